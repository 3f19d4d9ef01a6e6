"""Attribution rows: one backward pass gives a batch of rows, read out at every source and stored.

A row A[t, :] holds the direct effects of every source on target t (`openscope.attribution.attribute`).
`backward_rows` injects each target's read-out vector in its own copy of the batched replacement forward
and takes one backward pass; `Readout` contracts the gradients at the sources with the sources' output
vectors, writing straight into the `RowStore`, which keeps the rows, ranks the latents not yet
attributed by their partial influence on the logits, and finally assembles the adjacency matrix.

Work per batch is kept to what the batch's targets can reach: a target at layer l reads the MLP input
of layer l, so gradients exist only at the embeddings and the MLP outputs of layers below l; only those
probes are asked of autograd, and only the sources there are read out (the store's row is zero beyond,
as it was allocated).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.attribution.graph import ROW_EPS, NodeLayout
from openscope.attribution.replacement import ActiveFeatures, FrozenRun, ReplacementModel
from openscope.errors import OpenscopeError

INFLUENCE_CHUNK_BYTES = 256 * 2**20
"""Rows of the store are read this many bytes at a time when ranking (the |row| temporaries)."""


def backward_rows(
    run: FrozenRun, n_layers: int, layers: Tensor, positions: Tensor, vectors: Tensor
) -> list[Tensor]:
    """Gradients at the probes for targets read at (layer, position) with `vectors` (layer n_layers: the
    final norm's output), target b in copy b; one backward pass for all of them.

    Returns the gradients at the embedding probe and at the MLP-output probes of the layers below the
    highest target layer (1 + max(layers) tensors, fewer than `run.probes` when no target is a logit):
    no target reaches an MLP output at or above its own layer.
    """
    total = torch.zeros((), dtype=run.final.dtype, device=run.final.device)
    rows = torch.arange(len(layers), device=layers.device)
    for layer in layers.unique().tolist():
        sel = (layers == layer).nonzero().squeeze(1)
        site = run.final if layer == n_layers else run.mlp_in[layer]
        picked = site[rows[sel].to(site.device), positions[sel].to(site.device)]
        total = total + (picked * vectors[sel].to(picked)).sum()
    wanted = run.probes[: 1 + int(layers.max())]
    grads = torch.autograd.grad(total, wanted, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, wanted, strict=True)]


class LayerReadout(NamedTuple):
    """The feature columns of one source layer, laid out for one batched product per batch."""

    start: int
    """First feature column of the layer (features are sorted by layer)."""
    end: int
    """One past its last."""
    writes: range
    """Model layers its latents write (a CLT: this one and every later one)."""
    blocks: Tensor
    """[V] the token position of each block of `decoders`."""
    rows: Tensor
    """[n] each feature's block."""
    slots: Tensor
    """[n] each feature's column in its block."""
    decoders: Tensor
    """[V, K·d, c] per block, the activation-scaled decoder rows a·d of up to c features of one position,
    concatenated over the K layers written, zero-padded."""


class BlockLayout(NamedTuple):
    """Features of one layer (sorted by position) in blocks of c, each block one position's."""

    blocks: Tensor
    """[V] each block's position."""
    rows: Tensor
    """[n] each feature's block."""
    slots: Tensor
    """[n] each feature's column in its block."""
    width: int
    """c, the features a block holds: the mean count of the positions that have any, so a crowded
    position takes several blocks and padding stays below one block per position."""


def block_layout(positions: Tensor, n_tokens: int) -> BlockLayout:
    """The BlockLayout of features at `positions` ([n], sorted)."""
    counts = torch.bincount(positions, minlength=n_tokens)
    width = max(1, -(-len(positions) // max(1, int((counts > 0).sum()))))
    per_position = -(-counts // width)  # blocks per position (ceil)
    first_block = torch.cumsum(per_position, 0) - per_position
    rank = torch.arange(len(positions)) - (torch.cumsum(counts, 0) - counts)[positions]
    return BlockLayout(
        torch.repeat_interleave(torch.arange(n_tokens), per_position),
        first_block[positions] + rank // width,
        rank % width,
        width,
    )


def readout_layers(rm: ReplacementModel, features: ActiveFeatures, dtype: torch.dtype) -> list[LayerReadout]:
    """One LayerReadout per source layer with active features."""
    out: list[LayerReadout] = []
    with torch.no_grad():
        for layer, slot in enumerate(rm.slots):
            sel = (features.layer == layer).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            first = slot.dictionary.site_out.layer
            latents = features.latent[sel].to(slot.coder.w_enc.device)
            rows = [slot.coder.decoder_vectors(slot.index, m - first, latents) for m in slot.writes]
            scaled = (torch.cat(rows, dim=1) * features.activation[sel, None].to(rows[0])).to(dtype)
            layout = block_layout(features.position[sel].cpu(), rm.n_tokens)
            decoders = scaled.new_zeros(len(layout.blocks), layout.width, scaled.shape[1])
            decoders[layout.rows, layout.slots] = scaled
            start = int(sel[0])
            out.append(
                LayerReadout(
                    start,
                    start + len(sel),
                    slot.writes,
                    layout.blocks.to(scaled.device),
                    layout.rows,
                    layout.slots,
                    decoders.transpose(1, 2),
                )
            )
    return out


def readout_bytes(features: ActiveFeatures, rm: ReplacementModel) -> int:
    """Bytes `readout_layers` allocates for its decoder blocks (for the memory estimate)."""
    total = 0
    for layer, slot in enumerate(rm.slots):
        positions = features.position[features.layer == layer]
        if positions.numel():
            layout = block_layout(positions.cpu(), rm.n_tokens)
            total += len(layout.blocks) * layout.width * len(slot.writes) * rm.clean.mlp_out[0].shape[-1]
    return total * rm.clean.embeddings.element_size()


class Readout:
    """Turns the gradients at every source into attribution-row entries (source output · gradient)."""

    def __init__(self, rm: ReplacementModel, features: ActiveFeatures, n_logits: int) -> None:
        self.n_features = features.count
        self.n_layers, self.n_tokens = rm.n_layers, rm.n_tokens
        self.n_cols = self.n_features + (self.n_layers + 1) * self.n_tokens + n_logits
        self.errors = rm.errors
        self.embeddings = rm.clean.embeddings
        self.layers = readout_layers(rm, features, self.embeddings.dtype)

    @torch.no_grad()
    def rows(self, grads: Sequence[Tensor], out: Tensor) -> None:
        """Write the row entries of `out.shape[0]` targets into out [n_rows, n_cols] (zeros beforehand)
        from the gradients at the probes ([0] embeddings, [1 + m] MLP outputs of layers m below the
        batch's highest target; `backward_rows`)."""
        n, t, n_rows = self.n_features, self.n_tokens, out.shape[0]
        below = len(grads) - 1  # gradients at MLP outputs of layers >= below are zero
        layer_grads = [gm[:n_rows].transpose(0, 1) for gm in grads[1:]]  # [T, b, d] views
        for r in self.layers:
            stop = min(r.writes.stop, below)
            if stop <= r.writes.start:
                continue
            k = stop - r.writes.start
            d = layer_grads[0].shape[-1]
            # A CLT latent writes several layers: its layers' gradients side by side, one product.
            g = (
                layer_grads[r.writes.start]
                if k == 1
                else torch.cat(layer_grads[r.writes.start : stop], dim=-1)
            )
            per_block = torch.bmm(g.index_select(0, r.blocks), r.decoders[:, : k * d])
            out[:, r.start : r.end] = per_block[r.rows, :, r.slots].t().float().cpu()
        for m, g in enumerate(layer_grads):
            errors = torch.einsum("tbd,td->bt", g, self.errors[m])
            out[:, n + m * t : n + (m + 1) * t] = errors.float().cpu()
        tokens = torch.einsum("btd,td->bt", grads[0][:n_rows], self.embeddings)
        start = n + self.n_layers * t
        out[:, start : start + t] = tokens.float().cpu()


class RowStore:
    """The attribution rows computed so far: the logit rows first, then latents' rows as they arrive.

    Rows are kept once, in float32 ([k + budget, n_cols]). Ranking the latents not yet attributed by
    their partial influence needs the rows normalised (|A| over its row sum); only the row sums are kept,
    and `influence` normalises the rows on the fly, a chunk at a time.
    """

    def __init__(self, n_rows: int, n_cols: int) -> None:
        self.rows = torch.zeros(n_rows, n_cols)
        self.nodes = torch.zeros(n_rows, dtype=torch.long)
        """Node (column index) each row belongs to."""
        self.sums = torch.zeros(n_rows)
        """Each row's sum of absolute values (clamped at ROW_EPS), set by `close`."""
        self.filled = 0

    def block(self, n: int) -> Tensor:
        """The next n rows (zeros) to write into, then `close` them."""
        return self.rows[self.filled : self.filled + n]

    def close(self, nodes: Tensor) -> None:
        """The next len(nodes) rows are written: they belong to these nodes."""
        end = self.filled + len(nodes)
        self.nodes[self.filled : end] = nodes
        self.sums[self.filled : end] = self.rows[self.filled : end].abs().sum(dim=1).clamp(min=ROW_EPS)
        self.filled = end

    def influence(self, seed: Tensor, max_iter: int = 1000) -> Tensor:
        """Every node's influence on the logits through the rows so far (circuit-tracer's partial
        influence): Σ_{k≥1} seed·Âᵏ for Â whose row `nodes[i]` is row i normalised, other rows zero.

        Only nodes with rows carry influence onward, so the path sums run on the small square block of
        Â between them (w ← w·Â[:, nodes]); one pass over the store then spreads the accumulated
        weights onto every column: Σ_k w_k·Â.
        """
        filled, nodes, sums = self.filled, self.nodes[: self.filled], self.sums[: self.filled]
        square = self.rows[:filled, nodes].abs() / sums[:, None]
        weights = seed[nodes].to(square.dtype)
        total = torch.zeros_like(weights)
        for _ in range(max_iter):
            if not bool(weights.any()):
                break
            total += weights
            weights = weights @ square
        else:
            raise OpenscopeError(
                f"influence did not converge after {max_iter} steps: the graph has a cycle (edges must go forward)"
            )
        scaled = total / sums
        out = torch.zeros(self.rows.shape[1])
        chunk = max(1, INFLUENCE_CHUNK_BYTES // max(1, 4 * self.rows.shape[1]))
        for i in range(0, filled, chunk):
            out += scaled[i : i + chunk] @ self.rows[i : min(i + chunk, filled)].abs()
        return out

    def adjacency(self, selected: Tensor, layout_cols: NodeLayout) -> tuple[NodeLayout, Tensor]:
        """(layout, adjacency [N, N]) of the graph keeping the `selected` latents: the logit rows (the
        first k) and the selected latents' rows, restricted to the columns of the nodes kept;
        `layout_cols` is the layout of the store's columns (every active latent)."""
        n, k, filled = layout_cols.n_features, layout_cols.n_logits, self.filled
        layout = NodeLayout(len(selected), layout_cols.n_errors, layout_cols.n_tokens, k)
        columns = torch.cat([selected, torch.arange(n, layout_cols.n_nodes)])
        adjacency = torch.zeros(layout.n_nodes, layout.n_nodes)
        row_of = torch.full((n,), -1, dtype=torch.long)
        row_of[self.nodes[k:filled]] = torch.arange(k, filled)
        rows = row_of[selected]
        chunk = max(1, INFLUENCE_CHUNK_BYTES // max(1, 4 * self.rows.shape[1]))
        for i in range(0, len(rows), chunk):  # a chunk of rows at a time: no copy of the whole store
            part = rows[i : i + chunk]
            adjacency[i : i + len(part)] = self.rows[part][:, columns]
        adjacency[layout.logits] = self.rows[:k][:, columns]
        return layout, adjacency
