"""The suite plan: what a suite trains, one `SuiteItem` per dictionary, and the rules an item obeys.

A `SuitePlan` names a model, its text and data settings, `openscope train` settings shared by every item
(`defaults`) and the items. Each item is one dictionary: its folder under the suite's output (Gemma Scope
2's naming, e.g. `resid_post/layer_9_width_16k_l0_medium`), its kind, the sites it reads, its width,
target L0 and training tokens. `train_config` turns an item into the `TrainConfig` that trains it, so a
plan is exactly as expressive as `openscope train`. The file format (YAML or JSON, edited by hand) is
`openscope.suite.planfile`; the catalogues that fill a plan are `openscope.suite.presets`.

Multi-layer coders (cross-layer transcoders, crosscoders) are sized as Gemma Scope 2 names them: `width`
is the TOTAL latent count, and each layer gets `layer_width(width, n)` latents — width // n rounded down
to a multiple of 32 (when that leaves at least 32), so the total never exceeds the nominal width: the
270M's `clt/width_262k_…` over 18 layers has 14,560 latents a layer, 262,080 in all.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openscope.errors import OpenscopeError
from openscope.models.catalog import ModelDims, dims_of
from openscope.models.sites import Site, parse_sites
from openscope.train import TrainConfig
from openscope.train.clt import expand_layer_lists

KINDS = ("sae", "transcoder", "skip_transcoder", "clt", "skip_clt", "crosscoder")
"""Dictionary kinds a plan can hold (the `openscope train --kind` values)."""
TRANSCODER_KINDS = ("transcoder", "skip_transcoder")
"""Kinds that read a layer's `mlp_in` and predict its `mlp_out`."""
CLT_KINDS = ("clt", "skip_clt")
"""Cross-layer transcoders: consecutive `mlp_in` layers, each predicting its `mlp_out` and later ones."""
MULTI_LAYER_KINDS = (*CLT_KINDS, "crosscoder")
"""Kinds whose width is the total over their layers."""
ACTIVATION_MODES = ("stored", "live")
"""stored: harvested once into an activation store, then trained from it; live: the model runs during
training and feeds a shuffling buffer (nothing on disk)."""
STORE_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Activation-store dtypes and their bytes per value."""
LATENT_MULTIPLE = 32
"""A multi-layer coder's per-layer width is rounded down to a multiple of this (Gemma Scope 2's 270M CLT:
262,144 // 18 = 14,563 -> 14,560)."""
PLANNED_FIELDS = frozenset(
    {"store", "model", "source", "context_len", "sites", "kind", "width", "target_l0", "tokens"}
    | {"batch_size", "output", "resume", "overwrite"}
)
"""`TrainConfig` fields the plan sets itself (from its model, data and items): not allowed as defaults."""
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in PLANNED_FIELDS)
"""`TrainConfig` fields a plan's `defaults` or an item's `options` may set (lr, activation, seed, ...)."""


@dataclass
class DataSettings:
    """The text every item trains on and how its activations reach the trainer."""

    source: str = "wiki"
    """Text source (as for `openscope harvest --source`)."""
    context_len: int = 1024
    """Tokens per packed context."""
    batch_size: int = 4096
    """Tokens per training step."""
    activations: str = "stored"
    """stored (harvest once into a store, then train from it) or live (the model runs during training)."""
    dtype: str = "bfloat16"
    """Dtype of stored activations: float32, float16 or bfloat16 (training computes in float32)."""


@dataclass
class SuiteItem:
    """One dictionary of a suite."""

    name: str
    """Its folder under the suite's output, in Gemma Scope 2's naming (`resid_post/layer_9_width_16k_l0_medium`)."""
    kind: str
    """sae, transcoder, skip_transcoder, clt, skip_clt or crosscoder."""
    sites: str
    """The sites it reads, as a site spec: `9.resid_post`; a transcoder its `mlp_in` (`9.mlp_in`, predicting
    `9.mlp_out`); a CLT its consecutive `mlp_in` layers (`0-17.mlp_in`); a crosscoder its layers of one
    site kind (`5,9,12,15.resid_post`)."""
    width: int
    """Latents; a CLT or crosscoder: the total as Gemma Scope 2 names it, `layer_width` per layer."""
    target_l0: float
    """Target L0 of the quadratic L0 loss (a CLT or crosscoder: per layer)."""
    tokens: int
    """Training tokens."""
    options: dict[str, Any] = field(default_factory=dict)
    """Other `openscope train` settings for this item alone (TrainConfig field names), over the plan's defaults."""


ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(SuiteItem))
"""The keys of an item."""


