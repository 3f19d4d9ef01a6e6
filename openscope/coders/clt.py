"""The cross-layer transcoder (CLT) and the weakly causal crosscoder: one encoder per layer; a latent
writes to its layer and every later one.

Over L layers (indices ℓ, m = 0..L−1, relative to the first layer the coder covers):

    a_ℓ = σ(x_ℓ W_enc^ℓ + b_enc^ℓ)                          latents read at layer ℓ
    ŷ_m = Σ_{ℓ≤m} a_ℓ W_dec^{ℓ→m} + b_dec^m  (+ x_m A_m)      prediction for layer m

x_ℓ is the input site at layer ℓ (Gemma Scope 2: the MLP input, `pre_feedforward_layernorm` output)
and ŷ_m predicts the output site at layer m (the MLP output). σ is JumpReLU (θ = exp(log θ) per latent,
the same straight-through estimator as `SparseCoder`) or ReLU. The width is L·F latents in all, F per
layer. Like a saved `SparseCoder`, the weights take raw activations (no normalisation inside).

A weakly causal crosscoder (Gemma Scope 2) is the same math with inputs = targets: x_ℓ = y_ℓ is one
site kind (e.g. resid_post) at k chosen layers that need not be consecutive (e.g. 5, 9, 12, 15); its
encoder is block-diagonal over the concatenated activations (a latent reads only its own layer) and a
latent decodes into its layer and the later chosen ones only. `CLTConfig.kind` = "crosscoder" marks it
(no skip connection, d_in = d_out); which model layers it covers is the binding's business
(`openscope.coders.dictionary.Dictionary.layers`), as for a CLT.

Parameters: w_enc [L, d_in, F], b_enc [L, F], log_threshold [L, F] (JumpReLU), w_dec — one tensor per
source layer, w_dec[ℓ] [F, L−ℓ, d_out] whose slice [:, m−ℓ] is W_dec^{ℓ→m} (only m ≥ ℓ is stored), b_dec
[L, d_out], w_skip [L, d_in, d_out] (optional, A_m applied as x_m @ A_m). Activations for all layers are
stacked: x [L, B, d_in], latents [L, B, F], ŷ [L, B, d_out].

Training (`openscope.train.clt`) works in normalised units: the trainer feeds x_ℓ / C_in[ℓ] and
targets y_m / C_out[m] (one scale per layer and side), and `fold` turns the trained coder into one that
takes raw activations, which is what gets saved. Inside a model it runs one layer at a time through the
`openscope.coders.protocol.Coder` methods (`encode_at`, `decode_into`, ...), which a SparseCoder shares. `train_forward` is the training pass: a
"sparse" path that touches only the active latents (encoder backward and the decoder to every later
layer, through the same kernels as `SparseCoder`) and its "dense" reference twin; both return per-layer
L0 and firing rates with the JumpReLU straight-through gradient to θ.

Decoder norm. A latent's decoder is one row spanning all its target layers, so the unit-norm constraint
of single-layer dictionaries applies to the concatenation: ‖[W_dec^{ℓ→ℓ}, …, W_dec^{ℓ→L−1}]_j‖ = 1 in
normalised units, kept by `remove_parallel_grad_` + `normalize_decoder_` around each Adam step. Why
this rather than Anthropic's unconstrained decoder with a norm-weighted penalty: the JumpReLU (quadratic)
L0 penalty counts firing latents, so it cannot be gamed by moving scale from the encoder to the decoder
and needs no norm weighting; fixing the norm removes that scale symmetry, so Adam's step sizes (and the
faster log θ rate) mean the same for every latent, and any activation-valued penalty (ReLU's L1) is then
norm-weighted automatically (all norms are 1). It also lets a latent move its mass freely between the
layers it writes to, and matches an init from single-layer transcoders (unit rows, later blocks zero).
`decoder_norms` gives each latent's norm over all its target layers (1 for a trained CLT before folding).
Gemma Scope 2 initialised CLTs from Matryoshka prefixes of single-layer transcoders: `clt_from_transcoders`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from openscope.coders import activations as act
from openscope.coders.clt_decode import add_to_targets, decode_to_targets
from openscope.coders.coder import SparseCoder, unit_rows
from openscope.coders.protocol import Reconstruction
from openscope.coders.sparse import clt_dense_above, gathered_linear, make_entries, sum_to_targets
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
    kind: Literal["clt", "crosscoder"] = "clt"
    """clt (reads one site kind, predicts another) or crosscoder (reconstructs the sites it reads)."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_in", "d_out", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OpenscopeError(f"CLT {name} must be a positive integer, got {value!r}")
        if self.activation not in ("jumprelu", "relu"):
            raise OpenscopeError(f"CLT activation must be jumprelu or relu, got {self.activation!r}")
        if self.kind not in ("clt", "crosscoder"):
            raise OpenscopeError(f"a multi-layer coder is a clt or a crosscoder, not {self.kind!r}")
        if self.kind == "crosscoder" and (self.skip or self.d_in != self.d_out):
            raise OpenscopeError(
                f"a crosscoder reconstructs what it reads: no skip connection and d_in = d_out "
                f"(got skip={self.skip}, {self.d_in} -> {self.d_out})"
            )


