"""The cross-layer transcoder's sparse decoder: each source layer's active latents decoded into all its
target layers, forward and backward through the active entries only.

For source layer ℓ with decoder w [F, T, d] (T = L − ℓ target layers) and N active entries (row b, latent j,
value v, row-major: `openscope.coders.sparse.Entries`):

    out[t, b] = Σ_{entries of row b} v · w[j, t]                       (forward, [T, B, d])
    ∂/∂v_e    = Σ_t g[t, b_e] · w[j_e, t]                             (a dot per entry)
    ∂/∂w[j, t] = Σ_{entries of latent j} v_e · g[t, b_e]               (a row sum per latent)

All three are `embedding_bag` kernels (and its per-sample-weight backward), one target block at a time: a
[F, d] table (1.3 MB at F = 512, d = 640) stays in cache while the N entries gather from it, about twice as
fast per entry as whole rows (T·d floats). Narrower column chunks measured no faster end to end (their
gathers are faster, the copies they add eat it). The third gathers rows of the [B, d] gradient, in row
chunks on the CPU for the same reason (`openscope.coders.sparse.sum_by_latent`).

The output is one [B, d] tensor per target block, so `add_to_targets` sums the source layers into ŷ [L, B, d]
with contiguous adds and hands each block its gradient as a view of ŷ's: the old [B, T·d] layout copied
every block once more each way (a transpose), which cost as much as the gathers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from openscope.coders.sparse import Entries, sum_by_latent
from openscope.errors import OpenscopeError


def _psw_backward(g: Tensor, table: Tensor, e: Entries) -> Tensor:
    """[N] the dot g[rows[e]]·table[cols[e]] per entry: embedding_bag's own per-sample-weight backward."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        g, table, e.cols, e.row_offsets, e.rows, 0, -1
    )


class _DecodeToTargets(torch.autograd.Function):
    """out_t[b] = Σ_entries v·w[j, t] for w [F, T, d], one [B, d] output per target block t; sparse backward
    (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, w: Tensor, e: Entries) -> tuple[Tensor, ...]:
        ctx.save_for_backward(values, w)
        ctx.entries = e
        # Separate outputs, not one stacked tensor: stacking would copy every block once more.
        return tuple(
            F.embedding_bag(
                e.cols, w[:, t].contiguous(), e.row_offsets, mode="sum", per_sample_weights=values
            )
            for t in range(w.shape[1])
        )

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        values, w = ctx.saved_tensors
        e: Entries = ctx.entries
        want_v, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_v = values.new_zeros(values.shape) if want_v else None
        grad_w = torch.empty_like(w) if want_w else None
        v_by_latent = values[e.col_order]  # ordered once for all target blocks
        for t, g in enumerate(grad_outputs):
            g_t = g.contiguous()  # already so when it is a slice of ŷ's gradient (the usual case)
            if grad_v is not None:
                grad_v += _psw_backward(g_t, w[:, t].contiguous(), e)
            if grad_w is not None:
                grad_w[:, t] = sum_by_latent(g_t, v_by_latent, e)
        return grad_v, grad_w, None


def decode_to_targets(values: Tensor, w_dec: Tensor, e: Entries) -> tuple[Tensor, ...]:
    """Per target block t of w_dec [F, T, d], [B, d]: Σ over a row's entries of value·w_dec[latent, t] (no bias)."""
    if w_dec.ndim != 3:
        raise OpenscopeError(f"a block decoder is [latents, targets, d], got {list(w_dec.shape)}")
    return _DecodeToTargets.apply(values, w_dec, e)  # type: ignore[no-any-return]


class _AddToTargets(torch.autograd.Function):
    """ŷ_m = base_m + Σ_{ℓ≤m} c_ℓ[m − ℓ] for per-source-layer blocks c_ℓ = (c_ℓ[0], …, c_ℓ[L−ℓ−1]), each
    [B, d], passed flattened source by source, and a base broadcastable to [L, B, d] (or None).

    Its own function because autograd through in-place slice additions would clone the whole [L, B, d]
    gradient once per source layer; here each block's gradient is a slice (a view) of the one gradient.
    """

    @staticmethod
    def forward(ctx: Any, n: int, base: Tensor | None, *blocks: Tensor) -> Tensor:
        ctx.n = n
        ctx.base = None if base is None else (base.shape, base.dtype)
        out = blocks[0].new_empty(n, *blocks[0].shape)
        if base is None:
            out.zero_()
        else:
            out.copy_(base.expand_as(out))
        i = 0
        for src in range(n):
            for m in range(src, n):
                out[m] += blocks[i]
                i += 1
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (g,) = grad_outputs
        n = ctx.n
        grad_base = None
        if ctx.base is not None and ctx.needs_input_grad[1]:
            shape, dtype = ctx.base
            grad_base = g.sum_to_size(shape).to(dtype)
        return (None, grad_base, *(g[m] for src in range(n) for m in range(src, n)))


def add_to_targets(contributions: Sequence[Sequence[Tensor]], base: Tensor | None = None) -> Tensor:
    """[L, B, d] from per-source-layer blocks (c_ℓ[0], …, c_ℓ[L−ℓ−1]), each [B, d]: layer m gets
    base_m + Σ_{ℓ≤m} c_ℓ[m − ℓ] (base broadcastable to [L, B, d]; None: 0). Adding into the base saves an
    [L, B, d] block a step against adding it afterwards."""
    n = len(contributions)
    shape = contributions[0][0].shape
    for src, blocks in enumerate(contributions):
        if len(blocks) != n - src or any(c.shape != shape for c in blocks):
            raise OpenscopeError(f"source layer {src} must give {n - src} blocks of {list(shape)}")
    return _AddToTargets.apply(n, base, *(c for blocks in contributions for c in blocks))  # type: ignore[no-any-return]
