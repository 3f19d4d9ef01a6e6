"""Catalogues that fill a suite plan: Gemma Scope 2's, and a minimal one; Gemma Scope 2's folder names.

`gemma-scope-2` is the catalogue Gemma Scope 2 released for each Gemma 3 size (and the same rules for
any other model):

- **Sweep layers** at about 25/50/65/85% depth (layer round(n × p), halves rounded up; for the Gemma 3
  sizes the published ones, which the rule reproduces): `resid_post/`, `attn_out/`, `mlp_out/` SAEs and
  `transcoder/` (also `_affine`: a skip-transcoder) at widths 16k, 65k and 262k (the residual stream
  also 1m) × target L0 small ≈ 10, medium ≈ 50, big ≈ 150.
- **All layers**: `resid_post_all/`, `attn_out_all/`, `mlp_out_all/`, `transcoder_all/` (± `_affine`)
  at widths 16k and 262k × `l0_small` and `l0_big`, whose targets ramp linearly with depth (small 10 at
  the first layer to 20 at the last, big 60 to 120).
- **Cross-layer transcoders** over all layers (± affine skip), `clt/width_262k_l0_medium`: the width is
  the total, 14,560 latents a layer × 18 = 262,080 for the 270M (see `plan.layer_width`). Gemma Scope 2
  trained them for the 270M and 1B only; any model outside the Gemma 3 catalogue gets them too.
- **Weakly causal crosscoders** over the four sweep layers,
  `crosscoder/layer_5_9_12_15_width_65k_l0_medium`: the width in the name is the total over the four
  layers (the 1B's 262k = 65,536 × 4; the 270M's 65k = 16,384 × 4). Other models: 262k from a
  residual width of 1024 up, else 65k.

`minimal` is one 4096-latent SAE per layer's residual stream, trained live. `--scale F` multiplies every
width and token budget by F: widths are rounded to a power of two and kept at least 32 latents (per
layer for a multi-layer coder), so the same catalogue, with names that say its real widths, runs on a
laptop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import NamedTuple

from openscope.errors import OpenscopeError
from openscope.models.catalog import ModelDims, catalogue_name
from openscope.suite.plan import DataSettings, SuiteItem, SuitePlan

WIDTHS = {"16k": 16_384, "65k": 65_536, "262k": 262_144, "1m": 1_048_576}
"""Gemma Scope 2's widths by the label in its folder names."""
L0_TARGETS = {"small": 10.0, "medium": 50.0, "big": 150.0}
"""Target L0 of the sweep layers' dictionaries, by label."""
L0_RAMPS = {"small": (10.0, 20.0), "big": (60.0, 120.0)}
"""Target L0 of the all-layer sets, by label: (first layer, last layer), linear in between."""
SWEEP_DEPTHS = (25, 50, 65, 85)
"""Depths of the sweep layers, in percent of the model's layers."""
SAE_FAMILIES = {"resid_post": "resid_post", "attn_out": "attn_out", "mlp_out": "mlp_out"}
"""SAE families and the site kind each reads."""
MIN_WIDTH = 32
"""Fewest latents a scaled dictionary (a multi-layer coder: each of its layers) keeps."""
DEFAULT_TOKENS = {"gemma-scope-2": 4_000_000_000, "minimal": 2_000_000}
"""Training tokens per dictionary of each preset before --scale. Gemma Scope 2's own budgets per
dictionary are not published with the catalogue; 4 billion is of the order Gemma Scope trained on."""


class ScopeFacts(NamedTuple):
    """What Gemma Scope 2 released for one model (or the rules' answer for another model)."""

    sweep: tuple[int, ...]
    """The four sweep layers."""
    clt: bool
    """Whether it has cross-layer transcoders."""
    crosscoder_width: int
    """Total width of its crosscoder over the sweep layers."""


GEMMA_SCOPE_2: dict[str, ScopeFacts] = {
    "gemma-3-270m": ScopeFacts((5, 9, 12, 15), True, WIDTHS["65k"]),
    "gemma-3-1b": ScopeFacts((7, 13, 17, 22), True, WIDTHS["262k"]),
    "gemma-3-4b": ScopeFacts((9, 17, 22, 29), False, WIDTHS["262k"]),
    "gemma-3-12b": ScopeFacts((12, 24, 31, 41), False, WIDTHS["262k"]),
    "gemma-3-27b": ScopeFacts((16, 31, 40, 53), False, WIDTHS["262k"]),
}
"""Gemma Scope 2's catalogue per Gemma 3 size."""


