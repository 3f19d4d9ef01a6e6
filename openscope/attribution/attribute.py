"""Attribution: the direct linear effects between a prompt's nodes in its local replacement model.

Nodes (ordered as circuit-tracer orders them, `graph.NodeLayout`): every latent active on the prompt
(layer, position, latent), one error node per layer and position, one token-embedding node per
position, and the top next-token logits covering `logit_probability` of the probability (at most
`max_logits`). A **logit target** is the logit minus the mean logit over the vocabulary, read from the
final norm's output (before any logit soft-capping): (W_U[t] − mean_v W_U[v]) · h.

Edges. The replacement model (`replacement.ReplacementModel`) is linear in its sources, so the direct
effect of source s on target t is A[t, s] = ∂(target t) / ∂(s's output) · (s's output):

- a latent's output is a·d (activation times decoder row; a CLT latent writes to every later layer's
  MLP output, and the contraction sums over them), an error node's is ε, a token's its embedding;
- a latent target's value is its encoder pre-activation z = W_enc · x + b at its layer's MLP input x.

So adding δ to a source latent's activation changes target t's pre-activation (or logit target) by
exactly A[t, s]·δ/a in the replacement model (and scaling a token or error vector by 1 + δ changes it by
A[t, s]·δ) — the check the tests make. "Direct" means through the frozen residual stream only: every
other latent is held at its clean activation, so paths through other latents are separate edges.

Each row A[t, :] is one backward pass: inject the target's read-out vector at its site and contract the
gradients at every source with the sources' output vectors. Rows are computed in batches, as circuit-
tracer does: the replacement model runs once on B copies of the prompt, copy b carries target b, and
one backward gives B rows. With `max_feature_nodes` below the number of active latents, latents are
attributed in order of their (partial) influence on the logits, recomputed as rows arrive, and only
those attributed become graph nodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from openscope.attribution.graph import NodeLayout, influence_from_rows, normalize_rows
from openscope.attribution.replacement import (
    ActiveFeatures,
    FrozenRun,
    LayerSlot,
    ReplacementModel,
)
from openscope.coders.dictionary import Dictionary
from openscope.errors import OpenscopeError
from openscope.models.load import LoadedModel
from openscope.models.tokens import prompt_ids

log = logging.getLogger(__name__)


class AttributionGraph(NamedTuple):
    """An unpruned attribution graph: the adjacency matrix and what its nodes are."""

    prompt: str
    """The prompt text (without the BOS the tokenisation adds)."""
    input_ids: Tensor
    """[T] the token ids attributed (BOS first)."""
    slots: tuple[LayerSlot, ...]
    """Per model layer, the dictionary (and its layer) that replaced the MLP."""
    features: Tensor
    """[n, 3] (layer, position, latent within the layer) of each feature node, sorted."""
    activations: Tensor
    """[n] each feature node's activation."""
    logit_ids: Tensor
    """[k] token id of each logit node, most probable first."""
    logit_probs: Tensor
    """[k] their next-token probabilities."""
    adjacency: Tensor
    """[N, N] direct effects, rows targets and columns sources, nodes in `layout` order."""
    layout: NodeLayout
    """How many feature, error, token and logit nodes there are."""
    n_active: int
    """Latents active on the prompt (more than the feature nodes when max_feature_nodes cut them)."""
    seconds: float
    """Wall time of the attribution."""

    @property
    def n_layers(self) -> int:
        return len(self.slots)

    @property
    def n_tokens(self) -> int:
        return self.layout.n_tokens


def top_logits(logits: Tensor, max_logits: int, probability: float) -> tuple[Tensor, Tensor]:
    """(ids, probs) of the fewest most probable tokens whose probabilities sum to `probability`, at most
    `max_logits` of them."""
    if max_logits < 1:
        raise OpenscopeError(f"max_logits must be at least 1, got {max_logits}")
    if not 0.0 < probability <= 1.0:
        raise OpenscopeError(f"the logit probability to cover must be in (0, 1], got {probability}")
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = probs.topk(min(max_logits, probs.numel()))
    cut = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(probability, dtype=top_p.dtype))) + 1
    return top_i[:cut], top_p[:cut]


