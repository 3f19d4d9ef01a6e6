"""`openscope features`: per-latent dashboards of sparse dictionaries, streamed into the SQLite index.

For every latent of each dictionary, over a token budget:
- **top-k examples** and **quantile examples** (`openscope.features.examples`);
- **firing frequency**, mean activation (over firing tokens), max activation, and a histogram of the
  nonzero activations on fixed log-spaced bins (`openscope.features.streaming`);
- **logit effects** (top/bottom tokens and the histogram over the vocabulary) and **neighbours** of its
  decoder direction (`openscope.features.directions`);
- **correlated neurons** (input coordinates, over every token) and **correlated features** (other
  latents, over a bounded token sample), and for `attn_out` dictionaries the decoder's split over
  attention heads (`openscope.features.correlations`): what Neuronpedia's dashboards add;
- **roles** (chat data, whose tokens carry roles): per role, the firing frequency and mean activation,
  and how specific the latent is to that role (`openscope.features.roles`). `--roles model` indexes only
  the tokens of those roles.

Multi-layer coders (a cross-layer transcoder, a crosscoder) have L·F latents: latent i·F + j is latent j
of coder layer i, read at that layer's input site (`Dictionary.sites_in[i]`); its direction for logit
effects and neighbours is its decoder into its own layer's output site.

Data: rows of an activation store (`--store`: every shard keeps the token ids of its contexts, so
examples show text), or live (`--source`: the model runs on a text source, stopping at the last
site needed). Batches are whole contexts (`openscope.activations.batches`), so the window around any
token is in the batch. Nothing proportional to the number of tokens is ever held.

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
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor
from tqdm.auto import tqdm

from openscope.activations.batches import check_context_store, keep_roles, live_batches, store_batches
from openscope.activations.store import ActivationStore, shard_checksum
from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import (
    Dictionary,
    dictionary_folders,
    load_dictionary,
    model_of,
    unique_names,
    validate_dictionary,
)
from openscope.data.chat import role_ids
from openscope.data.sources import is_chat_source
from openscope.errors import OpenscopeError
from openscope.features.config import FeaturesConfig
from openscope.features.correlations import head_distribution
from openscope.features.directions import LogitHist, LogitRows, logit_rows, neighbour_lists, output_directions
from openscope.features.examples import finish_examples
from openscope.features.export import FEATURE_EXPORT, export_features
from openscope.features.index import ExampleRow, ExtraRow, FeatureRow, connect, mark_pending, write_results
from openscope.features.neuronpedia import decoder_directions
from openscope.features.roles import role_rows
from openscope.features.schema import DictionaryInfo
from openscope.features.streaming import LatentStats, hist_edges
from openscope.files import absolute, check_output, child, safe_name
from openscope.models.load import LoadedModel, load_model, resolve_device, text_config
from openscope.models.sites import Site
from openscope.models.tokens import token_pieces

log = logging.getLogger(__name__)

FEATURES_VERSION = 2
"""Bumped when the computation changes meaning (part of every fingerprint). 2: the Neuronpedia extras
(logit histograms, correlations, head distributions) and their streaming state."""


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


# ---- finishing: from streaming state to database rows ----------------------------------------------


class Finished(NamedTuple):
    """The database rows of one dictionary."""

    features: list[FeatureRow]
    examples: list[ExampleRow]
    logits: list[tuple[int, int, int, int, float]]
    vocab: dict[int, str]
    """Every token id the rows use, as text."""
    extras: list[ExtraRow]


def finish(stats: LatentStats, d: Dictionary, loaded: LoadedModel, cfg: FeaturesConfig) -> Finished:
    """Database rows of one dictionary: features, examples, logits, the vocabulary they use, extras."""
    f = stats.width
    directions = latent_directions(d).cpu()
    logits = _logit_rows(loaded, d, directions, cfg.logits)
    neighbours = neighbour_lists(directions, cfg.neighbours)
    examples = finish_examples(stats, cfg.quantile_buckets, cfg.window)
    top = examples.top

    used = examples.token_ids()
    used |= {row[3] for row in logits.rows}
    vocab = token_pieces(loaded.tokenizer, sorted(used))
    top_token = {
        e.latent: vocab.get(e.max_token_id, "") for e in examples.rows if e.kind == "top" and e.rank == 0
    }
    n = max(stats.tokens_done, 1)
    features = []
    for latent in range(f):
        counts = stats.hist[latent]
        nz = counts.nonzero().squeeze(1)
        first, last = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        fired = int(stats.n_fired[latent])
        features.append(
            FeatureRow(
                latent=latent,
                frequency=fired / n,
                n_fired=fired,
                max_activation=max(float(top.score[latent, 0]), 0.0) if fired else 0.0,
                mean_activation=float(stats.act_sum[latent]) / fired if fired else 0.0,
                top_token=top_token.get(latent, ""),
                top_logit=vocab.get(logits.top_id[latent], ""),
                hist_first=first,
                hist_counts=counts[first:last].tolist(),
                neighbours=neighbours[latent],
            )
        )
    extras = extra_rows(stats, d, loaded, directions, logits)
    return Finished(features, examples.rows, logits.rows, vocab, extras)


def extra_rows(
    stats: LatentStats, d: Dictionary, loaded: LoadedModel, directions: Tensor, logits: LogitRows
) -> list[ExtraRow]:
    """Per latent, what the Neuronpedia export adds: logit histogram, correlated neurons and features,
    and (attn_out dictionaries) the head distribution of its direction."""
    neurons = stats.corr.neurons()
    correlates = stats.corr.features(device=loaded.device)
    heads = head_rows(d, loaded, directions)
    return [
        ExtraRow(latent, h, neurons[latent], correlates[latent], heads[latent])
        for latent, h in enumerate(logits.hist)
    ]


def head_rows(d: Dictionary, loaded: LoadedModel, directions: Tensor) -> list[list[float]]:
    """Per latent, `head_distribution` of its direction where it writes an `attn_out` site ([] elsewhere)."""
    config = text_config(loaded.model.config)
    n_heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 0)
    f = d.coder.cfg.width
    out: list[list[float]] = []
    for i, site in enumerate(d.sites_out):
        part = directions[i * f : (i + 1) * f]
        if site.kind == "attn_out" and n_heads and part.shape[1] % n_heads == 0:
            out += head_distribution(part, n_heads)
        else:
            out += [[] for _ in range(len(part))]
    return out


def latent_directions(d: Dictionary) -> Tensor:
    """[latents, d_out] each latent's output direction in raw units: its W_dec row; a multi-layer coder's
    latent i·F + j: its decoder into its own layer i."""
    coder = d.coder
    if isinstance(coder, SparseCoder):
        return output_directions(coder)
    every = torch.arange(coder.cfg.width, device=coder.w_enc.device)
    rows = [coder.decoder_vectors(i, i, every) for i in range(coder.n_layers)]
    return torch.cat(rows).detach().float()


def _logit_rows(loaded: LoadedModel, d: Dictionary, directions: Tensor, k: int) -> LogitRows:
    """`logit_rows` of every latent; a multi-layer coder's layer by layer, each read out from the output
    site its latents' directions write (latent numbers i·F + j)."""
    if not d.is_multilayer:
        return logit_rows(loaded, d, directions, k)
    f = d.coder.cfg.width
    rows: list[tuple[int, int, int, int, float]] = []
    top_id: list[int] = []
    hist: list[LogitHist | None] = []
    for i, site in enumerate(d.sites_out):
        part = logit_rows(loaded, d._replace(site_out=site), directions[i * f : (i + 1) * f], k)
        rows += [(latent + i * f, sign, rank, token, value) for latent, sign, rank, token, value in part.rows]
        top_id += part.top_id
        hist += part.hist
    return LogitRows(rows, top_id, hist)


