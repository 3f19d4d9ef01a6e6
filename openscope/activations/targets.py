"""Where a harvest writes when it is not one process writing a local folder: a store at an fsspec URL, or
one store written by every rank of a torchrun harvest.

- **Ranks.** Rank r of W harvests shards r, r+W, r+2W, … of the one context stream (every rank reads
  the stream; only its own shards go through the model), names them `shard_NNNNN.rankR.safetensors` and
  keeps its own manifest, `manifest.rankR.json`, so each rank resumes by itself. After a barrier, rank 0
  merges the rank manifests into `manifest.json` (written last), and removes them. The shards are those
  of a one-process harvest (same contexts, same rows); a store being harvested by W ranks resumes only
  with W ranks (a one-line error otherwise).
- **URLs.** Files are written whole (`openscope.activations.remote`), each shard before the manifest
  that lists it, `stats.safetensors` before the final manifest. A finished shard is trusted on resume
  when its object exists (the reader checks its checksum). `--overwrite` deletes the old store's files,
  manifest first, before harvesting again: an object store cannot swap folders in one rename.
"""

from __future__ import annotations

import fnmatch
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from openscope.activations.ranks import Ranks
from openscope.activations.remote import PROBE, RemoteFolder
from openscope.activations.store import (
    MANIFEST,
    STATS,
    STORE,
    ActivationStore,
    manifest_bytes,
    parse_manifest,
    save_manifest,
    shard_intact,
    site_stats,
    write_tensors,
)
from openscope.errors import OpenscopeError

RANK_MANIFEST = re.compile(r"manifest\.rank(\d+)\.json")


def own_manifest(ranks: Ranks) -> str:
    """The manifest a rank keeps while it harvests (`manifest.json` for a single process)."""
    return MANIFEST if ranks.world == 1 else f"manifest.rank{ranks.rank}.json"


def shard_file(index: int, ranks: Ranks) -> str:
    """Shard `index`'s file: named by its rank under torchrun."""
    rank = "" if ranks.world == 1 else f".rank{ranks.rank}"
    return f"shard_{index:05d}{rank}.safetensors"


