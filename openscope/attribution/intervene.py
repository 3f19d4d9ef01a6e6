"""Interventions from a graph: zero or scale feature nodes' latents and compare the next-token predictions.

A graph's feature node names a latent (its dictionary and index) at one token position. `intervene`
runs the graph's prompt through the real model twice, without and with the edits, and reports the top
next tokens and the graph's logit nodes before and after. The edits use the steering path
(`openscope.interventions.steer`, mode "multiply"): at the latent's output site(s) the model's own activation y becomes
y + (s − 1)·f(x)·d — the latent's activation f (recomputed from the live input, so edits upstream reach
it) scaled by s, its decoder row d, and everything else (the reconstruction error, other latents, the
rest of the model: attention, norms, MLPs) left live. s = 0 removes the latent. A cross-layer
transcoder latent is edited at every layer it writes to. Graphs written by circuit-tracer name no
dictionary: a feature node `{layer}_{latent}_{position}` is then the latent of the loaded dictionary
that reads that layer (`node_latent`), and the prompt is re-tokenized (`foreign.prompt_ids_of`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from openscope.attribution.foreign import display_prompt, prompt_ids_of
from openscope.attribution.schema import (
    FEATURE_TYPES,
    AppliedEdit,
    GraphFile,
    GraphNode,
    InterventionResult,
    LatentEdit,
    LogitChange,
    TokenProbability,
)
from openscope.coders.dictionary import Dictionary
from openscope.errors import OpenscopeError
from openscope.interventions.steer import Intervention, steering
from openscope.models.load import LoadedModel
from openscope.models.sites import Site
from openscope.models.tokens import token_pieces

log = logging.getLogger(__name__)

_COLON_FORM = re.compile(r"^(\d+):(\d+):(\d+)$")


def node_id_of(spec: str) -> str:
    """A feature node id from a graph node id (`{layer}_{latent}_{position}`) or `layer:position:latent`."""
    spec = spec.strip()
    if m := _COLON_FORM.match(spec):
        layer, position, latent = m.groups()
        return f"{layer}_{latent}_{position}"
    return spec


def parse_edit(spec: str, factor: float | None = None) -> LatentEdit:
    """A LatentEdit from `NODE` (with the given factor) or `NODE=FACTOR` (NODE: a node id or L:pos:latent)."""
    node, sep, value = spec.partition("=")
    if sep:
        try:
            factor = float(value)
        except ValueError:
            raise OpenscopeError(f"bad edit {spec!r}: the factor after '=' must be a number") from None
    if factor is None:
        raise OpenscopeError(f"bad edit {spec!r}: write NODE=FACTOR, e.g. 3_120_5=2 or 3:5:120=0.5")
    return LatentEdit(node_id=node_id_of(node), factor=factor)


def feature_node(document: GraphFile, node_id: str) -> GraphNode:
    """The graph's feature node with this id (clear errors for unknown or non-feature nodes)."""
    for node in document.nodes:
        if node.node_id == node_id:
            if node.feature_type != FEATURE_TYPES[0] and (node.dictionary is None or node.latent is None):
                raise OpenscopeError(
                    f"node {node_id} is a {node.feature_type} node; only feature (latent) nodes can be edited"
                )
            return node
    raise OpenscopeError(f"no node {node_id} in the graph (feature node ids are layer_latent_position)")


def node_latent(node: GraphNode, dictionaries: Mapping[str, Dictionary]) -> tuple[str, int]:
    """(dictionary name, latent index in it) of a feature node: as the node names them (openscope's
    files), else (circuit-tracer's, `{layer}_{latent in layer}_{position}`) the loaded dictionary that
    reads that layer's MLP input (a CLT numbers its layer i's latent j as i·width + j)."""
    if node.dictionary is not None and node.latent is not None:
        if node.dictionary not in dictionaries:
            known = ", ".join(sorted(dictionaries)) or "none"
            raise OpenscopeError(
                f"node {node.node_id} needs dictionary {node.dictionary!r}, which is not loaded ({known})"
            )
        return node.dictionary, node.latent
    layer, latent, _ = (int(x) for x in node.node_id.split("_"))
    for name, d in dictionaries.items():
        for i, site in enumerate(d.sites_in):
            if site == Site(layer, "mlp_in"):
                return name, i * d.coder.cfg.width + latent
    raise OpenscopeError(
        f"node {node.node_id} is a latent of layer {layer}; no loaded dictionary reads {layer}.mlp_in "
        "(pass the graph's transcoders with --dictionaries)"
    )


def _top(probs: Tensor, logits: Tensor, k: int, pieces: Mapping[int, str]) -> list[TokenProbability]:
    values, ids = probs.topk(k)
    return [
        TokenProbability(token=pieces[i], token_id=i, probability=float(p), logit=float(logits[i]))
        for p, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


@torch.inference_mode()
def intervene(
    loaded: LoadedModel,
    document: GraphFile,
    dictionaries: Mapping[str, Dictionary],
    edits: Sequence[LatentEdit],
    top_k: int = 10,
) -> InterventionResult:
    """Apply the edits together on the graph's prompt and compare next-token predictions (module docstring).

    dictionaries maps the graph's dictionary names (`GraphNode.dictionary`) to loaded dictionaries.
    """
    if not edits:
        raise OpenscopeError("no edits given: name feature nodes to zero or scale")
    if top_k < 1:
        raise OpenscopeError(f"top_k must be at least 1, got {top_k}")
    ids = prompt_ids_of(document, loaded.tokenizer).to(loaded.device)
    interventions, applied = [], []
    for edit in edits:
        node = feature_node(document, edit.node_id)
        name, latent = node_latent(node, dictionaries)
        interventions.append(
            Intervention(dictionaries[name], latent, "multiply", edit.factor, (node.ctx_idx,))
        )
        applied.append(
            AppliedEdit(
                node_id=node.node_id,
                dictionary=name,
                latent=latent,
                layer=int(node.layer),
                position=node.ctx_idx,
                factor=edit.factor,
                activation=node.activation,
            )
        )
    before = loaded.model(input_ids=ids, use_cache=False).logits[0, -1].float()
    with steering(loaded, interventions):
        after = loaded.model(input_ids=ids, use_cache=False).logits[0, -1].float()
    p_before, p_after = torch.softmax(before, -1), torch.softmax(after, -1)
    k = min(top_k, before.numel())
    graph_logits = [n for n in document.nodes if n.feature_type == "logit"]
    logit_ids = [int(n.token_id if n.token_id is not None else n.feature or 0) for n in graph_logits]
    shown = set(p_before.topk(k).indices.tolist()) | set(p_after.topk(k).indices.tolist()) | set(logit_ids)
    pieces = token_pieces(loaded.tokenizer, sorted(shown))
    return InterventionResult(
        prompt=display_prompt(document),
        edits=applied,
        top_before=_top(p_before, before, k, pieces),
        top_after=_top(p_after, after, k, pieces),
        graph_logits=[
            LogitChange(
                token=pieces[i],
                token_id=i,
                probability_before=float(p_before[i]),
                probability_after=float(p_after[i]),
                logit_before=float(before[i]),
                logit_after=float(after[i]),
            )
            for i in logit_ids
        ],
    )
