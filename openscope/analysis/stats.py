"""The statistics of the chat analyses, as small pure functions on float64 tensors.

- difference of means and cosine alignment (the contrast direction and the decoder rows along it);
- AUROC (Mann–Whitney, ties count one half) with DeLong's standard error and a normal interval;
- Welch's t-test per column with exact two-sided p-values (Student t through the regularised
  incomplete beta function, so no SciPy is needed), Cohen's d, and Benjamini–Hochberg q-values;
- repetition rate of a token sequence (a coherence measure of steered text);
- Pearson's correlation and ranks (Spearman's ρ is Pearson's r of the ranks).

Rows are samples, columns are features (latents or residual dimensions) throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.errors import OpenscopeError
from openscope.interventions.directions import unit


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64).cpu()


def _check_rows(a: Tensor, b: Tensor, least: int, what: str) -> None:
    if a.shape[0] < least or b.shape[0] < least:
        raise OpenscopeError(
            f"{what} needs at least {least} samples in each set, got {a.shape[0]} and {b.shape[0]}"
        )


# ---- directions -----------------------------------------------------------------------------------


def mean_difference(a: Tensor, b: Tensor) -> Tensor:
    """μ_a − μ_b [d] of two sets of rows [n, d] and [m, d]."""
    _check_rows(a, b, 1, "a difference of means")
    return _f64(a).mean(0) - _f64(b).mean(0)


def cosine_alignment(rows: Tensor, direction: Tensor) -> Tensor:
    """cos(row_i, direction) [n] for rows [n, d]; zero rows get 0."""
    rows, u = _f64(rows), unit(direction)
    norms = rows.norm(dim=1)
    return torch.where(norms > 0, rows @ u / norms.clamp_min(1e-300), torch.zeros_like(norms))


# ---- AUROC ---------------------------------------------------------------------------------------


class Auroc(NamedTuple):
    """Area under the ROC curve of scores that should rank positives above negatives."""

    auc: float
    """P(score of a random positive > score of a random negative), ties counting one half."""
    low: float
    """Lower end of the confidence interval (DeLong standard error, normal approximation, clipped to [0, 1])."""
    high: float
    """Upper end of the confidence interval."""
    se: float
    """DeLong standard error (0 when the sets are perfectly separated: the interval is then degenerate)."""


def _psi(pos: Tensor, neg: Tensor) -> Tensor:
    """[n, m] the Mann–Whitney kernel: 1 where pos_i > neg_j, 1/2 on ties, else 0."""
    p, n = _f64(pos).reshape(-1, 1), _f64(neg).reshape(1, -1)
    return (p > n).double() + 0.5 * (p == n).double()


def auroc(pos: Tensor, neg: Tensor, level: float = 0.95) -> Auroc:
    """AUROC of scores pos [n] (should be high) against neg [m], with DeLong's interval at `level`.

    DeLong et al. 1988: the AUROC is a two-sample U-statistic; its variance is var(V10)/n + var(V01)/m
    where V10_i (V01_j) is the mean kernel of positive i (negative j) against the other set.
    """
    _check_rows(pos.reshape(-1), neg.reshape(-1), 2, "an AUROC with a confidence interval")
    if not 0 < level < 1:
        raise OpenscopeError(f"the confidence level must be in (0, 1), got {level}")
    psi = _psi(pos, neg)
    auc = float(psi.mean())
    v10, v01 = psi.mean(1), psi.mean(0)
    se = math.sqrt(float(v10.var() / v10.numel() + v01.var() / v01.numel()))
    z = float(torch.special.ndtri(torch.tensor((1 + level) / 2, dtype=torch.float64)))
    return Auroc(auc, max(0.0, auc - z * se), min(1.0, auc + z * se), se)


# ---- per-column tests -------------------------------------------------------------------------------


def betainc(a: Tensor, b: Tensor, x: Tensor, iterations: int = 300) -> Tensor:
    """The regularised incomplete beta function I_x(a, b), elementwise (float64).

    Lentz's continued fraction (Numerical Recipes §6.4), on whichever of x or 1 − x converges fast
    (I_x(a, b) = 1 − I_{1−x}(b, a)); exact 0 and 1 at the ends.
    """
    a, b, x = torch.broadcast_tensors(_f64(a), _f64(b), _f64(x))
    swap = x > (a + 1) / (a + b + 2)
    aa, bb, xx = torch.where(swap, b, a), torch.where(swap, a, b), torch.where(swap, 1 - x, x)
    tiny = 1e-300
    qab, qap, qam = aa + bb, aa + 1, aa - 1
    c = torch.ones_like(xx)
    d = 1 - qab * xx / qap
    d = 1 / torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
    h = d.clone()
    for m in range(1, iterations + 1):
        m2 = 2 * m
        for num in (
            m * (bb - m) * xx / ((qam + m2) * (aa + m2)),
            -(aa + m) * (qab + m) * xx / ((aa + m2) * (qap + m2)),
        ):
            d = 1 + num * d
            d = 1 / torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
            c = 1 + num / c
            c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
            step = d * c
            h = h * step
        if bool(((step - 1).abs() < 1e-15).all()):
            break
    inner = xx.clamp(tiny, 1 - 1e-16)
    log_front = (
        torch.lgamma(qab) - torch.lgamma(aa) - torch.lgamma(bb) + aa * inner.log() + bb * (1 - inner).log()
    )
    part = torch.exp(log_front) * h / aa
    out = torch.where(swap, 1 - part, part)
    out = torch.where(x <= 0, torch.zeros_like(out), out)
    return torch.where(x >= 1, torch.ones_like(out), out)


def t_two_sided_p(t: Tensor, df: Tensor) -> Tensor:
    """Two-sided p-value of Student's t with df degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    t, df = torch.broadcast_tensors(_f64(t), _f64(df))
    x = torch.where(torch.isinf(t), torch.zeros_like(t), df / (df + t * t))
    return betainc(df / 2, torch.full_like(df, 0.5), x).clamp(0, 1)


