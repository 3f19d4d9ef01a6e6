"""Sparse kernels for the fast training path: touch only the active latents, forward and backward.

A batch's active latents are a list of N entries (row b, latent j) stored row-major (CSR by row).
Two autograd functions use it:

- `gathered_linear`: the pre-activations z[b, j] = x[b]·W[:, j] + bias[j] at the entries only.
  The dense product x @ W is computed once, without autograd, to choose the entries; the backward
  is sparse: ∂/∂W[:, j] = Σ_b g[b, j]·x[b] over the entries (cost N·d, not B·d·F).
- `sparse_decode`: y[b] = Σ_j f[b, j]·W_dec[j] over the entries (an `embedding_bag` with per-entry
  weights), whose backward gives each entry's gradient (a dot product) and W_dec's gradient by
  summing rows per latent (again an `embedding_bag`, over the entries sorted by latent).

Both are exact: they equal the dense computation restricted to the entries (tests check values and
gradients against the dense twin in `SparseCoder.forward(..., path="dense")`).

The per-latent sums (the weight gradients) gather rows of a [B, d] source (x or an output gradient) in
latent order, which jumps across all B rows: on the CPU they run over row chunks of `CPU_CHUNK_ROWS` rows
at a time, so that the chunk of the source stays in cache, and add the chunks' [F, d] partial sums
(`sum_by_latent`).

`sum_to_targets` is the cross-layer transcoder's decode scatter: each source layer's decoded block goes
into all its target layers, with a backward that slices instead of cloning the whole gradient per layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from openscope.errors import OpenscopeError

CPU_CHUNK_ROWS = 512
"""Rows per chunk of the per-latent sums on the CPU. A [512, d] slice of the source (1.3 MB at d = 640) stays
in a core's L2 cache while its entries gather from it: measured 1.7× faster per entry than gathering from all
B = 4096 rows (7.2 against 4.2 GMAC/s, one thread, 32 entries a row); 256 rows were as fast, 1024 slower.
Other devices sum in one chunk (their gathers do not depend on a core's cache)."""

CLT_DENSE_ABOVE = {"cpu": 0.15, "cuda": 0.02}
"""A cross-layer transcoder's path="auto" takes the dense path above this fraction of its L·B·F latents
touched, per device type (others: the CPU's). CPU: the dense decoder costs ~(L+1)/2 times a transcoder's,
the sparse one the same per entry and block (18 layers, 8% touched: sparse ~2× faster). CUDA (one H200,
float32, 18 layers, d 640, B 4096): dense was 2.6× faster at 6.25% touched, sparse 1.8× faster at 0.78%;
their log-linear crossing is near 1.7%. bfloat16 products speed the dense path more, so it is not higher."""


def clt_dense_above(device: torch.device) -> float:
    """The fraction of touched latents above which a CLT's auto path goes dense on `device`."""
    return CLT_DENSE_ABOVE.get(device.type, CLT_DENSE_ABOVE["cpu"])


class Entries(NamedTuple):
    """Where a batch's active latents are, row-major, with the latent-major order precomputed."""

    rows: Tensor
    """[N] int64, batch row of each entry, non-decreasing."""
    cols: Tensor
    """[N] int64, latent index of each entry."""
    row_offsets: Tensor
    """[B] int64, index of each row's first entry (CSR offsets, as `embedding_bag` wants them)."""
    col_order: Tensor
    """[N] int64, permutation sorting the entries by (row chunk, latent), stable: latent-major within
    each chunk of `chunk_rows` rows."""
    col_rows: Tensor
    """[N] int64, the row of each entry in `col_order` order, counted from its chunk's first row."""
    col_offsets: Tensor
    """[C, F] int64, index of each latent's first entry within its chunk's part of `col_order`."""
    chunk_rows: int
    """Rows per chunk (the last chunk may be shorter)."""
    chunk_starts: tuple[int, ...]
    """C + 1 positions in `col_order` where each chunk's entries start, the last = N."""


def _offsets(keys: Tensor, n: int) -> Tensor:
    """Start of each bucket 0..n−1 in a list sorted by bucket key."""
    counts = torch.bincount(keys, minlength=n)
    return torch.cumsum(counts, 0) - counts


def make_entries(
    rows: Tensor, cols: Tensor, n_rows: int, n_cols: int, chunk_rows: int | None = None
) -> Entries:
    """Index structures for entries already sorted by row; `chunk_rows` None: `CPU_CHUNK_ROWS` on the CPU,
    all rows in one chunk elsewhere."""
    if chunk_rows is None:
        chunk_rows = CPU_CHUNK_ROWS if rows.device.type == "cpu" else n_rows
    chunk_rows = max(1, min(chunk_rows, n_rows))
    n_chunks = -(-n_rows // chunk_rows)
    row_offsets = _offsets(rows, n_rows)
    chunk = torch.div(rows, chunk_rows, rounding_mode="floor")
    key = chunk * n_cols + cols
    col_order = torch.argsort(key, stable=True)
    starts = [*row_offsets[::chunk_rows].tolist(), rows.numel()]
    col_offsets = _offsets(key, n_chunks * n_cols).view(n_chunks, n_cols) - row_offsets[::chunk_rows, None]
    return Entries(
        rows=rows,
        cols=cols,
        row_offsets=row_offsets,
        col_order=col_order,
        col_rows=rows[col_order] - chunk[col_order] * chunk_rows,
        col_offsets=col_offsets,
        chunk_rows=chunk_rows,
        chunk_starts=tuple(starts),
    )


def sum_by_latent(src: Tensor, weights: Tensor, e: Entries) -> Tensor:
    """out[j] = Σ over entries with latent j of w[e]·src[rows[e]]  → [F, src.shape[1]], with the entries'
    weights given in `e.col_order` order (`weights[e.col_order]`: a caller summing several sources with the
    same weights orders them once). One `embedding_bag` per row chunk, the chunks' sums added."""
    out: Tensor | None = None
    for c, (lo, hi) in enumerate(itertools.pairwise(e.chunk_starts)):
        r0 = c * e.chunk_rows
        part = F.embedding_bag(
            e.col_rows[lo:hi],
            src[r0 : r0 + e.chunk_rows].contiguous(),
            e.col_offsets[c],
            mode="sum",
            per_sample_weights=weights[lo:hi],
        )
        out = part if out is None else out.add_(part)
    return src.new_zeros(e.col_offsets.shape[1], src.shape[1]) if out is None else out  # None: no rows


def _sum_by_row(table: Tensor, weights: Tensor, e: Entries) -> Tensor:
    """out[b] = Σ over entries of row b of weights[e]·table[cols[e]]  → [B, table.shape[1]]."""
    return F.embedding_bag(e.cols, table, e.row_offsets, mode="sum", per_sample_weights=weights)


class _GatheredLinear(torch.autograd.Function):
    """Pre-activations at the entries; forward takes them precomputed, backward is sparse."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor, values: Tensor, e: Entries) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.entries = e
        ctx.n_latents = bias.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (g,) = grad_outputs
        x, w = ctx.saved_tensors
        e: Entries = ctx.entries
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _sum_by_row(w.t().contiguous(), g, e)
        if ctx.needs_input_grad[1]:
            # Computed latent-major ([F, d]) because that is the contiguous way to sum rows of x.
            grad_w = sum_by_latent(x, g[e.col_order], e).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(ctx.n_latents, dtype=g.dtype, device=g.device).index_add_(0, e.cols, g)
        return grad_x, grad_w, grad_b, None, None


def gathered_linear(x: Tensor, w: Tensor, bias: Tensor, values: Tensor, e: Entries) -> Tensor:
    """(x @ w + bias)[rows, cols] at the entries, given those values computed without autograd."""
    return _GatheredLinear.apply(x, w, bias, values, e)  # type: ignore[no-any-return]


class _SparseDecode(torch.autograd.Function):
    """y[b] = Σ_entries f·W_dec[j]; backward: per-entry dots and a per-latent row sum."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, w_dec: Tensor, e: Entries) -> Tensor:
        ctx.save_for_backward(values, w_dec)
        ctx.entries = e
        return _sum_by_row(w_dec, values, e)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (g,) = grad_outputs
        values, w_dec = ctx.saved_tensors
        e: Entries = ctx.entries
        grad_v = grad_w = None
        if ctx.needs_input_grad[0]:
            # ∂/∂f[b, j] = g[b]·W_dec[j]: let embedding_bag's own per-sample-weight backward do the dots.
            with torch.enable_grad():
                v = values.detach().requires_grad_(True)
                out = _sum_by_row(w_dec.detach(), v, e)
                (grad_v,) = torch.autograd.grad(out, v, g)
        if ctx.needs_input_grad[1]:
            grad_w = sum_by_latent(g, values[e.col_order], e)
        return grad_v, grad_w, None


def sparse_decode(values: Tensor, w_dec: Tensor, e: Entries) -> Tensor:
    """Σ over each row's entries of value·W_dec[latent]  → [B, d_out] (no bias)."""
    return _SparseDecode.apply(values, w_dec, e)  # type: ignore[no-any-return]


class _SumToTargets(torch.autograd.Function):
    """ŷ_m = Σ_{ℓ≤m} c_ℓ[:, m−ℓ]: add each source layer's decoded block [B, (L−ℓ)·d] into its target layers.

    Written as its own function because autograd through in-place slice additions would clone the whole
    [L, B, d] gradient once per source layer (L²·B·d traffic); here the forward adds and the backward
    slices, each touching every contribution once.
    """

    @staticmethod
    def forward(ctx: Any, d: int, *contributions: Tensor) -> Tensor:
        n, b = len(contributions), contributions[0].shape[0]
        ctx.shapes = [c.shape for c in contributions]
        out = contributions[0].new_zeros(n, b, d)
        for src, c in enumerate(contributions):
            out[src:] += c.reshape(b, n - src, d).transpose(0, 1)
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (g,) = grad_outputs
        grads = [g[src:].transpose(0, 1).reshape(shape) for src, shape in enumerate(ctx.shapes)]
        return (None, *grads)


def sum_to_targets(contributions: Sequence[Tensor], d: int) -> Tensor:
    """[L, B, d] from per-source-layer blocks c_ℓ [B, (L−ℓ)·d]: layer m gets Σ_{ℓ≤m} c_ℓ[:, (m−ℓ)·d:(m−ℓ+1)·d]."""
    n = len(contributions)
    for src, c in enumerate(contributions):
        if c.ndim != 2 or c.shape[1] != (n - src) * d:
            raise OpenscopeError(f"contribution {src} must be [batch, {(n - src) * d}], got {list(c.shape)}")
    return _SumToTargets.apply(d, *contributions)  # type: ignore[no-any-return]
