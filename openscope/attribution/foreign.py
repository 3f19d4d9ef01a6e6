"""Graph files written by circuit-tracer: their node ids made unique, their prompt turned back into tokens.

circuit-tracer (`frontend/graph_models.py`) names an error node `0_{layer}_{position}`, which is also
the id of the feature node of layer 0, latent `layer`, at that position (`{layer}_{latent}_{position}`):
a file holding both has two nodes with one id, and its links name that id without saying which node they
mean. openscope renames every error node to its own scheme `{layer}_-1_{position}` (no latent is -1) and
settles each link end that named a shared id:

- as a **target** it is the feature: error nodes have no inputs;
- as a **source** it is whichever node fits the file's order. circuit-tracer lists nodes in its node
  order (features, then errors, then tokens, then logits) and links target by target, each target's
  sources in that same order, so the sources of one target have increasing ranks in the node list: the
  shared id takes the earliest of its nodes that keeps them increasing (both when it appears twice for
  one target: the feature, then the error). A node that cannot reach the target (an error node feeds
  only later layers) is never chosen. Where both would still fit, the link goes to the feature node,
  and the number of such links is logged.

Its `prompt` is the decoded token ids, BOS included (`<bos>The capital of...`), and it records no ids:
`prompt_ids_of` tokenizes such a prompt without adding another BOS and checks the count against
`prompt_tokens`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import Tensor

from openscope.attribution.schema import GraphFile
from openscope.models.tokens import prompt_ids

log = logging.getLogger(__name__)

ERROR_TYPE = "mlp reconstruction error"
"""circuit-tracer's and openscope's feature_type of an error node."""


def error_node_id(layer: Any, position: Any) -> str:
    """openscope's id of the error node of a layer at a position."""
    return f"{layer}_-1_{position}"


def _layer(node: dict[str, Any]) -> float:
    """A node's layer as a number ('E', the embeddings, is below every layer)."""
    try:
        return float(node.get("layer", "E"))
    except (TypeError, ValueError):
        return -1.0


def _can_feed(source: dict[str, Any], target: dict[str, Any]) -> bool:
    """Whether an edge source -> target can exist: an error node feeds later layers only."""
    if source.get("feature_type") == ERROR_TYPE:
        return _layer(target) > _layer(source)
    return True


def settle_node_ids(data: dict[str, Any]) -> int:
    """Rename error nodes to `{layer}_-1_{position}` and point links at the nodes they meant (module
    docstring), in place; returns how many links could go to either node (given to the feature)."""
    nodes, links = data.get("nodes"), data.get("links")
    if not isinstance(nodes, list) or not isinstance(links, list):
        return 0
    if not all(isinstance(n, dict) and isinstance(n.get("node_id"), str) for n in nodes):
        return 0
    ranks: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        ranks.setdefault(node["node_id"], []).append(rank)
        if node.get("feature_type") == ERROR_TYPE and node["node_id"] != error_node_id(
            node.get("layer"), node.get("ctx_idx")
        ):
            node["node_id"] = error_node_id(node.get("layer"), node.get("ctx_idx"))
    if all(len(r) == 1 and nodes[r[0]]["node_id"] == old for old, r in ranks.items()):
        return 0  # nothing renamed: openscope's own files, or circuit-tracer's without error nodes
    unsettled = 0
    previous: tuple[Any, int] = (None, -1)  # (target id, rank of the previous link's source)
    for i, link in enumerate(links):
        if not isinstance(link, dict):
            continue
        target_ranks = ranks.get(str(link.get("target")), [])
        targets = [r for r in target_ranks if nodes[r].get("feature_type") != ERROR_TYPE] or target_ranks
        target = nodes[targets[0]] if targets else {}
        if targets:
            link["target"] = target["node_id"]
        sources = ranks.get(str(link.get("source")), [])
        options = [r for r in sources if not target or _can_feed(nodes[r], target)]
        if not options:
            continue
        floor = previous[1] if previous[0] == link.get("target") else -1
        later = [r for r in options if r > floor] or options
        nxt = links[i + 1] if i + 1 < len(links) and isinstance(links[i + 1], dict) else {}
        ceiling = (
            max(ranks.get(str(nxt.get("source")), [len(nodes)]))
            if nxt.get("target") == link["target"]
            else None
        )
        fitting = [r for r in later if ceiling is None or r < ceiling] or later
        unsettled += len(fitting) > 1
        chosen = fitting[0]
        link["source"] = nodes[chosen]["node_id"]
        previous = (link["target"], chosen)
    if unsettled:
        log.warning(
            "%d links of this circuit-tracer graph name an id shared by a feature and an error node and fit "
            "either: given to the feature node",
            unsettled,
        )
    return unsettled


def prompt_ids_of(document: GraphFile, tokenizer: Any) -> Tensor:
    """[1, T] the token ids of a graph's prompt: recorded by openscope, else re-tokenized (a prompt that
    starts with the tokenizer's BOS text, as circuit-tracer writes it, gets no second BOS)."""
    meta = document.metadata
    if meta.openscope is not None:
        return torch.tensor([meta.openscope.prompt_token_ids])
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos and meta.prompt.startswith(bos):
        ids = tokenizer(meta.prompt, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = prompt_ids(tokenizer, meta.prompt)
    if meta.prompt_tokens and ids.shape[1] != len(meta.prompt_tokens):
        log.warning(
            "the graph's prompt tokenizes to %d tokens here, the graph has %d: is this the graph's model?",
            ids.shape[1],
            len(meta.prompt_tokens),
        )
    return ids


def display_prompt(document: GraphFile) -> str:
    """The prompt without the BOS text circuit-tracer's files (and openscope's) begin with."""
    meta = document.metadata
    first = meta.prompt_tokens[0] if meta.prompt_tokens else ""
    if re.fullmatch(r"<[^<>\s]+>", first) and meta.prompt.startswith(first):
        return meta.prompt[len(first) :]
    return meta.prompt
