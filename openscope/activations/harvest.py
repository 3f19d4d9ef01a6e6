"""Harvest: one model forward per batch captures every requested site into a sharded store.

The forward stops after the last layer it needs (no later blocks, no LM head). Shards hold a
fixed number of whole contexts, processed in fixed batches, so a resumed run feeds the model
exactly the batches an uninterrupted run would and writes byte-identical shards. Resuming
re-reads the text stream and checks that the contexts of the finished shards are unchanged,
so a store never mixes data from two sources.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from openscope.activations.capture import harvest_shard
from openscope.activations.ranks import Ranks, agree, barrier, current_ranks, from_rank0, rank_device
from openscope.activations.remote import RemoteFolder, store_url
from openscope.activations.store import (
    CHECKSUM,
    FORMAT,
    MANIFEST,
    STATS,
    STORE,
    VERSION,
    ActivationStore,
    is_store,
    read_manifest,
    save_manifest,
    shard_intact,
    shard_name,
    site_stats,
    tokens_digest,
    write_tensors,
)
from openscope.activations.targets import Target, decide, finish, merge, own_manifest, shard_file
from openscope.config import to_jsonable
from openscope.data.chat import ROLES, role_ids
from openscope.data.contexts import source_contexts
from openscope.data.sources import is_chat_source, split_slice
from openscope.errors import OpenscopeError
from openscope.files import (
    Staged,
    absolute,
    check_replaceable,
    check_target,
    is_empty_folder,
    prepare_output,
    recover,
)
from openscope.models.load import (
    DEFAULT_MODEL,
    LoadedModel,
    dtype_name,
    load_model,
    parse_dtype,
    resolve_device,
)
from openscope.models.sites import Site, SitePoint, locate, parse_sites, site_width

log = logging.getLogger(__name__)


@dataclass
class HarvestConfig:
    """What to harvest, from which model and text, into which store."""

    model: str = DEFAULT_MODEL
    """Model: a known name (see `openscope models`), a local Hugging Face directory, or a hub id."""
    sites: str = "mid.resid_post"
    """Sites to capture: names or patterns such as `6.resid_post`, `*.mlp_out`, `0-5.attn_out`, `mid.resid_post` (the middle layer)."""
    source: str = "wiki"
    """Text: wiki, shakespeare, python (stdlib code), or a path to .txt/.jsonl/.parquet files or a saved HF dataset; slice documents with `wiki[:9000]`."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet, saved dataset) holding the text."""
    roles: str = ""
    """Chat sources (sharegpt, chat:PATH): store only tokens of these roles, e.g. `model` or `model,user` (of template, system, user, model); empty: every token. Each stored row keeps its role either way."""
    tokens: int = 200_000
    """Token budget: contexts are harvested until this many context positions are covered."""
    context_len: int = 256
    """Tokens per packed context (the first is always BOS)."""
    batch_size: int = 16
    """Contexts per forward pass."""
    output: Path = Path("openscope-out/activations")
    """Store folder. Running the same command again resumes an interrupted harvest there."""
    dtype: str = "float32"
    """Storage dtype: float32, float16 or bfloat16 (float16 overflows on large Gemma residuals)."""
    model_dtype: str = "float32"
    """Compute dtype of the model (keep float32 on CPU: bfloat16 matmuls are very slow there)."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    shard_mb: int = 256
    """Approximate size of one shard in MB; bounds the harvest's memory together with batch_size."""
    overwrite: bool = False
    """Replace the store in the output folder (one made from another model, sites or data, or a damaged one). Only an activation store is ever replaced, and only once the new one is complete; a folder holding anything else is refused."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance written into the manifest."""


class HarvestResult(NamedTuple):
    """What a harvest produced."""

    output: Path
    """The store folder."""
    n_contexts: int
    """Contexts processed in total (including those of an earlier, resumed run)."""
    n_rows: int
    """Rows stored per site (tokens, BOS/EOS/pad excluded)."""
    n_shards: int
    """Shards in the store."""
    resumed_shards: int
    """Shards that were already finished when this run started."""
    seconds: float
    """Wall time of this run's forward passes and writes."""
    tokens_per_s: float
    """Context tokens per second fed through the model by this run."""


