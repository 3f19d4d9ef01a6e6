"""`openscope suite run`: train every dictionary of a plan into one folder, in as few passes of the model
over the text as the plan allows, resumably.

The schedule (`openscope.suite.schedule`) groups the items into training runs that share their
batches; with stored activations one harvest feeds them all. Each run trains in `runs/<group>` with the
trainer's own checkpoints, and each finished dictionary is moved (one rename) into its Gemma Scope 2
folder. The manifest records every step (`openscope.suite.folder`), so after `kill -9` at any moment the
same command skips the finished items (their folders untouched), resumes the harvest where it stopped
and the interrupted run from its checkpoint, and ends with the dictionaries an uninterrupted run makes.

A run that fails — NaN loss, out of memory, a full disk, any error openscope reports in one line —
marks its items failed with that line and the suite goes on; a rerun tries them again. Other errors
are bugs and stop the suite with their traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from openscope.activations.harvest import HarvestConfig, harvest
from openscope.activations.store import is_store, read_manifest
from openscope.coders.io import CONFIG_FILE
from openscope.config import save_json
from openscope.data.sources import split_slice
from openscope.errors import OpenscopeError
from openscope.models.catalog import dims_of
from openscope.models.load import LoadedModel, resolve_device
from openscope.suite.folder import SuiteState, catalogue_entry, check_item_names, open_suite
from openscope.suite.plan import MULTI_LAYER_KINDS, SuitePlan, check_plan
from openscope.suite.planfile import read_plan
from openscope.suite.schedule import RUNS_FOLDER, Group, Schedule, group_config, item_keys, schedule
from openscope.train import train

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
"""A training run's checkpoint (removed once every dictionary of the run is in place)."""
_REASON_CHARS = 400


@dataclass
class RunConfig:
    """Which plan to train, into which folder, on which device."""

    plan: Path
    """A plan file (written by `openscope suite plan`, perhaps edited, or by hand)."""
    output: Path = Path("openscope-out/suite")
    """Suite folder: each dictionary in its Gemma Scope 2 folder (resid_post/layer_9_width_16k_l0_medium), catalogue.json, suite.json (the plan and each item's status), runs/ (each training run's metrics and checkpoint) and activations/ (the harvested store). Run the same command again to resume."""
    overwrite: bool = False
    """Replace a suite folder holding another plan (only an openscope suite folder is ever replaced, once the new suite is finished; the same plan's suite always resumes)."""
    device: str = "auto"
    """Device for harvesting and training: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""


class RunResult(NamedTuple):
    """What a suite run did."""

    output: Path
    """The suite folder."""
    done: list[str]
    """Items finished by this run."""
    skipped: list[str]
    """Items already finished before it (left untouched)."""
    failed: dict[str, str]
    """Items that failed, with the reason."""
    passes: int
    """Passes of the model over the text this run made (a harvest, and each live run)."""
    seconds: float
    """Wall time."""


class Observer:
    """What a suite run reports as it goes (the command line draws it; this base class logs it)."""

    def begin(self, items: int, finished: int, units: list[tuple[str, int]]) -> None:
        """The suite starts: its item count, how many were already finished, and the (label, tokens) of
        every harvest and training run still to do."""
        log.info("suite: %d items, %d already finished, %d runs to do", items, finished, len(units))

    def unit(self, label: str, tokens: int, poll: Callable[[], int], items: int = 0) -> None:
        """A harvest or training run starts: `poll()` says how many of its `tokens` are done; `items`:
        the items it trains (0 for a harvest)."""
        log.info("%s: %d tokens", label, tokens)

    def item(self, entry: dict[str, Any]) -> None:
        """An item finished or failed (its catalogue entry)."""
        log.info("%s", item_line(entry))


def item_line(entry: dict[str, Any]) -> str:
    """One line on a finished or failed item."""
    if entry["status"] == "failed":
        return f"failed {entry['name']}: {entry['reason']}"

    def num(key: str, spec: str) -> str:
        value = entry.get(key)
        return "-" if value is None else format(value, spec)

    return (
        f"done {entry['name']}: L0 {num('l0', '.1f')} (target {entry['target_l0']:g}), FVU {num('fvu', '.3f')}, "
        f"dead {num('dead_fraction', '.0%')} ({num('seconds', '.0f')} s)"
    )


def failure_reason(exc: BaseException) -> str | None:
    """The one-line reason an item failed, for the errors that fail an item (None: a bug, re-raised)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OpenscopeError):
        reason = text
    elif isinstance(exc, MemoryError | torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    ):
        reason = f"out of memory ({text or type(exc).__name__})"
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        reason = f"disk full ({exc.strerror or text}{f': {exc.filename}' if exc.filename else ''})"
    elif isinstance(exc, OSError):
        reason = f"{type(exc).__name__}: {text}"
    else:
        return None
    return reason[:_REASON_CHARS]