@dataclass
class SuitePlan:
    """A whole suite: the model, its data, shared training settings and the dictionaries."""

    model: str
    """Model name (a Gemma 3 size such as `gemma-3-270m`), hub id or local Hugging Face folder."""
    items: list[SuiteItem]
    """The dictionaries, each one folder of the suite."""
    data: DataSettings = field(default_factory=DataSettings)
    """Text and data settings shared by every item."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """`openscope train` settings for every item (TrainConfig field names: lr, activation, seed, ...)."""
    preset: str = ""
    """The preset the plan was made from (empty: written by hand)."""
    scale: float = 1.0
    """The --scale the preset's widths and token budgets were multiplied by."""


def layer_width(width: int, n_layers: int) -> int:
    """Latents per layer of a multi-layer coder of total `width` over `n_layers` layers: width // n_layers,
    rounded down to a multiple of `LATENT_MULTIPLE` when that leaves at least that many (so n_layers × the
    result never exceeds `width`, and applying the rule to that product gives the same per-layer width)."""
    per = width // n_layers
    return per - per % LATENT_MULTIPLE if per >= LATENT_MULTIPLE else per


def item_sites(item: SuiteItem, n_layers: int) -> list[Site]:
    """The sites an item reads (its site spec expanded for a model of `n_layers` layers; a bare layer
    list takes the site kind after it, as `openscope train` reads it: `5,9.resid_post`)."""
    return parse_sites(expand_layer_lists(item.sites), n_layers)


def coder_layers(item: SuiteItem, n_layers: int) -> int:
    """How many layers the item's coder spans (1 unless it is a multi-layer kind)."""
    return len(item_sites(item, n_layers)) if item.kind in MULTI_LAYER_KINDS else 1


def item_layer_width(item: SuiteItem, n_layers: int) -> int:
    """Latents per layer: the width, or a multi-layer coder's `layer_width`."""
    return layer_width(item.width, coder_layers(item, n_layers))


def item_reads(item: SuiteItem, n_layers: int) -> list[Site]:
    """Every site whose activations the item trains on: its inputs, and a transcoder's or CLT's targets
    (`mlp_out` of each `mlp_in` layer)."""
    sites = item_sites(item, n_layers)
    if item.kind in (*TRANSCODER_KINDS, *CLT_KINDS):
        sites = sites + [Site(s.layer, "mlp_out") for s in sites]
    return sorted(set(sites), key=lambda s: s.order)


