"""Sparse probing (SAEBench's `sparse_probing`): how well a few latents alone classify labelled text.

Each text of a labelled set (`openscope.data.labelled`) is run through the model; the dictionary's input
site is mean-pooled over the text's tokens (BOS/EOS/pad excluded), once as raw activations and once as
latents (each token encoded, then the latents averaged). Per class, as SAEBench does: a balanced
one-vs-rest set (the class's texts against as many drawn from the other classes, equally from each), split
into train and test texts by a seeded draw. For k in `ks` the k latents with the largest
|mean(class) − mean(rest)| on the training texts are chosen and a logistic probe is fitted on them alone;
the same on the k raw dimensions (`llm_top_k`), and a dense probe on every raw dimension gives the ceiling
(`llm_test_accuracy`). The score is held-out accuracy, averaged over classes, then over tasks.

The probe is SAEBench's (scikit-learn's default L2 logistic regression): minimise
½‖w‖² + C Σᵢ log(1 + exp(−sᵢ (w·xᵢ + b))) with C = 1 (the bias unpenalised), here in float64 with torch's
L-BFGS; `tests/test_probing.py` checks it against scipy's optimiser on the same objective.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from openscope.coders.dictionary import Dictionary
from openscope.data.labelled import LabelledSet
from openscope.errors import OpenscopeError
from openscope.models.hooks import run_to_sites
from openscope.models.load import LoadedModel
from openscope.models.sites import Site
from openscope.models.tokens import encode, keep_mask, pad_batch

log = logging.getLogger(__name__)

KS = (1, 2, 5, 10, 20)
"""Numbers of latents the sparse probes get (SAEBench reports 1, 2, 5 by default; the issue adds 10, 20)."""


# ---- the logistic probe -----------------------------------------------------------------------------


class LogisticProbe(NamedTuple):
    """A fitted binary logistic probe: score = x·weight + bias, positive class where score > 0."""

    weight: Tensor
    """[d] float64 weights."""
    bias: float
    """The intercept."""

    def scores(self, x: Tensor) -> Tensor:
        """[N] float64 decision scores of rows x [N, d]."""
        return x.double() @ self.weight + self.bias


def logistic_objective(w: Tensor, b: Tensor, x: Tensor, y: Tensor, c: float, sample_weight: Tensor) -> Tensor:
    """½‖w‖² + C Σᵢ vᵢ log(1 + exp(−sᵢ (w·xᵢ + b))), sᵢ = ±1 from labels y ∈ {0, 1}, vᵢ the sample weights."""
    s = y.double() * 2 - 1
    margins = s * (x @ w + b)
    return 0.5 * w.pow(2).sum() + c * (sample_weight * torch.nn.functional.softplus(-margins)).sum()


def fit_logistic(
    x: Tensor, y: Tensor, c: float = 1.0, balanced: bool = False, max_iter: int = 500
) -> LogisticProbe:
    """Fit an L2-regularised binary logistic probe on rows x [N, d] with labels y [N] in {0, 1}.

    `balanced` weighs each class by N / (2 · its count) (scikit-learn's class_weight="balanced")."""
    x, y = x.double().cpu(), y.double().cpu()
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise OpenscopeError("a probe needs rows x [N, d] and one label per row")
    weight = torch.ones_like(y)
    if balanced:
        n_pos = float(y.sum())
        n_neg = len(y) - n_pos
        if n_pos > 0 and n_neg > 0:
            weight = torch.where(y > 0, len(y) / (2 * n_pos), len(y) / (2 * n_neg))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = logistic_objective(w, b, x, y, c, weight)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticProbe(w.detach(), float(b.detach()))


def accuracy(probe: LogisticProbe, x: Tensor, y: Tensor) -> float:
    """Fraction of rows the probe classifies right."""
    return float(((probe.scores(x) > 0).double() == y.double().cpu()).double().mean())


def top_k_mean_diff(x: Tensor, y: Tensor, k: int, signed: bool = False) -> Tensor:
    """Indices of the k columns of x [N, d] with the largest |mean over y = 1 − mean over y = 0| (with
    `signed`, the largest positive difference: columns that speak for the class)."""
    yb = y.bool().cpu()
    diff = x[yb].double().mean(0) - x[~yb].double().mean(0)
    return torch.argsort(diff if signed else diff.abs(), descending=True, stable=True)[:k]


# ---- balanced one-vs-rest sets ---------------------------------------------------------------------


def one_vs_rest(labels: Tensor, cls: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(row indices, 0/1 labels) of a balanced set: every row of `cls`, and as many drawn from the other
    classes, an equal share from each (SAEBench's `prepare_probe_data`), shuffled."""
    pos = (labels == cls).nonzero().squeeze(1)
    others = [c for c in labels.unique().tolist() if c != cls]
    per = -(-len(pos) // max(len(others), 1))
    neg = torch.cat(
        [
            (labels == c).nonzero().squeeze(1)[torch.randperm(int((labels == c).sum()), generator=gen)[:per]]
            for c in others
        ]
    )
    neg = neg[torch.randperm(len(neg), generator=gen)[: len(pos)]]
    rows = torch.cat([pos, neg])
    ys = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    order = torch.randperm(len(rows), generator=gen)
    return rows[order], ys[order]


def split_by_class(labels: Tensor, train_fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(train rows, test rows): each class's rows shuffled and cut at `train_fraction` (at least one on
    each side)."""
    train, test = [], []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=gen)]
        cut = min(max(1, round(len(rows) * train_fraction)), len(rows) - 1)
        train.append(rows[:cut])
        test.append(rows[cut:])
    return torch.cat(train), torch.cat(test)


# ---- one task ------------------------------------------------------------------------------------


class ProbeScores(NamedTuple):
    """Held-out accuracies of one one-vs-rest problem (or their mean over classes)."""

    llm_test_accuracy: float
    """Dense probe on every raw dimension (the ceiling)."""
    llm_top_k: dict[int, float]
    """k → probe on the k raw dimensions with the largest class-mean difference."""
    sae_top_k: dict[int, float]
    """k → probe on the k latents with the largest class-mean difference."""


def probe_class(
    raw: Tensor, latents: Tensor, y_rows: tuple[Tensor, Tensor, Tensor, Tensor], ks: Sequence[int]
) -> ProbeScores:
    """Scores of one balanced problem: train rows/labels and test rows/labels into raw [N, d] and
    latents [N, F] (mean-pooled per text)."""
    tr, ytr, te, yte = y_rows
    dense = fit_logistic(raw[tr], ytr)
    llm, sae = {}, {}
    for k in ks:
        for feats, out in ((raw, llm), (latents, sae)):
            if k > feats.shape[1]:
                continue
            cols = top_k_mean_diff(feats[tr], ytr, k)
            out[k] = accuracy(fit_logistic(feats[tr][:, cols], ytr), feats[te][:, cols], yte)
    return ProbeScores(accuracy(dense, raw[te], yte), llm, sae)


def mean_scores(scores: Sequence[ProbeScores]) -> ProbeScores:
    """The mean of several problems' scores (per k over the problems that have it)."""

    def avg(key: str) -> dict[int, float]:
        ks = sorted({k for s in scores for k in getattr(s, key)})
        return {k: sum(getattr(s, key)[k] for s in scores) / len(scores) for k in ks}

    return ProbeScores(
        sum(s.llm_test_accuracy for s in scores) / len(scores), avg("llm_top_k"), avg("sae_top_k")
    )


class TaskResult(NamedTuple):
    """Sparse probing on one labelled set."""

    task: str
    """The labelled set."""
    classes: list[str]
    """Its classes."""
    n_train: int
    """Texts in the training split (all classes)."""
    n_test: int
    """Texts held out."""
    scores: ProbeScores
    """Accuracies averaged over the classes' one-vs-rest problems."""
    per_class: dict[str, ProbeScores]
    """Each class's own one-vs-rest accuracies."""


def probe_task(
    data: LabelledSet,
    raw: Tensor,
    latents: Tensor,
    ks: Sequence[int] = KS,
    train_fraction: float = 0.8,
    seed: int = 42,
) -> TaskResult:
    """Sparse probing of one labelled set from its mean-pooled raw activations [N, d] and latents [N, F]."""
    labels = torch.tensor(data.labels)
    if len(labels.unique()) < 2:
        raise OpenscopeError(f"labelled set {data.name!r} has one class: probing needs at least two")
    gen = torch.Generator().manual_seed(seed)
    train, test = split_by_class(labels, train_fraction, gen)
    per_class = {}
    for c, name in enumerate(data.classes):
        tr, ytr = one_vs_rest(labels[train], c, gen)
        te, yte = one_vs_rest(labels[test], c, gen)
        per_class[name] = probe_class(raw, latents, (train[tr], ytr, test[te], yte), ks)
    return TaskResult(
        data.name, data.classes, len(train), len(test), mean_scores(list(per_class.values())), per_class
    )


# ---- mean-pooled activations ------------------------------------------------------------------------


@torch.inference_mode()
def pooled_activations(
    loaded: LoadedModel,
    site: Site,
    texts: Sequence[str],
    dicts: Sequence[Dictionary],
    context_len: int = 128,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over each text's first `context_len` tokens (BOS/EOS/pad excluded) of the raw activations at
    `site` [N, d] and of each dictionary's latents [N, F] (by name; each dictionary reads `site`)."""
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    raws: list[Tensor] = []
    lats: dict[str, list[Tensor]] = {d.name: [] for d in dicts}
    for start in tqdm(range(0, len(texts), batch_size), desc=f"probing {site.name}", disable=not progress):
        seqs = [encode(tok, t)[:context_len] for t in texts[start : start + batch_size]]
        ids, attn, _ = pad_batch(seqs, pad)
        ids, attn = ids.to(loaded.device), attn.to(loaded.device)
        keep = (keep_mask(ids, tok) & attn.bool()).float()
        if bool((keep.sum(1) == 0).any()):
            raise OpenscopeError("a labelled text has no token besides BOS/EOS/padding")
        x = run_to_sites(loaded, ids, [site], attn)[site].float()
        count = keep.sum(1, keepdim=True)
        raws.append(((x * keep.unsqueeze(-1)).sum(1) / count).cpu())
        flat = x.reshape(-1, x.shape[-1])
        for d in dicts:
            f = d.coder.encode_at(0, flat).float().reshape(*x.shape[:2], -1)
            lats[d.name].append(((f * keep.unsqueeze(-1)).sum(1) / count).cpu())
    return torch.cat(raws), {name: torch.cat(v) for name, v in lats.items()}


class ProbingReport(NamedTuple):
    """Sparse probing of one dictionary on every task."""

    tasks: list[TaskResult]
    """One result per labelled set."""
    scores: ProbeScores
    """Accuracies averaged over the tasks (SAEBench's headline numbers)."""
    ks: tuple[int, ...]
    """The k of the sparse probes."""
    seed: int
    """Seed of the text draw, the train/test split and the balanced negatives."""
    train_fraction: float
    """Fraction of each class's texts in the training split."""
    per_class: int
    """Texts drawn per class (at most)."""
    context_len: int
    """Tokens of each text read (BOS included)."""


def run_probing(
    loaded: LoadedModel,
    dicts: Sequence[Dictionary],
    sets: Sequence[LabelledSet],
    ks: Sequence[int] = KS,
    train_fraction: float = 0.8,
    seed: int = 42,
    context_len: int = 128,
    batch_size: int = 8,
    per_class: int = 0,
    progress: bool = False,
) -> dict[str, ProbingReport]:
    """Sparse probing of every single-layer dictionary on every labelled set; one forward pass per site
    and text serves every dictionary reading that site. Multi-layer dictionaries are skipped (logged)."""
    if not 0 < train_fraction < 1:
        raise OpenscopeError(f"the train fraction must lie strictly between 0 and 1, got {train_fraction}")
    if not ks or min(ks) < 1:
        raise OpenscopeError(f"probe sizes k must be positive, got {list(ks)}")
    single = [d for d in dicts if d.n_layers == 1]
    for d in dicts:
        if d.n_layers != 1:
            log.warning("sparse probing skips %s: it spans %d layers", d.name, d.n_layers)
    by_site: dict[Site, list[Dictionary]] = {}
    for d in single:
        by_site.setdefault(d.site_in, []).append(d)
    results: dict[str, list[TaskResult]] = {d.name: [] for d in single}
    for data in sets:
        for site, group in by_site.items():
            raw, lats = pooled_activations(loaded, site, data.texts, group, context_len, batch_size, progress)
            for d in group:
                results[d.name].append(probe_task(data, raw, lats[d.name], ks, train_fraction, seed))
    return {
        name: ProbingReport(
            tasks,
            mean_scores([t.scores for t in tasks]),
            tuple(ks),
            seed,
            train_fraction,
            per_class,
            context_len,
        )
        for name, tasks in results.items()
    }
