"""The attribution-graph contract: pydantic models for graph JSON files and graph interventions.

A graph file is the circuit-tracer / Neuronpedia graph format (Neuronpedia's `graph-schema.json`,
circuit-tracer's `frontend/graph_models.py`), so it loads in those viewers unchanged, plus openscope's
own additions in places those tools ignore (extra node fields, `metadata.openscope`):

- `metadata`: slug, scan (the transcoders), prompt, prompt_tokens, node_threshold, info (generator, time),
  generation_settings, pruning_settings, and `openscope` (`OpenscopeGraphInfo`: the model, prompt token
  ids, the dictionaries with their folders, the metrics: replacement and completeness scores, counts).
- `qParams`: the viewer's saved state (pinned nodes, supernodes, clicked node); empty when written.
- `nodes`: one per kept node. `node_id` (unique) is `{layer}_{latent}_{position}` for a feature (latent
  within its layer's encoder), `{layer}_-1_{position}` for an error node, `E_{token_id}_{position}` for
  a token embedding and `{n_layers + 1}_{token_id}_{position}` for a logit. `layer` is a string: the
  model layer, "E" for embeddings, n_layers + 1 for logits; `ctx_idx` the token position;
  `feature_type` one of FEATURE_TYPES; `influence` the node's cumulative influence (the fraction of all
  influence held by it and every more influential node: small = important; viewers prune nodes above a
  threshold); `activation` a feature's activation; `token_prob` a logit's probability. Feature nodes
  carry `dictionary` (a name in `metadata.openscope.dictionaries`) and `latent` (its index in that
  dictionary; a CLT numbers layer i's latents from i·width), which is what the explorer's feature
  page `#/feature/<dictionary>/<latent>` takes; `feature` is the Cantor pairing of (layer, latent in
  layer), circuit-tracer's id for a feature across layers.
- `links`: kept edges {source, target, weight}: the direct effect of source on target (the target's
  pre-activation, or its logit minus the mean logit, changes by weight × δ/a when the source latent's
  activation a changes by δ in the replacement model; see `openscope.attribution.attribute`).

`metadata.scan` is the transcoders' identity (circuit-tracer's meaning: an openscope file names the
dictionaries' folder) and `metadata.prompt` the decoded token ids, BOS included, in files of both tools.
`GraphFile` reads graphs written by circuit-tracer too (their extra fields are kept; `openscope` is None
then); `load_graph` first renames their error nodes, whose ids `0_{layer}_{position}` can equal a
feature node's, to `{layer}_-1_{position}` (`openscope.attribution.foreign`). Interventions on a graph (`openscope.attribution.intervene`) answer an `InterventionRequest` with
an `InterventionResult`. Names are stable: fields may be added (with defaults), never renamed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openscope.features.schema import RequestModel

GRAPH_SCHEMA_VERSION = 1
"""Version of openscope's graph additions (`OpenscopeGraphInfo.schema_version`)."""

FEATURE_TYPES = ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")
"""Node kinds, spelled as circuit-tracer and Neuronpedia spell them (their viewers key on these; a
per-layer transcoder's latents are "cross layer transcoder" nodes there too)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """Parts of the shared format: other tools may add fields, which are kept."""

    model_config = ConfigDict(extra="allow")


class GraphDictionary(_Strict):
    """A dictionary that replaced MLPs in the graph's replacement model."""

    name: str = Field(description="Name (feature nodes' `dictionary`; the explorer's DictionaryInfo.name).")
    folder: str | None = Field(default=None, description="Folder it was loaded from (None: in memory).")
    kind: Literal["transcoder", "skip_transcoder", "clt"] = Field(description="Kind of coder.")
    layers: list[int] = Field(description="Model layers whose MLP it replaced, in order.")
    width: int = Field(description="Latents per layer (a CLT's latent i·width + j is layer i's latent j).")


