"""The streaming per-latent statistics of `openscope features`: constant memory however many tokens.

A batch's activations [N, F] are reduced to their nonzero entries; per-latent counts, sums and
histograms are `bincount`s; the top-k and the sample are kept per latent in fixed [F, k] tensors
(`Slots`), and a batch enters them through a segmented top-k over just the entries that beat the
current k-th value (`segmented_topk`), so after the first batches almost nothing is sorted. The
histogram has fixed log-spaced bins (`hist_edges`, the same edges for every latent, so it streams
exactly). `LatentStats` holds all of it for one dictionary, with the sums and token sample behind the
correlated neurons and features (`openscope.features.correlations`), and checkpoints to a dict of
tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.activations.batches import TokenBatch
from openscope.errors import OpenscopeError
from openscope.features.config import FeaturesConfig
from openscope.features.correlations import Correlations, neuron_width, sample_size
from openscope.features.roles import RoleCounter

# ---- pure math ------------------------------------------------------------------------------------


def segmented_topk(segment: Tensor, score: Tensor, n_segments: int, k: int) -> Tensor:
    """For entries (segment[i], score[i]): per segment the indices of its k highest-scoring entries.

    Returns [n_segments, k] int64 indices into the entries, highest score first, -1 where a segment
    has fewer than k entries. Ties keep the earlier entry first (stable sorts).
    """
    out = torch.full((n_segments, k), -1, dtype=torch.long)
    if segment.numel() == 0 or k == 0:
        return out
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(segment[order], stable=True)]
    seg = segment[order]
    counts = torch.bincount(segment, minlength=n_segments)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order)) - starts[seg]
    keep = rank < k
    out[seg[keep], rank[keep]] = order[keep]
    return out


def hist_edges(lo: float, hi: float, per_decade: int) -> Tensor:
    """Log-spaced histogram edges from lo to (at least) hi, `per_decade` bins per factor of ten."""
    if not (0 < lo < hi) or per_decade < 1:
        raise OpenscopeError(
            f"histogram needs 0 < hist_min < hist_max and bins_per_decade >= 1 (got {lo}, {hi})"
        )
    n_bins = math.ceil(round(math.log10(hi / lo) * per_decade, 6))
    return 10 ** (math.log10(lo) + torch.arange(n_bins + 1, dtype=torch.float64) / per_decade)


def hist_bin(values: Tensor, lo: float, per_decade: int, n_bins: int) -> Tensor:
    """Bin index of each positive value on `hist_edges(lo, ..., per_decade)`, clamped to [0, n_bins)."""
    b = torch.floor((torch.log10(values.double()) - math.log10(lo)) * per_decade)
    return b.clamp_(0, n_bins - 1).long()


# ---- streaming state --------------------------------------------------------------------------------


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one intra-op thread (restored afterwards)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Windows(NamedTuple):
    """Examples taken from a batch: one per (latent, entry) pair asked for."""

    value: Tensor
    """[M] activation at the example's token."""
    context: Tensor
    """[M] global context id."""
    position: Tensor
    """[M] position of the token in its context."""
    tokens: Tensor
    """[M, W] token ids of the window (-1 outside the context)."""
    acts: Tensor
    """[M, W] the latent's activation at each window token (0 where not encoded)."""


class BatchView:
    """One dictionary's activations on one batch, reduced to what the statistics need."""

    def __init__(self, batch: TokenBatch, acts: Tensor, window: int) -> None:
        self.batch, self.acts, self.window = batch, acts, window
        mask = acts > 0
        self.rows, self.latents = mask.nonzero(as_tuple=True)
        self.values = acts[mask]  # same row-major order as nonzero()
        n_ctx, length = batch.contexts.shape
        self.grid = torch.full((n_ctx, length), -1, dtype=torch.long)
        self.grid[batch.row_context, batch.row_position] = torch.arange(len(batch.row_context))

    def windows(self, latents: Tensor, entries: Tensor) -> Windows:
        """The examples of nonzero entries `entries` (indices into values) of `latents`."""
        rows = self.rows[entries]
        b = self.batch
        c, p = b.row_context[rows], b.row_position[rows]
        length = b.contexts.shape[1]
        q = p[:, None] + torch.arange(-self.window, self.window + 1)
        valid = (q >= 0) & (q < length)
        qc = q.clamp(0, length - 1)
        tokens = torch.where(valid, b.contexts[c[:, None], qc], torch.tensor(-1))
        rr = self.grid[c[:, None], qc]
        has = valid & (rr >= 0)
        acts = self.acts[rr.clamp(min=0), latents[:, None]] * has
        return Windows(self.values[entries], b.context_ids[c], p, tokens.int(), acts.float())


