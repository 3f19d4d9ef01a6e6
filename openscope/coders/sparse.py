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

`sparse_decode_blocks` is `sparse_decode` for a cross-layer transcoder's decoder [F, T, d] (a latent writes to
T target layers): the same numbers, computed one target block W[:, t] [F, d] at a time. A whole row
(T·d floats, 46 kB at 18 layers of Gemma 3 270M) per entry streams the table from memory; one block at a
time keeps the [F, d] table in cache, about twice as fast per entry. Its backward gives the entries'
gradients as a sampled product (g W_tᵀ at the entries only, `torch.sparse.sampled_addmm`) instead of
re-running the decode.

`sum_to_targets` is the cross-layer transcoder's decode scatter: each source layer's decoded block goes
into all its target layers, with a backward that slices instead of cloning the whole gradient per layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from openscope.errors import OpenscopeError


class Entries(NamedTuple):
    """Where a batch's active latents are, row-major, with the latent-major order precomputed."""

    rows: Tensor
    """[N] int64, batch row of each entry, non-decreasing."""
    cols: Tensor
    """[N] int64, latent index of each entry."""
    row_offsets: Tensor
    """[B] int64, index of each row's first entry (CSR offsets, as `embedding_bag` wants them)."""
    col_order: Tensor
    """[N] int64, permutation sorting the entries by latent (stable)."""
    col_offsets: Tensor
    """[F] int64, index (in latent order) of each latent's first entry."""


def _offsets(keys: Tensor, n: int) -> Tensor:
    """Start of each bucket 0..n−1 in a list sorted by bucket key."""
    counts = torch.bincount(keys, minlength=n)
    return torch.cumsum(counts, 0) - counts


def make_entries(rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> Entries:
    """Index structures for entries already sorted by row."""
    return Entries(
        rows=rows,
        cols=cols,
        row_offsets=_offsets(rows, n_rows),
        col_order=torch.argsort(cols, stable=True),
        col_offsets=_offsets(cols, n_cols),
    )


def _sum_by_col(src: Tensor, weights: Tensor, e: Entries) -> Tensor:
    """out[j] = Σ over entries with latent j of weights[e]·src[rows[e]]  → [F, src.shape[1]]."""
    order = e.col_order
    return F.embedding_bag(e.rows[order], src, e.col_offsets, mode="sum", per_sample_weights=weights[order])


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
            grad_w = _sum_by_col(x, g, e).t()
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
            grad_w = _sum_by_col(g, values, e)
        return grad_v, grad_w, None


def sparse_decode(values: Tensor, w_dec: Tensor, e: Entries) -> Tensor:
    """Σ over each row's entries of value·W_dec[latent]  → [B, d_out] (no bias)."""
    return _SparseDecode.apply(values, w_dec, e)  # type: ignore[no-any-return]


def _csr_pattern(e: Entries) -> Tensor:
    """The entries as a [B, F] CSR tensor with zero values: the sampling pattern of `sampled_addmm`."""
    n = e.rows.numel()
    crow = torch.cat([e.row_offsets, e.row_offsets.new_tensor([n])])
    zeros = torch.zeros(n, dtype=torch.float32, device=e.rows.device)
    shape = (e.row_offsets.numel(), e.col_offsets.numel())
    with warnings.catch_warnings():  # "CSR support is in beta": sampled_addmm is all this module uses of it
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, e.cols, zeros, shape, check_invariants=False)


class _SparseDecodeBlocks(torch.autograd.Function):
    """y[b, t] = Σ_entries f·W[j, t] for W [F, T, d], one target block at a time (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, w: Tensor, e: Entries) -> Tensor:
        ctx.save_for_backward(values, w)
        ctx.entries = e
        b = e.row_offsets.numel()
        out = values.new_empty(b, w.shape[1], w.shape[2])
        for t in range(w.shape[1]):
            out[:, t] = _sum_by_row(w[:, t].contiguous(), values, e)
        return out.reshape(b, -1)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (g,) = grad_outputs
        values, w = ctx.saved_tensors
        e: Entries = ctx.entries
        g = g.reshape(g.shape[0], w.shape[1], w.shape[2])
        want_v, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_v = values.new_zeros(values.shape) if want_v else None
        grad_w = torch.empty_like(w) if want_w else None
        pattern = _csr_pattern(e).to(g.dtype) if want_v else None
        for t in range(w.shape[1]):
            g_t = g[:, t].contiguous()  # one copy of the target block's gradient serves both
            if grad_v is not None:
                grad_v += torch.sparse.sampled_addmm(pattern, g_t, w[:, t].t(), beta=0.0).values()
            if grad_w is not None:
                grad_w[:, t] = _sum_by_col(g_t, values, e)
        return grad_v, grad_w, None


def sparse_decode_blocks(values: Tensor, w_dec: Tensor, e: Entries) -> Tensor:
    """`sparse_decode` of a decoder w_dec [F, T, d] with every latent writing T blocks  → [B, T·d] (no bias)."""
    if w_dec.ndim != 3:
        raise OpenscopeError(f"a block decoder is [latents, targets, d], got {list(w_dec.shape)}")
    return _SparseDecodeBlocks.apply(values, w_dec, e)  # type: ignore[no-any-return]


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
