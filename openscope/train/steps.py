"""One training step of a sparse dictionary: forward, losses, backward, constrained Adam step.

Not the trainer (data loop, checkpoints, logging: `openscope.train.loop`): `train_step` (a single-layer
SAE or transcoder) and `clt_train_step` (a cross-layer transcoder) are the pure cores a trainer calls
once per batch, returning a `StepStats` / `CLTStepStats` of plain floats.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from openscope.coders import losses as L
from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import Path, SparseCoder
from openscope.errors import OpenscopeError

Sparsity = Literal["quadratic_l0", "l0", "l1", "none"]


@dataclass(frozen=True)
class StepConfig:
    """Losses, coefficients and schedules of a training step (normalised units)."""

    lr: float = 7e-5
    """Adam learning rate after warm-up (Gemma Scope)."""
    lr_warmup_steps: int = 1000
    """Steps of linear learning-rate warm-up."""
    total_steps: int = 0
    """Steps of the whole run (needed by the decay)."""
    lr_decay_steps: int = 0
    """Final steps over which the learning rate decays linearly to zero (0: no decay)."""
    sparsity: Sparsity = "quadratic_l0"
    """quadratic_l0 (Gemma Scope 2, jumprelu), l0 (Gemma Scope 1, jumprelu), l1 (relu) or none
    (topk/batchtopk: sparsity is structural)."""
    sparsity_coeff: float = 1e-3
    """λ of the sparsity loss after its warm-up."""
    target_l0: float | None = None
    """L0* of the quadratic L0 loss (required for quadratic_l0)."""
    sparsity_warmup_steps: int = 10_000
    """Steps of linear λ warm-up."""
    freq_coeff: float = 1.0
    """λ_f of the frequency penalty on over-firing latents (jumprelu only; 0 disables it)."""
    max_fire_rate: float = 0.1
    """p_max: latents firing on more than this fraction of tokens are penalised."""
    aux_k: int = 512
    """AuxK: dead latents used per token (topk/batchtopk)."""
    aux_coeff: float = 1 / 32
    """α of the AuxK loss (0 disables it)."""
    matryoshka_prefixes: tuple[int, ...] = ()
    """Nested prefix sizes (strictly increasing); the full width is appended if missing. Empty:
    plain reconstruction loss."""
    matryoshka_weights: tuple[float, ...] | None = None
    """One weight per prefix (including the appended full width); None: equal, summing to 1."""
    path: Path = "auto"
    """Forward implementation: auto, sparse or dense (see SparseCoder.forward)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise OpenscopeError(f"learning rate must be positive, got {self.lr!r}")
        if self.sparsity not in ("quadratic_l0", "l0", "l1", "none"):
            raise OpenscopeError(f"unknown sparsity loss {self.sparsity!r}")
        if self.sparsity == "quadratic_l0" and (self.target_l0 is None or not self.target_l0 > 0):
            raise OpenscopeError(f"quadratic_l0 needs a positive target_l0, got {self.target_l0!r}")
        for name in ("sparsity_coeff", "freq_coeff", "aux_coeff"):
            if getattr(self, name) < 0:
                raise OpenscopeError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.aux_k < 0:
            raise OpenscopeError(f"aux_k must be >= 0, got {self.aux_k!r}")
        p = self.matryoshka_prefixes
        if any(m < 1 for m in p) or any(b <= a for a, b in itertools.pairwise(p)):
            raise OpenscopeError(f"Matryoshka prefixes must be positive and strictly increasing, got {p}")


class StepStats(NamedTuple):
    """What one step measured (plain floats/ints, normalised units)."""

    loss: float
    """Total loss that was minimised."""
    reconstruction: float
    """Reconstruction (or Matryoshka) loss."""
    sparsity: float
    """Sparsity loss (λ included)."""
    frequency: float
    """Frequency penalty (λ_f included)."""
    aux: float
    """AuxK loss (α included)."""
    l0: float
    """Mean firing latents per token."""
    fvu: float
    """Fraction of variance unexplained by the full reconstruction."""
    dead: int
    """Latents that have not fired for the tracker's window (0 without a tracker)."""
    lr: float
    """Learning rate used."""
    sparsity_coeff: float
    """λ used (after warm-up)."""