def _tail_tokens(metrics: Path) -> int:
    """Tokens trained so far by a run, from the last complete line of its metrics.jsonl."""
    try:
        with metrics.open("rb") as fh:
            fh.seek(max(0, metrics.stat().st_size - 8192))
            lines = fh.read().splitlines()
        return int(json.loads(lines[-1]).get("tokens", 0)) if lines else 0
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _store_tokens(store: Path, context_len: int) -> int:
    """Tokens harvested so far into a store."""
    try:
        return sum(s["n_contexts"] for s in read_manifest(store)["shards"]) * context_len
    except (OSError, OpenscopeError, KeyError, TypeError):
        return 0


def _as_uninterrupted(folder: Path) -> None:
    """A resumed run's dictionary records the settings of its item, as an uninterrupted run's does:
    `resume` says how the run got there, not how the dictionary was trained (its weights are the same)."""
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    settings = config.get("openscope", {}).get("train_config")
    if isinstance(settings, dict) and settings.get("resume"):
        settings["resume"] = False
        save_json(path, config)  # (as `save_coder` writes it: the same bytes an uninterrupted run writes)


def _inputs(cfg: RunConfig, plan: SuitePlan) -> list[Path]:
    """Paths the suite reads (a folder holding one is never replaced)."""
    source = split_slice(plan.data.source)[0].removeprefix("chat:")
    return [p for p in (Path(cfg.plan), Path(source), Path(plan.model)) if p.exists()]