class _LayerReadout(NamedTuple):
    """The feature columns of one source layer, laid out for one batched product per batch."""

    start: int
    """First feature column of the layer (features are sorted by layer)."""
    end: int
    """One past its last."""
    writes: range
    """Model layers its latents write (a CLT: this one and every later one)."""
    positions: Tensor
    """[n] token position of each feature."""
    slots: Tensor
    """[n] each feature's column in its position's block of `decoders`."""
    decoders: Tensor
    """[T, K·d, c] per position, the activation-scaled decoder rows a·d of its features, concatenated
    over the K layers written, zero-padded to the layer's most crowded position (c latents)."""


class _Readout:
    """Turns the gradients at every source into attribution-row entries (source output · gradient)."""

    def __init__(self, rm: ReplacementModel, features: ActiveFeatures, n_logits: int) -> None:
        self.n_features = features.count
        self.n_layers, self.n_tokens = rm.n_layers, rm.n_tokens
        self.n_cols = self.n_features + (self.n_layers + 1) * self.n_tokens + n_logits
        self.errors = rm.errors
        self.embeddings = rm.clean.embeddings
        self.layers: list[_LayerReadout] = []
        with torch.no_grad():
            for layer, slot in enumerate(rm.slots):
                sel = (features.layer == layer).nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                first = slot.dictionary.site_out.layer
                latents = features.latent[sel].to(slot.coder.w_enc.device)
                rows = [slot.coder.decoder_vectors(slot.index, m - first, latents) for m in slot.writes]
                scaled = (torch.cat(rows, dim=1) * features.activation[sel, None].to(rows[0])).to(
                    self.embeddings
                )
                positions = features.position[sel].cpu()
                counts = torch.bincount(positions, minlength=self.n_tokens)
                starts = torch.cumsum(counts, 0) - counts
                slots = torch.arange(len(sel)) - starts[positions]  # rank within its position (sorted)
                decoders = scaled.new_zeros(self.n_tokens, int(counts.max()), scaled.shape[1])
                decoders[positions, slots] = scaled
                start = int(sel[0])
                self.layers.append(
                    _LayerReadout(
                        start, start + len(sel), slot.writes, positions, slots, decoders.transpose(1, 2)
                    )
                )

    @torch.no_grad()
    def rows(self, grads: Sequence[Tensor], n_rows: int, below: int) -> Tensor:
        """[n_rows, n_cols] row entries from the gradients at the probes ([0] embeddings, [1 + m] MLP outputs).

        below: the gradients at MLP outputs of layers ≥ below are zero (no target reads above it), so
        latents there, and the parts of a CLT latent's decoder writing there, are skipped.
        """
        n, n_layers, t = self.n_features, self.n_layers, self.n_tokens
        out = torch.zeros(n_rows, self.n_cols, dtype=torch.float32)
        # [T, b, L, d]: for a source layer, the gradients at every layer it writes are one view per position.
        g = torch.stack([gm[:n_rows].transpose(0, 1) for gm in grads[1:]], dim=2)
        d = g.shape[-1]
        for r in self.layers:
            stop = min(r.writes.stop, below)
            if stop <= r.writes.start:
                continue
            k = stop - r.writes.start
            per_position = torch.bmm(
                g[:, :, r.writes.start : stop].reshape(t, n_rows, -1), r.decoders[:, : k * d]
            )
            out[:, r.start : r.end] = per_position[r.positions, :, r.slots].t().float().cpu()
        errors = torch.einsum("tbld,ltd->blt", g, self.errors).reshape(n_rows, -1)
        out[:, n : n + n_layers * t] = errors.float().cpu()
        tokens = torch.einsum("btd,td->bt", grads[0][:n_rows], self.embeddings)
        out[:, n + n_layers * t : n + (n_layers + 1) * t] = tokens.float().cpu()
        return out


