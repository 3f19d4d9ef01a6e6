"""Attribution graphs: trace a prompt's computation from tokens through transcoder latents to its logits.

- `replacement`: the prompt's local replacement model (MLPs replaced by transcoders or a CLT, attention
  patterns and norm scales frozen, error nodes added back) by hooks on the HF model.
- `attribute`: the direct linear effects between nodes (tokens, active latents, error nodes, top
  logits), by batched backward passes (`rows`: the passes, their read-out, the row store and its
  ranking); `memory`: the memory estimate made before the passes, and the limit.
- `graph`: influence, pruning, replacement and completeness scores (pure tensor math).
- `schema` / `io`: the graph JSON (circuit-tracer / Neuronpedia graph schema plus our metrics);
  `foreign`: circuit-tracer's own graph files (its colliding error-node ids, its `<bos>` prompts).
- `intervene`: zero or scale a graph's latents and compare the next-token predictions.
- `commands`: the `openscope attribute` / `openscope intervene` configs and runners.

```python
from openscope.attribution import attribute, graph_file, save_graph

graph = attribute(lm, transcoders, "The capital of France is")
save_graph(graph_file(graph, model=lm.name, tokenizer=lm.tokenizer), "graph.json")
```
"""

from openscope.attribution.attribute import AttributionGraph, attribute, top_logits
from openscope.attribution.commands import AttributeConfig, InterveneConfig, run_attribute, run_intervene
from openscope.attribution.graph import (
    GraphScores,
    NodeLayout,
    PruneResult,
    graph_scores,
    node_influence,
    prune,
)
from openscope.attribution.intervene import intervene
from openscope.attribution.io import graph_file, load_graph, save_graph
from openscope.attribution.replacement import ReplacementModel
from openscope.attribution.schema import GraphFile, InterventionRequest, InterventionResult, LatentEdit

__all__ = [
    "AttributeConfig",
    "AttributionGraph",
    "GraphFile",
    "GraphScores",
    "InterveneConfig",
    "InterventionRequest",
    "InterventionResult",
    "LatentEdit",
    "NodeLayout",
    "PruneResult",
    "ReplacementModel",
    "attribute",
    "graph_file",
    "graph_scores",
    "intervene",
    "load_graph",
    "node_influence",
    "prune",
    "run_attribute",
    "run_intervene",
    "save_graph",
    "top_logits",
]
