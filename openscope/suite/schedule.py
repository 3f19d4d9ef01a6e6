"""How a suite runs: its items grouped so that every dictionary reading the same sites trains from the
same batches, and the one activation store those batches come from.

A **group** is one `openscope train` run. Single-layer items (SAEs, transcoders, skip-transcoders) of
one kind, token budget and set of training settings are grouped by the sites they read; the items of a
group are exactly the cross product of its widths × target L0s on each of its sites, so one `train()`
call trains them all from each batch (a transcoder reads its layer's `mlp_in` and `mlp_out` pair).
Sites whose items have the same widths and targets share a group: the gemma-scope-2 sweep layers'
`resid_post` SAEs at four layers × four widths × three targets are one run of 48 dictionaries. Items
of a site whose widths do not all carry the same targets are split by target set (an all-layer
set's ramped targets beside the sweep's). A cross-layer transcoder or a crosscoder is a group of its
own.

**Activations.** When the plan stores its activations, one harvest captures every site any group
reads, for the largest token budget, into `activations/all` under the suite folder: one pass of the
model over the text feeds every group, and no group runs the model again. When the plan trains live,
each group runs the model itself (one pass over its tokens for all its dictionaries and sites).
`model_passes` says how many passes over the text a schedule makes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from openscope.files import safe_name
from openscope.models.catalog import ModelDims
from openscope.models.sites import Site
from openscope.suite.plan import (
    MULTI_LAYER_KINDS,
    SuiteItem,
    SuitePlan,
    item_layer_width,
    item_reads,
    item_sites,
    train_config,
)
from openscope.train import TrainConfig
from openscope.train.config import number_text, result_key

STORE_FOLDER = "activations/all"
"""The suite's activation store, relative to its folder."""
RUNS_FOLDER = "runs"
"""Where each group's training run (metrics, checkpoint, run.json) lives, relative to the suite folder."""


class Group(NamedTuple):
    """One training run of a suite: the items it trains from the same batches."""

    id: str
    """Its run folder's name under `runs/` (`002_transcoder_1.mlp_in`)."""
    kind: str
    """The items' kind."""
    items: tuple[SuiteItem, ...]
    """The items, in the trainer's order: per site, per width, per target L0."""
    sites: tuple[str, ...]
    """Single-layer: the input sites (one per site trained); multi-layer: the item's site spec."""
    widths: tuple[int, ...]
    """Latents per dictionary (a multi-layer coder: per layer), ascending."""
    targets: tuple[float, ...]
    """Target L0s, ascending."""
    tokens: int
    """Training tokens of every item."""
    settings: dict[str, Any]
    """The `openscope train` settings shared by every item (the plan's defaults and the items' options)."""
    reads: tuple[str, ...]
    """Every site whose activations the run reads (inputs and targets), in forward order."""
    stored: bool
    """Whether it trains from the suite's activation store (else live, running the model itself)."""


class StoreSpec(NamedTuple):
    """The suite's activation store: what one harvest captures for every stored group."""

    folder: str
    """Its folder, relative to the suite folder."""
    sites: tuple[str, ...]
    """Every site a stored group reads, in forward order."""
    tokens: int
    """Token budget of the harvest: the largest budget of a stored group."""


class Schedule(NamedTuple):
    """A suite's groups, in the order they run, and the store the stored ones read."""

    groups: list[Group]
    """The training runs, in the order of their first item in the plan."""
    store: StoreSpec | None
    """The harvest (None when no group is stored)."""


def _settings(plan: SuitePlan, item: SuiteItem) -> dict[str, Any]:
    return {**plan.defaults, **item.options}


def _key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def _ordered(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(names), key=lambda n: Site.from_name(n).order))


def _blocks(items: list[SuiteItem]) -> list[tuple[tuple[int, ...], tuple[float, ...], list[SuiteItem]]]:
    """The items of one site split into full cross products: widths that carry the same set of targets
    form one block (widths × targets), each (width, target) once per block (a repeat goes to a later
    block)."""
    layers: list[dict[tuple[int, float], SuiteItem]] = []
    for item in items:
        pair = (item.width, float(item.target_l0))
        home = next((layer for layer in layers if pair not in layer), None)
        if home is None:
            home = {}
            layers.append(home)
        home[pair] = item
    blocks = []
    for layer in layers:
        targets_of: dict[int, set[float]] = {}
        for width, target in layer:
            targets_of.setdefault(width, set()).add(target)
        by_targets: dict[tuple[float, ...], list[int]] = {}
        for width, targets in targets_of.items():
            by_targets.setdefault(tuple(sorted(targets)), []).append(width)
        for targets, widths in by_targets.items():
            ws = tuple(sorted(widths))
            blocks.append((ws, targets, [layer[(w, t)] for w in ws for t in targets]))
    return blocks


