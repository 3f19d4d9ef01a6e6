"""Sparse activation functions for dictionaries: JumpReLU and its step function, TopK, BatchTopK, ReLU.

JumpReLU (Gemma Scope): f = z·H(z − θ) with θ = exp(log_threshold) > 0 per latent. The step H has no
useful derivative, so both JumpReLU and the Heaviside step used to count L0 get straight-through
pseudo-derivatives with a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth ε (Gemma Scope: ε = 0.001):

    ∂f/∂θ = −(θ/ε)·K((z − θ)/ε)        ∂H/∂θ = −(1/ε)·K((z − θ)/ε)

and no gradient flows into z through H (JumpReLU passes grad·H(z − θ) to z; the step passes none).

Every function here works elementwise on any pair of broadcastable shapes: a dense [B, F] block with
θ of shape [F], or the flat list of touched entries of the sparse path with θ gathered per entry.
Gradients to θ are summed back to θ's own shape (i.e. over the batch).

Also here: converting a TopK/BatchTopK dictionary's firing statistics into JumpReLU thresholds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

BANDWIDTH = 0.001
"""Default bandwidth ε of the rectangle kernel (Gemma Scope)."""


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1[|u| < 1/2], as the dtype of u."""
    return (u.abs() < 0.5).to(u.dtype)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to the shape of the input it belongs to."""
    return grad.sum_to_size(shape) if grad.shape != shape else grad


class _JumpReLU(torch.autograd.Function):
    """f = z·H(z − θ), with the straight-through backward of the module docstring."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (grad,) = grad_outputs
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > threshold).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = _sum_to(-(threshold / eps) * rectangle((z - threshold) / eps) * grad, threshold.shape)
        return grad_z, grad_t, None


class _Step(torch.autograd.Function):
    """H(z − θ); STE backward ∂H/∂θ = −(1/ε)·K((z − θ)/ε), nothing into z."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[None, Tensor | None, None]:
        (grad,) = grad_outputs
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = _sum_to(-(1.0 / eps) * rectangle((z - threshold) / eps) * grad, threshold.shape)
        return None, grad_t, None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float = BANDWIDTH) -> Tensor:
    """JumpReLU z·H(z − θ) with the straight-through pseudo-gradient to θ."""
    return _JumpReLU.apply(z, threshold, bandwidth)  # type: ignore[no-any-return]


def step(z: Tensor, threshold: Tensor, bandwidth: float = BANDWIDTH) -> Tensor:
    """Heaviside H(z − θ) (1 where a latent fires) with the straight-through pseudo-gradient to θ."""
    return _Step.apply(z, threshold, bandwidth)  # type: ignore[no-any-return]


def relu(z: Tensor) -> Tensor:
    """Plain ReLU (the L1-penalised baseline)."""
    return torch.relu(z)


def topk_indices(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row, the k largest pre-activations: (values [B, k], latent indices [B, k])."""
    return z.topk(min(k, z.shape[-1]), dim=-1, sorted=False)


def topk_mask(z: Tensor, k: int) -> Tensor:
    """Boolean [B, F]: True at each row's k largest pre-activations."""
    _, idx = topk_indices(z, k)
    return torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)


def batchtopk_flat_indices(z: Tensor, k: int) -> Tensor:
    """Flat indices (into z.view(-1)) of the k·B largest pre-activations of the whole batch, sorted.

    Sorted flat indices are sorted by row, which the sparse path needs for its per-row layout.
    """
    n = min(k * z.shape[0], z.numel())
    _, flat = z.reshape(-1).topk(n, sorted=False)
    return flat.sort().values


def batchtopk_mask(z: Tensor, k: int) -> Tensor:
    """Boolean [B, F]: True at the batch's k·B largest pre-activations."""
    mask = torch.zeros(z.numel(), dtype=torch.bool, device=z.device)
    mask[batchtopk_flat_indices(z, k)] = True
    return mask.view_as(z)


def topk(z: Tensor, k: int) -> Tensor:
    """TopK activation: ReLU of each row's k largest pre-activations, zero elsewhere (dense)."""
    return torch.relu(z) * topk_mask(z, k).to(z.dtype)


def batchtopk(z: Tensor, k: int) -> Tensor:
    """BatchTopK activation: ReLU of the batch's k·B largest pre-activations, zero elsewhere (dense)."""
    return torch.relu(z) * batchtopk_mask(z, k).to(z.dtype)


