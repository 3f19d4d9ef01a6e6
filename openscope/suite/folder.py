"""The suite folder: its manifest (the plan it runs and every item's status), its catalogue, and the
rule for when it may be written, resumed or replaced.

```
DIR/suite.json          the plan (as a document) and per item: status, reason, training metrics
DIR/catalogue.json      every item: folder, kind, sites, width, targets, metrics, status, tokens, time
DIR/plan.yaml           the plan, as `openscope suite plan` writes it (edit a copy, cost it, run it)
DIR/<family>/<name>/    each finished dictionary, in Gemma Scope 2's folder names and layout
DIR/runs/<group>/       each training run: metrics.jsonl, checkpoint.pt, run.json
DIR/activations/all/    the harvested store, when the plan stores its activations
DIR/eval/               `openscope eval --catalogue DIR`'s report and figures
```

A folder holding the suite of the same plan is resumed; one holding another plan's suite is replaced
only with `--overwrite`, and anything that is not an openscope suite folder never is
(`openscope.files`: the new suite is built in a staged sibling and swapped in when it is finished).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from openscope.coders.dictionary import is_dictionary_folder
from openscope.config import save_json
from openscope.errors import OpenscopeError
from openscope.files import (
    Ownership,
    Staged,
    absolute,
    check_replaceable,
    check_target,
    is_empty_folder,
    prepare_output,
    recover,
    write_text,
)
from openscope.reports import finite_or_none
from openscope.suite.plan import MULTI_LAYER_KINDS, SuiteItem, SuitePlan, item_layer_width, item_sites
from openscope.suite.planfile import plan_document, plan_text
from openscope.suite.schedule import RUNS_FOLDER, STORE_FOLDER, Schedule

MANIFEST = "suite.json"
"""The suite's manifest: the plan it runs and every item's status."""
CATALOGUE = "catalogue.json"
"""The catalogue: one entry per item."""
PLAN_COPY = "plan.yaml"
"""The plan, as a plan file."""
EVAL_FOLDER = "eval"
"""Where `openscope eval --catalogue DIR` writes its report by default."""
FORMAT = "openscope-suite"
"""The manifest's `format`."""
CATALOGUE_FORMAT = "openscope-suite-catalogue"
"""The catalogue's `format`."""
VERSION = 1
"""Version of both files."""
STATUSES = ("pending", "running", "done", "failed")
"""An item's status: not started, in the run training now (or when the suite was stopped), finished, failed."""
TIMING_FIELDS = ("seconds", "finished")
"""Catalogue fields that say when and how long (the rest of a catalogue is a function of the plan)."""
RESERVED = (MANIFEST, CATALOGUE, PLAN_COPY, EVAL_FOLDER, RUNS_FOLDER, STORE_FOLDER.split("/")[0])
"""Top-level names of a suite folder an item may not take."""
_DICTIONARY_FILES = ("config.json", "params*.safetensors", "*.tmp")
_REPORT_FILES = ("report.json", "report.md", "*.png", "*.safetensors", "*.tmp")


def _ours_below(folder: Path) -> bool:
    """Whether everything below a folder is what a suite writes there: dictionaries (under family
    folders), training runs, the store, or the catalogue's report; never a link."""
    if folder.name in (RUNS_FOLDER, STORE_FOLDER.split("/")[0]):
        return not folder.is_symlink()
    allowed = Ownership("", files=_DICTIONARY_FILES + _REPORT_FILES, folders=("*",), folder_check=_ours_below)
    return not folder.is_symlink() and not allowed.foreign(folder)


def is_suite(folder: Path) -> bool:
    """Whether a folder holds a suite openscope ran (its suite.json says so)."""
    try:
        doc = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("plan"), dict)


SUITE = Ownership(
    "a suite",
    files=(MANIFEST, CATALOGUE, PLAN_COPY, "*.tmp"),
    folders=("*",),
    folder_check=_ours_below,
    manifest=is_suite,
)
"""What a suite folder holds: --overwrite replaces a folder only if it holds nothing else."""