def latents_of(d: Dictionary, acts: Mapping[Site, Tensor]) -> Tensor:
    """[N, latents] a dictionary's latents from its sites' activations [N, d_in] (a multi-layer coder's
    layers side by side: latent i·F + j is layer i's latent j, encoded from `sites_in[i]`)."""
    coder = d.coder
    if isinstance(coder, SparseCoder):
        return coder.encode(acts[d.site_in].to(coder.w_enc.device, coder.w_enc.dtype))
    parts = [
        coder.encode_at(i, acts[site].to(coder.w_enc.device, coder.w_enc.dtype))
        for i, site in enumerate(d.sites_in)
    ]
    return torch.cat(parts, dim=1)


# ---- fingerprints and checkpoints ------------------------------------------------------------------


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


def coder_digest(coder: torch.nn.Module) -> str:
    """sha256 of a coder's tensors (names, shapes, bytes): changes whenever the weights do."""
    digest = hashlib.sha256()
    for name, t in sorted(coder.state_dict().items()):
        digest.update(f"{name}{list(t.shape)}{t.dtype}".encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(d: Dictionary, data_identity: str, settings: dict[str, Any]) -> str:
    """What a dictionary's dashboards depend on: weights, sites, data and settings."""
    parts: list[Any] = [FEATURES_VERSION, d.site_in.name, d.site_out.name, coder_digest(d.coder)]
    parts += [data_identity, settings]
    if d.is_multilayer:  # every layer's sites (a crosscoder's need not follow from the first)
        parts.append([s.name for s in (*d.sites_in, *d.sites_out)])
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _info(
    d: Dictionary, loaded: LoadedModel, source: str, n_tokens: int, alive: int, complete: bool
) -> DictionaryInfo:
    coder = d.coder
    return DictionaryInfo(
        name=d.name,
        site=d.site_in.name,
        site_out=d.site_out.name,
        width=coder.cfg.width * d.n_layers,
        kind=coder.kind,
        model=loaded.name,
        folder=str(d.folder or ""),
        source=source,
        n_tokens=n_tokens,
        complete=complete,
        alive=alive,
    )


def _save_progress(conn: sqlite3.Connection, name: str, fp: str, stats: LatentStats) -> None:
    blob = st_save({k: v.contiguous() for k, v in stats.state().items()})
    with conn:
        conn.execute(
            "INSERT OR REPLACE INTO progress VALUES (?,?,?,?,?)",
            (name, fp, stats.batches_done, stats.tokens_done, blob),
        )


def _load_progress(conn: sqlite3.Connection, name: str, fp: str, stats: LatentStats) -> bool:
    row = conn.execute("SELECT fingerprint, state FROM progress WHERE dictionary = ?", (name,)).fetchone()
    if row is None or row[0] != fp:
        return False
    stats.load(st_load(bytes(row[1])))
    return True


# ---- orchestration ---------------------------------------------------------------------------------


class _Data(NamedTuple):
    """Where the tokens come from, and what identifies them in the fingerprints."""

    store: ActivationStore | None
    context_len: int
    batch_contexts: int
    identity: str
    label: str


def _check_settings(cfg: FeaturesConfig) -> None:
    for name in ("tokens", "batch_tokens", "checkpoint_every", "quantile_buckets"):
        if getattr(cfg, name) < 1:
            raise OpenscopeError(f"{name} must be at least 1")
    for name in ("top_k", "window", "quantile_examples", "logits", "neighbours"):
        if getattr(cfg, name) < 0:
            raise OpenscopeError(f"{name} must not be negative")


def _open_store(cfg: FeaturesConfig) -> ActivationStore | None:
    store = ActivationStore(cfg.store) if cfg.store is not None else None
    wanted = role_ids(cfg.roles)
    if store is not None:
        store.check_roles(wanted)
    elif wanted and not is_chat_source(cfg.source):
        raise OpenscopeError(f"--roles needs a chat source (sharegpt or chat:PATH), not {cfg.source!r}")
    return store


def _dictionaries(cfg: FeaturesConfig, dictionaries: Sequence[Dictionary] | None) -> list[Dictionary]:
    """The dictionaries to index, uniquely named, checked before any work (--export target, kind)."""
    if dictionaries is None:
        dictionaries = [load_dictionary(f) for f in dictionary_folders(cfg.dictionaries)]
    dicts = unique_names(list(dictionaries))
    if not dicts:
        raise OpenscopeError("no dictionaries to index")
    for d in dicts if cfg.export is not None else []:  # a bad --export is refused before the work
        target = child(absolute(cfg.export or "."), safe_name(d.name, "dictionary"))
        check_output(target, FEATURE_EXPORT, overwrite=cfg.overwrite, flag="--export")
    return dicts


def _sites_read(dicts: list[Dictionary]) -> list[Site]:
    """Every site the dictionaries encode (all layers of a multi-layer coder), without repeats."""
    return list(dict.fromkeys(s for d in dicts for s in d.sites_in))


def _data(cfg: FeaturesConfig, store: ActivationStore | None, dicts: list[Dictionary]) -> _Data:
    if store is not None:
        check_context_store(store, _sites_read(dicts))
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
    return _Data(store, context_len, batch_contexts, data_identity, source_label)


def _write(
    conn: sqlite3.Connection,
    cfg: FeaturesConfig,
    loaded: LoadedModel,
    d: Dictionary,
    stats: LatentStats,
    fp: str,
    settings: dict[str, Any],
    label: str,
) -> None:
    """Finish one dictionary's dashboards and write them (one transaction)."""
    edges = hist_edges(cfg.hist_min, cfg.hist_max, cfg.bins_per_decade).tolist()
    done = finish(stats, d, loaded, cfg)
    alive = int((stats.n_fired > 0).sum())
    info = _info(d, loaded, label, stats.tokens_done, alive, complete=True)
    write_results(
        conn,
        info,
        fp,
        {
            **settings,
            "hist_edges": edges,
            "correlation_sample": len(stats.corr.keys),
            "config": json.loads(json.dumps(asdict(cfg), default=str)),
        },
        done.features,
        done.examples,
        done.logits,
        done.vocab,
        role_rows(stats.roles),
        done.extras,
    )
    log.info("%s: %d of %d latents alive over %d tokens", d.name, info.alive, info.width, info.n_tokens)


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
    _check_settings(cfg)
    device = resolve_device(cfg.device)
    store = _open_store(cfg)
    dicts = _dictionaries(cfg, dictionaries)
    data = _data(cfg, store, dicts)
    settings = _settings(cfg, data.batch_contexts)
    prints = {d.name: fingerprint(d, data.identity, settings) for d in dicts}

    conn = connect(cfg.output)
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
                mark_pending(conn, _info(d, loaded, data.label, 0, 0, complete=False))
            run = _stream(cfg, conn, loaded, data, pending, prints, progress, on_batch)
            seconds, n_tokens = run.seconds, run.n_tokens
            for d in pending:
                _write(conn, cfg, loaded, d, run.stats[d.name], prints[d.name], settings, data.label)
    finally:
        conn.close()
    exported: list[Path] = []
    if cfg.export is not None:
        for d in dicts:
            exported += export_features(
                cfg.output,
                d.name,
                cfg.export,
                cfg.export_latents,
                cfg.neuronpedia,
                cfg.overwrite,
                directions=decoder_directions(d.coder) if cfg.neuronpedia else None,
                context_len=data.context_len,
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
    conn: sqlite3.Connection,
    loaded: LoadedModel,
    data: _Data,
    dicts: list[Dictionary],
    prints: dict[str, str],
    progress: bool,
    on_batch: Callable[[int], None] | None,
) -> _Run:
    """The streaming pass over the data for every pending dictionary at once (one read/forward per batch)."""
    stats: dict[str, LatentStats] = {}
    for d in dicts:
        d_in = 0 if d.is_multilayer else int(d.coder.cfg.d_in)  # no correlated neurons for multi-layer coders
        s = LatentStats(d.coder.cfg.width * d.n_layers, cfg, d_in)
        if not cfg.force and _load_progress(conn, d.name, prints[d.name], s):
            log.info("%s: resuming after %d batches (%d tokens)", d.name, s.batches_done, s.tokens_done)
        stats[d.name] = s
    sites = _sites_read(dicts)
    start = min(s.batches_done for s in stats.values())
    todo = [d for d in dicts if stats[d.name].tokens_done < cfg.tokens]
    if data.store is not None:
        batches = store_batches(data.store, sites, data.batch_contexts, start)
    else:
        batches = live_batches(
            loaded, sites, cfg.source, cfg.text_field, data.context_len, data.batch_contexts, start
        )
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
                inputs = None if d.is_multilayer else batch.acts[d.site_in].float().cpu()
                s.update(batch, latents_of(d, batch.acts).float().cpu(), inputs)
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
