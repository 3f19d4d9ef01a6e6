"""Activation correlations of a dictionary's latents, and its decoder's split over attention heads: the
correlated-neuron, correlated-feature and decoder-weight tables of SAEDashboard's dashboards.

- **correlated neurons**: between each latent's activation a and each coordinate ("neuron") x of the
  dictionary's input activation, over every token `openscope features` encodes, from streaming sums
  (n, Σa, Σa², Σx, Σx², Σa·x [F, d_in]). Per latent, the `k` neurons of highest Pearson r, with r and
  the cosine of the two uncentred activation vectors, Σax / sqrt(Σa² Σx²). x enters the sums minus a
  fixed shift (the mean of the first batch), which leaves r unchanged and keeps the float32 Σa·x free
  of cancellation; the cosine is recovered exactly from the shifted sums.
- **correlated features**: between latents of the same dictionary, over a bounded uniform sample of
  tokens (`sample_size`: S·F ≤ 2^25 values, at least 256 tokens): the codes [S, F] of the S tokens with
  the largest random keys seen so far (keys seeded per batch, so a resumed run keeps the same sample).
  Per latent, the `k` other latents of highest Pearson r over the sample, with their uncentred cosine;
  latents that are constant over the sample (that never fire in it) have none.
- **head distribution**: for a dictionary writing `attn_out` (heads concatenated, before o_proj), each
  latent's decoder direction split into its heads' slices: the L2 norm of each, normalised to sum 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SAMPLE_VALUES = 2**25
"""Budget of the correlated-features sample: S·F ≤ this many activation values (128 MiB of float32)."""
MIN_SAMPLE = 256
"""The sample holds at least this many tokens, however wide the dictionary."""
CORRELATES = 3
"""Correlated neurons and features kept per latent (SAEDashboard's tables show 3)."""
NEURON_VALUES = 2**26
"""Budget of the correlated-neuron sums: Σa·x is [F, d_in] float32, kept in memory and in every
checkpoint, so a dictionary with F·d_in above this (256 MiB; e.g. 262k latents on a 640-wide site) keeps
none and its correlated-neuron tables stay empty (`neuron_width`)."""

Correlates = list[list[tuple[int, float, float]]]
"""Per latent, its correlates as (index, pearson, cosine), highest pearson first."""


# ---- pure math ------------------------------------------------------------------------------------


def sample_size(width: int, tokens: int) -> int:
    """Tokens in the correlated-features sample of a `width`-latent dictionary over a `tokens` budget."""
    return max(1, min(tokens, max(MIN_SAMPLE, SAMPLE_VALUES // max(width, 1))))


def neuron_width(width: int, d_in: int) -> int:
    """The input width whose correlations a `width`-latent dictionary keeps: d_in within the
    `NEURON_VALUES` budget, else 0 (none)."""
    return d_in if width * d_in <= NEURON_VALUES else 0


def pearson_cosine(
    n: int, sum_a: Tensor, sum_aa: Tensor, sum_x: Tensor, sum_xx: Tensor, sum_ax: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Pearson r and uncentred cosine [C, D] of C activations a and D coordinates x over n tokens, from
    their sums; x's sums (Σx, Σx², Σa·x) are of x − shift. NaN where either side is constant / zero."""
    sa, saa = sum_a.double()[:, None], sum_aa.double()[:, None]
    sx, sxx, sax, x0 = sum_x.double(), sum_xx.double(), sum_ax.double(), shift.double()
    var_a = n * saa - sa * sa
    var_x = n * sxx - sx * sx
    pearson = (n * sax - sa * sx) / (var_a * var_x).sqrt()
    raw_ax = sax + sa * x0
    raw_xx = sxx + 2 * x0 * sx + n * x0 * x0
    cosine = raw_ax / (saa * raw_xx).sqrt()
    return pearson, cosine


def top_by_pearson(pearson: Tensor, cosine: Tensor, ids: Tensor, k: int) -> Correlates:
    """Per row, the k columns of highest (finite) pearson as (ids[column], pearson, cosine)."""
    k = min(k, pearson.shape[1])
    if k == 0:
        return [[] for _ in range(len(pearson))]
    score = torch.nan_to_num(pearson, nan=-math.inf)
    v, j = score.topk(k, dim=1)
    c = cosine.gather(1, j)
    out: Correlates = []
    for row_v, row_j, row_c in zip(v.tolist(), j.tolist(), c.tolist(), strict=True):
        out.append(
            [(int(ids[a]), p, q) for p, a, q in zip(row_v, row_j, row_c, strict=True) if p > -math.inf]
        )
    return out


def feature_correlates(
    codes: Tensor, k: int = CORRELATES, chunk_values: int = 2**24, device: str | torch.device = "cpu"
) -> Correlates:
    """Per latent (columns of codes [S, F]), the k other latents of highest Pearson r over the S tokens,
    with their uncentred cosine. Only latents that vary over the sample take part (others get []);
    computed in chunks of latents so memory stays [chunk_values] beyond the sample."""
    f = codes.shape[1]
    out: Correlates = [[] for _ in range(f)]
    codes = codes.to(device, torch.float32)
    centred = codes - codes.mean(0)
    sd = centred.norm(dim=0)
    ids = (sd > 0).nonzero().squeeze(1)
    m = len(ids)
    if m < 2 or k == 0:
        return out
    z = centred[:, ids] / sd[ids]
    u = torch.nn.functional.normalize(codes[:, ids], dim=0)
    ids_cpu = ids.cpu()
    step = max(1, chunk_values // m)
    for i in range(0, m, step):
        pearson = z[:, i : i + step].t() @ z  # [c, m]
        rows = torch.arange(len(pearson), device=pearson.device)
        pearson[rows, rows + i] = math.nan  # a latent is not its own correlate
        cosine = u[:, i : i + step].t() @ u
        tops = top_by_pearson(pearson.cpu(), cosine.cpu(), ids_cpu, k)
        for r, top in enumerate(tops):
            out[int(ids_cpu[i + r])] = top
    return out


def head_distribution(directions: Tensor, n_heads: int) -> list[list[float]]:
    """Per direction (rows of [F, n_heads·head_dim]), the L2 norm of each head's slice over their sum
    ([] for a zero direction)."""
    f, width = directions.shape
    norms = directions.float().reshape(f, n_heads, width // n_heads).norm(dim=2)
    total = norms.sum(1, keepdim=True)
    share = norms / total.clamp_min(torch.finfo(torch.float32).tiny)
    return [row if t > 0 else [] for row, t in zip(share.tolist(), total.squeeze(1).tolist(), strict=True)]


# ---- streaming state --------------------------------------------------------------------------------


class Correlations:
    """The streaming state behind correlated neurons (sums over every token; `d_in` 0: none kept) and
    correlated features (a uniform sample of `sample` tokens' codes), checkpointed as tensors."""

    def __init__(self, width: int, d_in: int, sample: int) -> None:
        self.width, self.d_in, self.sample = width, d_in, sample
        self.n = 0
        self.sum_a = torch.zeros(width, dtype=torch.float64)
        self.sum_aa = torch.zeros(width, dtype=torch.float64)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_xx = torch.zeros(d_in, dtype=torch.float64)
        self.sum_ax = torch.zeros(width, d_in)
        self.shift = torch.zeros(0)
        """The fixed shift of x (empty until the first token)."""
        self.keys = torch.zeros(0)
        self.codes = torch.zeros(0, width)

    def add(
        self, acts: Tensor, rows: Tensor, latents: Tensor, values: Tensor, inputs: Tensor | None, keys: Tensor
    ) -> None:
        """One batch: codes acts [N, F], their nonzero entries (rows, latents, values), the dictionary's
        input [N, d_in] (None when `d_in` is 0) and one random key per row [N]."""
        if len(acts) == 0:
            return
        self.n += len(acts)
        self.sum_a += torch.bincount(latents, weights=values.double(), minlength=self.width)
        self.sum_aa += torch.bincount(latents, weights=values.double() ** 2, minlength=self.width)
        if self.d_in and inputs is not None:
            self._add_inputs(rows, latents, values, inputs.float())
        self._offer(keys, acts)

    def _add_inputs(self, rows: Tensor, latents: Tensor, values: Tensor, x: Tensor) -> None:
        if self.shift.numel() == 0:
            self.shift = x.mean(0)
        x = x - self.shift
        self.sum_x += x.double().sum(0)
        self.sum_xx += (x.double() ** 2).sum(0)
        step = max(1, 2**22 // self.d_in)  # entries per index_add_: [step, d_in] at a time
        for i in range(0, len(rows), step):
            part = slice(i, i + step)
            self.sum_ax.index_add_(0, latents[part], values[part, None] * x[rows[part]])

    def _offer(self, keys: Tensor, acts: Tensor) -> None:
        """Keep the codes of the `sample` rows with the largest keys seen so far."""
        room = self.sample - len(self.keys)
        if room > 0:  # still filling: every row enters
            self.keys = torch.cat([self.keys, keys[:room]])
            self.codes = torch.cat([self.codes, acts[:room].float()])
            keys, acts = keys[room:], acts[room:]
        if len(keys) == 0:
            return
        cand = (keys > self.keys.min()).nonzero().squeeze(1)
        if len(cand) == 0:
            return
        best = torch.cat([self.keys, keys[cand]]).topk(self.sample).indices
        kept = torch.zeros(self.sample + len(cand), dtype=torch.bool)
        kept[best] = True
        evicted = (~kept[: self.sample]).nonzero().squeeze(1)
        taken = cand[kept[self.sample :].nonzero().squeeze(1)]
        self.keys[evicted] = keys[taken]
        self.codes[evicted] = acts[taken].float()

    def neurons(self, k: int = CORRELATES, chunk: int = 1024) -> Correlates:
        """Per latent, its k most correlated input coordinates ([] for every latent when `d_in` is 0)."""
        if not self.d_in or self.shift.numel() == 0:
            return [[] for _ in range(self.width)]
        out: Correlates = []
        ids = torch.arange(self.d_in)
        for i in range(0, self.width, chunk):
            part = slice(i, i + chunk)
            pearson, cosine = pearson_cosine(
                self.n,
                self.sum_a[part],
                self.sum_aa[part],
                self.sum_x,
                self.sum_xx,
                self.sum_ax[part],
                self.shift,
            )
            out += top_by_pearson(pearson, cosine, ids, k)
        return out

    def features(self, k: int = CORRELATES, device: str | torch.device = "cpu") -> Correlates:
        """Per latent, its k most correlated other latents over the sample."""
        return feature_correlates(self.codes, k, device=device)

    def state(self) -> dict[str, Tensor]:
        names = ("sum_a", "sum_aa", "sum_x", "sum_xx", "sum_ax", "shift", "keys", "codes")
        return {"corr.n": torch.tensor([self.n]), **{f"corr.{k}": getattr(self, k) for k in names}}

    def load(self, state: dict[str, Tensor]) -> None:
        self.n = int(state["corr.n"][0])
        for k in ("sum_a", "sum_aa", "sum_x", "sum_xx", "sum_ax", "shift", "keys", "codes"):
            setattr(self, k, state[f"corr.{k}"].clone())