def schedule(plan: SuitePlan, dims: ModelDims) -> Schedule:
    """The groups of a (checked) plan and the store they read (see the module's docstring)."""
    n = dims.n_layers
    stored = plan.data.activations == "stored"
    position = {item.name: i for i, item in enumerate(plan.items)}
    runs: list[tuple[int, str, tuple[str, ...], tuple[int, ...], tuple[float, ...], list[SuiteItem]]] = []
    by_site: dict[tuple[str, str, int, str], list[SuiteItem]] = {}
    for item in plan.items:
        if item.kind in MULTI_LAYER_KINDS:
            width = (item_layer_width(item, n),)
            runs.append(
                (position[item.name], item.kind, (item.sites,), width, (float(item.target_l0),), [item])
            )
            continue
        site = item_sites(item, n)[0].name
        by_site.setdefault((item.kind, site, item.tokens, _key(_settings(plan, item))), []).append(item)
    # Sites whose blocks have the same kind, budget, settings, widths and targets train in one run.
    merged: dict[tuple[Any, ...], list[tuple[str, list[SuiteItem]]]] = {}
    for (kind, site, tokens, settings), items in by_site.items():
        for widths, targets, block in _blocks(items):
            merged.setdefault((kind, tokens, settings, widths, targets), []).append((site, block))
    for (kind, _, _, widths, targets), per_site in merged.items():
        per_site.sort(key=lambda pair: Site.from_name(pair[0]).order)
        items = [item for _, block in per_site for item in block]
        first = min(position[i.name] for i in items)
        runs.append((first, kind, tuple(site for site, _ in per_site), widths, targets, items))
    runs.sort(key=lambda run: run[0])
    groups = []
    for index, (_, kind, sites, widths, targets, items) in enumerate(runs):
        head = items[0]
        label = sites[0] + (f"+{len(sites) - 1}" if len(sites) > 1 else "")
        reads = _ordered(s.name for item in items for s in item_reads(item, n))
        groups.append(
            Group(
                id=safe_name(f"{index:03d}_{kind}_{label}"),
                kind=kind,
                items=tuple(items),
                sites=sites,
                widths=widths,
                targets=targets,
                tokens=head.tokens,
                settings=_settings(plan, head),
                reads=reads,
                stored=stored,
            )
        )
    in_store = [g for g in groups if g.stored]
    store = (
        StoreSpec(
            STORE_FOLDER, _ordered(s for g in in_store for s in g.reads), max(g.tokens for g in in_store)
        )
        if in_store
        else None
    )
    return Schedule(groups, store)


def model_passes(sched: Schedule) -> int:
    """Passes of the model over the text the schedule makes: one harvest for every stored group, plus
    one pass per live group (each feeds all its dictionaries)."""
    return (1 if sched.store is not None else 0) + sum(1 for g in sched.groups if not g.stored)


def group_config(
    group: Group, plan: SuitePlan, root: Path, n_layers: int, device: str | None = None
) -> TrainConfig:
    """The `TrainConfig` of a group's run: into `root/runs/<id>`, from the suite's store (or live),
    every width and target of the group on every one of its sites, on `device` unless the plan sets
    one; resumed when its checkpoint is there."""
    store = root / STORE_FOLDER if group.stored else None
    cfg = train_config(group.items[0], plan, root / RUNS_FOLDER, store=store, n_layers=n_layers)
    output = root / RUNS_FOLDER / group.id
    changes: dict[str, Any] = {
        "output": output,
        "resume": (output / "checkpoint.pt").is_file(),
    }
    if device is not None and "device" not in group.settings:  # a device the plan names wins
        changes["device"] = device
    if group.kind not in MULTI_LAYER_KINDS:
        changes |= {
            "sites": ",".join(group.sites),
            "width": ",".join(map(str, group.widths)),
            "target_l0": ",".join(number_text(t) for t in group.targets),
        }
    return dataclasses.replace(cfg, **changes)


def item_keys(group: Group, cfg: TrainConfig, n_layers: int) -> dict[str, str]:
    """Each item's key in the run's `TrainResult` (`result_key`), by item name."""
    if group.kind in MULTI_LAYER_KINDS:
        item = group.items[0]
        return {item.name: item_sites(item, n_layers)[0].name}
    return {
        item.name: result_key(item_sites(item, n_layers)[0].name, item.width, float(item.target_l0), cfg)
        for item in group.items
    }