def identity(
    cfg: HarvestConfig, loaded: LoadedModel, sites: list[Site], shard_contexts: int
) -> dict[str, Any]:
    """The fields two runs must share to write into one store."""
    return {
        "model": loaded.name,
        "sites": [s.name for s in sites],
        "source": cfg.source,
        "text_field": cfg.text_field,
        "context_len": cfg.context_len,
        "tokens": cfg.tokens,
        "batch_size": cfg.batch_size,
        "dtype": dtype_name(parse_dtype(cfg.dtype)),
        "model_dtype": dtype_name(loaded.dtype),
        "shard_contexts": shard_contexts,
        # Only when set, so stores made before role filters existed still resume.
        **({"roles": cfg.roles} if cfg.roles else {}),
    }


def _differs(manifest: dict[str, Any], ident: dict[str, Any]) -> str:
    """The first identity field a store's manifest has otherwise than this run ('' if none)."""
    return next((k for k, v in ident.items() if manifest["identity"].get(k) != v), "")


def _damaged(root: Path, manifest: dict[str, Any]) -> str:
    """The first finished shard that is missing or fails its checksum ('' if none)."""
    return next((s["file"] for s in manifest["shards"] if not shard_intact(root / s["file"], s)), "")


def _harvest_inputs(cfg: HarvestConfig) -> list[str]:
    """Paths the harvest reads (a folder holding one of them is never replaced)."""
    source = split_slice(cfg.source)[0].removeprefix("chat:")
    return [p for p in (source, cfg.model) if Path(p).expanduser().exists()]


def _check_output(cfg: HarvestConfig) -> None:
    """Refuse an --output that can never hold this store (a file, a link, a folder of other things)
    before the model is loaded; whether a store there resumes or is replaced is decided later."""
    root = absolute(cfg.output)
    recover(root)
    check_target(root)
    if root.is_dir() and not is_store(root) and any(root.glob("manifest.rank*.json")):
        decide(Target(root), {}, Ranks(0, 1), cfg.overwrite, _differs)  # names the ranks it needs
    if root.is_dir() and not is_empty_folder(root) and not is_store(root):
        check_replaceable(root, STORE, inputs=_harvest_inputs(cfg))


def _open_store(
    cfg: HarvestConfig, ident: dict[str, Any], replace_same: bool = False
) -> tuple[Staged, dict[str, Any] | None]:
    """Where this harvest writes, and the manifest to resume from (None: a fresh store).

    The same store (same identity, every finished shard intact) resumes in place. Anything else in
    the output folder is replaced only with --overwrite and only if it is an activation store
    (`openscope.files`): the new store is harvested beside it and swapped in when complete, so the
    old one stays whole until then, and an interrupted replacement resumes with the same command.
    `replace_same`: replace even the same store (its data changed; only with --overwrite).
    """
    root = absolute(cfg.output)
    recover(root)
    check_target(root)
    if is_store(root):
        manifest = read_manifest(root)
        differ = _differs(manifest, ident)
        damaged = _damaged(root, manifest)
        if not differ and not damaged and not replace_same:
            return Staged(root, root), manifest
        if not cfg.overwrite:
            if differ:
                raise OpenscopeError(
                    f"output folder {root} holds a different store ({differ}: "
                    f"{manifest['identity'].get(differ)!r} there, {ident[differ]!r} now); use --overwrite "
                    "to replace it or choose another --output"
                )
            raise OpenscopeError(
                f"shard {damaged} of {root} is missing or corrupt (checksum mismatch); rerun with "
                "--overwrite to harvest again"
            )
    elif root.is_dir() and not is_empty_folder(root):
        check_replaceable(root, STORE, inputs=_harvest_inputs(cfg))  # names what is there; always fails
    staged = prepare_output(root, STORE, overwrite=cfg.overwrite, inputs=_harvest_inputs(cfg), fresh=False)
    if staged.replacing and is_store(staged.folder):
        manifest = read_manifest(staged.folder)
        if not _differs(manifest, ident) and not _damaged(staged.folder, manifest):
            log.info("resuming the replacement store being harvested in %s", staged.folder)
            return staged, manifest
        staged = prepare_output(root, STORE, overwrite=True, inputs=_harvest_inputs(cfg), fresh=True)
    return staged, None


class _DataChanged(OpenscopeError):
    """The text source no longer gives the contexts a finished shard was made from."""


class _Plan(NamedTuple):
    """What a harvest computes, fixed before the first forward."""

    loaded: LoadedModel
    sites: list[Site]
    points: dict[Site, SitePoint]
    widths: dict[Site, int]
    store_dtype: torch.dtype
    device: str
    chat: bool
    wanted: list[int]
    shard_contexts: int
    total_contexts: int
    ident: dict[str, Any]


def harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None, progress: bool = True) -> HarvestResult:
    """Run (or resume) a harvest. Pass `loaded` to reuse a model already in memory."""
    if cfg.tokens < 1 or cfg.context_len < 2 or cfg.batch_size < 1 or cfg.shard_mb < 1:
        raise OpenscopeError("tokens, batch_size and shard_mb must be positive and context_len at least 2")
    store_dtype = parse_dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    chat = is_chat_source(cfg.source)
    wanted = role_ids(cfg.roles)
    if wanted and not chat:
        raise OpenscopeError(f"--roles needs a chat source (sharegpt or chat:PATH), not {cfg.source!r}")
    ranks = current_ranks()
    device = rank_device(device, ranks)
    url = store_url(cfg.output)
    if url is not None:
        RemoteFolder(url).check_writable()  # an unreachable or read-only store fails before the model loads
    elif ranks.world > 1:
        recover(absolute(cfg.output))
        check_target(absolute(cfg.output))
    else:
        _check_output(cfg)
    if loaded is None:
        loaded = load_model(cfg.model, cfg.model_dtype, device, cfg.cache_dir)
    sites = parse_sites(cfg.sites, loaded.n_layers)
    points = {s: locate(loaded.arch.layers, loaded.arch.layers_path, s) for s in sites}
    widths = {s: site_width(points[s], loaded.d_model) for s in sites}

    row_bytes = sum(widths.values()) * store_dtype.itemsize
    per_context = cfg.context_len * row_bytes
    shard_contexts = max(
        cfg.batch_size, (cfg.shard_mb * 2**20 // per_context) // cfg.batch_size * cfg.batch_size
    )
    total_contexts = -(-cfg.tokens // cfg.context_len)
    ident = identity(cfg, loaded, sites, shard_contexts)
    plan = _Plan(
        loaded,
        sites,
        points,
        widths,
        store_dtype,
        device,
        chat,
        wanted,
        shard_contexts,
        total_contexts,
        ident,
    )
    if url is not None or ranks.world > 1:
        return fill_ranks(cfg, plan, progress, url, ranks)
    try:
        return _fill(cfg, plan, progress, replace_same=False)
    except _DataChanged:
        if not cfg.overwrite:
            raise
        # --overwrite asked for a new store: harvest one beside the old and swap it in when complete.
        log.warning("the text source changed since %s was made; harvesting a replacement", cfg.output)
        return _fill(cfg, plan, progress, replace_same=True)


def _new_manifest(cfg: HarvestConfig, plan: _Plan) -> dict[str, Any]:
    tok = plan.loaded.tokenizer
    return {
        "format": FORMAT,
        "version": VERSION,
        "identity": plan.ident,
        "model": {"name": plan.loaded.name, "n_layers": plan.loaded.n_layers, "d_model": plan.loaded.d_model},
        "sites": {
            s.name: {"width": plan.widths[s], "hook_point": plan.points[s].hook_point} for s in plan.sites
        },
        "tokenizer": {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id},
        **({"roles": list(ROLES)} if plan.chat else {}),
        "extra": to_jsonable(cfg.extra),
        "shards": [],
        "complete": False,
    }


def _contexts(cfg: HarvestConfig, plan: _Plan) -> Iterator[Any]:
    """The harvest's contexts; the first is read before anything is written, so a source that is not
    text fails here."""
    stream = source_contexts(cfg.source, cfg.text_field, plan.loaded.tokenizer, cfg.context_len)
    contexts = itertools.islice(stream, plan.total_contexts)
    first = next(contexts, None)
    if first is None:
        raise OpenscopeError(f"text source {cfg.source!r} gave no contexts")
    return itertools.chain([first], contexts)


def _fill(cfg: HarvestConfig, plan: _Plan, progress: bool, replace_same: bool) -> HarvestResult:
    """Harvest every shard the store lacks (checking that finished ones still match the data), then
    finish the store and swap it into place if it replaces another."""
    contexts = _contexts(cfg, plan)
    staged, manifest = _open_store(cfg, plan.ident, replace_same)
    root = staged.folder
    if manifest is None:
        manifest = _new_manifest(cfg, plan)
        save_manifest(root, manifest)
    done = len(manifest["shards"])
    if manifest["complete"]:
        log.info("store at %s is already complete", root)

    tokens_done = sum(s["n_contexts"] for s in manifest["shards"]) * cfg.context_len
    bar = tqdm(
        total=plan.total_contexts * cfg.context_len,
        initial=tokens_done,
        unit="tok",
        unit_scale=True,
        desc="harvest",
        disable=not progress,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    writer = _ShardWriter(
        lambda name, tensors: write_tensors(root / name, tensors), lambda m: save_manifest(root, m), manifest
    )
    index, fed = harvest_loop(cfg, plan, contexts, manifest, writer, bar, Ranks(0, 1))
    if index == 0:
        raise OpenscopeError(f"text source {cfg.source!r} gave no contexts")
    _finish(root, manifest, plan.sites)
    staged.commit()
    seconds = time.perf_counter() - start
    n_contexts = sum(s["n_contexts"] for s in manifest["shards"])
    if n_contexts < plan.total_contexts:
        log.warning("the text source ran out after %d of %d contexts", n_contexts, plan.total_contexts)
    return HarvestResult(
        Path(cfg.output),
        n_contexts,
        sum(s["n_rows"] for s in manifest["shards"]),
        len(manifest["shards"]),
        done,
        seconds,
        fed / seconds if seconds > 0 else 0.0,
    )


def harvest_loop(
    cfg: HarvestConfig,
    plan: _Plan,
    contexts: Iterator[Any],
    manifest: dict[str, Any],
    writer: _ShardWriter,
    bar: Any,
    ranks: Ranks,
) -> tuple[int, int]:
    """Cut the contexts into shards and harvest this rank's (shards rank, rank+world, …) that its
    manifest lacks; a finished one is checked against the data instead. Returns (shards seen in the
    stream, context tokens fed to the model)."""
    done = len(manifest["shards"])
    index = fed = 0
    with writer:
        while chunk := list(itertools.islice(contexts, plan.shard_contexts)):
            mine, k = index % ranks.world == ranks.rank, index // ranks.world
            ctx = torch.tensor([c.input_ids for c in chunk], dtype=torch.long) if mine else None
            if ctx is None:
                pass  # another rank's shard: read from the stream, never run
            elif k < done:
                if tokens_digest(ctx) != manifest["shards"][k]["tokens_sha256"]:
                    raise _DataChanged(
                        f"the text source gives different contexts than those stored in {shard_name(index)}: "
                        "the data changed since the store was made; use --overwrite or another --output"
                    )
            else:
                roles = torch.tensor([c.roles for c in chunk], dtype=torch.uint8) if plan.chat else None
                shard = harvest_shard(
                    plan.loaded,
                    plan.widths,
                    ctx,
                    index * plan.shard_contexts,
                    cfg.batch_size,
                    plan.store_dtype,
                    plan.device,
                    bar,
                    roles,
                    plan.wanted,
                )
                entry = {
                    "file": shard_file(index, ranks),
                    "context_start": index * plan.shard_contexts,
                    "n_contexts": len(chunk),
                    "n_rows": shard.n_rows,
                    "tokens_sha256": tokens_digest(ctx),
                    "sum_sq_norm": shard.sum_sq_norm,
                }
                writer.submit(shard.tensors, entry)
                fed += ctx.numel()
            index += 1
    return index, fed


def _place(cfg: HarvestConfig, ident: dict[str, Any], url: str | None, ranks: Ranks) -> tuple[str, Any, Any]:
    """Rank 0: (state, where to write, the folder a staged replacement goes to or None); see `decide`."""
    if url is not None:
        target = Target(url)
        state = decide(target, ident, ranks, cfg.overwrite, _differs)
        if state == "replace":
            log.warning("--overwrite: deleting the store at %s before harvesting again", target.shown)
            target.clear()
            state = "fresh"
        return state, url, None
    root = absolute(cfg.output)
    recover(root)
    check_target(root)
    leftovers = root.is_dir() and any(not p.name.endswith(".tmp") for p in root.iterdir())
    if leftovers and not is_store(root) and not any(root.glob("manifest.rank*.json")):
        check_replaceable(root, STORE, inputs=_harvest_inputs(cfg))  # names what is there
    state = decide(Target(root), ident, ranks, cfg.overwrite, _differs)
    if state != "replace":
        root.mkdir(parents=True, exist_ok=True)
        return state, root, None
    staged = prepare_output(root, STORE, overwrite=True, inputs=_harvest_inputs(cfg), fresh=False)
    try:  # an interrupted replacement by as many ranks resumes
        again = decide(Target(staged.folder), ident, ranks, False, _differs)
    except OpenscopeError:
        again = "fresh"
    if again != "resume":
        staged = prepare_output(root, STORE, overwrite=True, inputs=_harvest_inputs(cfg), fresh=True)
    return ("resume" if again == "resume" else "fresh"), staged.folder, root


def fill_ranks(
    cfg: HarvestConfig, plan: _Plan, progress: bool, url: str | None, ranks: Ranks
) -> HarvestResult:
    """`_fill` for a store at a URL or written by every rank of a torchrun harvest (`targets`): rank 0
    decides where the store goes, each rank harvests its shards into its own manifest, rank 0 merges them
    into `manifest.json` after a barrier, last."""
    contexts = _contexts(cfg, plan)
    decision, error = ("", None, None), None
    if ranks.rank == 0:
        try:
            decision = _place(cfg, plan.ident, url, ranks)
        except OpenscopeError as exc:
            error = str(exc)
    agree(error, ranks)
    state, location, swap_into = from_rank0(decision, ranks)
    target, own = Target(location), own_manifest(ranks)
    manifest, error = None, None
    if state == "resume":
        try:
            manifest = target.load(own)
            names = target.names()
            if manifest is not None and (
                _differs(manifest, plan.ident) or any(not target.intact(e, names) for e in manifest["shards"])
            ):
                error = (
                    f"{target.shown}/{own} is from another harvest or lists a missing shard; use --overwrite"
                )
        except OpenscopeError as exc:
            error = str(exc)
    agree(error, ranks)
    start, fed, resumed = time.perf_counter(), 0, 0
    if state != "complete":
        if manifest is None:
            ranked = {"rank": ranks.rank, "world_size": ranks.world} if ranks.world > 1 else {}
            manifest = {**_new_manifest(cfg, plan), **ranked}
            target.save(manifest, own)
        resumed = len(manifest["shards"])
        total = -(-plan.total_contexts // ranks.world) * cfg.context_len
        with tqdm(total=total, unit="tok", unit_scale=True, desc="harvest", disable=not progress) as bar:
            writer = _ShardWriter(target.write_shard, lambda m: target.save(m, own), manifest)
            fed = harvest_loop(cfg, plan, contexts, manifest, writer, bar, ranks)[1]
        barrier(ranks)
        if ranks.rank == 0:
            if ranks.world > 1:
                merge(target, ranks, [s.name for s in plan.sites])
            else:
                finish(target, manifest, [s.name for s in plan.sites])
            if swap_into is not None:
                Staged(swap_into, location).commit()
    barrier(ranks)
    final = Target(swap_into or location).load(MANIFEST) or {}
    seconds = time.perf_counter() - start
    return HarvestResult(
        Path(cfg.output),
        int(final.get("n_contexts", 0)),
        int(final.get("n_rows", 0)),
        len(final.get("shards", [])),
        resumed if state != "complete" else len(final.get("shards", [])),
        seconds,
        fed / seconds if seconds > 0 else 0.0,
    )


class _ShardWriter:
    """Writes finished shards in a background thread while the model computes the next one.

    One shard at a time, in order: the shard file is written (atomically) and only then is its
    entry added to the manifest, so the manifest never lists a shard that is not whole on disk.
    Serialising, hashing and the fsync overlap with the forward passes instead of adding to them.
    """

    def __init__(
        self,
        write: Callable[[str, dict[str, torch.Tensor]], str],
        save: Callable[[dict[str, Any]], None],
        manifest: dict[str, Any],
    ):
        self.write, self.save, self.manifest = write, save, manifest
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: Future | None = None

    def _write(self, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> None:
        digest = self.write(entry["file"], tensors)
        self.manifest["shards"].append({**entry, CHECKSUM: digest})
        self.save(self.manifest)

    def submit(self, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> None:
        self.wait()  # keeps at most one shard in flight: memory stays bounded by the shard size
        self.pending = self.pool.submit(self._write, tensors, entry)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises a failed write here, in the main thread

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()  # on an error too: a shard already computed is still saved
        finally:
            self.pool.shutdown(wait=True)


def _finish(root: Path, manifest: dict[str, Any], sites: list[Site]) -> None:
    """Mark the store complete and write the per-site statistics."""
    manifest["stats"] = {s.name: site_stats(manifest["shards"], s.name)._asdict() for s in sites}
    manifest["n_rows"] = sum(s["n_rows"] for s in manifest["shards"])
    manifest["n_contexts"] = sum(s["n_contexts"] for s in manifest["shards"])
    manifest["complete"] = True
    save_manifest(root, manifest)
    store = ActivationStore(root, verify=False)
    write_tensors(root / STATS, {f"mean.{s.name}": store.mean(s.name) for s in sites})
