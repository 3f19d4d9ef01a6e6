"""Graph files: prune an attribution graph and write it as JSON in the graph schema (`schema.GraphFile`).

`graph_file` turns an unpruned `AttributionGraph` into the document viewers read (pruned by influence,
with the metrics), `save_graph` writes it atomically and `load_graph` reads and validates one (ours or
circuit-tracer's). Like circuit-tracer, openscope writes `prompt` as the decoded token ids (BOS
included) and `scan` as the transcoders' identity (`scan_of`); the model is `metadata.openscope.model`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

import openscope
from openscope.attribution.attribute import AttributionGraph
from openscope.attribution.foreign import settle_node_ids
from openscope.attribution.graph import GraphScores, PruneResult, graph_scores, nodes_for_fraction, prune
from openscope.attribution.schema import (
    GenerationSettings,
    GraphDictionary,
    GraphFile,
    GraphGenerator,
    GraphInfo,
    GraphLink,
    GraphMetadata,
    GraphMetrics,
    GraphNode,
    OpenscopeGraphInfo,
    PruningSettings,
    QParams,
)
from openscope.errors import OpenscopeError
from openscope.files import write_text
from openscope.models.tokens import token_pieces

log = logging.getLogger(__name__)


def cantor_pair(x: int, y: int) -> int:
    """The Cantor pairing of two non-negative integers (circuit-tracer's feature id of (layer, latent))."""
    return (x + y) * (x + y + 1) // 2 + y


def scan_of(graph: AttributionGraph) -> str:
    """The graph's `scan`: what circuit-tracer and Neuronpedia key a graph's transcoders by. openscope
    writes the dictionaries' folder (absolute; the folder holding them when there are several), or their
    names joined by '+' when some live in memory only."""
    dictionaries = list({id(s.dictionary): s.dictionary for s in graph.slots}.values())
    folders = [d.folder for d in dictionaries]
    if any(f is None for f in folders):
        return "+".join(d.name for d in dictionaries)
    paths = [str(Path(f).resolve()) for f in folders if f is not None]
    return paths[0] if len(paths) == 1 else os.path.commonpath(paths)


def _dictionaries(graph: AttributionGraph) -> list[GraphDictionary]:
    out: dict[str, GraphDictionary] = {}
    for layer, slot in enumerate(graph.slots):
        d = slot.dictionary
        if d.name in out:
            out[d.name].layers.append(layer)
            continue
        out[d.name] = GraphDictionary(
            name=d.name,
            folder=str(d.folder) if d.folder is not None else None,
            kind=d.coder.kind,  # type: ignore[arg-type]  # never an SAE: the replacement refuses them
            layers=[layer],
            width=slot.width,
        )
    return list(out.values())


def _nodes(graph: AttributionGraph, result: PruneResult, pieces: dict[int, str]) -> dict[int, GraphNode]:
    """The kept nodes by index in the adjacency."""
    layout, t = graph.layout, graph.n_tokens
    ids = graph.input_ids.tolist()
    logit_layer = str(graph.n_layers + 1)
    nodes: dict[int, GraphNode] = {}
    for i in result.node_mask.nonzero().squeeze(1).tolist():
        influence = float(result.cumulative[i])
        if i < layout.n_features:
            layer, pos, latent = graph.features[i].tolist()
            slot = graph.slots[layer]
            nodes[i] = GraphNode(
                node_id=f"{layer}_{latent}_{pos}",
                feature=cantor_pair(layer, latent),
                layer=str(layer),
                ctx_idx=pos,
                feature_type="cross layer transcoder",
                jsNodeId=f"{layer}_{latent}-0",
                influence=influence,
                activation=float(graph.activations[i]),
                dictionary=slot.dictionary.name,
                latent=slot.latent_offset + latent,
            )
        elif i < layout.tokens.start:
            layer, pos = divmod(i - layout.n_features, t)
            nodes[i] = GraphNode(
                node_id=f"{layer}_-1_{pos}",
                feature=-1,
                layer=str(layer),
                ctx_idx=pos,
                feature_type="mlp reconstruction error",
                jsNodeId=f"{layer}_{pos}-0",
                influence=influence,
            )
        elif i < layout.logits.start:
            pos = i - layout.tokens.start
            token_id = ids[pos]
            nodes[i] = GraphNode(
                node_id=f"E_{token_id}_{pos}",
                feature=pos,
                layer="E",
                ctx_idx=pos,
                feature_type="embedding",
                jsNodeId=f"E_{token_id}-{pos}",
                influence=influence,
                token=pieces[token_id],
                token_id=token_id,
            )
        else:
            r = i - layout.logits.start
            token_id = int(graph.logit_ids[r])
            prob = float(graph.logit_probs[r])
            nodes[i] = GraphNode(
                node_id=f"{logit_layer}_{token_id}_{t - 1}",
                feature=token_id,
                layer=logit_layer,
                ctx_idx=t - 1,
                feature_type="logit",
                token_prob=prob,
                is_target_logit=r == 0,
                jsNodeId=f"L_{token_id}-{t - 1}",
                clerp=f'Output "{pieces[token_id]}" (p={prob:.3f})',
                token=pieces[token_id],
                token_id=token_id,
            )
    return nodes


def graph_file(
    graph: AttributionGraph,
    *,
    model: str,
    tokenizer: Any,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    slug: str = "graph",
    generation: GenerationSettings | None = None,
) -> GraphFile:
    """Prune the graph (`graph.prune`) and build its JSON document with metrics (`schema.GraphFile`)."""
    result = prune(graph.adjacency, graph.layout, graph.logit_probs, node_threshold, edge_threshold)
    scores: GraphScores = graph_scores(graph.adjacency, graph.layout, graph.logit_probs)
    pieces = token_pieces(tokenizer, sorted(set(graph.input_ids.tolist()) | set(graph.logit_ids.tolist())))
    nodes = _nodes(graph, result, pieces)
    targets, sources = result.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [
        GraphLink(source=nodes[s].node_id, target=nodes[t].node_id, weight=w)
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
        if s in nodes and t in nodes
    ]
    linked = {link.source for link in links} | {link.target for link in links}
    used = [n for n in nodes.values() if n.node_id in linked or n.feature_type in ("embedding", "logit")]
    layout = graph.layout
    metrics = GraphMetrics(
        replacement_score=scores.replacement,
        completeness_score=scores.completeness,
        n_active_features=graph.n_active,
        n_feature_nodes=layout.n_features,
        n_error_nodes=layout.n_errors,
        n_token_nodes=layout.n_tokens,
        n_logit_nodes=layout.n_logits,
        n_nodes=len(used),
        n_links=len(links),
        n_edges=int(torch.count_nonzero(graph.adjacency)),
        nodes_for_80_percent=nodes_for_fraction(result.influence, 0.8),
        logit_probability=float(graph.logit_probs.sum()),
        seconds=graph.seconds,
    )
    dictionaries = _dictionaries(graph)
    ids = graph.input_ids.tolist()
    metadata = GraphMetadata(
        slug=slug,
        scan=scan_of(graph),
        transcoder_list=[d.name for d in dictionaries],
        prompt_tokens=[pieces[i] for i in ids],
        prompt=tokenizer.decode(ids),  # BOS included, as circuit-tracer writes it
        node_threshold=node_threshold,
        info=GraphInfo(
            generator=GraphGenerator(name="openscope", version=openscope.__version__),
            create_time_ms=time.time() * 1000,
        ),
        generation_settings=generation,
        pruning_settings=PruningSettings(node_threshold=node_threshold, edge_threshold=edge_threshold),
        openscope=OpenscopeGraphInfo(
            model=model, prompt_token_ids=ids, dictionaries=dictionaries, metrics=metrics
        ),
    )
    return GraphFile(metadata=metadata, qParams=QParams(), nodes=used, links=links)


def save_graph(document: GraphFile, path: str | Path) -> Path:
    """Write a graph file atomically (temporary file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, document.model_dump_json(), sync=False)
    log.info("wrote graph %s (%d nodes, %d links)", path, len(document.nodes), len(document.links))
    return path


def load_graph(path: str | Path) -> GraphFile:
    """Read and validate a graph file (ours or circuit-tracer's: its error nodes are renamed so that
    node ids are unique, `foreign.settle_node_ids`)."""
    path = Path(path)
    if not path.is_file():
        raise OpenscopeError(f"no graph file at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OpenscopeError(f"{path} is not a graph file: Invalid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise OpenscopeError(f"{path} is not a graph file: Invalid JSON: not UTF-8 text") from None
    if isinstance(data, dict):
        settle_node_ids(data)
    try:
        return GraphFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise OpenscopeError(f"{path} is not a graph file: {where}: {first.get('msg', exc)}") from None
