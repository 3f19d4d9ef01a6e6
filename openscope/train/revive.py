"""Reviving dead latents by resampling: a latent that has not fired for the dead window restarts as a
detector of one poorly reconstructed token of the current batch.

For each dead latent j (Anthropic's resampling, "Towards Monosemanticity", adapted to JumpReLU and to
cross-layer transcoders), on a batch in normalised units:

- a token b is drawn with probability ∝ ‖e_b‖², e = y − ŷ the reconstruction error (distinct tokens
  while the batch has enough of them with a non-zero error);
- decoder row d_j = e_b / ‖e_b‖ (a CLT's latent of layer ℓ: the error at layers ℓ..L−1 of token b,
  concatenated, unit norm over all of them, as `CrossLayerCoder.normalize_decoder_` keeps it);
- encoder: u = (x_b − x̄)/‖x_b − x̄‖ with x̄ the batch's mean input, and z_j = s·⟨x − x̄, u⟩, so the
  latent reads the direction in which token b differs from the average token (the residual stream's
  large constant part would otherwise make it fire everywhere);
- θ_j = the median θ of the live latents, and s = 2θ_j / ‖x_b − x̄‖: on token b, z_j = 2θ_j, so the
  latent fires there with a typical size, and on tokens whose centred input points within 60° of
  token b's;
- Adam: the latent's first moments restart at zero and its second moments at the mean over the live
  latents of the same parameter (zero second moments would make the next step ~30× the learning rate).

Latents that are alive are not touched, nor is anything else: on a dictionary with none dead a
resampling step is a no-op. The random draw is a pure function of the seed and step, so a resumed
run resamples as an uninterrupted one does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import SparseCoder, unit_rows


def draw_tokens(error: Tensor, n: int, seed: int) -> Tensor:
    """n token indices drawn ∝ ‖error_b‖² (error [B, d]); without replacement while enough tokens have
    an error, uniformly when none has."""
    weights = error.double().pow(2).sum(-1)
    if not bool((weights > 0).any()):
        weights = torch.ones_like(weights)
    gen = torch.Generator().manual_seed(seed)
    replace = n > int((weights > 0).sum())
    return torch.multinomial(weights.cpu(), n, replacement=replace, generator=gen).to(error.device)


def centred_directions(x: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(u [n, d], ‖x_b − x̄‖ [n], x̄ [d]) for the chosen tokens of inputs x [B, d]."""
    mean = x.mean(0)
    diff = x[tokens] - mean
    norm = diff.norm(dim=-1).clamp_min(1e-12)
    return diff / norm.unsqueeze(-1), norm, mean


@torch.no_grad()
def reset_adam_(
    optimizer: torch.optim.Optimizer,
    param: Tensor,
    dim: int,
    idx: Tensor,
    live: Tensor,
    layer: int | None = None,
) -> None:
    """Restart Adam's moments of the latents idx of param (latents along `dim`; of param[layer] when
    `layer` is set, a CLT's stacked parameters): first moment 0, second moment the mean over the `live`
    latents of the parameter's second moments (over all latents when none is live)."""
    state = optimizer.state.get(param)
    if not state or "exp_avg" not in state:
        return
    avg, sq = state["exp_avg"], state["exp_avg_sq"]
    if layer is not None:
        avg, sq = avg[layer], sq[layer]
    avg.movedim(dim, 0)[idx] = 0
    moved = sq.movedim(dim, 0)
    ref = moved[live] if bool(live.any()) else moved
    moved[idx] = ref.mean(0)


@torch.no_grad()
def resample_dead_(
    coder: SparseCoder, optimizer: torch.optim.Optimizer, x: Tensor, target: Tensor, dead: Tensor, seed: int
) -> int:
    """Resample the dead latents (dead [F] bool) of a JumpReLU/ReLU SparseCoder on a batch of raw inputs
    x and raw targets; returns how many were resampled."""
    idx = dead.to(x.device).nonzero().squeeze(1)
    if idx.numel() == 0:
        return 0
    live = ~dead.to(x.device)
    xs = x / coder.scale_in
    error = (target - coder(x, path="dense").reconstruction) / coder.scale_out
    tokens = draw_tokens(error, idx.numel(), seed)
    u, norm, mean = centred_directions(xs, tokens)
    theta = _live_theta(coder.threshold() if coder.log_threshold is not None else None, live)
    s = 2 * theta / norm
    coder.w_dec[idx] = unit_rows(error[tokens])
    coder.w_enc[:, idx] = (u * s.unsqueeze(1)).t()
    # z_j = (x̃ − b_dec)·w_j + b_enc[j] for an SAE with a pre-encoder bias, x̃·w_j + b_enc[j] otherwise.
    shift = coder.b_dec if coder.cfg.kind == "sae" and coder.cfg.pre_encoder_bias else torch.zeros_like(mean)
    coder.b_enc[idx] = s * ((shift - mean) * u).sum(-1)
    params = [(coder.w_dec, 0), (coder.w_enc, 1), (coder.b_enc, 0)]
    if coder.log_threshold is not None:
        coder.log_threshold[idx] = theta.log()
        params.append((coder.log_threshold, 0))
    for p, dim in params:
        reset_adam_(optimizer, p, dim, idx, live)
    return int(idx.numel())


def _live_theta(theta: Tensor | None, live: Tensor) -> Tensor:
    """The median θ of the live latents (ReLU: 1, a typical activation in normalised units)."""
    if theta is None:
        return torch.ones((), device=live.device)
    ref = theta[live] if bool(live.any()) else theta
    return ref.detach().median()


@torch.no_grad()
def resample_dead_clt_(
    clt: CrossLayerCoder, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, dead: Tensor, seed: int
) -> int:
    """`resample_dead_` for a cross-layer transcoder on normalised x [L, B, d_in], y [L, B, d_out]; dead
    [L·F] (the tracker's layout); returns how many latents were resampled."""
    n, f = clt.cfg.n_layers, clt.cfg.width
    dead = dead.to(x.device).view(n, f)
    if not bool(dead.any()):
        return 0
    error = y - clt.train_forward(x, path="dense").reconstruction  # [L, B, d_out]
    total = 0
    for src in range(n):
        idx = dead[src].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        live = ~dead[src]
        err = error[src:].transpose(0, 1).reshape(x.shape[1], -1)  # [B, (L−ℓ)·d]: every target layer
        tokens = draw_tokens(err, idx.numel(), seed * 1009 + src)
        u, norm, mean = centred_directions(x[src], tokens)
        theta = _live_theta(clt.threshold()[src] if clt.log_threshold is not None else None, live)
        s = 2 * theta / norm
        w_dec = clt.w_dec[src]
        w_dec[idx] = unit_rows(err[tokens]).view(idx.numel(), n - src, -1)
        clt.w_enc[src][:, idx] = (u * s.unsqueeze(1)).t()
        clt.b_enc[src][idx] = -s * (mean * u).sum(-1)
        reset_adam_(optimizer, w_dec, 0, idx, live)
        params = [(clt.w_enc, 1), (clt.b_enc, 0)]
        if clt.log_threshold is not None:
            clt.log_threshold[src][idx] = theta.log()
            params.append((clt.log_threshold, 0))
        for p, dim in params:
            reset_adam_(optimizer, p, dim, idx, live, layer=src)
        total += int(idx.numel())
    return total