class _RowStore:
    """The attribution rows computed so far, and (when latents are ranked) their normalised |values|."""

    def __init__(self, n_rows: int, n_cols: int, ranking: bool) -> None:
        self.rows = torch.zeros(n_rows, n_cols)
        self.nodes = torch.zeros(n_rows, dtype=torch.long)
        """Node (column index) each row belongs to."""
        self.ranking = ranking
        self.normalised = torch.zeros_like(self.rows) if ranking else None
        self.filled = 0

    def add(self, block: Tensor, nodes: Tensor) -> None:
        end = self.filled + len(nodes)
        self.rows[self.filled : end] = block
        self.nodes[self.filled : end] = nodes
        if self.normalised is not None:
            self.normalised[self.filled : end] = normalize_rows(block)
        self.filled = end

    def influence(self, seed: Tensor) -> Tensor:
        """Every node's influence on the logits through the rows so far (circuit-tracer's partial influence)."""
        assert self.normalised is not None
        return influence_from_rows(self.normalised[: self.filled], self.nodes[: self.filled], seed)


def backward_rows(
    run: FrozenRun, n_layers: int, layers: Tensor, positions: Tensor, vectors: Tensor
) -> list[Tensor]:
    """Gradients at the probes for targets read at (layer, position) with `vectors` (layer n_layers: the
    final norm's output), target b in copy b; one backward pass for all of them."""
    total = torch.zeros((), dtype=run.final.dtype, device=run.final.device)
    rows = torch.arange(len(layers))
    for layer in layers.unique().tolist():
        sel = (layers == layer).nonzero().squeeze(1)
        site = run.final if layer == n_layers else run.mlp_in[layer]
        picked = site[rows[sel].to(site.device), positions[sel].to(site.device)]
        total = total + (picked * vectors[sel].to(picked)).sum()
    grads = torch.autograd.grad(total, run.probes, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, run.probes, strict=True)]


def _prompt(loaded: LoadedModel, prompt: str | Tensor, max_tokens: int) -> tuple[str, Tensor]:
    """(text, ids [T]) of a prompt given as text (BOS is prepended) or token ids; refuses a long one."""
    if isinstance(prompt, str):
        if not prompt:
            raise OpenscopeError("the prompt is empty")
        text, ids = prompt, prompt_ids(loaded.tokenizer, prompt)[0]
    else:
        ids = prompt.reshape(-1)
        text = loaded.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    if ids.numel() > max_tokens:
        raise OpenscopeError(
            f"the prompt is {ids.numel()} tokens (with BOS), more than max_tokens={max_tokens}: the graph grows "
            "with the square of its nodes; shorten the prompt or raise --max-tokens"
        )
    return text, ids


def _adjacency(store: _RowStore, selected: Tensor, layout_cols: NodeLayout) -> tuple[NodeLayout, Tensor]:
    """(layout, adjacency [N, N]) of the graph keeping the `selected` latents: the store's logit rows (its
    first k) and the selected latents' rows, restricted to the columns of the nodes kept; `layout_cols`
    is the layout of the store's columns (every active latent)."""
    n, k, filled = layout_cols.n_features, layout_cols.n_logits, store.filled
    layout = NodeLayout(len(selected), layout_cols.n_errors, layout_cols.n_tokens, k)
    columns = torch.cat([selected, torch.arange(n, layout_cols.n_nodes)])
    adjacency = torch.zeros(layout.n_nodes, layout.n_nodes)
    row_of = torch.full((n,), -1, dtype=torch.long)
    row_of[store.nodes[k:filled]] = torch.arange(k, filled)
    adjacency[: layout.n_features] = store.rows[row_of[selected]][:, columns]
    adjacency[layout.logits] = store.rows[:k][:, columns]
    return layout, adjacency