class ColumnTest(NamedTuple):
    """Welch's t-test and effect size of set a against set b, per column."""

    mean_a: Tensor
    """[F] column means of set a."""
    mean_b: Tensor
    """[F] column means of set b."""
    d: Tensor
    """[F] Cohen's d: (μ_a − μ_b) / pooled standard deviation (0 where both sets are constant and equal)."""
    t: Tensor
    """[F] Welch's t statistic (±inf where both sets are constant and differ)."""
    df: Tensor
    """[F] Welch–Satterthwaite degrees of freedom."""
    p: Tensor
    """[F] two-sided p-value (1 where both sets are constant and equal)."""
    q: Tensor
    """[F] Benjamini–Hochberg adjusted p-value (false-discovery rate over the F tests)."""


def welch_test(a: Tensor, b: Tensor) -> ColumnTest:
    """Welch's unequal-variance t-test of every column of a [n, F] against b [m, F], with Cohen's d
    and Benjamini–Hochberg q-values over the columns."""
    _check_rows(a, b, 2, "a t-test")
    a, b = _f64(a), _f64(b)
    n, m = a.shape[0], b.shape[0]
    ma, mb = a.mean(0), b.mean(0)
    va, vb = a.var(0), b.var(0)
    diff = ma - mb
    sa, sb = va / n, vb / m
    se2 = sa + sb
    constant = se2 == 0
    safe_se = torch.where(constant, torch.ones_like(se2), se2).sqrt()
    t = torch.where(constant, torch.sign(diff) * math.inf, diff / safe_se)
    t = torch.where(constant & (diff == 0), torch.zeros_like(t), t)
    denom = sa * sa / (n - 1) + sb * sb / (m - 1)
    df = torch.where(
        denom > 0, se2 * se2 / torch.where(denom > 0, denom, torch.ones_like(denom)), n + m - 2.0
    )
    p = t_two_sided_p(t, df)
    pooled = (((n - 1) * va + (m - 1) * vb) / (n + m - 2)).sqrt()
    d = torch.where(
        pooled > 0,
        diff / torch.where(pooled > 0, pooled, torch.ones_like(pooled)),
        torch.sign(diff) * math.inf,
    )
    d = torch.where((pooled == 0) & (diff == 0), torch.zeros_like(d), d)
    return ColumnTest(ma, mb, d, t, df, p, benjamini_hochberg(p))


def benjamini_hochberg(p: Tensor) -> Tensor:
    """q-values [F]: q_(i) = min over j ≥ i of p_(j)·F/j (sorted ascending), capped at 1."""
    p = _f64(p).reshape(-1)
    if p.numel() == 0:
        return p
    order = p.argsort()
    ranked = p[order] * p.numel() / torch.arange(1, p.numel() + 1, dtype=torch.float64)
    # The running minimum from the largest p down makes the q-values monotone in p.
    ranked = ranked.flip(0).cummin(0).values.flip(0).clamp(max=1.0)
    q = torch.empty_like(p)
    q[order] = ranked
    return q


# ---- text --------------------------------------------------------------------------------------------


def repetition_rate(ids: Sequence[int], n: int = 2) -> float:
    """Fraction of the n-grams of a sequence that already occurred earlier in it (0: no repeats;
    near 1: a loop). Sequences shorter than n have no n-grams and rate 0."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation of two equally long sequences (nan when either is constant or too short)."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    if a.numel() < 2 or float(a.std()) == 0 or float(b.std()) == 0:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def ranks(x: Sequence[float]) -> list[float]:
    """Ranks from 1 (ties share their mean rank)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out