class CLTTrainOutput(NamedTuple):
    """One training forward pass over all layers (in the units of the inputs given)."""

    reconstruction: Tensor
    """[L, B, d_out] ŷ_m for every layer m."""
    prefix_reconstructions: tuple[Tensor, ...]
    """[L, B, d_out] ŷ from only the first p latents of every layer, per requested Matryoshka prefix p."""
    l0: Tensor
    """[L] mean firing latents per token at each layer (JumpReLU: from the STE step, so it has a
    gradient to θ, as the L0 losses need)."""
    fire_rate: Tensor
    """[L, F] fraction of tokens on which each latent fires (STE gradient to θ for JumpReLU)."""
    l1: Tensor
    """[L] mean over tokens of Σ_j a_j (decoder rows are unit-norm over their target layers during
    training, so this is the norm-weighted L1)."""


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
        """z [L, B, F] for raw inputs x [L, B, d_in] (float32 even under autocast: a bfloat16 product, cast,
        so the activations, losses and statistics that follow are float32)."""
        self._check_input(x)
        return torch.baddbmm(self.b_enc.unsqueeze(1), x, self.w_enc).float()

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
        # One product per source layer writes to all its target layers at once.
        contributions = [
            a_src @ self.w_dec[src].reshape(f, (n - src) * d) for src, a_src in enumerate(a.unbind(0))
        ]
        out = sum_to_targets(contributions, d) + self.b_dec.unsqueeze(1)
        if self.w_skip is not None:
            if x is None:
                raise OpenscopeError("a CLT with a skip connection needs the inputs x to decode")
            self._check_input(x)
            out = out + torch.bmm(x, self.w_skip)
        return out

    def forward(self, x: Tensor) -> Reconstruction:
        """Encode and decode raw inputs x [L, B, d_in]."""
        a = self.encode(x)
        return Reconstruction(self.decode(a, x), a)

    # ---- running inside a model: the `Coder` interface, one layer at a time ----------------------

    @property
    def n_layers(self) -> int:
        """Layers L the CLT reads and writes."""
        return self.cfg.n_layers

    @property
    def kind(self) -> Literal["clt", "crosscoder"]:
        """clt or crosscoder (`CLTConfig.kind`)."""
        return self.cfg.kind

    def _check_layer(self, i: int) -> None:  # a negative i would silently index from the end
        if not 0 <= i < self.cfg.n_layers:
            raise OpenscopeError(f"no layer {i} in a {self.cfg.n_layers}-layer CLT")

    def pre_activations_at(self, i: int, x: Tensor) -> Tensor:
        """Layer i's z [N, F] for its raw inputs x [N, d_in]."""
        self._check_layer(i)
        return torch.addmm(self.b_enc[i], x, self.w_enc[i])

    def encode_at(self, i: int, x: Tensor) -> Tensor:
        """Layer i's latents a_i [N, F] for its raw inputs x [N, d_in]."""
        z = self.pre_activations_at(i, x)
        if self.log_threshold is None:
            return act.relu(z)
        return act.jumprelu(z, self.threshold()[i], self.cfg.bandwidth)

    def decode_into(self, m: int, latents: Sequence[Tensor], x: Tensor) -> Tensor:
        """ŷ_m [N, d_out] from the latents of layers 0..m (each [N, F]) and layer m's raw input x."""
        self._check_layer(m)
        out = self.b_dec[m] + latents[0] @ self.decoder(0, m)
        for j in range(1, m + 1):
            out = out + latents[j] @ self.decoder(j, m)
        if self.w_skip is not None:
            out = out + x @ self.w_skip[m]
        return out

    def encoder_vectors(self, i: int, latents: Tensor) -> Tensor:
        """[n, d_in] ∂z_j/∂x for the given latents j of layer i: their W_enc^i columns."""
        self._check_layer(i)
        return self.w_enc[i][:, latents].t()

    def decoder_vectors(self, i: int, m: int, latents: Tensor) -> Tensor:
        """[n, d_out] the given latents' rows of W_dec^{i→m}: what one unit of each adds to ŷ_m."""
        return self.decoder(i, m)[latents]

    def skip_at(self, m: int, x: Tensor) -> Tensor | None:
        """Layer m's skip term x A_m [N, d_out]; None without a skip connection."""
        self._check_layer(m)
        if self.w_skip is None:
            return None
        return x @ self.w_skip[m]

    def reconstruct(self, xs: Sequence[Tensor]) -> Reconstruction:
        """Latents [L, N, F] and ŷ [L, N, d_out] of every layer from each layer's raw input [N, d_in]."""
        x = torch.stack(list(xs))
        latents = self.encode(x)
        return Reconstruction(self.decode(latents, x), latents)

    # ---- training forward ----------------------------------------------------------------------

    def train_forward(
        self,
        x: Tensor,
        *,
        prefixes: tuple[int, ...] = (),
        path: Literal["auto", "sparse", "dense"] = "auto",
        sparse_max_density: float | None = None,
    ) -> CLTTrainOutput:
        """The training pass on inputs x [L, B, d_in]: reconstructions, Matryoshka prefix
        reconstructions, per-layer L0 and firing rates.

        path: "dense" (plain batched products: the reference) or "sparse" (encoder backward and decoder
        through the active latents only; the same numbers); "auto" takes the sparse path while at most
        `sparse_max_density` of the L·B·F latents are touched (None: the device's, `clt_dense_above`).
        """
        self._check_input(x)
        for p in prefixes:
            if not 1 <= p <= self.cfg.width:
                raise OpenscopeError(f"Matryoshka prefix {p} is outside 1..{self.cfg.width}")
        if list(prefixes) != sorted(set(prefixes)):
            raise OpenscopeError(f"Matryoshka prefixes must be strictly increasing, got {prefixes}")
        if path == "dense":
            return self._train_forward_dense(x, prefixes)
        with torch.no_grad():  # layer by layer: [B, F] blocks, not one [L, B, F] (see `losses`)
            z = [self.pre_activations_at(i, x[i]).float() for i in range(self.cfg.n_layers)]
            touched = [zi > cut for zi, cut in zip(z, self._selection_cut(), strict=True)]
        n_touched = sum(int(t.sum()) for t in touched)
        limit = clt_dense_above(x.device) if sparse_max_density is None else sparse_max_density
        if path == "auto" and n_touched > limit * x.shape[0] * x.shape[1] * self.cfg.width:
            return self._train_forward_dense(x, prefixes)
        return self._train_forward_sparse(x, z, touched, prefixes)

    def _selection_cut(self) -> Tensor:
        """[L, F] pre-activations above this are touched by the sparse path: firing latents, and for
        JumpReLU those within ε/2 below θ too (the kernel window, where θ gets its gradient)."""
        if self.log_threshold is None:
            return torch.zeros_like(self.b_enc)
        return self.threshold().detach() - self.cfg.bandwidth / 2

    def _activate_dense(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(a, fired) for pre-activations z [L, B, F]; fired carries the STE gradient for JumpReLU."""
        if self.log_threshold is None:
            a = act.relu(z)
            return a, (a.detach() > 0).to(a.dtype)
        theta = self.threshold().unsqueeze(1)
        return act.jumprelu(z, theta, self.cfg.bandwidth), act.step(z.detach(), theta, self.cfg.bandwidth)

    def _groups(self, prefixes: tuple[int, ...]) -> list[tuple[int, int]]:
        """Latent ranges [lo, hi) between consecutive Matryoshka prefixes, the last ending at the width."""
        bounds = [0, *(p for p in prefixes if p < self.cfg.width), self.cfg.width]
        return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]

    def _base(self, x: Tensor) -> Tensor:
        """What every reconstruction adds to its decoded latents: b_dec [L, 1, d_out], plus the skip
        x W_skip [L, B, d_out] (one fused product)."""
        base = self.b_dec.unsqueeze(1)
        return base if self.w_skip is None else torch.baddbmm(base, x, self.w_skip)

    def _outputs(
        self, base: Tensor, parts: list[Tensor], prefixes: tuple[int, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(ŷ, prefix ŷs) [L, B, d_out] from each latent group's decoded [L, B, d_out] (no bias); a
        prefix's reconstruction is the running sum of the groups up to it (nested prefixes: one decode)."""
        sums = list(itertools.accumulate(parts))
        by_end = {hi: total for (_, hi), total in zip(self._groups(prefixes), sums, strict=True)}
        return sums[-1] + base, tuple(by_end[p] + base for p in prefixes)

    def _train_forward_dense(self, x: Tensor, prefixes: tuple[int, ...]) -> CLTTrainOutput:
        f = self.cfg.width
        a, fired = self._activate_dense(self.pre_activations(x))
        groups = self._groups(prefixes)
        parts: list[list[Tensor]] = [[] for _ in groups]
        # unbind, not a[src]: autograd would give each a[src] its own zero-filled [L, B, F] gradient.
        for src, a_src in enumerate(a.unbind(0)):
            table = self.w_dec[src].reshape(f, -1)  # [F, (L−ℓ)·d]: every target layer in one product
            for contributions, (lo, hi) in zip(parts, groups, strict=True):
                contributions.append(a_src[:, lo:hi] @ table[lo:hi] if len(groups) > 1 else a_src @ table)
        decoded = [sum_to_targets(contributions, self.cfg.d_out) for contributions in parts]
        recon, prefix_recons = self._outputs(self._base(x), decoded, prefixes)
        return CLTTrainOutput(
            reconstruction=recon,
            prefix_reconstructions=prefix_recons,
            l0=fired.sum(-1).mean(-1),
            fire_rate=fired.mean(1),
            l1=a.sum(-1).mean(-1),
        )

    def _train_forward_sparse(
        self, x: Tensor, z: list[Tensor], touched: list[Tensor], prefixes: tuple[int, ...]
    ) -> CLTTrainOutput:
        n, f = self.cfg.n_layers, self.cfg.width
        b = x.shape[1]
        groups = self._groups(prefixes)
        parts: list[list[tuple[Tensor, ...]]] = [[] for _ in groups]
        l0, l1, rates = [], [], []
        # Per-layer parameters by unbind: indexing them per layer would give each index its own
        # zero-filled gradient of the whole parameter (L² traffic).
        w_enc, b_enc = self.w_enc.unbind(0), self.b_enc.unbind(0)
        thresholds = self.threshold().unbind(0) if self.log_threshold is not None else None
        for src in range(n):
            rows, cols = touched[src].nonzero(as_tuple=True)  # row-major, as make_entries wants
            e = make_entries(rows, cols, b, f)
            z_e = gathered_linear(x[src], w_enc[src], b_enc[src], z[src][rows, cols], e)
            if thresholds is None:
                a_e = act.relu(z_e)
                fired_e = (a_e.detach() > 0).to(a_e.dtype)
            else:
                theta = thresholds[src][cols]
                a_e = act.jumprelu(z_e, theta, self.cfg.bandwidth)
                fired_e = act.step(z_e.detach(), theta, self.cfg.bandwidth)
            # Decoded into all later layers, one [B, d] block per target layer (see `clt_decode`).
            for contributions, (lo, hi) in zip(parts, groups, strict=True):
                if len(groups) == 1:
                    values, sub = a_e, e
                else:
                    keep = (cols >= lo) & (cols < hi)
                    values, sub = a_e[keep], make_entries(rows[keep], cols[keep], b, f)
                contributions.append(decode_to_targets(values, self.w_dec[src], sub))
            l0.append(fired_e.sum() / b)
            l1.append(a_e.sum() / b)
            rates.append(torch.zeros(f, dtype=a_e.dtype, device=x.device).index_add(0, cols, fired_e) / b)
        base = self._base(x)
        if len(groups) == 1:  # the sum starts from the base: no [L, B, d] block for the decoded part alone
            recon, prefix_recons = add_to_targets(parts[0], base), ()
        else:
            recon, prefix_recons = self._outputs(base, [add_to_targets(c) for c in parts], prefixes)
        return CLTTrainOutput(
            reconstruction=recon,
            prefix_reconstructions=prefix_recons,
            l0=torch.stack(l0),
            fire_rate=torch.stack(rates),
            l1=torch.stack(l1),
        )

    # ---- constraints applied around the optimiser step (see the module docstring) --------------

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from each latent's decoder gradient its component along the latent's decoder row
        (all target layers together): keeps ‖row‖ fixed to first order, so Adam does not fight
        `normalize_decoder_`. In place, g −= (g·w / ‖w‖²) w: the decoder is most of a CLT's parameters,
        so temporaries the size of it would cost more than the arithmetic."""
        for w in self.w_dec:
            if w.grad is None:
                continue
            g, rows = w.grad.view(w.shape[0], -1), w.view(w.shape[0], -1)
            coef = torch.linalg.vecdot(g, rows) / torch.linalg.vecdot(rows, rows).clamp_min(1e-24)
            g.addcmul_(rows, coef.unsqueeze(1), value=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each latent's decoder row (all its target layers together) to unit norm, in place."""
        for w in self.w_dec:
            rows = w.view(w.shape[0], -1)
            rows.mul_(rows.norm(dim=1, keepdim=True).clamp_min(1e-12).reciprocal())

    # ---- data-dependent start (in the units of the data given: normalised during training) ------

    @torch.no_grad()
    def zero_cross_layer_decoders_(self) -> None:
        """Start as L independent transcoders: blocks W_dec^{ℓ→m} for m > ℓ become zero and each own-layer
        block unit-norm. Cross-layer writes then grow from the gradient (a_ℓᵀ times layer m's error)
        instead of starting as random directions the first steps must remove."""
        for w in self.w_dec:
            w[:, 1:] = 0
            w[:, 0] = unit_rows(w[:, 0])

    @torch.no_grad()
    def init_decoder_bias_(self, y: Tensor) -> None:
        """b_dec^m = the mean of a batch of targets y [L, B, d_out] (see `SparseCoder.init_decoder_bias_`)."""
        self.b_dec.copy_(y.float().mean(1))

    @torch.no_grad()
    def calibrate_threshold_(self, x: Tensor, target_l0: float, per_latent: bool = False) -> Tensor:
        """Per layer, set θ so the batch x [L, B, d_in] fires target_l0 latents per token: one value per
        layer, or with `per_latent` each latent's own (see `SparseCoder.calibrate_threshold_`); returns θ [L]
        (per latent: each layer's median)."""
        if self.log_threshold is None:
            raise OpenscopeError("a relu CLT has no threshold to calibrate")
        z = self.pre_activations(x)
        if per_latent:
            thetas = torch.stack([act.thresholds_for_rate(z[i], target_l0) for i in range(self.cfg.n_layers)])
            self.log_threshold.copy_(thetas.log().to(self.log_threshold))
            return thetas.median(1).values.cpu()
        theta = torch.tensor([act.threshold_for_l0(z[i], target_l0) for i in range(self.cfg.n_layers)])
        self.log_threshold.copy_(theta.log().unsqueeze(1).expand_as(self.log_threshold))
        return theta

    def _own_layer_residual(self, x: Tensor, y: Tensor, i: int) -> Tensor:
        """y_i − b_dec^i (− x_i A_i): what layer i's own latents must explain when nothing else writes to it."""
        resid = y[i] - self.b_dec[i]
        return resid - x[i] @ self.w_skip[i] if self.w_skip is not None else resid

    @torch.no_grad()
    def align_decoder_signs_(self, x: Tensor, y: Tensor) -> int:
        """Flip each latent's decoder row where its own-layer contribution on the batch points against its
        layer's residual target (Σ_b a_bj ⟨y_b − b_dec − x_b A, d_j⟩ < 0). A random row points either way;
        the encoder-scale fit can shrink contributions but not turn them round, so half the latents would
        start by making the reconstruction worse. Returns the number of rows flipped."""
        a = self.encode(x)
        flipped = 0
        for i in range(self.cfg.n_layers):
            lean = ((a[i].t() @ self._own_layer_residual(x, y, i)) * self.decoder(i, i)).sum(1)
            flip = lean < 0
            self.w_dec[i][flip] *= -1
            flipped += int(flip.sum())
        return flipped

    @torch.no_grad()
    def fit_encoder_scale_(self, x: Tensor, y: Tensor) -> Tensor:
        """Per source layer ℓ, scale the encoder (W_enc, b_enc, θ) by the least-squares s_ℓ that best fits
        layer ℓ's own target with its own latents: s = ⟨y_ℓ − b_dec − x_ℓA, r⟩ / ‖r‖², r = a_ℓ W_dec^{ℓ→ℓ}.
        Exact when the CLT writes only to its own layer (after `zero_cross_layer_decoders_`), as
        `SparseCoder.fit_encoder_scale_`. Returns s [L] (1 where the fit is degenerate)."""
        a = self.encode(x)
        scales = []
        for i in range(self.cfg.n_layers):
            r = a[i] @ self.decoder(i, i)
            resid = self._own_layer_residual(x, y, i)
            denom = float(r.pow(2).sum())
            s = float((resid * r).sum()) / denom if denom > 0 else 0.0
            s = s if s > 0 and math.isfinite(s) else 1.0
            self.w_enc[i].mul_(s)
            self.b_enc[i].mul_(s)
            if self.log_threshold is not None:
                self.log_threshold[i].add_(math.log(s))
            scales.append(s)
        return torch.tensor(scales)

    # ---- folding -------------------------------------------------------------------------------

    @torch.no_grad()
    def fold(self, scale_in: Tensor, scale_out: Tensor) -> CrossLayerCoder:
        """A copy for raw activations of a CLT trained on normalised ones (x_ℓ / C_in[ℓ] → y_m / C_out[m]).

        Layer ℓ's latents are scaled by C_out[ℓ] (SparseCoder's convention, so a one-layer CLT folds
        exactly like a transcoder and each latent's own-layer block is unchanged):
        W_enc' = W_enc·C_out[ℓ]/C_in[ℓ], b_enc' = C_out[ℓ]·b_enc, θ' = C_out[ℓ]·θ,
        W_dec'^{ℓ→m} = W_dec^{ℓ→m}·C_out[m]/C_out[ℓ], b_dec'^m = C_out[m]·b_dec^m, A'_m = A_m·C_out[m]/C_in[m].
        Reconstructions are unchanged (in raw units). `fold(1 / C_in, 1 / C_out)` undoes a fold.
        """
        n = self.cfg.n_layers
        c_in = torch.as_tensor(scale_in, dtype=torch.float64).reshape(-1).cpu()
        c_out = torch.as_tensor(scale_out, dtype=torch.float64).reshape(-1).cpu()
        if c_in.shape != (n,) or c_out.shape != (n,):
            raise OpenscopeError(f"a {n}-layer CLT folds with {n} input and {n} output scales")
        if not bool(((c_in > 0) & (c_out > 0) & c_in.isfinite() & c_out.isfinite()).all()):
            raise OpenscopeError("normalisation scales must be positive finite numbers")
        out = CrossLayerCoder(self.cfg).to(device=self.w_enc.device, dtype=self.w_enc.dtype)

        def col(t: Tensor) -> Tensor:  # [L] scales as a column for broadcasting against [L, ...]
            return t.to(device=self.w_enc.device, dtype=self.w_enc.dtype)

        ratio = col(c_out / c_in)
        out.w_enc.copy_(self.w_enc * ratio.view(n, 1, 1))
        out.b_enc.copy_(self.b_enc * col(c_out).view(n, 1))
        out.b_dec.copy_(self.b_dec * col(c_out).view(n, 1))
        for src in range(n):
            out.w_dec[src].copy_(self.w_dec[src] * col(c_out[src:] / c_out[src]).view(1, n - src, 1))
        if self.log_threshold is not None and out.log_threshold is not None:
            out.log_threshold.copy_(self.log_threshold + col(c_out.log()).view(n, 1))
        if self.w_skip is not None and out.w_skip is not None:
            out.w_skip.copy_(self.w_skip * ratio.view(n, 1, 1))
        return out


def clt_from_transcoders(
    transcoders: Sequence[SparseCoder], width: int | None = None, skip: bool | None = None
) -> CrossLayerCoder:
    """A CLT (raw units) made of single-layer transcoders, one per layer in order (Gemma Scope 2's start).

    Layer ℓ takes the first `width` latents of transcoder ℓ (all of them by default; for a Matryoshka
    transcoder, a prefix): its encoder, threshold and b_enc, its decoder as the own-layer block
    W_dec^{ℓ→ℓ} (later-layer blocks zero), its b_dec and skip A. Each latent's decoder row is then scaled to
    unit norm with the inverse scale moved into its encoder and threshold, so the CLT's output at every
    layer equals the (prefix of the) transcoder's. skip: whether the CLT has a skip connection (default:
    whether the transcoders have one; a transcoder without one gives A = 0).
    """
    if not transcoders:
        raise OpenscopeError("no transcoders to build a CLT from")
    folded = [t.fold() for t in transcoders]
    first = folded[0].cfg
    width = width or min(t.cfg.width for t in folded)
    has_skip = [t.w_skip is not None for t in folded]
    skip = any(has_skip) if skip is None else skip
    for i, t in enumerate(folded):
        c = t.cfg
        if c.kind == "sae":
            raise OpenscopeError(f"transcoder {i} is an SAE; a CLT is built from transcoders")
        if c.activation not in ("jumprelu", "relu") or c.activation != first.activation:
            raise OpenscopeError(
                f"transcoders must all be jumprelu or all relu to make a CLT; transcoder {i} is {c.activation}"
            )
        if (c.d_in, c.d_out) != (first.d_in, first.d_out):
            raise OpenscopeError(
                f"transcoder {i} maps {c.d_in} -> {c.d_out}, transcoder 0 {first.d_in} -> {first.d_out}"
            )
        if c.width < width:
            raise OpenscopeError(
                f"transcoder {i} has {c.width} latents, fewer than the CLT's {width} per layer"
            )
        if has_skip[i] and not skip:
            raise OpenscopeError(f"transcoder {i} has a skip connection; the CLT needs one too (skip_clt)")
    n = len(folded)
    cfg = CLTConfig(
        n_layers=n,
        d_in=first.d_in,
        d_out=first.d_out,
        width=width,
        activation="relu" if first.activation == "relu" else "jumprelu",
        skip=skip,
    )
    clt = CrossLayerCoder(cfg)
    with torch.no_grad():
        for i, t in enumerate(folded):
            w_dec = t.w_dec[:width]
            # Unit rows with the scale moved into the encoder: a' = n·a, d' = d/n gives the same a·d.
            norm = w_dec.norm(dim=1)
            norm = torch.where(norm > 0, norm, torch.ones_like(norm))
            clt.w_enc[i].copy_(t.w_enc[:, :width] * norm)
            clt.b_enc[i].copy_(t.b_enc[:width] * norm)
            clt.w_dec[i].zero_()
            clt.w_dec[i][:, 0].copy_(w_dec / norm.unsqueeze(1))
            clt.b_dec[i].copy_(t.b_dec)
            if clt.log_threshold is not None:
                clt.log_threshold[i].copy_(t.threshold()[:width].log() + norm.log())
            if clt.w_skip is not None:
                clt.w_skip[i].copy_(t.w_skip if t.w_skip is not None else torch.zeros_like(clt.w_skip[i]))
    return clt