def attribute(
    loaded: LoadedModel,
    dictionaries: Sequence[Dictionary],
    prompt: str | Tensor,
    *,
    max_logits: int = 10,
    logit_probability: float = 0.95,
    batch_size: int = 32,
    max_feature_nodes: int | None = None,
    max_tokens: int = 64,
    update_interval: int = 4,
    progress: bool = False,
) -> AttributionGraph:
    """The attribution graph of a prompt (module docstring) in the replacement model of `dictionaries`.

    prompt: text (BOS is prepended) or token ids [T] / [1, T]; max_logits / logit_probability: which
    logits become nodes; batch_size: rows per backward pass (and copies of the prompt in the forward);
    max_feature_nodes: attribute at most this many latents, the most influential first (None: all);
    max_tokens: refuse longer prompts (the graph grows with the square of its nodes); update_interval:
    batches between re-rankings when max_feature_nodes cuts.
    """
    start_time = time.perf_counter()
    if batch_size < 1:
        raise OpenscopeError(f"batch_size must be at least 1, got {batch_size}")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise OpenscopeError(f"max_feature_nodes must be non-negative, got {max_feature_nodes}")
    text, ids = _prompt(loaded, prompt, max_tokens)
    rm = ReplacementModel(loaded, dictionaries, ids)
    n_layers, t = rm.n_layers, rm.n_tokens
    active = rm.active()
    n = active.count
    budget = n if max_feature_nodes is None else min(n, max_feature_nodes)
    logit_ids, logit_probs = top_logits(rm.clean.logits, max_logits, logit_probability)
    k = len(logit_ids)
    layout_cols = NodeLayout(n, n_layers * t, t, k)
    log.info("%d latents active on %d tokens; attributing %d of them and %d logits", n, t, budget, k)

    readout = _Readout(rm, active, k)
    encoders = rm.encoder_vectors(active)
    unembed = getattr(loaded.arch.lm_head, "weight", None)
    if not isinstance(unembed, Tensor):
        raise OpenscopeError(f"cannot find the unembedding of {loaded.name}")
    with torch.no_grad():
        logit_vectors = (unembed[logit_ids.to(unembed.device)] - unembed.mean(0)).detach()
    run = rm.run(batch=max(1, min(batch_size, max(k, budget))), grad=True)
    batch = run.final.shape[0]
    store = _RowStore(k + budget, layout_cols.n_nodes, ranking=budget < n)
    bar = tqdm(total=k + budget, desc="attribution rows", unit="row", disable=not progress)
    for i in range(0, k, batch):
        j = min(i + batch, k)
        layers = torch.full((j - i,), n_layers)
        grads = backward_rows(run, n_layers, layers, torch.full((j - i,), t - 1), logit_vectors[i:j])
        store.add(
            readout.rows(grads, j - i, below=n_layers),
            torch.arange(layout_cols.logits.start + i, layout_cols.logits.start + j),
        )
        bar.update(j - i)
    visited = torch.zeros(n, dtype=torch.bool)
    seed = torch.zeros(layout_cols.n_nodes)
    seed[layout_cols.logits] = logit_probs.float().cpu()
    while store.filled - k < budget:
        if not store.ranking:
            pending = torch.arange(n)
        else:
            # Rank the unvisited latents by their influence through the rows computed so far; re-rank
            # after a queue that grows with the graph (a ranking is a pass over all rows per path length).
            ranked = store.influence(seed)[:n].argsort(descending=True)
            done = store.filled - k
            pending = ranked[~visited[ranked]][: min(max(update_interval * batch, done // 4), budget - done)]
            # Batches of similar layers cost less (the readout skips layers above the batch's targets).
            pending = pending[active.layer[pending].argsort(stable=True)]
        for chunk in pending.split(batch):
            layers = active.layer[chunk]
            grads = backward_rows(run, n_layers, layers, active.position[chunk], encoders[chunk])
            store.add(readout.rows(grads, len(chunk), below=int(layers.max())), chunk)
            visited[chunk] = True
            bar.update(len(chunk))
    bar.close()
    del run  # the autograd graph of the batched forward
    store.normalised = None
    selected = visited.nonzero().squeeze(1)
    layout, adjacency = _adjacency(store, selected, layout_cols)
    features = torch.stack(
        [active.layer[selected], active.position[selected], active.latent[selected]], dim=1
    )
    seconds = time.perf_counter() - start_time
    log.info("attributed %d rows in %.1f s", store.filled, seconds)
    return AttributionGraph(
        prompt=text,
        input_ids=ids.cpu(),
        slots=rm.slots,
        features=features.cpu(),
        activations=active.activation[selected].float().cpu(),
        logit_ids=logit_ids.cpu(),
        logit_probs=logit_probs.cpu(),
        adjacency=adjacency,
        layout=layout,
        n_active=n,
        seconds=seconds,
    )
