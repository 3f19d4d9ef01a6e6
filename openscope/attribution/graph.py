"""Attribution-graph math on the adjacency matrix: influence, pruning and the graph's quality scores.

Pure functions on tensors (no model). The conventions are circuit-tracer's (safety-research/
circuit-tracer, `graph.py`), so graphs prune and score the same way there and here:

- The adjacency matrix A is square over all nodes, **rows are targets, columns are sources**:
  A[t, s] is the direct linear effect of source s on target t (see `openscope.attribution.attribute`).
- Nodes are ordered [features, error nodes, token embeddings, logits] (`NodeLayout`).
- Influence. Normalise the absolute weights per target row, Â[t, s] = |A[t, s]| / Σ_s' |A[t, s']|
  (the share of t's total input that comes from s). Seed the logit nodes with their probabilities w
  and sum over paths of every length: influence = w Â + w Â² + … = w ((I − Â)⁻¹ − I). Â is
  nilpotent (edges only go forward through layers, so any path is at most n_layers + 2 long), so the
  series ends and is computed by repeated vector-matrix products instead of an inverse.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from openscope.errors import OpenscopeError

ROW_EPS = 1e-10
"""Smallest row sum when normalising rows (rows of zeros stay zeros)."""


class NodeLayout(NamedTuple):
    """How many nodes of each kind a graph has; they are ordered features, errors, tokens, logits."""

    n_features: int
    """Feature (active latent) nodes."""
    n_errors: int
    """Error nodes (n_layers × n_tokens: layer-major, then position)."""
    n_tokens: int
    """Token-embedding nodes (one per prompt position)."""
    n_logits: int
    """Logit nodes (the chosen top next-token logits, most probable first)."""

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens + self.n_logits

    @property
    def errors(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def tokens(self) -> slice:
        start = self.n_features + self.n_errors
        return slice(start, start + self.n_tokens)

    @property
    def logits(self) -> slice:
        return slice(self.n_nodes - self.n_logits, self.n_nodes)


def normalize_rows(matrix: Tensor) -> Tensor:
    """|A| with each row divided by its sum (the share of a target's input from each source)."""
    a = matrix.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=ROW_EPS)


def influence_from_rows(rows: Tensor, row_nodes: Tensor, seed: Tensor, max_iter: int = 1000) -> Tensor:
    """Σ_{k≥1} seed · Âᵏ for the matrix Â whose row `row_nodes[i]` is `rows[i]` and whose other rows are 0.

    rows: [r, n] normalised rows (`normalize_rows`); row_nodes: [r] the node each row belongs to; seed:
    [n] the starting weights (logit probabilities on logit nodes). With every row given (row_nodes =
    0..n−1) this is the influence of every node on the seeded ones; with some rows missing it is
    circuit-tracer's partial influence, which ranks nodes before their own rows are computed.
    """
    total = torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
    current = seed.to(rows.dtype)
    for _ in range(max_iter):
        current = current[row_nodes] @ rows
        if not bool(current.any()):
            return total
        total += current
    raise OpenscopeError(
        f"influence did not converge after {max_iter} steps: the graph has a cycle (edges must go forward)"
    )


def target_rows(adjacency: Tensor) -> Tensor:
    """Indices of the rows with any edge (an attribution graph's features and logits; error and token
    nodes have no inputs): the math below runs on those rows only, so a long prompt's graph is not
    copied whole."""
    return adjacency.any(dim=1).nonzero().squeeze(1)


def node_influence(adjacency: Tensor, seed: Tensor) -> Tensor:
    """[n] each node's total influence on the seeded nodes (module docstring), from the raw adjacency."""
    rows = target_rows(adjacency)
    return influence_from_rows(normalize_rows(adjacency[rows]), rows, seed)


def logit_seed(layout: NodeLayout, logit_probs: Tensor) -> Tensor:
    """[n_nodes] zeros with the logit probabilities on the logit nodes."""
    seed = torch.zeros(layout.n_nodes, dtype=torch.float32)
    seed[layout.logits] = logit_probs.float().cpu()
    return seed


def count_below(cumulative: Tensor, value: float) -> int:
    """How many entries of the non-decreasing `cumulative` lie below `value` (searchsorted, left), the
    value taken in the sequence's dtype and on its device."""
    target = torch.tensor(value, dtype=cumulative.dtype, device=cumulative.device)
    return int(torch.searchsorted(cumulative, target))


def find_threshold(scores: Tensor, fraction: float) -> Tensor:
    """The score s such that keeping every score ≥ s keeps (just over) `fraction` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=ROW_EPS)
    return ordered[min(count_below(cumulative, fraction), len(ordered) - 1)]


def cumulative_influence(influence: Tensor) -> Tensor:
    """[n] for each node, the fraction of all influence held by it and every node more influential than
    it (small = important; circuit-tracer's `influence` field, which viewers prune by)."""
    ordered, order = influence.sort(descending=True)
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=ROW_EPS)
    out = torch.zeros_like(influence)
    out[order] = cumulative
    return out


