"""The cross-layer transcoder (CLT): one encoder per layer; a latent writes to its layer and every later one.

Over L consecutive layers (indices ℓ, m = 0..L−1, relative to the first layer the CLT covers):

    a_ℓ = σ(x_ℓ W_enc^ℓ + b_enc^ℓ)                          latents read at layer ℓ
    ŷ_m = Σ_{ℓ≤m} a_ℓ W_dec^{ℓ→m} + b_dec^m  (+ x_m A_m)      prediction for layer m

x_ℓ is the input site at layer ℓ (Gemma Scope 2: the MLP input, `pre_feedforward_layernorm` output)
and ŷ_m predicts the output site at layer m (the MLP output). σ is JumpReLU (θ = exp(log θ) per latent,
the same straight-through estimator as `SparseCoder`) or ReLU. The width is L·F latents in all, F per
layer. Like a saved `SparseCoder`, the weights take raw activations (no normalisation inside).

Parameters: w_enc [L, d_in, F], b_enc [L, F], log_threshold [L, F] (JumpReLU), w_dec — one tensor per
source layer, w_dec[ℓ] [F, L−ℓ, d_out] whose slice [:, m−ℓ] is W_dec^{ℓ→m} (only m ≥ ℓ is stored), b_dec
[L, d_out], w_skip [L, d_in, d_out] (optional, A_m applied as x_m @ A_m). Activations for all layers are
stacked: x [L, B, d_in], latents [L, B, F], ŷ [L, B, d_out].

Training (a later issue) can use this module as it is: every weight is an `nn.Parameter`, `forward`
returns the reconstruction and dense latents, `fire_rate`/L0 come from `activations.step` on
`pre_activations` exactly as for `SparseCoder`, and the decoder norm of latent j at layer ℓ (for a
norm-weighted sparsity penalty) is the norm of w_dec[ℓ][j] over all its target layers (`decoder_norms`).
Gemma Scope 2 initialised CLTs from Matryoshka prefixes of single-layer transcoders (DESIGN §3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from openscope.coders import activations as act
from openscope.coders.coder import unit_rows
from openscope.errors import OpenscopeError


@dataclass(frozen=True)
class CLTConfig:
    """Shape and kind of a cross-layer transcoder."""

    n_layers: int
    """Number of consecutive layers L the CLT reads from and writes to."""
    d_in: int
    """Width of the input activation at each layer."""
    d_out: int
    """Width of the predicted activation at each layer."""
    width: int
    """Latents per layer F (the CLT has n_layers·width latents in all)."""
    activation: Literal["jumprelu", "relu"] = "jumprelu"
    """jumprelu (Gemma Scope 2) or relu."""
    skip: bool = False
    """Add a linear skip x_m @ A_m per layer (zero-initialised)."""
    init_threshold: float = 0.001
    """Initial JumpReLU threshold θ."""
    bandwidth: float = act.BANDWIDTH
    """Bandwidth ε of the JumpReLU straight-through rectangle kernel."""
    seed: int = 0
    """Seed of the weight initialisation."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_in", "d_out", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OpenscopeError(f"CLT {name} must be a positive integer, got {value!r}")
        if self.activation not in ("jumprelu", "relu"):
            raise OpenscopeError(f"CLT activation must be jumprelu or relu, got {self.activation!r}")


class CLTOutput(NamedTuple):
    """One CLT forward pass over all its layers."""

    reconstruction: Tensor
    """[L, B, d_out] ŷ_m for every layer m."""
    latents: Tensor
    """[L, B, F] a_ℓ for every layer ℓ (dense)."""


class CrossLayerCoder(nn.Module):
    """A cross-layer transcoder: see the module docstring for the math and the parameter shapes."""

    log_threshold: nn.Parameter | None
    w_skip: nn.Parameter | None

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, f = cfg.n_layers, cfg.width
        gen = torch.Generator().manual_seed(cfg.seed)
        self.w_enc = nn.Parameter(
            unit_rows(torch.randn(n, f, cfg.d_in, generator=gen)).transpose(1, 2).contiguous()
        )
        self.b_enc = nn.Parameter(torch.zeros(n, f))
        # Each latent's decoder rows over its target layers start with unit norm in total.
        self.w_dec = nn.ParameterList(
            nn.Parameter(
                unit_rows(torch.randn(f, (n - src) * cfg.d_out, generator=gen)).reshape(f, n - src, cfg.d_out)
            )
            for src in range(n)
        )
        self.b_dec = nn.Parameter(torch.zeros(n, cfg.d_out))
        self.log_threshold = None
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n, f), math.log(cfg.init_threshold)))
        self.w_skip = nn.Parameter(torch.zeros(n, cfg.d_in, cfg.d_out)) if cfg.skip else None

    def threshold(self) -> Tensor:
        """θ [L, F] (JumpReLU)."""
        if self.log_threshold is None:
            raise OpenscopeError("a relu CLT has no threshold")
        return self.log_threshold.exp()

    def decoder(self, source: int, target: int) -> Tensor:
        """W_dec^{source→target} [F, d_out] (target ≥ source)."""
        n = self.cfg.n_layers
        if not 0 <= source <= target < n:
            raise OpenscopeError(f"no decoder from layer {source} to layer {target} in a {n}-layer CLT")
        return self.w_dec[source][:, target - source]

    def decoder_norms(self) -> Tensor:
        """[L, F] the norm of each latent's decoder rows over all the layers it writes to."""
        return torch.stack([w.flatten(1).norm(dim=1) for w in self.w_dec])

    def _check_input(self, x: Tensor, name: str = "x") -> None:
        n, d = self.cfg.n_layers, self.cfg.d_in
        if x.ndim != 3 or x.shape[0] != n or x.shape[2] != d:
            raise OpenscopeError(f"CLT {name} must be [{n} layers, batch, {d}], got {list(x.shape)}")

    def pre_activations(self, x: Tensor) -> Tensor:
        """z [L, B, F] for raw inputs x [L, B, d_in]."""
        self._check_input(x)
        return torch.baddbmm(self.b_enc.unsqueeze(1), x, self.w_enc)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents a [L, B, F] for raw inputs x [L, B, d_in]."""
        z = self.pre_activations(x)
        if self.log_threshold is None:
            return act.relu(z)
        return act.jumprelu(z, self.threshold().unsqueeze(1), self.cfg.bandwidth)

    def decode(self, a: Tensor, x: Tensor | None = None) -> Tensor:
        """ŷ [L, B, d_out] from latents a [L, B, F]; with a skip connection the inputs x are needed."""
        n, f, d = self.cfg.n_layers, self.cfg.width, self.cfg.d_out
        if a.ndim != 3 or a.shape[0] != n or a.shape[2] != f:
            raise OpenscopeError(f"CLT latents must be [{n} layers, batch, {f}], got {list(a.shape)}")
        out = self.b_dec.unsqueeze(1).expand(n, a.shape[1], d).clone()
        for src in range(n):
            # One product per source layer writes to all its target layers at once.
            contribution = a[src] @ self.w_dec[src].reshape(f, (n - src) * d)
            out[src:] += contribution.reshape(a.shape[1], n - src, d).transpose(0, 1)
        if self.w_skip is not None:
            if x is None:
                raise OpenscopeError("a CLT with a skip connection needs the inputs x to decode")
            self._check_input(x)
            out = out + torch.bmm(x, self.w_skip)
        return out

    def forward(self, x: Tensor) -> CLTOutput:
        """Encode and decode raw inputs x [L, B, d_in]."""
        a = self.encode(x)
        return CLTOutput(self.decode(a, x), a)