def check_item_names(plan: SuitePlan) -> None:
    """One-line error unless every item's folder can live in a suite folder: not one of the suite's own
    names, and no item inside another's folder."""
    names = [item.name for item in plan.items]
    for name in names:
        if name.split("/")[0] in RESERVED:
            raise OpenscopeError(
                f"item {name!r}: a suite folder keeps its own {name.split('/')[0]!r} there; rename the item"
            )
    folders = set(names)
    for name in names:
        parts = name.split("/")
        parent = next(
            ("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in folders), None
        )
        if parent is not None:
            raise OpenscopeError(f"item {name!r} would lie inside the folder of item {parent!r}; rename one")


def plan_identity(plan: SuitePlan) -> dict[str, Any]:
    """The plan as the manifest records it (what a rerun must match to resume)."""
    return json.loads(json.dumps(plan_document(plan)))


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8")) if is_suite(folder) else None


def _describe(manifest: dict[str, Any]) -> str:
    plan = manifest["plan"]
    items = plan.get("items") if isinstance(plan.get("items"), list) else []
    return f"{len(items)} items for {plan.get('model')!r}"


def open_suite(
    target: Path, plan: SuitePlan, *, overwrite: bool, inputs: list[Path]
) -> tuple[Staged, dict[str, Any] | None]:
    """Where the suite runs, and the manifest to resume (None: a fresh suite). The same plan's suite
    resumes in place (or, after an interrupted --overwrite, in its staged copy); another plan's suite
    is replaced only with `overwrite`; anything else is refused."""
    root = absolute(target)
    recover(root)
    check_target(root)
    identity = plan_identity(plan)
    manifest = _read_manifest(root) if root.is_dir() else None
    if manifest is not None and manifest["plan"] == identity:
        return Staged(root, root), manifest
    if manifest is not None and not overwrite:
        raise OpenscopeError(
            f"--output {root} holds the suite of another plan ({_describe(manifest)}); pass --overwrite "
            "to replace it, or choose another --output"
        )
    if root.is_dir() and not is_empty_folder(root):
        check_replaceable(root, SUITE, inputs=inputs)
    staged = prepare_output(root, SUITE, overwrite=overwrite, inputs=inputs, fresh=False)
    if staged.replacing:
        previous = _read_manifest(staged.folder)
        if previous is not None and previous["plan"] == identity:
            return staged, previous
        staged = prepare_output(root, SUITE, overwrite=overwrite, inputs=inputs, fresh=True)
    return staged, None


# ---- the manifest ------------------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _mean(value: Any) -> float | None:
    """A metric of the trainer's `final` (a multi-layer coder's: one per layer, averaged)."""
    if isinstance(value, list):
        values = [v for v in value if isinstance(v, int | float)]
        return sum(values) / len(values) if values else None
    return float(value) if isinstance(value, int | float) else None


class SuiteState:
    """The manifest of a running suite, saved (with the catalogue) after every change."""

    def __init__(
        self, folder: Path, plan: SuitePlan, sched: Schedule, n_layers: int, manifest: dict[str, Any] | None
    ) -> None:
        self.folder, self.plan, self.sched, self.n_layers = folder, plan, sched, n_layers
        self.group_of = {item.name: g.id for g in sched.groups for item in g.items}
        fresh = {item.name: {"status": "pending", "reason": None} for item in plan.items}
        self.manifest: dict[str, Any] = manifest or {
            "format": FORMAT,
            "version": VERSION,
            "plan": plan_identity(plan),
            "items": fresh,
            "groups": {},
        }
        self.evaluated = self._evaluated()
        if manifest is None:
            write_text(folder / PLAN_COPY, plan_text(plan))
        self.save()

    def _evaluated(self) -> dict[str, Any]:
        """The held-out metrics `openscope eval --catalogue` wrote into the catalogue, kept across reruns."""
        try:
            doc = json.loads((self.folder / CATALOGUE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("format") != CATALOGUE_FORMAT:
            return {}
        kept = {e["name"]: e["eval"] for e in doc.get("items", []) if isinstance(e, dict) and e.get("eval")}
        if isinstance(doc.get("evaluation"), dict):
            kept[""] = doc["evaluation"]
        return kept

    def entry(self, name: str) -> dict[str, Any]:
        """An item's manifest entry."""
        return self.manifest["items"][name]

    def done(self, item: SuiteItem) -> bool:
        """Whether the item is finished and its folder is in place."""
        return self.entry(item.name)["status"] == "done" and is_dictionary_folder(self.folder / item.name)

    def group_record(self, group_id: str) -> dict[str, Any]:
        """What the manifest knows of a group's run (`trained`: item name -> its folder in the run)."""
        return self.manifest["groups"].setdefault(group_id, {})

    def start(self, items: list[SuiteItem]) -> None:
        """The items' group starts (or resumes) training."""
        for item in items:
            self.manifest["items"][item.name] = {"status": "running", "reason": None}
            self.evaluated.pop(item.name, None)
        self.save()

    def trained(
        self,
        group_id: str,
        folders: dict[str, str],
        finals: dict[str, dict[str, Any]],
        steps: int,
        batch_size: int,
        seconds: float,
    ) -> None:
        """A group's run finished: where each item's dictionary is in the run folder, and its numbers."""
        self.group_record(group_id).update(trained=folders)
        for name in folders:
            final = finals.get(name, {})
            self.entry(name).update(
                train={k: _mean(final.get(k)) for k in ("l0", "fvu", "dead_fraction")},
                tokens_seen=steps * batch_size,
                seconds=round(seconds, 3),
            )
        self.save()

    def finish(self, name: str) -> None:
        """An item's dictionary is in its place."""
        self.entry(name).update(status="done", reason=None, finished=_now())
        self.save()

    def fail(self, names: list[str], reason: str) -> None:
        """Items failed, with the one-line reason."""
        for name in names:
            self.entry(name).update(status="failed", reason=reason, finished=_now())
        self.save()

    def save(self) -> None:
        """Write suite.json and catalogue.json (atomically)."""
        save_json(self.folder / MANIFEST, self.manifest)
        doc = catalogue_document(self.plan, self.manifest, self.n_layers, self.evaluated, self.group_of)
        save_json(self.folder / CATALOGUE, doc)


# ---- the catalogue ------------------------------------------------------------------------------------


def catalogue_entry(
    item: SuiteItem, record: dict[str, Any], group: str, n_layers: int, evaluated: dict[str, Any] | None
) -> dict[str, Any]:
    """One item of the catalogue: what it is, where, its status, and its numbers: `l0`, `fvu`,
    `dead_fraction` and `delta_loss` are the held-out ones once `openscope eval --catalogue` has run
    (`measured_on: evaluation`), else the last training step's (no delta loss)."""
    sites = item_sites(item, n_layers)
    train = record.get("train") or {}
    measured = evaluated or train
    return finite_or_none(
        {
            "name": item.name,
            "folder": item.name,
            "family": item.name.split("/")[0],
            "kind": item.kind,
            "sites": item.sites,
            "site_kind": sites[0].kind,
            "layers": [s.layer for s in sites],
            "width": item.width,
            "layer_width": item_layer_width(item, n_layers),
            "target_l0": float(item.target_l0),
            "tokens": item.tokens,
            "tokens_seen": record.get("tokens_seen"),
            "group": group,
            "status": record["status"],
            "reason": record.get("reason"),
            "l0": measured.get("l0"),
            "fvu": measured.get("fvu"),
            "dead_fraction": measured.get("dead_fraction"),
            "delta_loss": measured.get("delta_loss"),
            "measured_on": ("evaluation" if evaluated else "training") if measured else None,
            "train": train or None,
            "eval": evaluated or None,
            "seconds": record.get("seconds"),
            "finished": record.get("finished"),
        }
    )


def catalogue_document(
    plan: SuitePlan,
    manifest: dict[str, Any],
    n_layers: int,
    evaluated: dict[str, Any],
    group_of: dict[str, str],
) -> dict[str, Any]:
    """catalogue.json: the suite's model and data, the counts by status and one entry per item."""
    items = [
        catalogue_entry(
            item, manifest["items"][item.name], group_of[item.name], n_layers, evaluated.get(item.name)
        )
        for item in plan.items
    ]
    counts = {s: sum(1 for e in items if e["status"] == s) for s in STATUSES}
    return {
        "format": CATALOGUE_FORMAT,
        "version": VERSION,
        "model": plan.model,
        "preset": plan.preset,
        "scale": plan.scale,
        "source": plan.data.source,
        "activations": plan.data.activations,
        "n_layers": n_layers,
        "counts": counts,
        "evaluation": evaluated.get(""),
        "items": items,
    }


def read_catalogue(folder: Path) -> dict[str, Any]:
    """A suite folder's catalogue.json, or a one-line error saying what the folder is not."""
    path = Path(folder) / CATALOGUE
    if not Path(folder).is_dir():
        raise OpenscopeError(f"--catalogue {folder} is not a folder (give an `openscope suite run` output)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise OpenscopeError(
            f"{folder} holds no {CATALOGUE} (is it an `openscope suite run` output?)"
        ) from None
    except ValueError as exc:
        raise OpenscopeError(f"{path} is not valid JSON ({exc})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != CATALOGUE_FORMAT
        or not isinstance(doc.get("items"), list)
    ):
        raise OpenscopeError(f"{path} is not a suite catalogue openscope wrote")
    return doc


def item_layer(entry: dict[str, Any]) -> int | None:
    """The model layer of a single-layer item (None for a multi-layer one)."""
    layers = entry.get("layers") or []
    return int(layers[0]) if len(layers) == 1 and entry.get("kind") not in MULTI_LAYER_KINDS else None
