"""Matryoshka prefixes: the `--matryoshka` spec, each step's prefix lengths and loss weights, and copies
of a dictionary that keep only a prefix of its latents (for measuring each prefix's quality).

Two forms (Gemma Scope 2 trains with nested prefixes; both are offered):
- fixed groups, `128,512,2048`: the same nested prefix sizes every step (the full width is added);
- random prefixes, `random:8` (Nabeshima's variant): 8 prefix lengths drawn afresh every step, plus the
  full width, each reconstruction weighted 1/9 (a length drawn twice counts twice).

Random lengths are log-uniform over 1..width: ℓ = ⌊exp(u·ln(width + 1))⌋, u ~ U(0, 1), so
P(ℓ = k) ∝ ln((k + 1)/k). Log-uniform is scale-free: every octave of prefix sizes (1-2, 16-32, 1k-2k
latents) is drawn equally often, so the first latents are in almost every prefix and are pushed hardest
towards general features, while the tail still gets prefixes ending inside it; a uniform draw would
almost never end a prefix in the first 1% of the dictionary. The draw is a pure function of
(seed, step): a resumed run draws what the uninterrupted one did, and data-parallel replicas agree.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import Counter
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import Cutoff, SparseCoder
from openscope.errors import OpenscopeError

RANDOM = "random:"
"""The prefix of the random form of a spec, e.g. `random:8`."""


class MatryoshkaSpec(NamedTuple):
    """A parsed `--matryoshka` value (both fields empty/zero: Matryoshka training is off)."""

    fixed: tuple[int, ...] = ()
    """Fixed nested prefix sizes, strictly increasing (empty for random prefixes or off)."""
    random: int = 0
    """Random prefixes: how many lengths are drawn every step (0 for fixed prefixes or off)."""

    @property
    def enabled(self) -> bool:
        """Whether the spec asks for Matryoshka training at all."""
        return bool(self.fixed) or self.random > 0


def parse_matryoshka(text: str, flag: str = "--matryoshka") -> MatryoshkaSpec:
    """`128,512,2048` (fixed), `random:8` (random) or empty (off); a one-line error for anything else."""
    text = text.strip()
    if not text:
        return MatryoshkaSpec()
    if text.startswith(RANDOM):
        count = text[len(RANDOM) :].strip()
        if not count.isdigit() or int(count) < 1:
            raise OpenscopeError(f"{flag} {text!r}: random prefixes need a positive count, e.g. random:8")
        return MatryoshkaSpec(random=int(count))
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise OpenscopeError(
            f"{flag} {text!r} is neither prefix sizes (e.g. 128,512,2048) nor random:N"
        ) from None
    if any(s < 1 for s in sizes) or any(b <= a for a, b in itertools.pairwise(sizes)):
        raise OpenscopeError(f"{flag} {text!r}: prefix sizes must be positive and strictly increasing")
    return MatryoshkaSpec(fixed=sizes)


def check_width(spec: MatryoshkaSpec, width: int, flag: str = "--matryoshka") -> None:
    """A one-line error when a fixed prefix is larger than the dictionary's width."""
    if spec.fixed and spec.fixed[-1] > width:
        raise OpenscopeError(f"{flag} prefix {spec.fixed[-1]} is larger than the width {width}")


def log_uniform_lengths(n: int, width: int, seed: int, step: int) -> list[int]:
    """n prefix lengths in 1..width drawn log-uniformly, a pure function of (seed, step)."""
    rng = random.Random(f"openscope-matryoshka:{seed}:{step}")
    top = math.log(width + 1)
    return [min(width, max(1, math.floor(math.exp(rng.random() * top)))) for _ in range(n)]


