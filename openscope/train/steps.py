"""One training step of a sparse dictionary: forward, losses, backward, constrained Adam step.

Not the trainer (data loop, checkpoints, logging: `openscope.train.loop`): `train_step` (a single-layer
SAE or transcoder) and `clt_train_step` (a cross-layer transcoder) are the pure cores a trainer calls
once per batch, returning a `StepStats` / `CLTStepStats` of plain floats.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from openscope.coders import losses as L
from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import Path, SparseCoder
from openscope.coders.matryoshka import random_prefixes
from openscope.errors import OpenscopeError
from openscope.train.parallel import Replicas, fvu_of, fvu_sums
from openscope.train.revive import resample_dead_, resample_dead_clt_

Sparsity = Literal["quadratic_l0", "l0", "l1", "none"]
Revive = Literal["none", "aux", "resample", "preact"]


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
    revive: Revive = "none"
    """Dead latents of a jumprelu/relu coder: none; aux (the AuxK loss as for topk: the top aux_k dead
    pre-activations must reconstruct the error; single-layer coders only); resample (every resample_every
    steps, restart each dead latent on a poorly reconstructed token, Adam state reset:
    `openscope.train.revive`); preact (jumprelu: the pre-activation loss, preact_coeff·Σ_dead max(0, θ − z),
    raises dead latents' pre-activations until they fire). Needs the trainer's dead-latent tracker."""
    preact_coeff: float = 1e-4
    """λ_p of revive preact (normalised units; with Adam it sets how large a revived latent's first
    reconstruction steps are against the ones that revived it, not how fast it revives)."""
    resample_every: int = 250
    """revive resample: steps between resamplings (a latent resampled gets a fresh dead window); none
    in the run's last max(lr_decay_steps, resample_every) steps, so every restarted latent has time to
    settle."""
    matryoshka_prefixes: tuple[int, ...] = ()
    """Nested prefix sizes (strictly increasing); the full width is appended if missing. Empty:
    plain reconstruction loss."""
    matryoshka_weights: tuple[float, ...] | None = None
    """One weight per prefix (including the appended full width); None: equal, summing to 1."""
    matryoshka_random: int = 0
    """Random Matryoshka prefixes: this many lengths drawn every step, log-uniform over 1..width, plus
    the full width (`openscope.coders.matryoshka`); 0: the fixed matryoshka_prefixes (or none)."""
    matryoshka_seed: int = 0
    """Seed of the random prefix draws (each step's draw is a pure function of seed and step)."""
    target_l0_start: float | None = None
    """Quadratic L0: the target at step 0, decaying linearly to target_l0 over target_l0_decay_steps
    (a CLT from greedily chosen transcoder latents starts at their summed L0); None: target_l0 throughout."""
    target_l0_decay_steps: int = 0
    """Steps over which the target L0 goes from target_l0_start to target_l0."""
    path: Path = "auto"
    """Forward implementation: auto, sparse or dense (see SparseCoder.forward)."""
    bf16: bool = False
    """Run the dictionary's matrix products in bfloat16 under autocast (float32 master weights, Adam
    state, losses and statistics); off: float32 throughout."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise OpenscopeError(f"learning rate must be positive, got {self.lr!r}")
        if self.sparsity not in ("quadratic_l0", "l0", "l1", "none"):
            raise OpenscopeError(f"unknown sparsity loss {self.sparsity!r}")
        if self.sparsity == "quadratic_l0" and (self.target_l0 is None or not self.target_l0 > 0):
            raise OpenscopeError(f"quadratic_l0 needs a positive target_l0, got {self.target_l0!r}")
        for name in ("sparsity_coeff", "freq_coeff", "aux_coeff", "preact_coeff"):
            if getattr(self, name) < 0:
                raise OpenscopeError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.aux_k < 0:
            raise OpenscopeError(f"aux_k must be >= 0, got {self.aux_k!r}")
        if self.revive not in ("none", "aux", "resample", "preact"):
            raise OpenscopeError(f"unknown revival {self.revive!r}; expected none, aux, resample or preact")
        if self.resample_every < 1:
            raise OpenscopeError(f"resample_every must be >= 1, got {self.resample_every!r}")
        p = self.matryoshka_prefixes
        if any(m < 1 for m in p) or any(b <= a for a, b in itertools.pairwise(p)):
            raise OpenscopeError(f"Matryoshka prefixes must be positive and strictly increasing, got {p}")
        if self.matryoshka_random < 0 or (self.matryoshka_random and p):
            raise OpenscopeError(
                "Matryoshka prefixes are fixed or a positive number of random ones, not both"
            )
        if self.target_l0_start is not None and not self.target_l0_start > 0:
            raise OpenscopeError(f"target_l0_start must be positive, got {self.target_l0_start!r}")


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
    """Revival loss: AuxK (α included) or the pre-activation loss (λ_p included)."""
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

    def revived_(self, resampled: Tensor) -> None:
        """Give the latents `resampled` ([F] bool) a fresh dead window: they count as alive until they
        have had one to fire in."""
        self.tokens_since_fired[resampled.cpu()] = 0


def resample_due(cfg: StepConfig, step: int, replicas: Replicas | None) -> bool:
    """Whether this step ends with a resampling of the dead latents (revive resample)."""
    if cfg.revive != "resample" or (step + 1) % cfg.resample_every:
        return False
    if cfg.total_steps and step + 1 > cfg.total_steps - max(cfg.lr_decay_steps, cfg.resample_every):
        # A restarted latent fires on a broad cone of inputs until training narrows it: one restarted in
        # the last stretch (the lr decay, or less than one period before the end) ships unsettled.
        # Measured on 270M layer 9 (245 steps, a resampling at step 243): held-out FVU 11.4 against 0.085.
        return False
    if replicas is not None:
        raise OpenscopeError(
            "revive resample draws from one process's batch: not with data-parallel replicas"
        )
    return True


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
    """The sparsity loss fits the activation: the L0 losses need JumpReLU, L1 needs ReLU; so does the
    pre-activation revival (it pulls towards θ)."""
    needs = {"quadratic_l0": "jumprelu", "l0": "jumprelu", "l1": "relu"}.get(cfg.sparsity)
    if needs is not None and activation != needs:
        raise OpenscopeError(f"{cfg.sparsity} sparsity needs a {needs} coder, not {activation}")
    if cfg.revive == "preact" and activation != "jumprelu":
        raise OpenscopeError(f"revive preact needs a jumprelu coder (it pulls towards θ), not {activation}")


def step_prefixes(cfg: StepConfig, step: int, width: int) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """(the Matryoshka prefixes below the width this step reconstructs from, the loss weights of those and
    of the full width, last); weights None: Matryoshka is off (plain reconstruction loss)."""
    if cfg.matryoshka_random:
        return random_prefixes(cfg.matryoshka_random, width, cfg.matryoshka_seed, step)
    if not cfg.matryoshka_prefixes:
        return (), None
    if cfg.matryoshka_prefixes[-1] > width:
        raise OpenscopeError(f"Matryoshka prefixes {cfg.matryoshka_prefixes} exceed the width {width}")
    prefixes = tuple(m for m in cfg.matryoshka_prefixes if m < width)
    return prefixes, L.matryoshka_weights(len(prefixes) + 1, cfg.matryoshka_weights)


def target_l0_now(cfg: StepConfig, step: int) -> float | None:
    """The quadratic L0 loss's target at a step (see `StepConfig.target_l0_start`)."""
    if cfg.target_l0 is None or cfg.target_l0_start is None:
        return cfg.target_l0
    return L.decaying_target(step, cfg.target_l0_start, cfg.target_l0, cfg.target_l0_decay_steps)


def autocast(cfg: StepConfig, x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast of the products on x's device when cfg.bf16, else nothing."""
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, dtype=torch.bfloat16)


def _schedules(cfg: StepConfig, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float]:
    """(learning rate, λ) at this step; the rate is set on the optimiser's groups (× their lr_scale)."""
    lr = L.lr_at(step, cfg.lr, cfg.lr_warmup_steps, cfg.total_steps, cfg.lr_decay_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr, L.sparsity_coeff_at(step, cfg.sparsity_coeff, cfg.sparsity_warmup_steps)


def sparsity_loss(cfg: StepConfig, l0: Tensor, l1: Tensor, lam: float, zero: Tensor, step: int = 0) -> Tensor:
    """The step's sparsity loss (λ = lam included) of the batch's L0 and L1 (per layer for a CLT);
    `zero` for sparsity none (topk/batchtopk: sparsity is structural)."""
    if cfg.sparsity == "quadratic_l0":
        target = target_l0_now(cfg, step)
        assert target is not None
        return L.l0_quadratic_loss(l0, target, lam)
    if cfg.sparsity == "l0":
        return L.l0_linear_loss(l0, lam)
    if cfg.sparsity == "l1":
        return L.l1_loss(l1, lam)
    return zero


def train_step(
    coder: SparseCoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor | None,
    cfg: StepConfig,
    step: int,
    tracker: DeadLatentTracker | None = None,
    replicas: Replicas | None = None,
    loss_term: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> StepStats:
    """One optimisation step on raw activations x (input) and y (target; None for an SAE). With `replicas`,
    this replica's rows of the global batch: statistics reduced and gradients averaged over the replicas,
    so the step is a single process's on the whole batch (`openscope.train.parallel`). `loss_term(rec, raw
    reconstruction)` replaces the reconstruction loss rec (KL fine-tuning, `openscope.train.finetune`)."""
    ccfg = coder.cfg
    check_sparsity(cfg, ccfg.activation)
    target = x if y is None else y
    if target.shape != (x.shape[0], ccfg.d_out):
        raise OpenscopeError(f"target must be [{x.shape[0]}, {ccfg.d_out}], got {list(target.shape)}")
    prefixes, weights = step_prefixes(cfg, step, ccfg.width)

    lr, lam = _schedules(cfg, optimizer, step)

    aux_kind = ccfg.activation in ("topk", "batchtopk") or cfg.revive == "aux"
    use_aux = tracker is not None and aux_kind and cfg.aux_coeff > 0
    dead = tracker.dead_mask().to(x.device) if tracker is not None else None
    optimizer.zero_grad(set_to_none=True)
    cutoff = None
    if replicas is not None and ccfg.activation == "batchtopk":
        assert ccfg.k is not None
        cutoff = replicas.batchtopk_cutoff(ccfg.k, x.shape[0] * replicas.size)
    with autocast(cfg, x):
        aux_dead = dead if use_aux else None
        out = coder(x, prefixes=prefixes, dead=aux_dead, aux_k=cfg.aux_k, path=cfg.path, batch_cutoff=cutoff)

    # Losses in normalised units: divide raw targets/reconstructions by C_out.
    c = coder.scale_out
    yn, recon = target / c, out.reconstruction / c
    if weights is not None:
        rec = L.matryoshka_loss(yn, [r / c for r in out.prefix_reconstructions] + [recon], weights)
    else:
        rec = L.reconstruction_loss(yn, recon)
    l0, fire_rate, l1, fvu = out.l0, out.fire_rate, out.l1, None
    aux_terms = None
    if out.aux_reconstruction is not None:
        residual = (yn - recon).detach()
        aux_terms = (
            L.reconstruction_loss(residual, out.aux_reconstruction / c),
            residual.pow(2).sum(-1).mean(),
        )
    if replicas is not None:
        g = replicas.global_means(
            {"rec": rec, "l0": l0, "fire_rate": fire_rate, "l1": l1}
            | ({"aux": aux_terms[0], "aux_norm": aux_terms[1]} if aux_terms is not None else {}),
            fvu_sums(yn, recon, ()),
        )
        rec, l0, fire_rate, l1, fvu = g["rec"], g["l0"], g["fire_rate"], g["l1"], fvu_of(g)
        aux_terms = (g["aux"], g["aux_norm"]) if aux_terms is not None else None
    zero = rec.new_zeros(())
    sparsity = sparsity_loss(cfg, l0, l1, lam, zero, step)
    freq = zero
    if ccfg.activation == "jumprelu" and cfg.freq_coeff > 0:
        freq = L.frequency_penalty(fire_rate, cfg.max_fire_rate, cfg.freq_coeff)
    aux = zero if aux_terms is None else L.aux_k_normalised(*aux_terms, cfg.aux_coeff)
    if cfg.revive == "preact" and dead is not None and bool(dead.any()):
        idx = dead.nonzero().squeeze(1)
        with autocast(cfg, x):
            z_dead = coder.pre_activations(x, idx).float()
        aux = aux + L.pre_activation_loss(z_dead, coder.threshold()[idx], cfg.preact_coeff)

    loss = (rec if loss_term is None else loss_term(rec, out.reconstruction)) + sparsity + freq + aux
    loss.backward()
    if replicas is not None:
        replicas.average_grads_(coder)
    coder.remove_parallel_grad_()
    optimizer.step()
    coder.normalize_decoder_()

    fired = fire_rate.detach() > 0
    if tracker is not None:
        tracker.update(fired, x.shape[0] * (1 if replicas is None else replicas.size))
        if resample_due(cfg, step, replicas):
            dead_now = tracker.dead_mask()
            resample_dead_(coder, optimizer, x, target, dead_now, ccfg.seed + step)
            tracker.revived_(dead_now)
    n_dead = int(tracker.dead_mask().sum()) if tracker is not None else 0
    return StepStats(
        loss=float(loss.detach()),
        reconstruction=float(rec.detach()),
        sparsity=float(sparsity.detach()),
        frequency=float(freq.detach()),
        aux=float(aux.detach()),
        l0=float(l0.detach()),
        fvu=float(L.fvu(yn, recon.detach()) if fvu is None else fvu),
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


def clt_preact_loss(clt: CrossLayerCoder, x: Tensor, dead: Tensor, cfg: StepConfig) -> Tensor:
    """The pre-activation loss (`losses.pre_activation_loss`) of a CLT's dead latents (dead [L, F]) on
    normalised inputs x [L, B, d_in], summed over layers as the CLT's other losses are."""
    total = x.new_zeros(())
    theta = clt.threshold()
    for i in dead.any(1).nonzero().squeeze(1).tolist():
        idx = dead[i].nonzero().squeeze(1)
        with autocast(cfg, x):
            z = torch.addmm(clt.b_enc[i][idx], x[i], clt.w_enc[i][:, idx]).float()
        total = total + L.pre_activation_loss(z, theta[i][idx], cfg.preact_coeff)
    return total


def clt_train_step(
    clt: CrossLayerCoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    cfg: StepConfig,
    step: int,
    tracker: DeadLatentTracker | None = None,
    replicas: Replicas | None = None,
) -> CLTStepStats:
    """One optimisation step on normalised inputs x [L, B, d_in] and targets y [L, B, d_out] (with
    `replicas`: this replica's rows of the global batch, as in `train_step`)."""
    ccfg = clt.cfg
    check_sparsity(cfg, ccfg.activation)
    if cfg.sparsity == "none":
        raise OpenscopeError("a CLT (jumprelu or relu) needs a sparsity loss; sparsity none is for topk")
    n = ccfg.n_layers
    if y.shape != (n, x.shape[1], ccfg.d_out):
        raise OpenscopeError(f"CLT targets must be [{n}, {x.shape[1]}, {ccfg.d_out}], got {list(y.shape)}")
    prefixes, weights = step_prefixes(cfg, step, ccfg.width)
    if cfg.revive == "aux":
        raise OpenscopeError("revive aux (AuxK) is for single-layer coders; a CLT revives with resample")

    lr, lam = _schedules(cfg, optimizer, step)

    optimizer.zero_grad(set_to_none=True)
    with autocast(cfg, x):
        out = clt.train_forward(x, prefixes=prefixes, path=cfg.path)
    # reconstruction_loss means over all leading dims ([L, B]): × L makes it the sum over layers.
    if weights is not None:
        rec = n * L.matryoshka_loss(y, [*out.prefix_reconstructions, out.reconstruction], weights)
    else:
        rec = n * L.reconstruction_loss(y, out.reconstruction)
    l0, fire_rate, l1, fvu = out.l0, out.fire_rate, out.l1, None
    if replicas is not None:
        g = replicas.global_means(
            {"rec": rec, "l0": l0, "fire_rate": fire_rate, "l1": l1}, fvu_sums(y, out.reconstruction, (0,))
        )
        rec, l0, fire_rate, l1, fvu = g["rec"], g["l0"], g["fire_rate"], g["l1"], fvu_of(g)
    sparsity = sparsity_loss(cfg, l0, l1, lam, rec.new_zeros(()), step).sum()  # per layer, summed
    freq = rec.new_zeros(())
    if ccfg.activation == "jumprelu" and cfg.freq_coeff > 0:
        freq = L.frequency_penalty(fire_rate.flatten(), cfg.max_fire_rate, cfg.freq_coeff)

    revival = rec.new_zeros(())
    if cfg.revive == "preact" and tracker is not None:
        revival = clt_preact_loss(clt, x, tracker.dead_mask().to(x.device).view(n, -1), cfg)

    loss = rec + sparsity + freq + revival
    loss.backward()
    if replicas is not None:
        replicas.average_grads_(clt)
    clt.remove_parallel_grad_()
    optimizer.step()
    clt.normalize_decoder_()

    dead = [0] * n
    if tracker is not None:
        rows = x.shape[1] * (1 if replicas is None else replicas.size)
        tracker.update((fire_rate.detach() > 0).flatten(), rows)
        if resample_due(cfg, step, replicas):
            dead_now = tracker.dead_mask()
            resample_dead_clt_(clt, optimizer, x, y, dead_now, ccfg.seed + step)
            tracker.revived_(dead_now)
        dead = [int(v) for v in tracker.dead_mask().view(n, -1).sum(1)]
    return CLTStepStats(
        loss=float(loss.detach()),
        reconstruction=float(rec.detach()),
        sparsity=float(sparsity.detach()),
        frequency=float(freq.detach()),
        l0=[float(v) for v in l0.detach()],
        fvu=[float(v) for v in (L.fvu_per_layer(y, out.reconstruction.detach()) if fvu is None else fvu)],
        dead=dead,
        lr=lr,
        sparsity_coeff=lam,
    )
