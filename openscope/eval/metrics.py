"""Evaluation metrics for sparse dictionaries, as small pure functions plus streaming sums.

Reconstruction metrics (on clean activations, kept positions only):
- L0: mean number of non-zero latents per token.
- FVU = E‖y − ŷ‖² / E‖y − ȳ‖² (ȳ the mean over tokens), reported with 1 − FVU.
- MSE: mean squared error per element, E‖y − ŷ‖² / d_out (SAELens' convention).
- dead latents fire on no token; dense latents fire on more than 10% of tokens.

Language-model metrics (next-token distributions; a position counts when its input token and its
target are both kept, i.e. neither is BOS/EOS/pad):
- delta LM loss = CE with the reconstruction spliced in − clean CE.
- KL(clean ‖ spliced) of the next-token distributions.
- loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean), CE_zero with the site zero-ablated.
`next_token_ce`/`next_token_kl` take full logits (the reference); `head_losses` gives both from final
residual streams of many versions at once without ever holding [positions, vocab] logits (the fast path).

Everything that runs over many batches accumulates in float64 sums (`Moments`, `MeanSum`,
`ReconstructionSums`) so no per-token values are kept; the one-shot functions (`fvu`, `l0`, `mse`…)
are the reference the streaming sums are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from openscope.coders.losses import fvu as _fvu
from openscope.models.restart import cap_logits

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""

_LOGIT_CHUNK_ROWS = 256
"""Positions per chunk when computing log-softmaxes over the vocabulary: Gemma's 262k-entry vocabulary
makes a full [batch·seq, vocab] temporary cost gigabytes, a chunk of 256 rows costs 256 MB."""

_VOCAB_BLOCK = 4096
"""Vocabulary entries per block in `head_losses`: a block of logits for all versions' rows stays in cache."""


# ---- one-shot reconstruction metrics ------------------------------------------------------------


def fired(latents: Tensor) -> Tensor:
    """[N, F] bool: which latents are active (non-zero) on each token."""
    return latents != 0


def l0(latents: Tensor) -> float:
    """Mean number of active latents per token (row)."""
    return float(fired(latents).sum(-1).double().mean())


def fvu(target: Tensor, recon: Tensor) -> float:
    """Fraction of variance unexplained, Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the rows, in float64."""
    return float(_fvu(target.double(), recon.double()))


def mse(target: Tensor, recon: Tensor) -> float:
    """Mean squared error per element (E‖y − ŷ‖² / d)."""
    return float((target.double() - recon.double()).pow(2).mean())


def firing_frequencies(counts: Tensor, n_tokens: int) -> Tensor:
    """[F] fraction of tokens on which each latent fired, from firing counts over n_tokens tokens."""
    return counts.double() / max(n_tokens, 1)


def dead_latents(frequencies: Tensor) -> int:
    """Latents that never fired."""
    return int((frequencies == 0).sum())


def dense_latents(frequencies: Tensor, threshold: float = DENSE_FREQUENCY) -> int:
    """Latents that fire on more than `threshold` of the tokens."""
    return int((frequencies > threshold).sum())


class Histogram(NamedTuple):
    """A histogram of log10 latent firing frequencies (dead latents are counted apart: log10 0 = −inf)."""

    counts: list[int]
    """Latents per bin."""
    edges: list[float]
    """Bin edges in log10(frequency), len(counts) + 1 values, ending at 0 (a latent firing on every token)."""
    dead: int
    """Latents that never fired (not in any bin)."""


def frequency_histogram(frequencies: Tensor, bins: int = 50, n_tokens: int | None = None) -> Histogram:
    """Histogram of log10 firing frequency over the latents that fired at least once.

    The range starts at log10(1/n_tokens) (the rarest frequency a run can see) when n_tokens is given,
    else at the rarest observed frequency; it ends at 0.
    """
    freqs = frequencies.double().cpu().numpy()
    alive = freqs[freqs > 0]
    logs = np.log10(alive)
    lo = -math.log10(n_tokens) if n_tokens is not None and n_tokens > 1 else -1.0
    if logs.size:
        lo = min(lo, float(logs.min()))
    counts, edges = np.histogram(logs, bins=bins, range=(lo, 0.0))
    return Histogram([int(c) for c in counts], [float(e) for e in edges], int((freqs == 0).sum()))


# ---- next-token (LM) metrics ---------------------------------------------------------------------


def ce_positions(keep: Tensor) -> Tensor:
    """[B, T−1] bool: positions whose loss counts, i.e. input token t and target t+1 are both kept."""
    return keep[:, :-1] & keep[:, 1:]


