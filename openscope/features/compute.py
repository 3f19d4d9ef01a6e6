"""`openscope features`: per-latent dashboards of sparse dictionaries, streamed into the SQLite index.

For every latent of each dictionary, over a token budget:
- **top-k examples**: the k tokens with the largest activation, each with a window of ±`window`
  tokens of its context and the latent's activation at every token of the window;
- **quantile examples**: a uniform random sample of the tokens where the latent fired (priority
  sampling: each firing gets a seeded random key, the largest keys are kept), split at the end into
  `quantile_buckets` groups by activation, so the dashboard shows weak, medium and strong firings;
- **firing frequency**, mean activation (over firing tokens), max activation, and a histogram of the
  nonzero activations on fixed log-spaced bins (the same edges for every latent, so it streams exactly);
- **logit effects**: the decoder direction d mapped to the residual stream and read out by the
  unembedding through the final norm's gain, W_U·(g ⊙ d). A direction is not a hidden state, so
  the norm's 1/rms(x) scale (which depends on the rest of x) is left out and only its gain g is
  applied; Gemma's RMSNorm multiplies by (1 + w), other models' by w (`norm_gain`). Rankings are
  what the dashboard shows; values are in logit units per unit of direction;
- **neighbours**: the latents with the most similar decoder directions (cosine);
- **roles** (chat data, whose tokens carry roles): per role, the firing frequency and mean activation,
  and how specific the latent is to that role (`openscope.analysis.roles`). `--roles model` indexes only
  the tokens of those roles.

Data: rows of an activation store (`--store`: every shard keeps the token ids of its contexts, so
examples show text), or live (`--source`: the model runs on a text source, stopping at the last
site needed). Batches are whole contexts, so the window around any token is in the batch.

Streaming, vectorised: a batch's activations [N, F] are reduced to their nonzero entries; per-latent
counts, sums and histograms are `bincount`s; the top-k and the sample are kept per latent in fixed
[F, k] tensors, and a batch enters them through a segmented top-k over just the entries that beat
the current k-th value (`segmented_topk`), so after the first batches almost nothing is sorted.
Nothing proportional to the number of tokens is ever held.

Incremental and resumable: each dictionary has a fingerprint (weights, data, settings). One whose
finished dashboards carry the same fingerprint is skipped, so adding a dictionary computes only
that one. While running, every `checkpoint_every` batches the whole streaming state of each
dictionary is committed to the `progress` table together with the number of batches done; a rerun
restores it and continues at that batch (an interruption loses at most that many batches). Random
keys are seeded by (seed, batch index), so a resumed run ends with exactly the state of an
uninterrupted one. The finished dashboards of a dictionary are written in one transaction.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from tqdm.auto import tqdm

from openscope.activations.store import ActivationStore, shard_checksum
from openscope.analysis.roles import RoleCounter, frequency_elsewhere, specificity
from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import Dictionary, load_dictionary, validate_dictionary
from openscope.data.chat import ROLES, role_ids
from openscope.data.conversations import is_chat_source, source_contexts
from openscope.data.packing import to_batch
from openscope.errors import OpenscopeError
from openscope.features import db as fdb
from openscope.features.schema import DictionaryInfo
from openscope.files import Ownership, absolute, check_output, child, replacing, safe_name, write_text
from openscope.models.hooks import run_to_sites
from openscope.models.load import LoadedModel, load_model, resolve_device
from openscope.models.sites import Site, locate
from openscope.models.tokens import keep_mask, token_pieces

log = logging.getLogger(__name__)

FEATURES_VERSION = 1
"""Bumped when the computation changes meaning (part of every fingerprint)."""


@dataclass
class FeaturesConfig:
    """Which dictionaries to index, from which tokens, with which settings, into which database."""

    dictionaries: list[Path] = field(default_factory=lambda: [Path("openscope-out/dictionaries")])
    """Dictionary folders, or folders to search for them; repeat the flag for several."""
    output: Path = fdb.DEFAULT_DB
    """The SQLite feature database (created if missing; other dictionaries in it are kept)."""
    store: Path | None = None
    """Read activations from this store (it must hold the dictionaries' input sites). Default: run the model live on --source."""
    source: str = "wiki[9000:]"
    """Text for live mode: wiki, shakespeare, python, or a path; slice documents, e.g. `wiki[9000:]`."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet, saved dataset) holding the text."""
    roles: str = ""
    """Chat data (sharegpt, chat:PATH, or a store harvested from one): index only tokens of these roles, e.g. `model` (of template, system, user, model); empty: every token. Per-role statistics are kept whenever the data has roles."""
    model: str | None = None
    """Model (name, local directory or hub id). Default: the store's model, else the dictionaries' model_name."""
    tokens: int = 1_000_000
    """Token budget: tokens (BOS/EOS/pad excluded) encoded per dictionary, rounded up to whole batches."""
    context_len: int = 128
    """Tokens per packed context in live mode (a store keeps its own)."""
    batch_tokens: int = 4096
    """Tokens per batch (rounded to whole contexts)."""
    top_k: int = 24
    """Top activating examples kept per latent."""
    window: int = 16
    """Tokens shown on each side of an example's max token."""
    quantile_buckets: int = 4
    """Activation quantile groups of sampled examples."""
    quantile_examples: int = 4
    """Sampled examples per quantile group."""
    hist_min: float = 1e-3
    """Lowest histogram edge (smaller nonzero activations count in the first bin)."""
    hist_max: float = 1e5
    """Highest histogram edge (larger activations count in the last bin)."""
    bins_per_decade: int = 16
    """Log-spaced histogram bins per factor of ten."""
    logits: int = 10
    """Top and bottom logit tokens kept per latent."""
    neighbours: int = 10
    """Nearest latents by decoder cosine kept per latent."""
    seed: int = 0
    """Seed of the quantile sampling (a rerun with the same seed gives the same examples)."""
    checkpoint_every: int = 50
    """Commit the streaming state every this many batches (the most an interruption loses)."""
    force: bool = False
    """Recompute dictionaries whose dashboards are already complete."""
    export: Path | None = None
    """Also write each feature's JSON (FeatureDetail, Neuronpedia-style) to <export>/<dictionary>/<latent>.json."""
    export_latents: str = ""
    """Latents to export, e.g. `0-99,512` (default: all)."""
    overwrite: bool = False
    """Replace earlier --export files of these dictionaries (only folders of feature JSON openscope wrote)."""
    neuronpedia: bool = False
    """Export with Neuronpedia's key names (activations, pos_str, ...) instead of openscope's schema."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""


class FeaturesResult(NamedTuple):
    """What `compute_features` did."""

    output: Path
    """The database."""
    computed: list[str]
    """Dictionaries whose dashboards were (re)computed in this run."""
    skipped: list[str]
    """Dictionaries already complete with the same fingerprint (left untouched)."""
    n_tokens: int
    """Tokens this run encoded (summed over batches, not over dictionaries)."""
    seconds: float
    """Wall time of the streaming pass."""
    tokens_per_s: float
    """n_tokens / seconds."""
    exported: list[Path]
    """JSON files written by --export."""


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


def norm_gain(norm: nn.Module | None, width: int) -> Tensor:
    """The per-dimension gain g of a final norm, applied to a direction (see the module docstring).

    Gemma's RMSNorm multiplies by (1 + weight); other RMSNorm/LayerNorm modules by weight; no norm
    (or no weight) is a gain of 1.
    """
    weight = getattr(norm, "weight", None) if norm is not None else None
    if not isinstance(weight, Tensor):
        return torch.ones(width)
    g = weight.detach().float().cpu()
    return 1.0 + g if "gemma" in type(norm).__name__.lower() else g


def logit_effects(
    directions: Tensor, gain: Tensor, w_u: Tensor, k: int, chunk: int = 128
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top and bottom k of W_U·(g ⊙ d) for each direction d (rows of [F, d]).

    Returns (top_values, top_ids, bottom_values, bottom_ids), each [F, k]; top largest first,
    bottom most negative first. Chunked over latents so memory stays [chunk, vocab].
    """
    k = min(k, w_u.shape[0])
    tops, top_ids, bots, bot_ids = [], [], [], []
    scaled = directions.float() * gain.float()
    w_t = w_u.float().t()
    for i in range(0, len(scaled), chunk):
        logits = scaled[i : i + chunk] @ w_t
        v, j = logits.topk(k, dim=1)
        tops.append(v)
        top_ids.append(j)
        v, j = logits.topk(k, dim=1, largest=False)
        bots.append(v)
        bot_ids.append(j)
    return torch.cat(tops), torch.cat(top_ids), torch.cat(bots), torch.cat(bot_ids)


def decoder_neighbours(w_dec: Tensor, k: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Per latent, the k other latents with the highest decoder cosine: (cosines [F, k], ids [F, k])."""
    f = w_dec.shape[0]
    k = min(k, f - 1)
    unit = torch.nn.functional.normalize(w_dec.float(), dim=1)
    cos_out, id_out = [], []
    for i in range(0, f, chunk):
        cos = unit[i : i + chunk] @ unit.t()
        rows = torch.arange(i, min(i + chunk, f))
        cos[rows - i, rows] = -math.inf  # a latent is not its own neighbour
        v, j = cos.topk(k, dim=1)
        cos_out.append(v)
        id_out.append(j)
    return torch.cat(cos_out), torch.cat(id_out)


def output_directions(coder: SparseCoder) -> Tensor:
    """[F, d_out] what one unit of each latent adds to the output (W_dec rows × C_out; W_dec if folded)."""
    return coder.w_dec.detach().float() * coder.scale_out.float()


def residual_directions(loaded: LoadedModel, site: Site, directions: Tensor) -> Tensor | None:
    """Directions written at `site`, as directions in the residual stream (None if not linear there).

    resid_pre/resid_post/mlp_out (Gemma: after post_feedforward_layernorm) already live in the
    residual stream; attn_out (the o_proj input) goes through o_proj and, in Gemma, the gain of
    post_attention_layernorm; mlp_in is a normed copy of the residual, not something added to it.
    """
    if site.kind in ("resid_pre", "resid_post", "mlp_out"):
        return directions
    if site.kind == "attn_out":
        point = locate(loaded.arch.layers, loaded.arch.layers_path, site)
        weight = getattr(point.module, "weight", None)
        if not isinstance(weight, Tensor):
            return None
        out = directions @ weight.detach().float().cpu().t()
        post = getattr(loaded.arch.layers[site.layer], "post_attention_layernorm", None)
        return out * norm_gain(post, out.shape[1]) if post is not None else out
    return None


def parse_latents(spec: str, width: int) -> list[int]:
    """`0-9,17` → [0..9, 17]; '' → all latents. Out-of-range latents are an error."""
    if not spec.strip():
        return list(range(width))
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise OpenscopeError(f"bad latent list {spec!r}; expected e.g. 0-99,512")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi >= width or lo > hi:
            raise OpenscopeError(f"latents {part} are out of range for width {width} (0..{width - 1})")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))


# ---- data: batches of whole contexts --------------------------------------------------------------


class TokenBatch(NamedTuple):
    """A batch of whole contexts and the encoded rows (kept positions) of each site."""

    index: int
    """Global batch index (resume and random keys use it)."""
    acts: dict[Site, Tensor]
    """Per input site, rows [N, d] (float32)."""
    contexts: Tensor
    """Token ids of the batch's contexts [C, L]."""
    context_ids: Tensor
    """Global id of each context [C]."""
    row_context: Tensor
    """Local context (0..C-1) of each row [N]."""
    row_position: Tensor
    """Position inside its context of each row [N]."""
    row_role: Tensor | None = None
    """Role of each row's token [N] (chat data; index into ROLES), else None."""


def keep_roles(batch: TokenBatch, wanted: Sequence[int]) -> TokenBatch:
    """The batch with only the rows of the given roles (its contexts stay whole, for the windows)."""
    if not wanted or batch.row_role is None:
        return batch
    rows = torch.isin(batch.row_role, torch.tensor(list(wanted), dtype=batch.row_role.dtype))
    return batch._replace(
        acts={s: a[rows] for s, a in batch.acts.items()},
        row_context=batch.row_context[rows],
        row_position=batch.row_position[rows],
        row_role=batch.row_role[rows],
    )


def _check_store(store: ActivationStore, sites: Sequence[Site]) -> None:
    for site in sites:
        store.check_site(site.name)
    if not store.shards:
        raise OpenscopeError(f"the store at {store.root} has no finished shards")
    keys = set(store.read_shard_keys(0))
    missing = {"token_ids", "contexts", "context", "position"} - keys
    if missing:
        raise OpenscopeError(
            f"the store at {store.root} holds no token ids ({', '.join(sorted(missing))} missing); "
            "re-harvest it, or run live with --source"
        )


def store_batches(
    store: ActivationStore, sites: Sequence[Site], batch_contexts: int, start: int = 0
) -> Iterator[TokenBatch]:
    """Batches of `batch_contexts` whole contexts, shard by shard in order, from batch `start` on.

    A batch never spans two shards, so batch boundaries follow from the manifest alone and a
    resumed run skips finished shards without reading them.
    """
    index = 0
    for i, shard in enumerate(store.shards):
        n_ctx = int(shard["n_contexts"])
        n_batches = -(-n_ctx // batch_contexts)
        if index + n_batches <= start:
            index += n_batches
            continue
        roles = ["role"] if store.roles is not None else []
        data = store.read_shard(i, [*(s.name for s in sites), "contexts", "context", "position", *roles])
        first = int(shard.get("context_start", int(data["context"].min()) if len(data["context"]) else 0))
        local = data["context"].long() - first
        for b in range(n_batches):
            if index >= start:
                lo, hi = b * batch_contexts, min((b + 1) * batch_contexts, n_ctx)
                rows = ((local >= lo) & (local < hi)).nonzero().squeeze(1)
                yield TokenBatch(
                    index,
                    {s: data[s.name][rows].float() for s in sites},
                    data["contexts"][lo:hi].long(),
                    torch.arange(first + lo, first + hi),
                    local[rows] - lo,
                    data["position"][rows].long(),
                    data["role"][rows].long() if roles else None,
                )
            index += 1


def live_batches(
    loaded: LoadedModel,
    sites: Sequence[Site],
    source: str,
    text_field: str,
    context_len: int,
    batch_contexts: int,
    start: int = 0,
) -> Iterator[TokenBatch]:
    """Batches of whole contexts from a text source, run through the model up to the last site.

    Batches before `start` are tokenised but never run (a resumed run sees the same contexts).
    """
    contexts = source_contexts(source, text_field, loaded.tokenizer, context_len)
    device = loaded.device
    for index in itertools.count():
        chunk = list(itertools.islice(contexts, batch_contexts))
        if not chunk:
            return
        if index < start:
            continue
        batch = to_batch([c.input_ids for c in chunk], loaded.tokenizer)
        acts = run_to_sites(loaded, batch.input_ids.to(device), sites, batch.attention_mask.to(device))
        keep = keep_mask(batch.input_ids, loaded.tokenizer)
        row_context, row_position = keep.nonzero(as_tuple=True)
        roles = chunk[0].roles is not None
        yield TokenBatch(
            index,
            {s: acts[s][keep.to(device)].float().cpu() for s in sites},
            batch.input_ids,
            torch.arange(index * batch_contexts, index * batch_contexts + len(chunk)),
            row_context,
            row_position,
            torch.tensor([c.roles for c in chunk])[keep] if roles else None,
        )


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
    """The streaming statistics of one dictionary's latents (everything `finish` needs)."""

    def __init__(self, width: int, cfg: FeaturesConfig) -> None:
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
        self.tokens_done = 0
        self.batches_done = 0

    def update(self, batch: TokenBatch, acts: Tensor) -> None:
        """Add one batch: acts [N, F] are this dictionary's latents on the batch's rows.

        Runs on one thread: these are many small memory-bound ops, and on a busy machine every
        multi-threaded op waits for a descheduled worker (measured: 0.1 s per 4096-token batch of a
        4096-latent SAE on one thread, 1.2 s on two while another process used the cores).
        """
        with single_thread():
            self._update(batch, acts)

    def _update(self, batch: TokenBatch, acts: Tensor) -> None:
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
        }

    def load(self, state: dict[str, Tensor]) -> None:
        self.top.load("top", state)
        self.sample.load("sample", state)
        self.n_fired = state["n_fired"].clone()
        self.act_sum = state["act_sum"].clone()
        self.hist = state["hist"].clone()
        self.roles.load(state)
        self.tokens_done, self.batches_done = (int(x) for x in state["counters"].tolist())


# ---- finishing: from streaming state to database rows ----------------------------------------------


class _Pick(NamedTuple):
    latent: int
    kind: str
    bucket: int
    rank: int
    slot: int


def quantile_groups(n: int, buckets: int) -> list[range]:
    """Split ranks 0..n-1 (ascending activation) into up to `buckets` near-equal consecutive groups."""
    base, extra = divmod(n, buckets)
    groups, start = [], 0
    for b in range(buckets):
        size = base + (1 if b < extra else 0)
        if size:
            groups.append(range(start, start + size))
        start += size
    return groups


def _example_rows(slots: Slots, picks: Sequence[_Pick], window: int) -> list[fdb.ExampleRow]:
    """Database rows of the picked slots, windows trimmed to the context (vectorised, then one pass)."""
    tokens = slots.tokens.numpy()
    acts = slots.acts.numpy()
    inside = tokens >= 0
    lo = inside.argmax(2).tolist()
    hi = (tokens.shape[2] - inside[:, :, ::-1].argmax(2)).tolist()
    context, position, value = slots.context.tolist(), slots.position.tolist(), slots.value.tolist()
    centre = tokens[:, :, window].tolist()
    rows = []
    for p in picks:
        i, j = p.latent, p.slot
        a, b = lo[i][j], hi[i][j]
        rows.append(
            fdb.ExampleRow(
                latent=i,
                kind=p.kind,
                bucket=p.bucket,
                rank=p.rank,
                context=context[i][j],
                position=position[i][j],
                start=position[i][j] - window + a,
                max_index=window - a,
                max_activation=value[i][j],
                max_token_id=centre[i][j],
                token_ids=tokens[i, j, a:b],
                activations=acts[i, j, a:b],
            )
        )
    return rows


def finish(
    stats: LatentStats, d: Dictionary, loaded: LoadedModel, cfg: FeaturesConfig
) -> tuple[
    list[fdb.FeatureRow], list[fdb.ExampleRow], list[tuple[int, int, int, int, float]], dict[int, str]
]:
    """Database rows of one dictionary: features, examples, logits, and the vocabulary they use."""
    coder = d.coder
    assert isinstance(coder, SparseCoder)
    f = stats.width
    directions = output_directions(coder).cpu()
    logits: list[tuple[int, int, int, int, float]] = []
    top_logit_id = [-1] * f
    resid = residual_directions(loaded, d.site_out, directions)
    lm_head = loaded.arch.lm_head
    w_u = getattr(lm_head, "weight", None) if lm_head is not None else None
    if resid is not None and isinstance(w_u, Tensor) and cfg.logits > 0:
        gain = norm_gain(loaded.arch.final_norm, resid.shape[1])
        tv, ti, bv, bi = logit_effects(resid, gain, w_u.detach().cpu(), cfg.logits)
        for latent in range(f):
            for rank, (i, v) in enumerate(zip(ti[latent].tolist(), tv[latent].tolist(), strict=True)):
                logits.append((latent, 1, rank, i, v))
            for rank, (i, v) in enumerate(zip(bi[latent].tolist(), bv[latent].tolist(), strict=True)):
                logits.append((latent, -1, rank, i, v))
            top_logit_id[latent] = int(ti[latent, 0])
    else:
        log.info("%s writes %s, which is not the residual stream: no logit effects", d.name, d.site_out.name)
    if cfg.neighbours > 0 and f > 1:
        n_cos, n_ids = decoder_neighbours(directions, cfg.neighbours)
        neighbours = [list(zip(n_ids[i].tolist(), n_cos[i].tolist(), strict=True)) for i in range(f)]
    else:
        neighbours = [[] for _ in range(f)]

    top = stats.top.sorted()
    n_top = torch.isfinite(top.score).sum(1).tolist()
    top_picks = [_Pick(lat, "top", 0, r, r) for lat in range(f) for r in range(n_top[lat])]
    # The sample is uniform over firings; its activation quantiles are the buckets (0 = weakest),
    # each listed strongest first.
    sample = stats.sample
    filled = torch.isfinite(sample.score)
    desc = torch.where(filled, sample.value, torch.tensor(-math.inf)).argsort(
        dim=1, descending=True, stable=True
    )
    n_filled, desc_l = filled.sum(1).tolist(), desc.tolist()
    sample_picks = []
    for lat in range(f):
        ascending = desc_l[lat][: n_filled[lat]][::-1]
        for bucket, g in enumerate(quantile_groups(n_filled[lat], cfg.quantile_buckets)):
            for rank, i in enumerate(reversed(g)):
                sample_picks.append(_Pick(lat, "quantile", bucket, rank, ascending[i]))
    examples = _example_rows(top, top_picks, cfg.window) + _example_rows(sample, sample_picks, cfg.window)

    seen = [top.tokens[torch.isfinite(top.score)], sample.tokens[filled]]
    used = set(torch.cat([t.reshape(-1) for t in seen]).unique().tolist()) - {-1}
    used |= {row[3] for row in logits}
    vocab = token_pieces(loaded.tokenizer, sorted(used))
    top_token = {e.latent: vocab.get(e.max_token_id, "") for e in examples if e.kind == "top" and e.rank == 0}
    n = max(stats.tokens_done, 1)
    features = []
    for latent in range(f):
        counts = stats.hist[latent]
        nz = counts.nonzero().squeeze(1)
        first, last = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        fired = int(stats.n_fired[latent])
        features.append(
            fdb.FeatureRow(
                latent=latent,
                frequency=fired / n,
                n_fired=fired,
                max_activation=max(float(top.score[latent, 0]), 0.0) if fired else 0.0,
                mean_activation=float(stats.act_sum[latent]) / fired if fired else 0.0,
                top_token=top_token.get(latent, ""),
                top_logit=vocab.get(top_logit_id[latent], ""),
                hist_first=first,
                hist_counts=counts[first:last].tolist(),
                neighbours=neighbours[latent],
            )
        )
    return features, examples, logits, vocab


def role_rows(counter: RoleCounter) -> list[fdb.RoleStatRow]:
    """Database rows of the per-role statistics: every latent in every role that has tokens."""
    stats = counter.result()
    spec, f_out = specificity(stats), frequency_elsewhere(stats)
    freq, mean = stats.frequency, stats.mean_activation
    rows = []
    for r, name in enumerate(ROLES):
        n = int(stats.n_tokens[r])
        if n == 0:
            continue
        columns = (stats.n_fired[r], freq[r], mean[r], f_out[r], spec[r])
        for j, values in enumerate(zip(*(c.tolist() for c in columns), strict=True)):
            rows.append(fdb.RoleStatRow(j, name, n, *values))
    return rows


# ---- orchestration ---------------------------------------------------------------------------------


def _settings(cfg: FeaturesConfig, batch_contexts: int) -> dict[str, Any]:
    keys = [
        "tokens",
        "top_k",
        "window",
        "quantile_buckets",
        "quantile_examples",
        "hist_min",
        "hist_max",
        "bins_per_decade",
        "logits",
        "neighbours",
        "seed",
    ]
    out: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    out["batch_contexts"] = batch_contexts
    if cfg.roles:  # only when set, so dashboards made before role filters stay up to date
        out["roles"] = cfg.roles
    return out


def coder_digest(coder: SparseCoder) -> str:
    """sha256 of a coder's tensors (names, shapes, bytes): changes whenever the weights do."""
    digest = hashlib.sha256()
    for name, t in sorted(coder.state_dict().items()):
        digest.update(f"{name}{list(t.shape)}{t.dtype}".encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(d: Dictionary, data_identity: str, settings: dict[str, Any]) -> str:
    """What a dictionary's dashboards depend on: weights, sites, data and settings."""
    assert isinstance(d.coder, SparseCoder)
    text = json.dumps(
        [FEATURES_VERSION, d.site_in.name, d.site_out.name, coder_digest(d.coder), data_identity, settings],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _unique(dicts: list[Dictionary]) -> list[Dictionary]:
    """Distinct names: a clash is told apart by the parent folder, then by a counter."""
    names = [d.name for d in dicts]
    out = []
    seen: dict[str, int] = {}
    for d in dicts:
        name = d.name
        if names.count(name) > 1 and d.folder is not None:
            name = f"{d.folder.parent.name}/{d.folder.name}"
        seen[name] = seen.get(name, 0) + 1
        out.append(d._replace(name=name if seen[name] == 1 else f"{name}#{seen[name]}"))
    return out


def _info(
    d: Dictionary, loaded: LoadedModel, source: str, n_tokens: int, alive: int, complete: bool
) -> DictionaryInfo:
    coder = d.coder
    assert isinstance(coder, SparseCoder)
    return DictionaryInfo(
        name=d.name,
        site=d.site_in.name,
        site_out=d.site_out.name,
        width=coder.cfg.width,
        kind=coder.cfg.kind,
        model=loaded.name,
        folder=str(d.folder or ""),
        source=source,
        n_tokens=n_tokens,
        complete=complete,
        alive=alive,
    )


def _save_progress(conn: Any, name: str, fp: str, stats: LatentStats) -> None:
    blob = st_save({k: v.contiguous() for k, v in stats.state().items()})
    with conn:
        conn.execute(
            "INSERT OR REPLACE INTO progress VALUES (?,?,?,?,?)",
            (name, fp, stats.batches_done, stats.tokens_done, blob),
        )


def _load_progress(conn: Any, name: str, fp: str, stats: LatentStats) -> bool:
    row = conn.execute("SELECT fingerprint, state FROM progress WHERE dictionary = ?", (name,)).fetchone()
    if row is None or row[0] != fp:
        return False
    stats.load(st_load(bytes(row[1])))
    return True


def compute_features(
    cfg: FeaturesConfig,
    loaded: LoadedModel | None = None,
    dictionaries: Sequence[Dictionary] | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> FeaturesResult:
    """Compute (or resume, or skip) the dashboards of every dictionary and write them to cfg.output.

    Pass `loaded`/`dictionaries` to use ones in memory (then cfg.dictionaries is not read).
    `on_batch(batch_index)` is called after each batch (after any checkpoint): progress hooks, tests.
    """
    from openscope.coders.dictionary import dictionary_folders, model_of

    for name in ("tokens", "batch_tokens", "checkpoint_every", "quantile_buckets"):
        if getattr(cfg, name) < 1:
            raise OpenscopeError(f"{name} must be at least 1")
    for name in ("top_k", "window", "quantile_examples", "logits", "neighbours"):
        if getattr(cfg, name) < 0:
            raise OpenscopeError(f"{name} must not be negative")
    device = resolve_device(cfg.device)
    store = ActivationStore(cfg.store) if cfg.store is not None else None
    wanted = role_ids(cfg.roles)
    if store is not None:
        store.check_roles(wanted)
    elif wanted and not is_chat_source(cfg.source):
        raise OpenscopeError(f"--roles needs a chat source (sharegpt or chat:PATH), not {cfg.source!r}")
    if dictionaries is None:
        dictionaries = [load_dictionary(f) for f in dictionary_folders(cfg.dictionaries)]
    dicts = _unique(list(dictionaries))
    if not dicts:
        raise OpenscopeError("no dictionaries to index")
    for d in dicts if cfg.export is not None else []:  # a bad --export is refused before the work
        target = child(absolute(cfg.export or "."), safe_name(d.name, "dictionary"))
        check_output(target, FEATURE_EXPORT, overwrite=cfg.overwrite, flag="--export")
    for d in dicts:
        if not isinstance(d.coder, SparseCoder):
            raise OpenscopeError(
                f"dictionary {d.name} is a cross-layer transcoder; feature dashboards support single-layer "
                "dictionaries only for now"
            )
    if store is not None:
        _check_store(store, [d.site_in for d in dicts])
        context_len = int(store.manifest["identity"]["context_len"])
        data_identity = json.dumps(
            ["store", str(Path(cfg.store or "").resolve()), [shard_checksum(s)[1] for s in store.shards]]
        )
        source_label = str(cfg.store)
    else:
        context_len = cfg.context_len
        data_identity = json.dumps(["live", cfg.source, cfg.text_field, context_len, cfg.model])
        source_label = cfg.source
    batch_contexts = max(1, cfg.batch_tokens // context_len)
    settings = _settings(cfg, batch_contexts)
    prints = {d.name: fingerprint(d, data_identity, settings) for d in dicts}

    conn = fdb.connect(cfg.output)
    try:
        done = {
            r[0]: r[1] for r in conn.execute("SELECT name, fingerprint FROM dictionaries WHERE complete = 1")
        }
        pending = [d for d in dicts if cfg.force or done.get(d.name) != prints[d.name]]
        skipped = [d.name for d in dicts if d not in pending]
        for name in skipped:
            log.info("%s: dashboards complete and up to date, skipped", name)
        seconds, n_tokens = 0.0, 0
        if pending:
            if loaded is None:
                model_name = cfg.model or (
                    store.manifest["identity"].get("model") if store is not None else None
                )
                loaded = load_model(model_name or model_of(pending), device=device, cache_dir=cfg.cache_dir)
            for d in pending:
                validate_dictionary(d, loaded)
                d.coder.to(loaded.device).eval()
                fdb.mark_pending(conn, _info(d, loaded, source_label, 0, 0, complete=False))
            run = _stream(
                cfg, conn, loaded, store, pending, prints, context_len, batch_contexts, progress, on_batch
            )
            seconds, n_tokens = run.seconds, run.n_tokens
            edges = hist_edges(cfg.hist_min, cfg.hist_max, cfg.bins_per_decade).tolist()
            for d in pending:
                stats = run.stats[d.name]
                features, examples, logits, vocab = finish(stats, d, loaded, cfg)
                alive = int((stats.n_fired > 0).sum())
                info = _info(d, loaded, source_label, stats.tokens_done, alive, complete=True)
                fdb.write_results(
                    conn,
                    info,
                    prints[d.name],
                    {
                        **settings,
                        "hist_edges": edges,
                        "config": json.loads(json.dumps(asdict(cfg), default=str)),
                    },
                    features,
                    examples,
                    logits,
                    vocab,
                    role_rows(stats.roles),
                )
                log.info(
                    "%s: %d of %d latents alive over %d tokens", d.name, info.alive, info.width, info.n_tokens
                )
    finally:
        conn.close()
    exported: list[Path] = []
    if cfg.export is not None:
        for d in dicts:
            exported += export_features(
                cfg.output, d.name, cfg.export, cfg.export_latents, cfg.neuronpedia, cfg.overwrite
            )
    return FeaturesResult(
        Path(cfg.output),
        [d.name for d in pending],
        skipped,
        n_tokens,
        seconds,
        n_tokens / seconds if seconds > 0 else 0.0,
        exported,
    )


class _Run(NamedTuple):
    stats: dict[str, LatentStats]
    seconds: float
    n_tokens: int


@torch.inference_mode()
def _stream(
    cfg: FeaturesConfig,
    conn: Any,
    loaded: LoadedModel,
    store: ActivationStore | None,
    dicts: list[Dictionary],
    prints: dict[str, str],
    context_len: int,
    batch_contexts: int,
    progress: bool,
    on_batch: Callable[[int], None] | None,
) -> _Run:
    """The streaming pass over the data for every pending dictionary at once (one read/forward per batch)."""
    stats: dict[str, LatentStats] = {}
    for d in dicts:
        s = LatentStats(d.coder.cfg.width, cfg)
        if not cfg.force and _load_progress(conn, d.name, prints[d.name], s):
            log.info("%s: resuming after %d batches (%d tokens)", d.name, s.batches_done, s.tokens_done)
        stats[d.name] = s
    sites = list(dict.fromkeys(d.site_in for d in dicts))
    start = min(s.batches_done for s in stats.values())
    todo = [d for d in dicts if stats[d.name].tokens_done < cfg.tokens]
    if store is not None:
        batches = store_batches(store, sites, batch_contexts, start)
    else:
        batches = live_batches(loaded, sites, cfg.source, cfg.text_field, context_len, batch_contexts, start)
    done_before = min(s.tokens_done for s in stats.values())
    bar = tqdm(
        total=cfg.tokens,
        initial=done_before,
        unit="tok",
        unit_scale=True,
        desc="features",
        disable=not progress,
        smoothing=0.1,
    )
    t0 = time.perf_counter()
    n_tokens = 0
    since_checkpoint = 0
    wanted = role_ids(cfg.roles)
    try:
        for batch in batches if todo else ():
            batch = keep_roles(batch, wanted)
            n_rows = len(batch.row_context)
            for d in todo:
                s = stats[d.name]
                if batch.index < s.batches_done or s.tokens_done >= cfg.tokens:
                    continue
                coder = d.coder
                x = batch.acts[d.site_in].to(coder.w_enc.device, coder.w_enc.dtype)
                s.update(batch, coder.encode(x).float().cpu())
            n_tokens += n_rows
            bar.update(n_rows)
            since_checkpoint += 1
            finished = all(stats[d.name].tokens_done >= cfg.tokens for d in todo)
            if since_checkpoint >= cfg.checkpoint_every and not finished:
                for d in todo:
                    _save_progress(conn, d.name, prints[d.name], stats[d.name])
                since_checkpoint = 0
            if on_batch is not None:
                on_batch(batch.index)
            if finished:
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    short = [d.name for d in dicts if stats[d.name].tokens_done < cfg.tokens]
    if short:
        log.warning("the data ran out before the token budget for %s", ", ".join(short))
    return _Run(stats, seconds, n_tokens)


# ---- export ----------------------------------------------------------------------------------------


FEATURE_EXPORT = Ownership("a feature export", files=("*.json", "*.tmp"))
"""What `<export>/<dictionary>/` holds: one `<latent>.json` per feature."""


def export_features(
    db_path: str | Path,
    dictionary: str,
    out: str | Path,
    latents: str | Sequence[int] | None = None,
    neuronpedia: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write features of one dictionary as JSON files `<out>/<dictionary>/<latent>.json`.

    The dictionary's folder is written whole and renamed into place (`openscope.files`); an earlier
    export there is replaced only with `overwrite`. The folder's name is the dictionary's name made
    safe (never `..`, never a path), so it always lies inside `out`.

    The JSON is `FeatureDetail` (the schema the web app serves), or with `neuronpedia` the same data
    under Neuronpedia's key names. latents: a spec such as "0-99,512", a list, or None for all.
    """
    with fdb.FeatureDB(db_path) as db:
        info = db.dictionary(dictionary)
        if latents is None or isinstance(latents, str):
            chosen = parse_latents(latents or "", info.width)
        else:
            chosen = list(latents)
        root = absolute(out)
        target = child(root, safe_name(dictionary, "dictionary"))
        with replacing(target, FEATURE_EXPORT, overwrite=overwrite, flag="--export") as folder:
            for latent in chosen:
                detail = db.feature(dictionary, latent)
                text = json.dumps(detail.neuronpedia()) if neuronpedia else detail.model_dump_json()
                write_text(folder / f"{latent}.json", text, sync=False)
    return [target / f"{latent}.json" for latent in chosen]


def export_feature_json(db_path: str | Path, dictionary: str, latent: int) -> str:
    """One feature's JSON (FeatureDetail) as a string."""
    with fdb.FeatureDB(db_path) as db:
        return db.feature(dictionary, latent).model_dump_json()


__all__ = [
    "FeaturesConfig",
    "FeaturesResult",
    "compute_features",
    "decoder_neighbours",
    "export_feature_json",
    "export_features",
    "hist_bin",
    "hist_edges",
    "logit_effects",
    "norm_gain",
    "parse_latents",
    "segmented_topk",
]