class _Suite:
    """One run of a suite: its plan, folder, state and observer."""

    def __init__(
        self, cfg: RunConfig, plan: SuitePlan, sched: Schedule, state: SuiteState, observer: Observer
    ):
        self.cfg, self.plan, self.sched, self.state, self.observer = cfg, plan, sched, state, observer
        self.root = state.folder
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.passes = 0

    def fail(self, names: list[str], reason: str) -> None:
        self.state.fail(names, reason)
        for name in names:
            self.failed[name] = reason
            self.observer.item(self._entry(name))

    def _entry(self, name: str) -> dict[str, Any]:
        item = next(i for i in self.plan.items if i.name == name)
        return catalogue_entry(
            item, self.state.entry(name), self.state.group_of[name], self.state.n_layers, None
        )

    def harvest(self, loaded: LoadedModel | None) -> str | None:
        """Harvest the store every stored group reads (resuming one cut short); the reason if it failed."""
        spec = self.sched.store
        assert spec is not None
        folder = self.root / spec.folder
        if is_store(folder):
            manifest = read_manifest(folder)
            if manifest["complete"] and list(manifest["sites"]) == list(spec.sites):
                return None
        data = self.plan.data
        hcfg = HarvestConfig(
            model=self.plan.model,
            sites=",".join(spec.sites),
            source=data.source,
            tokens=spec.tokens,
            context_len=data.context_len,
            output=folder,
            dtype=data.dtype,
            device=self.cfg.device,
            cache_dir=self.cfg.cache_dir,
        )
        self.observer.unit(
            f"harvest {len(spec.sites)} sites", spec.tokens, lambda: _store_tokens(folder, data.context_len)
        )
        try:
            harvest(hcfg, loaded=loaded, progress=False)
        except (OpenscopeError, OSError, MemoryError, RuntimeError) as exc:
            reason = failure_reason(exc)
            if reason is None:
                raise
            return reason
        self.passes += 1
        return None

    def run_group(self, group: Group) -> None:
        """Train one group (or resume it), move its dictionaries into place; mark its items failed with
        the reason if its run fails."""
        pending = [item for item in group.items if not self.state.done(item)]
        try:
            self._train_and_place(group, pending)
        except (OpenscopeError, OSError, MemoryError, RuntimeError) as exc:
            reason = failure_reason(exc)
            if reason is None:
                raise
            self.fail([item.name for item in pending if not self.state.done(item)], reason)

    def _train_and_place(self, group: Group, pending: list[Any]) -> None:
        run_dir = self.root / RUNS_FOLDER / group.id
        record = self.state.group_record(group.id)
        trained = record.get("trained")
        if trained is not None and any(
            i.name not in trained
            or (not (run_dir / trained[i.name]).is_dir() and not (self.root / i.name).is_dir())
            for i in pending
        ):
            # a finished item's folder was removed since, or an item failed: train the group again
            trained = None
            record.pop("trained")
            shutil.rmtree(run_dir, ignore_errors=True)
        if trained is None:
            trained = self._train(group, pending, run_dir)
        for item in pending:
            if item.name not in trained:
                continue  # it failed alone (marked failed in `_train`)
            self._place(run_dir / trained[item.name], self.root / item.name)
            self.state.finish(item.name)
            self.done.append(item.name)
            self.observer.item(self._entry(item.name))
        for folder in trained.values():  # copies of items finished earlier (the run was trained again)
            if (run_dir / folder).is_dir():
                shutil.rmtree(run_dir / folder)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the run is finished: its dictionaries are in place

    def _train(self, group: Group, pending: list[Any], run_dir: Path) -> dict[str, str]:
        n_layers = self.state.n_layers
        cfg = group_config(group, self.plan, self.root, n_layers, device=self.cfg.device)
        if not cfg.resume and run_dir.is_dir():
            shutil.rmtree(run_dir)  # no checkpoint: nothing to resume from (the folder is the suite's own)
        keys = item_keys(group, cfg, n_layers)
        self.state.start(pending)
        total = -(-group.tokens // cfg.batch_size) * cfg.batch_size
        what = f"{len(group.items)} dictionar{'y' if len(group.items) == 1 else 'ies'}"
        poll = lambda: _tail_tokens(run_dir / "metrics.jsonl")  # noqa: E731
        self.observer.unit(f"train {group.id} ({what})", total, poll, len(pending))
        start = time.perf_counter()
        result = train(cfg, progress=False, isolate_failures=True)
        if not group.stored:
            self.passes += 1
        failed = result.failed or {}
        for name, key in keys.items():  # a dictionary that failed alone fails its item alone
            if key in failed:
                self.fail([name], failed[key])
        keys = {name: key for name, key in keys.items() if key not in failed}
        folders = {name: result.folders[key].name for name, key in keys.items()}
        if cfg.resume:
            for folder in set(folders.values()):
                _as_uninterrupted(run_dir / folder)
        if group.kind in MULTI_LAYER_KINDS:  # one coder: its numbers per layer
            layers = list(result.final.values())
            finals = {
                name: {k: [f.get(k) for f in layers] for k in ("l0", "fvu", "dead_fraction")} for name in keys
            }
        else:
            finals = {name: result.final.get(key, {}) for name, key in keys.items()}
        seconds = time.perf_counter() - start
        self.state.trained(group.id, folders, finals, result.steps, cfg.batch_size, seconds)
        return folders

    def _place(self, source: Path, target: Path) -> None:
        """Move a trained dictionary folder into its place in one rename (a copy left by an earlier,
        interrupted attempt at this item is replaced; one already moved stays)."""
        if not source.is_dir():
            if target.is_dir():
                return
            raise OpenscopeError(f"the trained dictionary {source} is missing; rerun to train it again")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        source.rename(target)


def prepare(cfg: RunConfig) -> tuple[SuitePlan, Schedule, int]:
    """Read and check the plan (one-line errors naming its file and line), and schedule it."""
    plan, loc = read_plan(cfg.plan)
    dims = dims_of(plan.model)
    check_plan(plan, dims, loc.at)
    check_item_names(plan)
    resolve_device(cfg.device)
    return plan, schedule(plan, dims), dims.n_layers


def run_suite(
    cfg: RunConfig, observer: Observer | None = None, loaded: LoadedModel | None = None
) -> RunResult:
    """Run (or resume) a suite (module docstring). `loaded`: the plan's model already in memory, for the
    harvest."""
    start = time.perf_counter()
    observer = observer or Observer()
    plan, sched, n_layers = prepare(cfg)
    staged, manifest = open_suite(cfg.output, plan, overwrite=cfg.overwrite, inputs=_inputs(cfg, plan))
    state = SuiteState(staged.folder, plan, sched, n_layers, manifest)
    suite = _Suite(cfg, plan, sched, state, observer)
    skipped = [item.name for item in plan.items if state.done(item)]
    todo = [g for g in sched.groups if not all(state.done(item) for item in g.items)]
    harvesting = sched.store is not None and any(g.stored for g in todo)
    units = [(f"train {g.id}", g.tokens) for g in todo]
    if harvesting and sched.store is not None:
        units.insert(0, ("harvest", sched.store.tokens))
    observer.begin(len(plan.items), len(skipped), units)
    harvest_failed = suite.harvest(loaded) if harvesting else None
    for group in todo:
        if group.stored and harvest_failed is not None:
            names = [item.name for item in group.items if not state.done(item)]
            suite.fail(names, f"the harvest failed: {harvest_failed}")
            continue
        suite.run_group(group)
    staged.commit()
    return RunResult(
        Path(cfg.output), suite.done, skipped, suite.failed, suite.passes, time.perf_counter() - start
    )
