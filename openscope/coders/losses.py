"""Training losses and schedules for sparse dictionaries, as small pure functions (the recipe they
serve: docs/design.md, "The training recipe").

All losses are measured in normalised units (activations divided by C, E‖x/C‖² = 1), so their
coefficients carry over between layers and models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from openscope.errors import OpenscopeError

# Sums of squares by `mse_loss`, not (y − ŷ).pow(2).sum(): that builds one or two temporaries the size of
# the batch forward and three more backward. A CLT's batch is [L, B, d] (189 MB at 18 layers of Gemma 3
# 270M, B 4096), and every fresh block that large is new pages for the kernel to map (see
# `openscope.train.memory`); `var` would avoid them too, but its reduction runs at a quarter of the speed.


def _squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """Σ (a − b)² over every element, b broadcast to a's shape."""
    return F.mse_loss(a, b.expand_as(a), reduction="sum")


def reconstruction_loss(target: Tensor, recon: Tensor) -> Tensor:
    """‖y − ŷ‖², summed over dimensions, mean over the batch."""
    return _squared_distance(recon, target) / max(1, target.numel() // target.shape[-1])


def fvu(target: Tensor, recon: Tensor) -> Tensor:
    """Fraction of variance unexplained: Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the batch."""
    total = _squared_distance(target, target.mean(0))
    return _squared_distance(recon, target) / total.clamp_min(1e-12)


def fvu_per_layer(target: Tensor, recon: Tensor) -> Tensor:
    """[L] FVU of each layer of stacked activations [L, B, d] (a CLT's), each against its own layer's mean
    (layer by layer: the temporaries stay [B, d])."""
    pairs = list(zip(target, recon, strict=True))
    total = torch.stack([_squared_distance(t, t.mean(0)) for t, _ in pairs])
    return torch.stack([_squared_distance(r, t) for t, r in pairs]) / total.clamp_min(1e-12)


def l0_linear_loss(l0: Tensor, coeff: float) -> Tensor:
    """Gemma Scope 1 sparsity: λ·L0 (L0 from the STE step, so it has a gradient to θ)."""
    return coeff * l0


def l0_quadratic_loss(l0: Tensor, target_l0: float, coeff: float) -> Tensor:
    """Gemma Scope 2 sparsity: λ·(2/L0*)·(L0 − L0*)², pulling L0 towards the target L0* from both sides."""
    if not target_l0 > 0:
        raise OpenscopeError(f"target L0 must be positive, got {target_l0!r}")
    return coeff * (2.0 / target_l0) * (l0 - target_l0).pow(2)


def frequency_penalty(fire_rate: Tensor, max_rate: float, coeff: float) -> Tensor:
    """Penalty on latents that fire too often: λ_f·Σ_j max(0, p_j − p_max)² / p_max.

    p_j is the fraction of the batch's tokens on which latent j fires (from the STE step, so the
    gradient raises the thresholds of over-firing latents). Latents at or under p_max cost nothing;
    the square makes small excursions cheap, and dividing by p_max makes λ_f roughly independent of
    the chosen cap.
    """
    if not 0 < max_rate <= 1:
        raise OpenscopeError(f"max fire rate must be in (0, 1], got {max_rate!r}")
    return coeff * torch.relu(fire_rate - max_rate).pow(2).sum() / max_rate


def l1_loss(l1: Tensor, coeff: float) -> Tensor:
    """ReLU-baseline sparsity: λ·mean over rows of Σ_j f_j‖W_dec,j‖ (rows are unit-norm here)."""
    return coeff * l1


def aux_k_loss(residual: Tensor, aux_recon: Tensor, coeff: float) -> Tensor:
    """AuxK (Gao et al.): dead latents must reconstruct the main model's error e = y − ŷ.

    α·‖e − ê‖² / ‖e‖² (each summed over dims, mean over batch): the normalised form, so the term
    stays O(α) however small the residual gets. The residual must be detached by the caller.
    """
    return aux_k_normalised(reconstruction_loss(residual, aux_recon), residual.pow(2).sum(-1).mean(), coeff)


def pre_activation_loss(z: Tensor, theta: Tensor, coeff: float) -> Tensor:
    """Anthropic's pre-activation loss (circuits update, Jan 2025), on the dead latents only:
    λ_p·mean over rows of Σ_j max(0, θ_j − z_j) for pre-activations z [B, n] and thresholds θ [n]
    (decoder rows are unit-norm here, so the ‖d_j‖ weight is 1).

    A dead latent's encoder gets no gradient from the reconstruction or the L0 loss (its z lies below
    the STE window on every row); this one raises z on every row and lowers θ until the latent fires
    somewhere, after which the reconstruction decides what it fires on. Latents that fire cost nothing.
    """
    return coeff * torch.relu(theta - z).sum(-1).mean()


def aux_k_normalised(error: Tensor, norm: Tensor, coeff: float) -> Tensor:
    """AuxK from its two batch means, α·error / norm (error = mean ‖e − ê‖², norm = mean ‖e‖²): a batch
    split across processes reduces both over the whole batch first."""
    return coeff * error / norm.clamp_min(1e-12)


def matryoshka_weights(n: int, weights: Sequence[float] | None) -> tuple[float, ...]:
    """Weights of the prefix losses: as given, or equal weights summing to 1 (so the total stays on
    the scale of a single reconstruction loss and sparsity coefficients carry over)."""
    if weights is None:
        return tuple(1.0 / n for _ in range(n))
    if len(weights) != n:
        raise OpenscopeError(f"got {len(weights)} Matryoshka weights for {n} prefixes")
    return tuple(float(w) for w in weights)


def matryoshka_loss(target: Tensor, prefix_recons: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_i w_i·‖y − ŷ_i‖², ŷ_i the reconstruction from the i-th nested prefix of the dictionary."""
    if len(prefix_recons) != len(weights):
        raise OpenscopeError(f"got {len(weights)} Matryoshka weights for {len(prefix_recons)} prefixes")
    terms = [w * reconstruction_loss(target, r) for w, r in zip(weights, prefix_recons, strict=True)]
    return torch.stack(terms).sum()


def linear_warmup(step: int, warmup_steps: int, final: float) -> float:
    """A value ramping linearly from final/warmup_steps at step 0 to final at step warmup_steps − 1."""
    if warmup_steps <= 0:
        return final
    return final * min(1.0, (step + 1) / warmup_steps)


def sparsity_coeff_at(step: int, coeff: float, warmup_steps: int) -> float:
    """λ at a step: linear warm-up over warmup_steps (Gemma Scope: 10k–50k steps), then constant."""
    return linear_warmup(step, warmup_steps, coeff)


def decaying_target(step: int, start: float, final: float, decay_steps: int) -> float:
    """A target going linearly from `start` at step 0 to `final` at step decay_steps, then `final`
    (the target L0 of a CLT started from greedily chosen transcoder latents)."""
    if decay_steps <= 0 or step >= decay_steps:
        return final
    return start + (final - start) * step / decay_steps


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int = 0, decay_steps: int = 0) -> float:
    """Learning rate at a step: linear warm-up over warmup_steps (Gemma Scope: 1k steps), constant, then (when
    decay_steps > 0) a linear decay to zero over the last decay_steps of total_steps."""
    value = linear_warmup(step, warmup_steps, lr)
    if decay_steps > 0 and step >= total_steps - decay_steps:
        value *= max(0.0, (total_steps - step) / decay_steps)
    return value