class ItemError(OpenscopeError):
    """A bad value of one key of a plan (`key`), so a plan file's message can name that key's line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        """The key whose value is wrong (`width`, `sites`, ...)."""


def unknown_key(key: str, expected: tuple[str, ...] | list[str], what: str) -> str:
    """The message for a key that is not one of `expected` (with the closest one, if any)."""
    close = difflib.get_close_matches(key, expected, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {', '.join(expected)}"
    return f"unknown key {key!r} in {what}{hint}"


def check_options(options: dict[str, Any], what: str) -> None:
    """An `ItemError` unless every key is a `TrainConfig` field a plan may set."""
    for key in options:
        if key not in TRAIN_FIELDS:
            planned = f" (the plan sets {key} itself)" if key in PLANNED_FIELDS else ""
            raise ItemError(str(key), unknown_key(str(key), TRAIN_FIELDS, what) + planned)


def check_data(data: DataSettings) -> None:
    """An `ItemError` naming the key unless the data settings make sense."""
    if data.activations not in ACTIVATION_MODES:
        raise ItemError(
            "activations", f"activations must be {' or '.join(ACTIVATION_MODES)}, got {data.activations!r}"
        )
    if data.dtype not in STORE_DTYPES:
        raise ItemError("dtype", f"dtype must be one of {', '.join(STORE_DTYPES)}, got {data.dtype!r}")
    if not isinstance(data.source, str) or not data.source:
        raise ItemError("source", f"source must be a text source, got {data.source!r}")
    for name, least in (("context_len", 2), ("batch_size", 1)):
        value = getattr(data, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ItemError(name, f"{name} must be an integer of at least {least}, got {value!r}")


def _check_numbers(item: SuiteItem) -> None:
    for name in ("width", "tokens"):
        value = getattr(item, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ItemError(name, f"{name} must be a positive integer, got {value!r}")
    l0 = item.target_l0
    if not isinstance(l0, int | float) or isinstance(l0, bool) or not math.isfinite(l0) or l0 <= 0:
        raise ItemError("target_l0", f"target_l0 must be a positive number, got {l0!r}")


def _check_sites(item: SuiteItem, dims: ModelDims) -> None:
    try:
        sites = item_sites(item, dims.n_layers)
    except OpenscopeError as exc:
        raise ItemError("sites", f"{exc} ({dims.name})") from None
    kinds = {s.kind for s in sites}
    if item.kind not in MULTI_LAYER_KINDS and len(sites) != 1:
        raise ItemError("sites", f"a {item.kind} reads one site, but {item.sites!r} names {len(sites)}")
    if item.kind in (*TRANSCODER_KINDS, *CLT_KINDS) and kinds != {"mlp_in"}:
        raise ItemError("sites", f"a {item.kind} reads mlp_in sites, not {item.sites!r}")
    if item.kind == "crosscoder" and len(kinds) != 1:
        raise ItemError("sites", f"a crosscoder reads one site kind at several layers, not {item.sites!r}")
    layers = [s.layer for s in sites]
    if item.kind in CLT_KINDS and layers != list(range(layers[0], layers[-1] + 1)):
        raise ItemError("sites", f"a {item.kind} covers consecutive layers, not {item.sites!r}")
    if item.kind in MULTI_LAYER_KINDS and layer_width(item.width, len(sites)) < 1:
        raise ItemError(
            "width", f"width {item.width} is less than one latent for each of its {len(sites)} layers"
        )


def check_item(item: SuiteItem, dims: ModelDims) -> None:
    """An `ItemError` naming the key (not yet the item) unless the item can train on this model."""
    if item.kind not in KINDS:
        raise ItemError("kind", f"unknown kind {item.kind!r}; expected one of {', '.join(KINDS)}")
    _check_numbers(item)
    _check_sites(item, dims)
    check_options(item.options, "options")


def check_names(items: list[SuiteItem]) -> None:
    """An `ItemError` (key: the item's index) unless every name is a distinct, safe relative folder."""
    seen: set[str] = set()
    for i, item in enumerate(items):
        parts = item.name.split("/")
        if any(p in ("", ".", "..") or not all(c.isalnum() or c in "_.-" for c in p) for p in parts):
            raise ItemError(
                str(i),
                f"item name {item.name!r} is not a relative folder of letters, digits, '_', '.', '-' and '/'",
            )
        if item.name in seen:
            raise ItemError(str(i), f"two items are named {item.name!r}")
        seen.add(item.name)


def _no_place(*path: Any) -> str:
    return ""


def check_plan(plan: SuitePlan, dims: ModelDims, where: Callable[..., str] = _no_place) -> None:
    """Check a whole plan against the model's shape: one-line errors naming the item and, through
    `where(*path)` (e.g. a plan file's `Locator.at`), the place of the bad key."""
    try:
        check_data(plan.data)
    except ItemError as exc:
        raise OpenscopeError(f"{where('data', exc.key)}data: {exc}") from None
    try:
        check_options(plan.defaults, "defaults")
    except ItemError as exc:
        raise OpenscopeError(f"{where('defaults', exc.key)}{exc}") from None
    try:
        check_names(plan.items)
    except ItemError as exc:
        raise OpenscopeError(f"{where('items', int(exc.key), 'name')}{exc}") from None
    for i, item in enumerate(plan.items):
        try:
            check_item(item, dims)
        except ItemError as exc:
            path = ("items", i, "options", exc.key) if exc.key not in ITEM_FIELDS else ("items", i, exc.key)
            raise OpenscopeError(f"{where(*path)}item {item.name!r}: {exc}") from None


def train_config(
    item: SuiteItem,
    plan: SuitePlan,
    output_root: Path,
    *,
    store: Path | None = None,
    n_layers: int | None = None,
) -> TrainConfig:
    """The `TrainConfig` that trains `item` into `output_root / item.name`: from the activation store
    `store`, or live from the plan's model when `store` is None. The plan's defaults, then the item's
    options, set everything else; a multi-layer coder's width is its per-layer width (for a model of
    `n_layers` layers; default: the plan's model's, from `dims_of`)."""
    n_layers = n_layers if n_layers is not None else dims_of(plan.model).n_layers
    settings = {**plan.defaults, **item.options}
    check_options(settings, f"the settings of {item.name}")
    live = store is None
    return TrainConfig(
        **settings,
        store=store if store is not None else TrainConfig.store,
        model=plan.model if live else "",
        source=plan.data.source,
        context_len=plan.data.context_len,
        sites=item.sites,
        kind=item.kind,
        width=item_layer_width(item, n_layers),
        target_l0=float(item.target_l0),
        tokens=item.tokens,
        batch_size=plan.data.batch_size,
        output=output_root / item.name,
    )