def threshold_for_l0(z: Tensor, l0: float) -> float:
    """The single threshold θ at which the batch of pre-activations z [B, F] has mean L0 = l0.

    Halfway between the (l0·B)-th and the next largest entry of z, so exactly l0·B entries lie
    above it (never below a tiny positive value, since θ > 0): the BatchTopK threshold, used to
    start a JumpReLU run at its target sparsity.
    """
    n = max(1, min(round(l0 * z.shape[0]), z.numel() - 1))
    top = z.detach().reshape(-1).float().topk(n + 1).values
    return max(float(top[-2:].mean()), 1e-6)


def thresholds_for_rate(z: Tensor, l0: float) -> Tensor:
    """Per latent, the threshold θ_j [F] at which latent j fires on the fraction l0/F of the batch of
    pre-activations z [B, F] (so the batch's mean L0 is l0 again, with every latent firing equally often).

    Each θ_j lies halfway between latent j's n-th largest pre-activation (n = l0·B/F, at least 1) and its
    next smaller distinct value, never below a tiny positive value. Halfway between distinct values, not
    on a value repeated by duplicate rows: a θ equal to a data value would let float rounding (a mean
    summed in another order, on another process) decide whether those rows fire. A JumpReLU started from
    one shared θ (`threshold_for_l0`) leaves the latents whose pre-activations are small everywhere silent
    from step 0: they get no gradient through the jump and most never fire (a fifth of a 4096-wide SAE at
    L0 50 on Gemma 3 270M).
    """
    b, f = z.shape
    n = max(1, min(round(l0 * b / f), b - 1))
    ranked = z.detach().float().sort(dim=0, descending=True).values  # [B, F]
    nth = ranked[n - 1]
    below = ranked < nth
    after = ranked.gather(0, below.int().argmax(0, keepdim=True)).squeeze(0)  # first smaller value
    fallback = nth - nth.abs().clamp_min(1e-6)  # every row ties: fire on all of them
    return torch.where(below.any(0), (nth + after) / 2, fallback).clamp_min(1e-6)


class ThresholdEstimator:
    """Accumulates the statistics that turn a TopK/BatchTopK dictionary into a JumpReLU one.

    Choice (documented, after Bussmann et al.'s BatchTopK): the JumpReLU threshold is the mean,
    over the batches seen, of the smallest activation that was kept.
    - global: per batch, the smallest positive kept activation of the batch (for BatchTopK this is
      exactly the batch's cut-off); for TopK, where each row has its own cut-off, the mean over rows
      of each row's smallest kept activation. One value for every latent.
    - per latent: per batch, each latent's smallest positive kept activation, averaged over the
      batches in which it fired; a latent that never fired gets the global value.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.batches = 0
        self.global_sum = 0.0
        self.latent_sum = torch.zeros(width, dtype=torch.float64)
        self.latent_batches = torch.zeros(width, dtype=torch.float64)

    @torch.no_grad()
    def update(self, latents: Tensor, per_row: bool) -> None:
        """Add one batch of dense latents [B, F] (zeros where not kept); per_row for TopK."""
        f = latents.detach().to(torch.float64).cpu()
        kept = f > 0
        if not bool(kept.any()):
            return
        big = torch.where(kept, f, torch.full_like(f, torch.inf))
        if per_row:
            row_min = big.min(dim=1).values
            self.add(float(row_min[torch.isfinite(row_min)].mean()), big.min(dim=0).values)
        else:
            self.add(float(big.min()), big.min(dim=0).values)

    def add(self, batch_min: float, col_min: Tensor) -> None:
        """Add one batch's minima: the global value of `update` and each latent's smallest kept activation
        [F] (inf where it never fired). A batch split across processes reduces both (min) first."""
        self.global_sum += batch_min
        fired = torch.isfinite(col_min)
        self.latent_sum[fired] += col_min[fired]
        self.latent_batches[fired] += 1
        self.batches += 1

    def threshold(self, per_latent: bool = False) -> Tensor:
        """The JumpReLU threshold θ [F] (float32, > 0) from the statistics gathered so far."""
        if self.batches == 0:
            raise ValueError("ThresholdEstimator saw no batch with an active latent")
        glob = self.global_sum / self.batches
        theta = torch.full((self.width,), glob, dtype=torch.float64)
        if per_latent:
            seen = self.latent_batches > 0
            theta[seen] = self.latent_sum[seen] / self.latent_batches[seen]
        # A threshold must stay strictly positive: it is stored as log θ.
        return theta.clamp_min(1e-8).to(torch.float32)