def random_prefixes(n: int, width: int, seed: int, step: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(distinct drawn lengths below the width, increasing; weights of those and of the full width,
    last): n draws plus the full width, each 1/(n + 1), a repeated length its draws' sum."""
    counts = Counter(log_uniform_lengths(n, width, seed, step))
    counts[width] += 1
    sizes = sorted(counts)
    return tuple(sizes[:-1]), tuple(counts[s] / (n + 1) for s in sizes)


def eval_prefixes(spec: MatryoshkaSpec, width: int) -> tuple[int, ...]:
    """The prefixes `openscope eval --prefixes auto` measures: the fixed ones below the width, or for random
    prefixes a log-spaced ladder (width/1024, /256, /64, /16, /4); empty when Matryoshka is off."""
    if spec.fixed:
        return tuple(p for p in spec.fixed if p < width)
    if spec.random:
        return tuple(sorted({width >> s for s in (10, 8, 6, 4, 2) if width >> s >= 1}))
    return ()


# ---- a dictionary's prefix as a dictionary of its own ---------------------------------------------


class PrefixMasked(SparseCoder):
    """A TopK/BatchTopK coder whose latents ≥ `prefix` are zeroed after activation, before decoding (the
    top k are chosen among all latents, as in Matryoshka training; a narrower copy would re-choose)."""

    def __init__(self, coder: SparseCoder, prefix: int) -> None:
        super().__init__(coder.cfg)
        self.to(device=coder.w_enc.device, dtype=coder.w_enc.dtype)
        self.load_state_dict(coder.state_dict())
        self.prefix = prefix
        """Latents kept: the first `prefix`."""

    def encode(self, x: Tensor, batch_cutoff: Cutoff | None = None) -> Tensor:
        """Latents [B, F] with those ≥ prefix zeroed."""
        f = super().encode(x, batch_cutoff)
        return torch.cat([f[:, : self.prefix], torch.zeros_like(f[:, self.prefix :])], 1)


@torch.no_grad()
def select_latents(coder: SparseCoder, latents: Tensor) -> SparseCoder:
    """A copy of a single-layer coder keeping only `latents` (int indices, in the order given)."""
    idx = latents.to(device=coder.w_enc.device, dtype=torch.long)
    out = SparseCoder(dataclasses.replace(coder.cfg, width=len(idx)))
    out.to(device=coder.w_enc.device, dtype=coder.w_enc.dtype)
    state = coder.state_dict()
    for name in ("w_enc", "b_enc", "w_dec", "log_threshold"):
        if name in state:
            state[name] = state[name].index_select(1 if name == "w_enc" else 0, idx)
    out.load_state_dict(state)
    return out


@torch.no_grad()
def clt_prefix(clt: CrossLayerCoder, prefix: int) -> CrossLayerCoder:
    """A copy of a CLT keeping the first `prefix` latents of every layer."""
    out = CrossLayerCoder(dataclasses.replace(clt.cfg, width=prefix))
    out.to(device=clt.w_enc.device, dtype=clt.w_enc.dtype)
    out.w_enc.copy_(clt.w_enc[:, :, :prefix])
    out.b_enc.copy_(clt.b_enc[:, :prefix])
    out.b_dec.copy_(clt.b_dec)
    for src in range(clt.cfg.n_layers):
        out.w_dec[src].copy_(clt.w_dec[src][:prefix])
    if clt.log_threshold is not None and out.log_threshold is not None:
        out.log_threshold.copy_(clt.log_threshold[:, :prefix])
    if clt.w_skip is not None and out.w_skip is not None:
        out.w_skip.copy_(clt.w_skip)
    return out


def prefix_coder(coder: SparseCoder | CrossLayerCoder, prefix: int) -> SparseCoder | CrossLayerCoder:
    """The coder with only its first `prefix` latents (per layer for a CLT): what it reconstructs with
    every later latent zeroed before decoding."""
    if not 1 <= prefix <= coder.cfg.width:
        raise OpenscopeError(f"prefix {prefix} is outside 1..{coder.cfg.width}")
    if isinstance(coder, CrossLayerCoder):
        return clt_prefix(coder, prefix)
    if coder.cfg.activation in ("topk", "batchtopk"):
        return PrefixMasked(coder, prefix)
    return select_latents(coder, torch.arange(prefix))