class Target:
    """A store folder a harvest writes: a local folder or a URL."""

    def __init__(self, location: Path | str):
        self.location = location
        self.remote = RemoteFolder(location) if isinstance(location, str) else None
        self.shown = self.remote.shown if self.remote is not None else str(location)
        self._spool = tempfile.TemporaryDirectory(prefix="openscope-shards-") if self.remote else None

    def names(self) -> set[str]:
        if self.remote is not None:
            return set(self.remote.names())
        folder = Path(self.location)
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def load(self, name: str) -> dict[str, Any] | None:
        """The manifest `name` in the folder, checked; None when there is none."""
        if self.remote is not None:
            try:
                return parse_manifest(self.remote.read(name), f"{self.shown}/{name}")
            except FileNotFoundError:
                return None
        path = Path(self.location) / name
        return parse_manifest(path.read_bytes(), str(path)) if path.is_file() else None

    def save(self, manifest: dict[str, Any], name: str) -> None:
        if self.remote is not None:
            self.remote.write(name, manifest_bytes(manifest))
        else:
            save_manifest(Path(self.location), manifest, name)

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> str:
        """Write a shard whole and return its checksum (a URL's: built in a local spool file, uploaded)."""
        if self.remote is None:
            return write_tensors(Path(self.location) / name, tensors)
        assert self._spool is not None
        spool = Path(self._spool.name) / name
        digest = write_tensors(spool, tensors)
        try:
            self.remote.upload(name, spool)
        finally:
            spool.unlink(missing_ok=True)
        return digest

    def intact(self, entry: dict[str, Any], names: set[str]) -> bool:
        """Whether a finished shard is still there (a local one: and matches its checksum)."""
        if self.remote is not None:
            return entry["file"] in names
        return shard_intact(Path(self.location) / entry["file"], entry)

    def remove(self, name: str) -> None:
        if self.remote is not None:
            self.remote.remove(name)
        else:
            (Path(self.location) / name).unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete an old store here (its manifest first, so it is never read half deleted)."""
        names = self.names()
        foreign = sorted(n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in STORE.files))
        foreign = [n for n in foreign if not RANK_MANIFEST.fullmatch(n) and not n.startswith(PROBE)]
        if foreign:
            raise OpenscopeError(
                f"--output {self.shown} holds {', '.join(foreign[:3])}, which openscope did not write as an "
                "activation store; refusing to replace it: choose another --output"
            )
        for name in sorted(names, key=lambda n: (n != MANIFEST, not RANK_MANIFEST.fullmatch(n), n)):
            self.remove(name)


def decide(
    target: Target,
    ident: dict[str, Any],
    ranks: Ranks,
    overwrite: bool,
    differs: Callable[[dict[str, Any], dict[str, Any]], str],
) -> str:
    """What rank 0 finds at the target for this harvest: "fresh" (nothing there), "resume", "complete"
    (the same store, finished) or "replace" (another store, and --overwrite). Anything else is a
    one-line error: another store without --overwrite, a store being harvested by another number of
    ranks, a folder holding files that are not a store's."""
    names = target.names()
    main = target.load(MANIFEST) if MANIFEST in names else None
    found = sorted(int(m.group(1)) for n in names if (m := RANK_MANIFEST.fullmatch(n)))
    if main is not None and main["complete"]:
        mine, theirs, world = main, "complete", ranks.world
    elif main is not None:
        mine, theirs, world = main, "incomplete", 1
    elif found:
        mine = target.load(f"manifest.rank{found[0]}.json")
        assert mine is not None
        theirs, world = "incomplete", int(mine.get("world_size", 0))
    else:
        if any(not n.endswith(".tmp") and not n.startswith(PROBE) for n in names):
            target.clear()  # refuses (naming them) unless they are a store's files, which it removes
        return "fresh"
    what = f"--output {target.shown}"
    if world != ranks.world:
        if overwrite:
            return "replace"
        raise OpenscopeError(
            f"{what} holds an unfinished store harvested by {world} process(es), but this run has "
            f"{ranks.world}; resume it with the same number (torchrun --nproc-per-node {world}), or use "
            "--overwrite to start again"
        )
    differ = differs(mine, ident)
    if differ:
        if overwrite:
            return "replace"
        raise OpenscopeError(
            f"output folder {target.shown} holds a different store ({differ}: {mine['identity'].get(differ)!r} "
            f"there, {ident[differ]!r} now); use --overwrite to replace it or choose another --output"
        )
    if (
        theirs == "incomplete"
        and ranks.world == 1
        and any(not target.intact(s, names) for s in mine["shards"])
    ):
        if overwrite:
            return "replace"
        raise OpenscopeError(f"a shard of {target.shown} is missing; rerun with --overwrite to harvest again")
    return theirs if theirs == "complete" else "resume"


def merge(target: Target, ranks: Ranks, sites: list[str]) -> dict[str, Any]:
    """Rank 0, after every rank finished: one manifest of all ranks' shards in context order, the
    statistics, then `manifest.json` (last), then the rank manifests are removed."""
    parts = [target.load(f"manifest.rank{r}.json") for r in range(ranks.world)]
    if any(p is None for p in parts):
        raise OpenscopeError(f"a rank's manifest is missing from {target.shown}; run the harvest again")
    first = dict(parts[0] or {})
    for key in ("rank", "world_size"):
        first.pop(key, None)
    shards = sorted((s for p in parts for s in (p or {})["shards"]), key=lambda s: s["context_start"])
    manifest = {**first, "shards": shards, "ranks": ranks.world}
    finish(target, manifest, sites)
    for r in range(ranks.world):
        target.remove(f"manifest.rank{r}.json")
    return manifest


def finish(target: Target, manifest: dict[str, Any], sites: list[str]) -> None:
    """Mark the store complete: statistics into the manifest, stats.safetensors, then the manifest."""
    manifest["stats"] = {s: site_stats(manifest["shards"], s)._asdict() for s in sites}
    manifest["n_rows"] = sum(s["n_rows"] for s in manifest["shards"])
    manifest["n_contexts"] = sum(s["n_contexts"] for s in manifest["shards"])
    manifest["complete"] = True
    store = ActivationStore(target.location, verify=False, manifest=manifest)
    target.write_shard(STATS, {f"mean.{s}": store.mean(s) for s in sites})
    target.save(manifest, MANIFEST)