class DeadLatentTracker:
    """Counts tokens since each latent last fired; a latent is dead after `dead_after_tokens`."""

    def __init__(self, width: int, dead_after_tokens: int = 10_000_000) -> None:
        self.dead_after_tokens = dead_after_tokens
        self.tokens_since_fired = torch.zeros(width, dtype=torch.int64)

    def update(self, fired: Tensor, n_tokens: int) -> None:
        """Record one batch: fired [F] bool, whether each latent fired on any of its n_tokens."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.cpu()] = 0

    def dead_mask(self) -> Tensor:
        """[F] bool, True for dead latents."""
        return self.tokens_since_fired >= self.dead_after_tokens


def make_optimizer(coder: nn.Module, lr: float = 7e-5, threshold_lr_scale: float = 1.0) -> torch.optim.Adam:
    """Adam with β = (0, 0.999) (Gemma Scope); JumpReLU's log θ may learn `threshold_lr_scale`× faster.
    Any coder whose threshold parameter is named `log_threshold` (SparseCoder, CrossLayerCoder).

    Adam moves a parameter by about lr per step, so log θ changes by ~lr per step: over a run of a
    few hundred steps the thresholds (and with them L0) barely move unless they get a larger rate.
    """
    if not threshold_lr_scale > 0:
        raise OpenscopeError(f"threshold_lr_scale must be positive, got {threshold_lr_scale!r}")
    thresholds = [p for n, p in coder.named_parameters() if n == "log_threshold"]
    others = [p for n, p in coder.named_parameters() if n != "log_threshold"]
    groups: list[dict] = [{"params": others, "lr_scale": 1.0}]
    if thresholds:
        groups.append({"params": thresholds, "lr_scale": threshold_lr_scale})
    return torch.optim.Adam(groups, lr=lr, betas=(0.0, 0.999))


def check_sparsity(cfg: StepConfig, activation: str) -> None:
    """The sparsity loss fits the activation: the L0 losses need JumpReLU, L1 needs ReLU."""
    needs = {"quadratic_l0": "jumprelu", "l0": "jumprelu", "l1": "relu"}.get(cfg.sparsity)
    if needs is not None and activation != needs:
        raise OpenscopeError(f"{cfg.sparsity} sparsity needs a {needs} coder, not {activation}")


def train_step(
    coder: SparseCoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor | None,
    cfg: StepConfig,
    step: int,
    tracker: DeadLatentTracker | None = None,
) -> StepStats:
    """One optimisation step on raw activations x (input) and y (target; None for an SAE)."""
    ccfg = coder.cfg
    check_sparsity(cfg, ccfg.activation)
    target = x if y is None else y
    if target.shape != (x.shape[0], ccfg.d_out):
        raise OpenscopeError(f"target must be [{x.shape[0]}, {ccfg.d_out}], got {list(target.shape)}")
    prefixes = tuple(m for m in cfg.matryoshka_prefixes if m < ccfg.width)
    if any(m > ccfg.width for m in cfg.matryoshka_prefixes):
        raise OpenscopeError(f"Matryoshka prefixes {cfg.matryoshka_prefixes} exceed the width {ccfg.width}")

    lr = L.lr_at(step, cfg.lr, cfg.lr_warmup_steps, cfg.total_steps, cfg.lr_decay_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    lam = L.sparsity_coeff_at(step, cfg.sparsity_coeff, cfg.sparsity_warmup_steps)

    use_aux = tracker is not None and ccfg.activation in ("topk", "batchtopk") and cfg.aux_coeff > 0
    dead = tracker.dead_mask().to(x.device) if tracker is not None else None
    optimizer.zero_grad(set_to_none=True)
    out = coder(x, prefixes=prefixes, dead=dead if use_aux else None, aux_k=cfg.aux_k, path=cfg.path)

    # Losses in normalised units: divide raw targets/reconstructions by C_out.
    c = coder.scale_out
    yn, recon = target / c, out.reconstruction / c
    if cfg.matryoshka_prefixes:
        recons = [r / c for r in out.prefix_reconstructions] + [recon]
        rec = L.matryoshka_loss(yn, recons, L.matryoshka_weights(len(recons), cfg.matryoshka_weights))
    else:
        rec = L.reconstruction_loss(yn, recon)
    zero = rec.new_zeros(())
    if cfg.sparsity == "quadratic_l0":
        assert cfg.target_l0 is not None
        sparsity = L.l0_quadratic_loss(out.l0, cfg.target_l0, lam)
    elif cfg.sparsity == "l0":
        sparsity = L.l0_linear_loss(out.l0, lam)
    elif cfg.sparsity == "l1":
        sparsity = L.l1_loss(out.l1, lam)
    else:
        sparsity = zero
    freq = zero
    if ccfg.activation == "jumprelu" and cfg.freq_coeff > 0:
        freq = L.frequency_penalty(out.fire_rate, cfg.max_fire_rate, cfg.freq_coeff)
    aux = zero
    if out.aux_reconstruction is not None:
        aux = L.aux_k_loss((yn - recon).detach(), out.aux_reconstruction / c, cfg.aux_coeff)

    loss = rec + sparsity + freq + aux
    loss.backward()
    coder.remove_parallel_grad_()
    optimizer.step()
    coder.normalize_decoder_()

    fired = out.fire_rate.detach() > 0
    if tracker is not None:
        tracker.update(fired, x.shape[0])
    n_dead = int(tracker.dead_mask().sum()) if tracker is not None else 0
    return StepStats(
        loss=float(loss.detach()),
        reconstruction=float(rec.detach()),
        sparsity=float(sparsity.detach()),
        frequency=float(freq.detach()),
        aux=float(aux.detach()),
        l0=float(out.l0.detach()),
        fvu=float(L.fvu(yn, recon.detach())),
        dead=n_dead,
        lr=lr,
        sparsity_coeff=lam,
    )


class CLTStepStats(NamedTuple):
    """What one CLT step measured (normalised units); per-layer lists are in layer order."""

    loss: float
    """Total loss that was minimised."""
    reconstruction: float
    """Reconstruction (or Matryoshka) loss, summed over layers."""
    sparsity: float
    """Sparsity loss (λ included), summed over layers."""
    frequency: float
    """Frequency penalty (λ_f included)."""
    l0: list[float]
    """Mean firing latents per token, per layer."""
    fvu: list[float]
    """Fraction of variance unexplained of each layer's target by the full reconstruction."""
    dead: list[int]
    """Latents per layer that have not fired for the tracker's window (0s without a tracker)."""
    lr: float
    """Learning rate used."""
    sparsity_coeff: float
    """λ used (after warm-up)."""