class PruneResult(NamedTuple):
    """Which nodes and edges survive pruning."""

    node_mask: Tensor
    """[n] bool: kept nodes."""
    edge_mask: Tensor
    """[n, n] bool: kept edges (rows targets, columns sources, like the adjacency)."""
    influence: Tensor
    """[n] each node's influence on the logits (unpruned graph)."""
    cumulative: Tensor
    """[n] `cumulative_influence` of each node."""


def prune(
    adjacency: Tensor,
    layout: NodeLayout,
    logit_probs: Tensor,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """Keep the nodes holding `node_threshold` of the influence on the logits, then the edges holding
    `edge_threshold` of the influence among them; tokens and logits are always kept.

    After the edge cut, feature and error nodes with no kept outgoing edge and features with no kept
    incoming edge are dropped, repeatedly (dropping one can strand another), as circuit-tracer does.
    Edge influence: a kept edge s → t scores Â'[t, s] · (influence of t + its logit weight), Â' the
    row-normalised adjacency among the kept nodes.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise OpenscopeError(f"{name} must be between 0 and 1, got {value}")
    n = layout.n_nodes
    if adjacency.shape != (n, n):
        raise OpenscopeError(f"adjacency is {list(adjacency.shape)} but the layout has {n} nodes")
    adjacency = adjacency.float()
    seed = logit_seed(layout, logit_probs).to(adjacency.device)
    rows = target_rows(adjacency)
    influence = influence_from_rows(normalize_rows(adjacency[rows]), rows, seed)
    node_mask = influence >= find_threshold(influence, node_threshold)
    always = layout.n_features + layout.n_errors  # tokens and logits from here on
    node_mask[always:] = True

    pruned = adjacency[rows]  # the rows with edges (a copy): every other row is zero
    pruned[~node_mask[rows]] = 0
    pruned[:, ~node_mask] = 0
    normalised = normalize_rows(pruned)
    edge_scores = normalised * (influence_from_rows(normalised, rows, seed) + seed)[rows, None]
    kept = edge_scores >= find_threshold(edge_scores, edge_threshold)
    kept &= pruned != 0
    del pruned, normalised, edge_scores
    edge_mask = torch.zeros(n, n, dtype=torch.bool, device=adjacency.device)
    edge_mask[rows] = kept

    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:always] &= edge_mask[:, :always].any(0)  # features and errors must feed something
        node_mask[: layout.n_features] &= edge_mask[: layout.n_features].any(1)  # features need an input
        if torch.equal(node_mask, before):
            break
    return PruneResult(node_mask, edge_mask, influence, cumulative_influence(influence))


class GraphScores(NamedTuple):
    """How much of the model's computation the graph explains through features (circuit-tracer's scores)."""

    replacement: float
    """Replacement score: of the influence on the logits that starts at the graph's sources (token
    embeddings and error nodes), the fraction starting at tokens, i.e. flowing token → features → logits
    without passing through an error node. 1 = the features alone explain the output."""
    completeness: float
    """Completeness score: for every node, the fraction of its (normalised, absolute) input that comes
    from non-error nodes, averaged with weights (the node's influence on the logits + its logit weight).
    Partial credit: a node mostly explained by features counts mostly."""


def graph_scores(adjacency: Tensor, layout: NodeLayout, logit_probs: Tensor) -> GraphScores:
    """Replacement and completeness scores of an (unpruned) graph; see `GraphScores`."""
    adjacency = adjacency.float()
    seed = logit_seed(layout, logit_probs).to(adjacency.device)
    rows = target_rows(adjacency)
    normalised = normalize_rows(adjacency[rows])
    influence = influence_from_rows(normalised, rows, seed)
    token_influence = float(influence[layout.tokens].sum())
    error_influence = float(influence[layout.errors].sum())
    sources = token_influence + error_influence
    replacement = token_influence / sources if sources > 0 else 0.0
    non_error = torch.ones(layout.n_nodes, dtype=normalised.dtype, device=adjacency.device)
    non_error[rows] = 1 - normalised[:, layout.errors].sum(dim=1)
    weights = influence + seed
    completeness = float((non_error * weights).sum() / weights.sum().clamp(min=ROW_EPS))
    return GraphScores(replacement, completeness)


def nodes_for_fraction(influence: Tensor, fraction: float) -> int:
    """How many nodes, most influential first, hold `fraction` of the total influence."""
    ordered = influence.flatten().sort(descending=True).values
    total = float(ordered.sum())
    if total <= 0:
        return 0
    cumulative = ordered.cumsum(0) / total
    return min(count_below(cumulative, fraction) + 1, len(ordered))