def sweep_layers(n_layers: int) -> tuple[int, ...]:
    """Layers at about 25/50/65/85% depth: round(n × p / 100), halves up (distinct, in range)."""
    layers = {min(n_layers - 1, (2 * n_layers * p + 100) // 200) for p in SWEEP_DEPTHS}
    return tuple(sorted(layers))


def scope_facts(dims: ModelDims, model: str) -> ScopeFacts:
    """Gemma Scope 2's catalogue for a Gemma 3 size, else the rules' answer for this model's shape."""
    known = catalogue_name(model) or catalogue_name(dims.name)
    if known in GEMMA_SCOPE_2:
        return GEMMA_SCOPE_2[known]
    wide = dims.d_model >= 1024
    return ScopeFacts(sweep_layers(dims.n_layers), True, WIDTHS["262k" if wide else "65k"])


# ---- folder names ---------------------------------------------------------------------------------------


def width_label(width: int) -> str:
    """A width as Gemma Scope names it: thousands (truncated) as `k`, millions as `m`, else the number
    (16384 -> 16k, 65536 -> 65k, 262080 -> 262k, 1048576 -> 1m, 512 -> 512)."""
    if width >= 1_000_000:
        return f"{width // 1_000_000}m"
    if width >= 1000:
        return f"{width // 1000}k"
    return str(width)


def label_width(label: str) -> int:
    """The width a label names: the power of two with that label (16k -> 16384), else the label's number."""
    match = re.fullmatch(r"(\d+)([km]?)", label)
    if not match:
        raise OpenscopeError(f"bad width label {label!r}; expected e.g. 16k, 1m or 512")
    unit = {"": 1, "k": 1000, "m": 1_000_000}[match.group(2)]
    low = int(match.group(1)) * unit
    power = 1 << max(0, low - 1).bit_length()
    return power if width_label(power) == label else low


class CatalogueName(NamedTuple):
    """A Gemma Scope 2 folder name, parsed."""

    family: str
    """The top folder: resid_post, attn_out, mlp_out, transcoder (each also `_all`), clt or crosscoder."""
    layers: tuple[int, ...]
    """Layers the name lists (empty for a CLT: all of them)."""
    width: int
    """The width the label names (a CLT or crosscoder: the total)."""
    width_label: str
    """The label as written (`16k`)."""
    l0: str
    """The target-L0 label: small, medium or big."""
    affine: bool
    """Whether it ends in `_affine` (a skip connection)."""


_NAME = re.compile(
    r"(?P<family>[a-z_]+)/(?:layer_(?P<layers>\d+(?:_\d+)*)_)?width_(?P<width>\d+[km]?)"
    r"_l0_(?P<l0>small|medium|big)(?P<affine>_affine)?"
)
FAMILIES = (*SAE_FAMILIES, "transcoder")
"""Families with one dictionary per layer (each also as `<family>_all`)."""


def folder_name(family: str, layers: tuple[int, ...], width: int, l0: str, affine: bool = False) -> str:
    """Gemma Scope 2's folder name, e.g. `transcoder_all/layer_3_width_16k_l0_small_affine`."""
    where = "layer_" + "_".join(map(str, layers)) + "_" if layers else ""
    return f"{family}/{where}width_{width_label(width)}_l0_{l0}" + ("_affine" if affine else "")


def parse_name(name: str) -> CatalogueName:
    """Parse a Gemma Scope 2 folder name (`folder_name`'s inverse); a one-line error if it is not one."""
    match = _NAME.fullmatch(name)
    family = match.group("family") if match else ""
    known = family in (*FAMILIES, *(f"{f}_all" for f in FAMILIES), "clt", "crosscoder")
    if match is None or not known:
        raise OpenscopeError(
            f"{name!r} is not a Gemma Scope 2 folder name (e.g. resid_post/layer_9_width_16k_l0_medium, "
            "clt/width_262k_l0_medium, crosscoder/layer_5_9_12_15_width_65k_l0_medium)"
        )
    layers = tuple(int(x) for x in match.group("layers").split("_")) if match.group("layers") else ()
    label = match.group("width")
    return CatalogueName(
        family, layers, label_width(label), label, match.group("l0"), bool(match.group("affine"))
    )


def kind_of(family: str, affine: bool) -> str:
    """The dictionary kind of a family (`transcoder` + affine -> skip_transcoder)."""
    base = family.removesuffix("_all")
    if base in SAE_FAMILIES:
        return "sae"
    if base == "transcoder":
        return "skip_transcoder" if affine else "transcoder"
    if base == "clt":
        return "skip_clt" if affine else "clt"
    return "crosscoder"


# ---- building a catalogue ----------------------------------------------------------------------------------


def scale_width(width: int, scale: float, n_layers: int = 1) -> int:
    """A (total) width times `scale`, rounded to a power of two, with at least `MIN_WIDTH` latents per
    layer; unchanged at scale 1 for Gemma Scope 2's widths (all powers of two)."""
    if scale == 1:
        return width
    power = 1 << max(0, round(math.log2(max(1.0, width * scale))))
    floor = 1 << max(0, MIN_WIDTH * n_layers - 1).bit_length()
    return max(power, floor)


def ramp(lo: float, hi: float, layer: int, n_layers: int) -> float:
    """A target rising linearly from `lo` at layer 0 to `hi` at the last layer (rounded to 0.1)."""
    frac = layer / (n_layers - 1) if n_layers > 1 else 0.0
    return round(lo + (hi - lo) * frac, 1)


class Builder:
    """Collects the items of a catalogue for one model at one scale (duplicate names kept once)."""

    def __init__(self, dims: ModelDims, scale: float, tokens: int) -> None:
        self.dims = dims
        self.scale = scale
        self.tokens = tokens
        self.items: dict[str, SuiteItem] = {}

    def add(
        self, family: str, layers: tuple[int, ...], width: int, l0: str, target: float, affine: bool
    ) -> None:
        """Add one dictionary, named from its scaled width."""
        kind = kind_of(family, affine)
        n = self.dims.n_layers
        if kind in ("clt", "skip_clt"):
            sites, span, named = f"0-{n - 1}.mlp_in", n, ()
        elif kind == "crosscoder":
            sites, span, named = ",".join(map(str, layers)) + ".resid_post", len(layers), layers
        else:
            site = "mlp_in" if kind != "sae" else SAE_FAMILIES[family.removesuffix("_all")]
            sites, span, named = f"{layers[0]}.{site}", 1, layers
        scaled = scale_width(width, self.scale, span)
        name = folder_name(family, named, scaled, l0, affine)
        self.items.setdefault(name, SuiteItem(name, kind, sites, scaled, target, self.tokens))


def _sweep(b: Builder, facts: ScopeFacts) -> None:
    for layer in facts.sweep:
        for family in FAMILIES:
            widths = [*WIDTHS] if family == "resid_post" else ["16k", "65k", "262k"]
            for affine in (False, True) if family == "transcoder" else (False,):
                for w in widths:
                    for l0, target in L0_TARGETS.items():
                        b.add(family, (layer,), WIDTHS[w], l0, target, affine)


def _all_layers(b: Builder) -> None:
    n = b.dims.n_layers
    for layer in range(n):
        for family in FAMILIES:
            for affine in (False, True) if family == "transcoder" else (False,):
                for w in ("16k", "262k"):
                    for l0, (lo, hi) in L0_RAMPS.items():
                        b.add(f"{family}_all", (layer,), WIDTHS[w], l0, ramp(lo, hi, layer, n), affine)


def gemma_scope_2(b: Builder, model: str) -> None:
    """Gemma Scope 2's catalogue (see the module's docstring)."""
    facts = scope_facts(b.dims, model)
    _sweep(b, facts)
    _all_layers(b)
    if facts.clt:
        for affine in (False, True):
            b.add("clt", (), WIDTHS["262k"], "medium", L0_TARGETS["medium"], affine)
    b.add("crosscoder", facts.sweep, facts.crosscoder_width, "medium", L0_TARGETS["medium"], False)


def minimal(b: Builder, model: str) -> None:
    """One 4096-latent SAE per layer's residual stream (target L0 50)."""
    for layer in range(b.dims.n_layers):
        b.add("resid_post_all", (layer,), 4096, "medium", L0_TARGETS["medium"], False)


PRESETS: dict[str, Callable[[Builder, str], None]] = {"gemma-scope-2": gemma_scope_2, "minimal": minimal}
"""The presets by name."""
PRESET_DATA = {
    "gemma-scope-2": DataSettings(context_len=1024, activations="stored", dtype="bfloat16"),
    "minimal": DataSettings(context_len=256, activations="live"),
}
"""Each preset's data settings (gemma-scope-2 stores its activations, as Gemma Scope 2 did)."""


def build_plan(
    model: str, dims: ModelDims, preset: str, scale: float = 1.0, tokens: int | None = None
) -> SuitePlan:
    """The plan of `preset` for a model: its catalogue at `scale`, `tokens` per dictionary (default: the
    preset's budget × scale, at least one batch)."""
    if preset not in PRESETS:
        raise OpenscopeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not (math.isfinite(scale) and scale > 0):
        raise OpenscopeError(f"--scale must be a positive number, got {scale}")
    if tokens is not None and tokens <= 0:
        raise OpenscopeError(f"--tokens must be positive, got {tokens}")
    data = PRESET_DATA[preset]
    budget = tokens if tokens is not None else max(data.batch_size, round(DEFAULT_TOKENS[preset] * scale))
    builder = Builder(dims, scale, budget)
    PRESETS[preset](builder, model)
    return SuitePlan(
        model=model,
        items=list(builder.items.values()),
        data=DataSettings(**vars(data)),
        defaults={"activation": "jumprelu", "sparsity": "quadratic_l0"},
        preset=preset,
        scale=scale,
    )