class Slots:
    """Per latent, the `size` best examples so far by a score (the activation, or a random key).

    Slots are unordered while streaming: a batch's winners overwrite just the slots they evict, so
    a batch costs in proportion to the examples that change, not to the whole [F, size, window]
    state. `sorted()` orders them (best first) at the end.
    """

    FIELDS = ("score", "value", "context", "position", "tokens", "acts")

    def __init__(self, n_latents: int, size: int, width: int) -> None:
        self.score = torch.full((n_latents, size), -math.inf)
        self.value = torch.zeros(n_latents, size)
        self.context = torch.full((n_latents, size), -1, dtype=torch.long)
        self.position = torch.zeros(n_latents, size, dtype=torch.long)
        self.tokens = torch.full((n_latents, size, width), -1, dtype=torch.int32)
        self.acts = torch.zeros(n_latents, size, width)
        self._floor = torch.full((n_latents,), -math.inf)

    @property
    def size(self) -> int:
        return self.score.shape[1]

    def floor(self) -> Tensor:
        """[F] the score an entry must beat to get in (the worst kept score)."""
        return self._floor

    def offer(self, view: BatchView, latents: Tensor, scores: Tensor, entries: Tensor) -> None:
        """Merge candidates (nonzero entries of one batch, with their latents and scores) into the slots."""
        size = self.size
        if size == 0 or entries.numel() == 0:
            return
        best = segmented_topk(latents, scores, self.score.shape[0], size)  # indices into the candidates
        cand_score = torch.where(best >= 0, scores[best.clamp(min=0)], torch.tensor(-math.inf))
        pick = torch.cat([self.score, cand_score], 1).topk(size, dim=1).indices
        kept = torch.zeros(self.score.shape[0], 2 * size, dtype=torch.bool).scatter_(1, pick, True)
        # Per latent, as many old slots are evicted as candidates are taken; nonzero() lists both
        # row-major, so the i-th evicted slot pairs with the i-th taken candidate.
        lat, slot = (~kept[:, :size]).nonzero(as_tuple=True)
        col = kept[:, size:].nonzero(as_tuple=True)[1]
        real = torch.isfinite(cand_score[lat, col])  # ties among empty (-inf) slots change nothing
        lat, slot, col = lat[real], slot[real], col[real]
        if len(lat):
            w = view.windows(lat, entries[best[lat, col]])
            self.score[lat, slot] = cand_score[lat, col]
            self.value[lat, slot] = w.value
            self.context[lat, slot] = w.context
            self.position[lat, slot] = w.position
            self.tokens[lat, slot] = w.tokens
            self.acts[lat, slot] = w.acts
            self._floor = self.score.min(1).values

    def sorted(self) -> Slots:
        """A copy with each latent's slots ordered by score, best first (empty slots last)."""
        order = self.score.argsort(dim=1, descending=True, stable=True)
        out = Slots.__new__(Slots)
        for k in ("score", "value", "context", "position"):
            setattr(out, k, getattr(self, k).gather(1, order))
        order3 = order[:, :, None].expand(-1, -1, self.tokens.shape[2])
        out.tokens = self.tokens.gather(1, order3)
        out.acts = self.acts.gather(1, order3)
        out._floor = self._floor.clone()
        return out

    def state(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{k}": getattr(self, k) for k in self.FIELDS}

    def load(self, prefix: str, state: dict[str, Tensor]) -> None:
        for k in self.FIELDS:
            setattr(self, k, state[f"{prefix}.{k}"].clone())
        self._floor = self.score.min(1).values


class LatentStats:
    """The streaming statistics of one dictionary's latents (everything `finish` needs); `d_in` is the
    width of the dictionary's input, whose coordinates the latents are correlated with (0: not kept)."""

    def __init__(self, width: int, cfg: FeaturesConfig, d_in: int = 0) -> None:
        self.cfg = cfg
        self.width = width
        self.edges = hist_edges(cfg.hist_min, cfg.hist_max, cfg.bins_per_decade)
        self.n_bins = len(self.edges) - 1
        win = 2 * cfg.window + 1
        self.top = Slots(width, cfg.top_k, win)
        self.sample = Slots(width, cfg.quantile_buckets * cfg.quantile_examples, win)
        self.n_fired = torch.zeros(width, dtype=torch.long)
        self.act_sum = torch.zeros(width, dtype=torch.float64)
        self.hist = torch.zeros(width, self.n_bins, dtype=torch.long)
        self.roles = RoleCounter(width)
        """Per-role counts (chat data; stay zero for plain text)."""
        self.corr = Correlations(width, neuron_width(width, d_in), sample_size(width, cfg.tokens))
        """Correlated neurons (sums over every token) and features (a sample of tokens)."""
        self.tokens_done = 0
        self.batches_done = 0

    def update(self, batch: TokenBatch, acts: Tensor, inputs: Tensor | None = None) -> None:
        """Add one batch: acts [N, F] are this dictionary's latents on the batch's rows, inputs [N, d_in]
        the activations they encode (for the correlated neurons; None: not kept).

        Runs on one thread: these are many small memory-bound ops, and on a busy machine every
        multi-threaded op waits for a descheduled worker (measured: 0.1 s per 4096-token batch of a
        4096-latent SAE on one thread, 1.2 s on two while another process used the cores).
        """
        with single_thread():
            self._update(batch, acts, inputs)

    def _update(self, batch: TokenBatch, acts: Tensor, inputs: Tensor | None) -> None:
        view = BatchView(batch, acts, self.cfg.window)
        lat, val = view.latents, view.values
        f = self.width
        self.n_fired += torch.bincount(lat, minlength=f)
        self.act_sum += torch.bincount(lat, weights=val.double(), minlength=f)
        bins = hist_bin(val, self.cfg.hist_min, self.cfg.bins_per_decade, self.n_bins)
        self.hist.view(-1).add_(torch.bincount(lat * self.n_bins + bins, minlength=f * self.n_bins))
        if batch.row_role is not None:
            self.roles.add(batch.row_role, view.rows, lat, val)
        # Only entries that beat a latent's current k-th best can enter: after the first batches
        # that filter leaves few entries to sort.
        entries = (val > self.top.floor()[lat]).nonzero().squeeze(1)
        self.top.offer(view, lat[entries], val[entries], entries)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + batch.index)
        keys = torch.rand(len(val), generator=gen)
        entries = (keys > self.sample.floor()[lat]).nonzero().squeeze(1)
        self.sample.offer(view, lat[entries], keys[entries], entries)
        row_keys = torch.rand(len(acts), generator=gen)
        self.corr.add(acts, view.rows, lat, val, inputs, row_keys)
        self.tokens_done += len(acts)
        self.batches_done = batch.index + 1

    def state(self) -> dict[str, Tensor]:
        return {
            **self.top.state("top"),
            **self.sample.state("sample"),
            "n_fired": self.n_fired,
            "act_sum": self.act_sum,
            "hist": self.hist,
            "counters": torch.tensor([self.tokens_done, self.batches_done]),
            **self.roles.state(),
            **self.corr.state(),
        }

    def load(self, state: dict[str, Tensor]) -> None:
        self.top.load("top", state)
        self.sample.load("sample", state)
        self.n_fired = state["n_fired"].clone()
        self.act_sum = state["act_sum"].clone()
        self.hist = state["hist"].clone()
        self.roles.load(state)
        self.corr.load(state)
        self.tokens_done, self.batches_done = (int(x) for x in state["counters"].tolist())