class GraphMetrics(_Strict):
    """How complete the graph is, and how big."""

    replacement_score: float = Field(
        description="Of the influence on the logits starting at tokens or error nodes, the fraction "
        "starting at tokens (flowing through features only). Unpruned graph."
    )
    completeness_score: float = Field(
        description="Influence-weighted mean over nodes of the fraction of each node's input that comes "
        "from non-error nodes. Unpruned graph."
    )
    n_active_features: int = Field(description="Latents active on the prompt.")
    n_feature_nodes: int = Field(description="Latents attributed (graph feature nodes before pruning).")
    n_error_nodes: int = Field(description="Error nodes before pruning (layers × positions).")
    n_token_nodes: int = Field(description="Token-embedding nodes.")
    n_logit_nodes: int = Field(description="Logit nodes.")
    n_nodes: int = Field(description="Nodes written (after pruning).")
    n_links: int = Field(description="Links written (after pruning).")
    n_edges: int = Field(description="Nonzero edges of the unpruned graph.")
    nodes_for_80_percent: int = Field(
        description="Fewest nodes (most influential first) holding 80% of the influence on the logits."
    )
    logit_probability: float = Field(description="Total probability of the logit nodes.")
    seconds: float = Field(description="Wall time of the attribution (seconds).")


class OpenscopeGraphInfo(_Strict):
    """openscope's additions to the graph metadata."""

    schema_version: int = Field(default=GRAPH_SCHEMA_VERSION, description="Version of these additions.")
    model: str = Field(description="The model (name, directory or hub id), as `openscope` loads it.")
    prompt_token_ids: list[int] = Field(description="Token ids of the prompt (BOS first).")
    dictionaries: list[GraphDictionary] = Field(description="The dictionaries of the replacement model.")
    metrics: GraphMetrics = Field(description="Scores and sizes.")
    feature_page: str = Field(
        default="#/feature/{dictionary}/{latent}",
        description="The explorer's route to a feature node's dashboard (fill in its dictionary and latent).",
    )


class GraphGenerator(_Open):
    name: str = Field(default="openscope", description="The graph generator.")
    version: str = Field(default="", description="Its version.")
    url: str = Field(default="", description="Where to find it.")


class GraphInfo(_Open):
    description: str = Field(default="", description="Free text.")
    generator: GraphGenerator = Field(default_factory=GraphGenerator, description="What made the graph.")
    create_time_ms: float | None = Field(default=None, description="Creation time, ms since the epoch.")


class GenerationSettings(_Open):
    max_n_logits: int = Field(description="Maximum number of logit nodes.")
    desired_logit_prob: float = Field(description="Cumulative probability the logit nodes cover (at most).")
    batch_size: int = Field(description="Rows per backward pass.")
    max_feature_nodes: int | None = Field(default=None, description="Cap on attributed latents (None: all).")
    freeze_skip_at_bos: bool | None = Field(
        default=None,
        description="openscope: skip-transcoders' skip term held constant at BOS/EOS/pad (False: live there, "
        "as in circuit-tracer; None: not recorded).",
    )


class PruningSettings(_Open):
    node_threshold: float = Field(description="Nodes kept: fewest holding this fraction of the influence.")
    edge_threshold: float = Field(
        description="Edges kept: fewest holding this fraction of the edge influence."
    )


class GraphMetadata(_Open):
    slug: str = Field(description="Short identifier of the graph (file stem).")
    scan: str = Field(
        description="The transcoders' identity (circuit-tracer's transcoder set; openscope: their folder)."
    )
    transcoder_list: list[str] = Field(default_factory=list, description="The dictionaries' names.")
    prompt_tokens: list[str] = Field(description="The prompt's tokens as text pieces (BOS first).")
    prompt: str = Field(description="The prompt text: the decoded token ids, BOS included.")
    node_threshold: float | None = Field(default=None, description="Default pruning threshold for viewers.")
    schema_version: int | None = Field(default=1, description="circuit-tracer's graph schema version.")
    info: GraphInfo | None = Field(default=None, description="Generator and time.")
    generation_settings: GenerationSettings | None = Field(default=None, description="Attribution settings.")
    pruning_settings: PruningSettings | None = Field(default=None, description="Pruning settings.")
    openscope: OpenscopeGraphInfo | None = Field(
        default=None, description="openscope's additions (None in graphs other tools wrote)."
    )


class QParams(_Open):
    pinnedIds: list[str] = Field(default_factory=list, description="Pinned node ids (subgraph).")
    supernodes: list[list[str]] = Field(default_factory=list, description="[label, node ids...] groups.")
    linkType: str = Field(default="both", description="Which links the viewer shows.")
    clickedId: str = Field(default="", description="The selected node id.")
    sg_pos: str = Field(default="", description="Subgraph node positions.")


