"""The sparse dictionary: one `SparseCoder` class for SAEs, transcoders and skip-transcoders.

The math is one for all three; the kinds differ by flags:
- sae: reconstructs its input (d_out = d_in); b_dec is subtracted before the encoder.
- transcoder: predicts another activation (e.g. the MLP output) from the input.
- skip_transcoder: a transcoder plus a linear skip x @ A (A zero-initialised, arXiv 2501.18823).

    x̃ = x / C_in  (− b_dec for SAEs)      z = x̃ W_enc + b_enc      f = σ(z)
    ŷ = C_out · (f W_dec + b_dec + (x / C_in) A)

C_in, C_out are fixed normalisation scalars (E‖x/C‖² = 1, see `normalisation_scale`); the coder
always takes and returns RAW activations, and training losses are measured in normalised units.
`fold` bakes C_in, C_out and the pre-encoder bias into the weights (Gemma Scope's convention:
the folded latents are C_out·f, so decoder rows stay unit-norm), which is what gets saved.

Inside a model a coder runs through the `openscope.coders.protocol.Coder` methods (`encode_at`,
`decode_into`, `decoder_vectors`, ...), which the cross-layer transcoder shares; a SparseCoder is its
one-layer case (layer index 0).

Two forward paths compute the same numbers: "dense" (plain matmuls; the reference) and "sparse"
(decode and backward only through the active latents, see `sparse.py`); "auto" picks sparse when
few enough latents fire.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from openscope.coders import activations as act
from openscope.coders.protocol import Reconstruction
from openscope.coders.sparse import gathered_linear, make_entries, sparse_decode
from openscope.errors import OpenscopeError

Kind = Literal["sae", "transcoder", "skip_transcoder"]
Activation = Literal["jumprelu", "topk", "batchtopk", "relu"]
Path = Literal["auto", "sparse", "dense"]
Cutoff = Callable[[Tensor], Tensor]
"""BatchTopK over a batch split across processes: these rows' pre-activations z → the whole batch's cut-off."""

KINDS = ("sae", "transcoder", "skip_transcoder")
ACTIVATIONS = ("jumprelu", "topk", "batchtopk", "relu")


@dataclass(frozen=True)
class CoderConfig:
    """Shape and kind of a sparse dictionary."""

    d_in: int
    """Width of the input activation."""
    d_out: int
    """Width of the reconstructed/predicted activation (must equal d_in for an SAE)."""
    width: int
    """Number of latents (dictionary size F)."""
    kind: Kind = "sae"
    """sae (reconstruct the input), transcoder (predict another activation) or skip_transcoder
    (transcoder plus a linear skip connection x @ A)."""
    activation: Activation = "jumprelu"
    """jumprelu (Gemma Scope), topk, batchtopk or relu (L1 baseline)."""
    k: int | None = None
    """Active latents per token for topk/batchtopk (batchtopk keeps k·B per batch)."""
    init_threshold: float = 0.001
    """Initial JumpReLU threshold θ (in normalised units)."""
    bandwidth: float = act.BANDWIDTH
    """Bandwidth ε of the straight-through rectangle kernel."""
    pre_encoder_bias: bool = True
    """SAE only: subtract b_dec from the input before encoding (folded away when saving)."""
    sparse_max_density: float = 0.03
    """path="auto" uses the sparse path while at most this fraction of B·F latents is touched;
    above it the dense matmuls are cheaper."""
    seed: int = 0
    """Seed of the weight initialisation."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OpenscopeError(f"coder {name} must be a positive integer, got {value!r}")
        if self.kind not in KINDS:
            raise OpenscopeError(f"unknown coder kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.activation not in ACTIVATIONS:
            raise OpenscopeError(
                f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if self.activation in ("topk", "batchtopk"):
            if self.k is None or self.k < 1:
                raise OpenscopeError(f"{self.activation} needs k >= 1, got k={self.k!r}")
            if self.k > self.width:
                raise OpenscopeError(f"k={self.k} is larger than the dictionary width {self.width}")
        if self.kind == "sae" and self.d_in != self.d_out:
            raise OpenscopeError(
                f"an SAE reconstructs its input: d_in={self.d_in} must equal d_out={self.d_out}"
            )
        if not (self.init_threshold > 0 and math.isfinite(self.init_threshold)):
            raise OpenscopeError(f"init_threshold must be a positive number, got {self.init_threshold!r}")
        if not self.bandwidth > 0:
            raise OpenscopeError(f"bandwidth must be positive, got {self.bandwidth!r}")


class SparseLatents(NamedTuple):
    """A batch's latents as a list of entries (may include explicit zeros: near-threshold entries)."""

    values: Tensor
    """[N] latent activation f at each entry."""
    rows: Tensor
    """[N] int64 batch row of each entry."""
    cols: Tensor
    """[N] int64 latent index of each entry."""

    def to_dense(self, n_rows: int, width: int) -> Tensor:
        """The dense [n_rows, width] latent matrix."""
        out = torch.zeros(n_rows, width, dtype=self.values.dtype, device=self.values.device)
        return out.index_put_((self.rows, self.cols), self.values, accumulate=True)


class CoderOutput(NamedTuple):
    """Everything one forward pass gives the losses; reconstructions are in raw units."""

    reconstruction: Tensor
    """[B, d_out] ŷ in raw activation units."""
    latents: SparseLatents
    """The active latents f (normalised units, i.e. before folding)."""
    pre_activations: Tensor
    """[B, F] encoder pre-activations z, detached (for statistics)."""
    l0: Tensor
    """Scalar: mean number of firing latents per row. For JumpReLU it comes from the STE step, so
    it has a gradient to the thresholds (what the L0 losses need)."""
    fire_rate: Tensor
    """[F] fraction of rows on which each latent fires (STE gradient to θ for JumpReLU)."""
    l1: Tensor
    """Scalar: mean over rows of Σ_j f_j (decoder rows are unit-norm, so this is the usual
    norm-weighted L1)."""
    prefix_reconstructions: tuple[Tensor, ...]
    """ŷ (raw units) using only the first m latents, for each requested Matryoshka prefix m."""
    aux_reconstruction: Tensor | None
    """[B, d_out] AuxK: decoding (no bias, raw units) of the top aux_k dead-latent pre-activations;
    None when not requested or no latent is dead."""


def normalisation_scale(x: Tensor) -> float:
    """The scalar C with E‖x/C‖² = 1 over the rows of x."""
    c = float(x.detach().double().pow(2).sum(-1).mean().sqrt())
    if not (c > 0 and math.isfinite(c)):
        raise OpenscopeError(f"cannot normalise activations with mean squared norm {c * c!r}")
    return c


def unit_rows(w: Tensor) -> Tensor:
    """Rows of w scaled to unit norm."""
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class SparseCoder(nn.Module):
    """A sparse dictionary (SAE, transcoder or skip-transcoder) with a JumpReLU/TopK/BatchTopK/ReLU.

    Parameters: w_enc [d_in, F], b_enc [F], w_dec [F, d_out], b_dec [d_out], log_threshold [F]
    (jumprelu only; θ = exp(log_threshold)), w_skip [d_in, d_out] (skip_transcoder only).
    Buffers: scale_in, scale_out (the normalisation scalars C_in, C_out).
    """

    log_threshold: nn.Parameter | None
    w_skip: nn.Parameter | None
    scale_in: Tensor
    scale_out: Tensor

    def __init__(self, cfg: CoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        w_dec = unit_rows(torch.randn(cfg.width, cfg.d_out, generator=gen))
        if cfg.kind == "sae":
            w_enc = w_dec.t().clone()
        else:
            # No tied init across different spaces: independent random unit-norm encoder directions.
            w_enc = unit_rows(torch.randn(cfg.width, cfg.d_in, generator=gen)).t().contiguous()
        self.w_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.w_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        self.log_threshold = None
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.width,), math.log(cfg.init_threshold)))
        self.w_skip = None
        if cfg.kind == "skip_transcoder":
            self.w_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out))
        self.register_buffer("scale_in", torch.tensor(1.0))
        self.register_buffer("scale_out", torch.tensor(1.0))

    # ---- normalisation -------------------------------------------------------------------------

    def set_scales(self, scale_in: float, scale_out: float) -> None:
        """Set the fixed normalisation scalars C_in, C_out (see `normalisation_scale`)."""
        for name, value in (("scale_in", scale_in), ("scale_out", scale_out)):
            if not (value > 0 and math.isfinite(value)):
                raise OpenscopeError(f"{name} must be a positive finite number, got {value!r}")
        self.scale_in.fill_(scale_in)
        self.scale_out.fill_(scale_out)

    def threshold(self) -> Tensor:
        """θ [F] (JumpReLU), in normalised units."""
        if self.log_threshold is None:
            raise OpenscopeError(f"a {self.cfg.activation} coder has no threshold")
        return self.log_threshold.exp()

    @torch.no_grad()
    def init_decoder_bias_(self, target: Tensor) -> None:
        """Set b_dec to the mean of a batch of raw targets (the input, for an SAE).

        Residual streams carry a large constant component (at Gemma 3 270M's layer 9 it is ~85% of
        E‖x‖²). With b_dec = 0 the first steps spend themselves learning it, and latents aligned
        with it fire on every token; starting from the mean removes both problems.
        """
        self.b_dec.copy_(target.float().mean(0) / self.scale_out)

    @torch.no_grad()
    def calibrate_threshold_(self, x: Tensor, target_l0: float, per_latent: bool = False) -> float:
        """Set θ so the batch x (raw) has mean L0 = target_l0: one value for every latent, or with
        `per_latent` each latent's own (`thresholds_for_rate`: every latent fires on target_l0/F of the
        batch, so none starts dead).

        Adam moves log θ by about lr per step, so from Gemma Scope's θ = 0.001 a short run never
        reaches a sparse threshold (lr 7e-5 · 1000 steps changes θ by 7%); starting at the target
        sparsity lets the run spend its steps on the dictionary instead. Returns θ (per latent: the median).
        """
        if self.log_threshold is None:
            raise OpenscopeError(f"a {self.cfg.activation} coder has no threshold to calibrate")
        z = self.pre_activations(x)
        if per_latent:
            thetas = act.thresholds_for_rate(z, target_l0)
            self.log_threshold.copy_(thetas.log().to(self.log_threshold))
            return float(thetas.median())
        theta = act.threshold_for_l0(z, target_l0)
        self.log_threshold.fill_(math.log(theta))
        return theta

    @torch.no_grad()
    def align_decoder_signs_(self, x: Tensor, target: Tensor) -> int:
        """Flip each decoder row whose contribution on the batch x (raw) points against the residual
        target: Σ_b f_bj ⟨y_b − b_dec − x_b A, d_j⟩ < 0. A transcoder's random decoder rows point either
        way, and the encoder-scale fit can shrink contributions but not turn them round, so half the
        latents would start by making the reconstruction worse (FVU 1.2-2 at step 0 on Gemma 3 270M).
        An SAE's rows (W_enc = W_decᵀ) already agree with what they read. Returns the rows flipped."""
        xs = self._normalised_input(x)
        resid = target / self.scale_out - self._skip_and_bias(xs)
        lean = ((self.encode(x).t() @ resid) * self.w_dec).sum(1)
        flip = lean < 0
        self.w_dec[flip] *= -1
        return int(flip.sum())

    @torch.no_grad()
    def fit_encoder_scale_(self, x: Tensor, target: Tensor) -> float:
        """Scale the encoder (W_enc, b_enc, θ) so the reconstruction of a batch has its best size.

        With unit-norm decoder rows and W_enc = W_decᵀ, the first reconstructions are several
        times too large (FVU ≈ 6 at Gemma 3 270M's layer 9), and the first steps go to shrinking
        them. Scaling z and θ together by s keeps the active set and scales the latents by s; s is
        the least-squares optimum ⟨y − b, r⟩ / ‖r‖² for r the latents' part of the reconstruction.
        Returns s (1 when the fit is degenerate).
        """
        xs = self._normalised_input(x)
        r = self.encode(x) @ self.w_dec
        resid = target / self.scale_out - self._skip_and_bias(xs)
        denom = float(r.pow(2).sum())
        s = float((resid * r).sum()) / denom if denom > 0 else 0.0
        if not (s > 0 and math.isfinite(s)):
            return 1.0
        self.w_enc.mul_(s)
        self.b_enc.mul_(s)
        if self.log_threshold is not None:
            self.log_threshold.add_(math.log(s))
        return s

    def _normalised_input(self, x: Tensor) -> Tensor:
        return x / self.scale_in

    def _encoder_bias(self, latents: Tensor | None = None) -> Tensor:
        """b_enc with the pre-encoder bias folded in: (x̃ − b_dec) W + b = x̃ W + (b − b_dec W); with
        `latents` (indices [n]), only theirs."""
        b, w = (self.b_enc, self.w_enc) if latents is None else (self.b_enc[latents], self.w_enc[:, latents])
        if self.cfg.kind == "sae" and self.cfg.pre_encoder_bias:
            return b - self.b_dec @ w
        return b

    def _skip_and_bias(self, xs: Tensor) -> Tensor:
        """b_dec (+ x̃ A for skip-transcoders), normalised units, [B, d_out] or [d_out]."""
        if self.w_skip is not None:
            return xs @ self.w_skip + self.b_dec
        return self.b_dec

    # ---- plain dense API -----------------------------------------------------------------------

    def pre_activations(self, x: Tensor, latents: Tensor | None = None) -> Tensor:
        """z [B, F] for raw input x; with `latents` (indices [n]), only those columns, z [B, n]."""
        w = self.w_enc if latents is None else self.w_enc[:, latents]
        return torch.addmm(self._encoder_bias(latents), self._normalised_input(x), w)

    def _activate_dense(self, z: Tensor, cutoff: Cutoff | None = None) -> Tensor:
        a = self.cfg.activation
        if a == "jumprelu":
            return act.jumprelu(z, self.threshold(), self.cfg.bandwidth)
        if a == "relu":
            return act.relu(z)
        assert self.cfg.k is not None
        if a == "topk":
            mask = act.topk_mask(z.detach(), self.cfg.k)
        elif cutoff is not None:
            mask = z.detach() >= cutoff(z.detach())
        else:
            mask = act.batchtopk_mask(z.detach(), self.cfg.k)
        return torch.relu(z) * mask.to(z.dtype)

    def encode(self, x: Tensor, batch_cutoff: Cutoff | None = None) -> Tensor:
        """Dense latents f [B, F] (normalised units) for raw input x [B, d_in] (`batch_cutoff`: see
        `forward`)."""
        return self._activate_dense(self.pre_activations(x), batch_cutoff)

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Raw-unit ŷ [B, d_out] from dense latents f; a skip-transcoder also needs the raw input x."""
        if self.w_skip is not None and x is None:
            raise OpenscopeError("a skip-transcoder needs the input x to decode (for its skip connection)")
        xs = self._normalised_input(x) if x is not None else None
        base = self._skip_and_bias(xs) if xs is not None else self.b_dec
        return (f @ self.w_dec + base) * self.scale_out

    # ---- running inside a model: the `Coder` interface (one layer, so i = m = 0) ---------------

    @property
    def n_layers(self) -> int:
        """1: a SparseCoder reads one site and writes one."""
        return 1

    @property
    def kind(self) -> Kind:
        """sae, transcoder or skip_transcoder."""
        return self.cfg.kind

    def _only_layer(self, *layers: int) -> None:
        for i in layers:
            if i != 0:
                raise OpenscopeError(f"a {self.cfg.kind} has one layer, 0; got layer {i}")

    def pre_activations_at(self, i: int, x: Tensor) -> Tensor:
        """z [N, F] for raw input x [N, d_in] (i = 0)."""
        self._only_layer(i)
        return self.pre_activations(x)

    def encode_at(self, i: int, x: Tensor) -> Tensor:
        """Dense latents f [N, F] for raw input x [N, d_in] (i = 0)."""
        self._only_layer(i)
        return self.encode(x)

    def decode_into(self, m: int, latents: Sequence[Tensor], x: Tensor) -> Tensor:
        """Raw ŷ [N, d_out] from latents[0] and the raw input x (m = 0)."""
        self._only_layer(m)
        return self.decode(latents[0], x)

    def encoder_vectors(self, i: int, latents: Tensor) -> Tensor:
        """[n, d_in] ∂z_j/∂x for the given latents j: W_enc columns over C_in (i = 0)."""
        self._only_layer(i)
        return (self.w_enc[:, latents] / self.scale_in).t()

    def decoder_vectors(self, i: int, m: int, latents: Tensor) -> Tensor:
        """[n, d_out] what one unit of each latent adds to ŷ: W_dec rows times C_out (i = m = 0)."""
        self._only_layer(i, m)
        return self.w_dec[latents] * self.scale_out

    def skip_at(self, m: int, x: Tensor) -> Tensor | None:
        """The skip term C_out·(x / C_in) A [N, d_out] (m = 0); None without a skip connection."""
        self._only_layer(m)
        if self.w_skip is None:
            return None
        return (x / self.scale_in) @ self.w_skip * self.scale_out

    def reconstruct(self, xs: Sequence[Tensor]) -> Reconstruction:
        """Latents [1, N, F] and ŷ [1, N, d_out] from the one layer's raw input xs[0] [N, d_in]."""
        if len(xs) != 1:
            raise OpenscopeError(f"a {self.cfg.kind} reads one layer, got inputs for {len(xs)}")
        latents = self.encode(xs[0])
        return Reconstruction(self.decode(latents, xs[0]).unsqueeze(0), latents.unsqueeze(0))

    # ---- training forward ----------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        *,
        prefixes: tuple[int, ...] = (),
        dead: Tensor | None = None,
        aux_k: int = 0,
        path: Path = "auto",
        batch_cutoff: Cutoff | None = None,
    ) -> CoderOutput:
        """Forward pass for training and evaluation on raw input x [B, d_in].

        prefixes: Matryoshka prefix sizes to reconstruct from as well; dead: [F] bool mask of dead
        latents and aux_k how many of them to use per row for the AuxK reconstruction; path: which
        implementation ("auto" = sparse when few latents fire); batch_cutoff: BatchTopK over a batch
        split across processes, the function that gives the whole batch's k·B-th largest
        pre-activation from these rows' z (called once; entries ≥ it are kept). The pre-activations
        are float32 even under autocast (a bfloat16 product, cast), so losses and statistics are too.
        """
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise OpenscopeError(f"coder input must be [batch, {self.cfg.d_in}], got {list(x.shape)}")
        for m in prefixes:
            if not 1 <= m <= self.cfg.width:
                raise OpenscopeError(f"Matryoshka prefix {m} is outside 1..{self.cfg.width}")
        xs = self._normalised_input(x)
        b_eff = self._encoder_bias()
        if path == "dense":
            return self._forward_dense(xs, b_eff, prefixes, dead, aux_k, batch_cutoff)
        with torch.no_grad():
            z = torch.addmm(b_eff, xs, self.w_enc).float()
            cut = batch_cutoff(z) if batch_cutoff is not None and self.cfg.activation == "batchtopk" else None
            rows, cols = self._select(z, cut)
        if path == "auto" and rows.numel() > self.cfg.sparse_max_density * z.numel():
            return self._forward_dense(
                xs, b_eff, prefixes, dead, aux_k, None if cut is None else lambda _: cut
            )
        return self._forward_sparse(xs, b_eff, z, rows, cols, prefixes, dead, aux_k)

    def _select(self, z: Tensor, cut: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The entries (rows, cols, row-major) the sparse path must touch."""
        a, n, width = self.cfg.activation, z.shape[0], z.shape[1]
        if a == "topk":
            assert self.cfg.k is not None
            _, idx = act.topk_indices(z, self.cfg.k)
            rows = torch.arange(n, device=z.device).repeat_interleave(idx.shape[1])
            return rows, idx.reshape(-1)
        if a == "batchtopk":
            assert self.cfg.k is not None
            if cut is not None:  # the whole batch's cut-off (batch split across processes)
                flat = (z.reshape(-1) >= cut).nonzero().squeeze(1)
            else:
                flat = act.batchtopk_flat_indices(z, self.cfg.k)
            return flat // width, flat % width
        if a == "jumprelu":
            # Firing latents plus those within ε/2 below θ: the kernel window, where θ gets gradient.
            cut = self.threshold() - self.cfg.bandwidth / 2
        else:
            cut = torch.zeros((), device=z.device)
        rows, cols = (z > cut).nonzero(as_tuple=True)
        return rows, cols

    def _activate_entries(self, z_e: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """(f, fired) at the entries; fired carries the STE gradient for JumpReLU."""
        if self.cfg.activation == "jumprelu":
            theta = self.threshold()[cols]
            return act.jumprelu(z_e, theta, self.cfg.bandwidth), act.step(
                z_e.detach(), theta, self.cfg.bandwidth
            )
        f = torch.relu(z_e)
        return f, (f.detach() > 0).to(f.dtype)

    def _forward_sparse(
        self,
        xs: Tensor,
        b_eff: Tensor,
        z: Tensor,
        rows: Tensor,
        cols: Tensor,
        prefixes: tuple[int, ...],
        dead: Tensor | None,
        aux_k: int,
    ) -> CoderOutput:
        n, width = z.shape
        e = make_entries(rows, cols, n, width)
        z_e = gathered_linear(xs, self.w_enc, b_eff, z[rows, cols], e)
        f, fired = self._activate_entries(z_e, cols)
        base = self._skip_and_bias(xs)
        scale = self.scale_out
        recon = (sparse_decode(f, self.w_dec, e) + base) * scale
        prefix_recons = []
        for m in prefixes:
            keep = cols < m
            sub = make_entries(rows[keep], cols[keep], n, width)
            prefix_recons.append((sparse_decode(f[keep], self.w_dec, sub) + base) * scale)
        aux = None
        if dead is not None and aux_k > 0 and bool(dead.any()):
            dead_idx = dead.nonzero().squeeze(1)
            with torch.no_grad():
                _, j = act.topk_indices(z.index_select(1, dead_idx), aux_k)
            a_cols = dead_idx[j.reshape(-1)]
            a_rows = torch.arange(n, device=z.device).repeat_interleave(j.shape[1])
            ea = make_entries(a_rows, a_cols, n, width)
            za = gathered_linear(xs, self.w_enc, b_eff, z[a_rows, a_cols], ea)
            aux = sparse_decode(torch.relu(za), self.w_dec, ea) * scale
        fire_rate = torch.zeros(width, dtype=f.dtype, device=f.device).index_add(0, cols, fired) / n
        return CoderOutput(
            reconstruction=recon,
            latents=SparseLatents(f, rows, cols),
            pre_activations=z,
            l0=fired.sum() / n,
            fire_rate=fire_rate,
            l1=f.sum() / n,
            prefix_reconstructions=tuple(prefix_recons),
            aux_reconstruction=aux,
        )

    def _forward_dense(
        self,
        xs: Tensor,
        b_eff: Tensor,
        prefixes: tuple[int, ...],
        dead: Tensor | None,
        aux_k: int,
        batch_cutoff: Cutoff | None = None,
    ) -> CoderOutput:
        z = torch.addmm(b_eff, xs, self.w_enc).float()
        f = self._activate_dense(z, batch_cutoff)
        if self.cfg.activation == "jumprelu":
            fired = act.step(z.detach(), self.threshold(), self.cfg.bandwidth)
        else:
            fired = (f.detach() > 0).to(f.dtype)
        base = self._skip_and_bias(xs)
        scale = self.scale_out
        recon = (f @ self.w_dec + base) * scale
        prefix_recons = tuple((f[:, :m] @ self.w_dec[:m] + base) * scale for m in prefixes)
        aux = None
        if dead is not None and aux_k > 0 and bool(dead.any()):
            masked = torch.where(dead, z.detach(), torch.full_like(z, -torch.inf))
            keep = act.topk_mask(masked, min(aux_k, int(dead.sum()))) & dead
            aux = (torch.relu(z) * keep.to(z.dtype)) @ self.w_dec * scale
        rows, cols = f.detach().nonzero(as_tuple=True)
        return CoderOutput(
            reconstruction=recon,
            latents=SparseLatents(f[rows, cols], rows, cols),
            pre_activations=z.detach(),
            l0=fired.sum(1).mean(),
            fire_rate=fired.mean(0),
            l1=f.sum(1).mean(),
            prefix_reconstructions=prefix_recons,
            aux_reconstruction=aux,
        )

    # ---- constraints applied around the optimiser step ----------------------------------------

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from each decoder row's gradient its component along the row (keeps ‖row‖ fixed
        to first order, so Adam does not fight the unit-norm constraint)."""
        g = self.w_dec.grad
        if g is None:
            return
        w = unit_rows(self.w_dec)
        g -= (g * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each decoder row to unit norm."""
        self.w_dec.copy_(unit_rows(self.w_dec))

    # ---- folding -------------------------------------------------------------------------------

    @torch.no_grad()
    def fold(self) -> SparseCoder:
        """A copy that takes raw activations with no normalisation and no pre-encoder bias.

        Reconstructions are unchanged; latents (and θ) are scaled by C_out, so decoder rows stay
        unit-norm (Gemma Scope's fold: b_enc' = C(b_enc − b_dec W_enc), θ' = Cθ, b_dec' = C b_dec;
        here with C_in ≠ C_out allowed: W_enc' = W_enc·C_out/C_in, A' = A·C_out/C_in).
        """
        c_in, c_out = float(self.scale_in), float(self.scale_out)
        folded = SparseCoder(dataclasses.replace(self.cfg, pre_encoder_bias=False))
        folded.to(device=self.w_enc.device, dtype=self.w_enc.dtype)
        folded.w_enc.copy_(self.w_enc * (c_out / c_in))
        folded.b_enc.copy_(self._encoder_bias() * c_out)
        folded.w_dec.copy_(self.w_dec)
        folded.b_dec.copy_(self.b_dec * c_out)
        if self.log_threshold is not None and folded.log_threshold is not None:
            folded.log_threshold.copy_(self.log_threshold + math.log(c_out))
        if self.w_skip is not None and folded.w_skip is not None:
            folded.w_skip.copy_(self.w_skip * (c_out / c_in))
        return folded


def topk_to_jumprelu(coder: SparseCoder, threshold: Tensor) -> SparseCoder:
    """A JumpReLU copy of a TopK/BatchTopK (or ReLU) coder using thresholds θ [F] (normalised units),
    e.g. from `activations.ThresholdEstimator`."""
    if threshold.shape != (coder.cfg.width,) or not bool((threshold > 0).all()):
        raise OpenscopeError(f"thresholds must be {coder.cfg.width} positive numbers")
    out = SparseCoder(dataclasses.replace(coder.cfg, activation="jumprelu", k=None))
    out.to(device=coder.w_enc.device, dtype=coder.w_enc.dtype)
    state = {k: v for k, v in coder.state_dict().items() if k != "log_threshold"}
    out.load_state_dict(state, strict=False)
    assert out.log_threshold is not None
    with torch.no_grad():
        out.log_threshold.copy_(threshold.to(out.log_threshold).log())
    return out