def _row_chunks(n: int, size: int = _LOGIT_CHUNK_ROWS) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def next_token_ce(logits: Tensor, input_ids: Tensor) -> Tensor:
    """[B, T−1] float64 cross-entropy of predicting token t+1 from position t (mask it with `ce_positions`)."""
    b, t, v = logits.shape
    flat = logits[:, :-1].reshape(-1, v)
    targets = input_ids[:, 1:].reshape(-1).to(logits.device)
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=logits.device)
    for rows in _row_chunks(flat.shape[0]):
        chunk = flat[rows].float()
        lse = torch.logsumexp(chunk, dim=-1)
        picked = chunk.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
        out[rows] = (lse - picked).double()
    return out.reshape(b, t - 1)


def next_token_kl(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """[B, T] float64 KL(P_clean ‖ P) of the next-token distributions at each position."""
    b, t, v = logits.shape
    p_flat, q_flat = clean_logits.reshape(-1, v), logits.reshape(-1, v)
    out = torch.empty(p_flat.shape[0], dtype=torch.float64, device=logits.device)
    for rows in _row_chunks(p_flat.shape[0]):
        log_p = torch.log_softmax(p_flat[rows].float(), dim=-1)
        log_q = torch.log_softmax(q_flat[rows].float(), dim=-1)
        out[rows] = (log_p.exp() * (log_p - log_q)).sum(-1).double()
    return out.reshape(b, t)


# exp(x) for x < −87 is a denormal float (or 0), which x86 computes ~7× slower: most of a 262k
# vocabulary lies that far below the top logit, so the exponentials cost more than the unembedding's
# matrix product. Clamped here, each such term adds e^−60 ≈ 9e−27 instead of less: at most 2e−21 of a
# 262k-entry sum, far below float32's 1e−7.
_EXP_FLOOR = -60.0


def head_losses(
    normed: Tensor,
    targets: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(CE [V, N], KL(P_0 ‖ P_v) [V, N]), float64, of V versions of the same N positions given their
    final-normed last residual streams normed [V, N, d] (version 0 the clean one, so KL[0] = 0) and the
    next tokens targets [N], through the unembedding (weight [vocab, d], bias, soft-cap).

    Equal to `next_token_ce` and `next_token_kl` on the full logits, but the logits are made a block of
    the vocabulary at a time, for all versions at once, and folded into running log-sum-exps (rescaled
    when the running maximum grows), so no [N, vocab] tensor is ever held and each block of the
    unembedding is read once for every version: with p = softmax(l_0) and q = softmax(l_v),
    KL = Σ p·(l_0 − l_v) − lse_0 + lse_v, the sum accumulated as Σ e^(l_0 − m_0)·(l_0 − l_v) beside the
    clean normaliser Σ e^(l_0 − m_0).
    """
    n_versions, n, d = normed.shape
    ce = torch.empty(n_versions, n, dtype=torch.float64, device=normed.device)
    kl = torch.empty_like(ce)
    rows_per_block = max(1, _LOGIT_CHUNK_ROWS * 2 // n_versions)
    for rows in _row_chunks(n, rows_per_block):
        h = normed[:, rows]
        r = h.shape[1]
        flat = h.reshape(-1, d)
        top = torch.full((n_versions, r), -math.inf, device=h.device)
        norm = torch.zeros(n_versions, r, dtype=torch.float64, device=h.device)
        weighted = torch.zeros(n_versions, r, dtype=torch.float64, device=h.device)
        for cols in _row_chunks(weight.shape[0], _VOCAB_BLOCK):
            logits = torch.nn.functional.linear(flat, weight[cols], None if bias is None else bias[cols])
            logits = cap_logits(logits.float(), softcap).reshape(n_versions, r, -1)
            new_top = torch.maximum(top, logits.amax(-1))
            e = (logits - new_top.unsqueeze(-1)).clamp_min_(_EXP_FLOOR).exp_()
            scale = torch.exp(top - new_top).double()
            norm = norm * scale + e.sum(-1).double()
            gap = (e[0] * (logits[0] - logits)).sum(-1).double()
            weighted = weighted * scale[0] + gap
            top = new_top
        lse = top.double() + norm.log()
        picked = (h * weight[targets[rows]]).sum(-1)
        if bias is not None:
            picked = picked + bias[targets[rows]]
        ce[:, rows] = lse - cap_logits(picked.float(), softcap).double()
        kl[:, rows] = weighted / norm[0] - lse[0] + lse
    return ce, kl


def loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 = as good as the model, 0 = as bad as zero-ablation.

    NaN when zero-ablating the site does not change the loss (the ratio has no meaning then).
    """
    denom = ce_zero - ce_clean
    return (ce_zero - ce_spliced) / denom if denom != 0 else math.nan


# ---- Pareto frontier -----------------------------------------------------------------------------


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both x and y (both lower-is-better), by increasing x.

    Points with a NaN coordinate are never on the front.
    """
    order = sorted(
        (i for i in range(len(xs)) if not (math.isnan(xs[i]) or math.isnan(ys[i]))),
        key=lambda i: (xs[i], ys[i]),
    )
    front: list[int] = []
    best_y = math.inf
    for i in order:
        if ys[i] < best_y:
            front.append(i)
            best_y = ys[i]
    return front


# ---- streaming sums ------------------------------------------------------------------------------


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations (M2) of a set of rows, mergeable batch by batch."""

    n: int
    """Rows seen."""
    mean: Tensor
    """[d] float64 mean row."""
    m2: float
    """Σ‖y − ȳ‖² over the rows seen (the FVU denominator)."""


def moments(y: Tensor) -> Moments:
    """The moments of the rows of y [N, d] (float64)."""
    y = y.double()
    mean = y.mean(0) if len(y) else torch.zeros(y.shape[-1], dtype=torch.float64, device=y.device)
    return Moments(len(y), mean, float((y - mean).pow(2).sum()))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two row sets (Chan et al.), exact without storing rows and stable for
    Gemma's large residual norms, where Σ‖y‖² − n‖ȳ‖² would cancel catastrophically."""
    n = a.n + b.n
    if a.n == 0 or b.n == 0:
        return b if a.n == 0 else a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    return Moments(n, mean, a.m2 + b.m2 + float(delta.pow(2).sum()) * a.n * b.n / n)


class MeanSum:
    """A float64 running mean of per-position values under a mask."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, values: Tensor, mask: Tensor) -> None:
        """Add values [...] at the positions where mask [...] is True."""
        self.total += float(values.double()[mask.to(values.device)].sum())
        self.count += int(mask.sum())

    @property
    def mean(self) -> float:
        """The mean so far (NaN before any value)."""
        return self.total / self.count if self.count else math.nan


class ReconstructionMetrics(NamedTuple):
    """A dictionary's reconstruction metrics on clean activations."""

    n_tokens: int
    """Tokens measured (BOS/EOS/pad excluded)."""
    l0: float
    """Mean active latents per token."""
    fvu: float
    """Fraction of variance unexplained, E‖y − ŷ‖² / E‖y − ȳ‖²."""
    mse: float
    """Mean squared error per element."""
    dead: int
    """Latents that fired on no token."""
    dense: int
    """Latents that fired on more than 10% of tokens."""
    frequencies: Tensor
    """[F] float64 fraction of tokens on which each latent fired."""


class ReconstructionSums:
    """Streaming float64 sums behind `ReconstructionMetrics` (no per-token values are kept)."""

    def __init__(self, width: int, d_out: int) -> None:
        self.width, self.d_out = width, d_out
        self.sq_err = 0.0
        self.active = 0
        self.counts = torch.zeros(width, dtype=torch.int64)
        self.moments = Moments(0, torch.zeros(d_out, dtype=torch.float64), 0.0)

    def add(self, target: Tensor, recon: Tensor, latents: Tensor) -> None:
        """Add a batch: target y [N, d_out], reconstruction ŷ [N, d_out], latents f [N, F]."""
        self.sq_err += float((target.double() - recon.double()).pow(2).sum())
        on = fired(latents)
        self.active += int(on.sum())
        self.counts += on.sum(0).cpu()
        batch = moments(target)
        self.moments = merge_moments(self.moments, Moments(batch.n, batch.mean.cpu(), batch.m2))

    def result(self, dense_threshold: float = DENSE_FREQUENCY) -> ReconstructionMetrics:
        n = self.moments.n
        freqs = firing_frequencies(self.counts, n)
        return ReconstructionMetrics(
            n_tokens=n,
            l0=self.active / n if n else math.nan,
            fvu=self.sq_err / self.moments.m2 if self.moments.m2 > 0 else math.nan,
            mse=self.sq_err / (n * self.d_out) if n else math.nan,
            dead=dead_latents(freqs),
            dense=dense_latents(freqs, dense_threshold),
            frequencies=freqs,
        )