class GraphNode(_Open):
    node_id: str = Field(description="Unique id (module docstring).")
    feature: int | None = Field(
        description="Feature id (Cantor pairing of layer and latent), -1 for errors, "
        "the position for embeddings, the token id for logits."
    )
    layer: str = Field(description="Model layer; 'E' for embeddings; n_layers + 1 for logits.")
    ctx_idx: int = Field(description="Token position.")
    feature_type: str = Field(description="One of FEATURE_TYPES.")
    token_prob: float = Field(default=0.0, description="A logit node's probability.")
    is_target_logit: bool = Field(default=False, description="The most probable logit.")
    run_idx: int = Field(default=0, description="circuit-tracer field (0).")
    reverse_ctx_idx: int = Field(default=0, description="circuit-tracer field (0).")
    jsNodeId: str = Field(description="The viewers' node key.")
    clerp: str = Field(default="", description="Label.")
    influence: float | None = Field(default=None, description="Cumulative influence (small = important).")
    activation: float | None = Field(default=None, description="A feature's activation.")
    dictionary: str | None = Field(default=None, description="A feature's dictionary name.")
    latent: int | None = Field(default=None, description="A feature's latent index in its dictionary.")
    token: str | None = Field(default=None, description="An embedding's or logit's token text.")
    token_id: int | None = Field(default=None, description="An embedding's or logit's token id.")


class GraphLink(_Open):
    source: str = Field(description="Source node_id.")
    target: str = Field(description="Target node_id.")
    weight: float = Field(description="Direct effect of source on target.")


class GraphFile(_Open):
    """A whole graph file (module docstring)."""

    metadata: GraphMetadata
    qParams: QParams = Field(default_factory=QParams)
    nodes: list[GraphNode]
    links: list[GraphLink]

    @model_validator(mode="after")
    def _links_join_nodes(self) -> GraphFile:
        ids = [n.node_id for n in self.nodes]
        known = set(ids)
        if len(known) != len(ids):
            raise ValueError("node_id values must be unique")
        for link in self.links:
            if link.source not in known or link.target not in known:
                raise ValueError(f"link {link.source} -> {link.target} names a node that is not in the graph")
        return self


# ---- interventions ---------------------------------------------------------------------------------


class LatentEdit(RequestModel):
    """Scale one feature node's latent (factor 0 zeroes it)."""

    node_id: str = Field(description="A feature node of the graph (`{layer}_{latent}_{position}`).")
    factor: float = Field(default=0.0, description="New activation = factor × the clean one (0: zero it).")


class InterventionRequest(RequestModel):
    """Edits to apply together on a graph's prompt."""

    edits: list[LatentEdit] = Field(description="The edits, applied in one forward.")
    top_k: int = Field(default=10, ge=1, le=100, description="How many top next tokens to list.")


class TokenProbability(_Strict):
    token: str = Field(description="The token's text piece.")
    token_id: int = Field(description="Its id.")
    probability: float = Field(description="Next-token probability.")
    logit: float = Field(description="Its logit.")


class AppliedEdit(_Strict):
    node_id: str = Field(description="The feature node.")
    dictionary: str = Field(description="Its dictionary.")
    latent: int = Field(description="Its latent index in the dictionary.")
    layer: int = Field(description="Model layer.")
    position: int = Field(description="Token position.")
    factor: float = Field(description="Scale applied to its activation.")
    activation: float | None = Field(default=None, description="Its clean activation (from the graph).")


class LogitChange(_Strict):
    token: str = Field(description="The token's text piece.")
    token_id: int = Field(description="Its id.")
    probability_before: float = Field(description="Probability without the edits.")
    probability_after: float = Field(description="Probability with the edits.")
    logit_before: float = Field(description="Logit without the edits.")
    logit_after: float = Field(description="Logit with the edits.")


class InterventionResult(_Strict):
    """Next-token predictions of the graph's prompt before and after the edits (real model, live)."""

    prompt: str = Field(description="The prompt.")
    edits: list[AppliedEdit] = Field(description="The edits applied.")
    top_before: list[TokenProbability] = Field(description="Top next tokens without the edits.")
    top_after: list[TokenProbability] = Field(description="Top next tokens with the edits.")
    graph_logits: list[LogitChange] = Field(description="The graph's logit nodes, before and after.")