def clt_train_step(
    clt: CrossLayerCoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    cfg: StepConfig,
    step: int,
    tracker: DeadLatentTracker | None = None,
) -> CLTStepStats:
    """One optimisation step on normalised inputs x [L, B, d_in] and targets y [L, B, d_out]."""
    ccfg = clt.cfg
    check_sparsity(cfg, ccfg.activation)
    if cfg.sparsity == "none":
        raise OpenscopeError("a CLT (jumprelu or relu) needs a sparsity loss; sparsity none is for topk")
    n = ccfg.n_layers
    if y.shape != (n, x.shape[1], ccfg.d_out):
        raise OpenscopeError(f"CLT targets must be [{n}, {x.shape[1]}, {ccfg.d_out}], got {list(y.shape)}")
    if any(p > ccfg.width for p in cfg.matryoshka_prefixes):
        raise OpenscopeError(f"Matryoshka prefixes {cfg.matryoshka_prefixes} exceed the width {ccfg.width}")
    prefixes = tuple(p for p in cfg.matryoshka_prefixes if p < ccfg.width)

    lr = L.lr_at(step, cfg.lr, cfg.lr_warmup_steps, cfg.total_steps, cfg.lr_decay_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    lam = L.sparsity_coeff_at(step, cfg.sparsity_coeff, cfg.sparsity_warmup_steps)

    optimizer.zero_grad(set_to_none=True)
    out = clt.train_forward(x, prefixes=prefixes, path=cfg.path)
    # reconstruction_loss means over all leading dims ([L, B]): × L makes it the sum over layers.
    if cfg.matryoshka_prefixes:
        recons = [*out.prefix_reconstructions, out.reconstruction]
        weights = L.matryoshka_weights(len(recons), cfg.matryoshka_weights)
        rec = n * L.matryoshka_loss(y, recons, weights)
    else:
        rec = n * L.reconstruction_loss(y, out.reconstruction)
    if cfg.sparsity == "quadratic_l0":
        assert cfg.target_l0 is not None
        sparsity = L.l0_quadratic_loss(out.l0, cfg.target_l0, lam).sum()
    elif cfg.sparsity == "l0":
        sparsity = L.l0_linear_loss(out.l0, lam).sum()
    else:
        sparsity = L.l1_loss(out.l1, lam).sum()
    freq = rec.new_zeros(())
    if ccfg.activation == "jumprelu" and cfg.freq_coeff > 0:
        freq = L.frequency_penalty(out.fire_rate.flatten(), cfg.max_fire_rate, cfg.freq_coeff)

    loss = rec + sparsity + freq
    loss.backward()
    clt.remove_parallel_grad_()
    optimizer.step()
    clt.normalize_decoder_()

    dead = [0] * n
    if tracker is not None:
        tracker.update((out.fire_rate.detach() > 0).flatten(), x.shape[1])
        dead = [int(v) for v in tracker.dead_mask().view(n, -1).sum(1)]
    return CLTStepStats(
        loss=float(loss.detach()),
        reconstruction=float(rec.detach()),
        sparsity=float(sparsity.detach()),
        frequency=float(freq.detach()),
        l0=[float(v) for v in out.l0.detach()],
        fvu=[float(v) for v in L.fvu_per_layer(y, out.reconstruction.detach())],
        dead=dead,
        lr=lr,
        sparsity_coeff=lam,
    )
