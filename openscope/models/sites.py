"""The site table: every place in every layer where openscope reads (or writes) activations.

A site is (layer, kind). Kinds, in the order the forward pass reaches them inside a block:

| kind        | reads                                                           |
|-------------|-----------------------------------------------------------------|
| resid_pre   | input of block L (the residual stream before it)                |
| attn_out    | input of `self_attn.o_proj` (heads concatenated, before W_O)    |
| mlp_in      | output of `pre_feedforward_layernorm` (Gemma) / input of `mlp`  |
| mlp_out     | output of `post_feedforward_layernorm` (Gemma) / output of `mlp`|
| resid_post  | output of block L (the residual stream after it)                |

Names are `<layer>.<kind>` (e.g. `6.resid_post`). Patterns select many: `*.mlp_out` or
`mlp_out` (every layer), `0-5.resid_post` (a range), `6.*` (every kind at layer 6), `mid.resid_post` (the middle
layer), and the prose form `layer 6 resid_post`; separate several with commas or spaces.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from torch import nn

from openscope.errors import OpenscopeError

# For each kind: where to read it, as candidates (path relative to the block, "input" or "output");
# the first path the block has wins, so Gemma's extra norms come before the generic fallbacks.
_SITE_POINTS: dict[str, tuple[tuple[str, str], ...]] = {
    "resid_pre": (("", "input"),),
    "attn_out": (("self_attn.o_proj", "input"), ("self_attn.dense", "input"), ("attn.c_proj", "input")),
    "mlp_in": (("pre_feedforward_layernorm", "output"), ("mlp", "input")),
    "mlp_out": (("post_feedforward_layernorm", "output"), ("mlp", "output")),
    "resid_post": (("", "output"),),
}
SITE_KINDS: tuple[str, ...] = tuple(_SITE_POINTS)


class Site(NamedTuple):
    """One hook site: a kind of activation at one layer."""

    layer: int
    """Index of the decoder block (0-based)."""
    kind: str
    """One of SITE_KINDS."""

    @property
    def name(self) -> str:
        """Canonical name, e.g. `6.resid_post`."""
        return f"{self.layer}.{self.kind}"

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass: sites compare by when the forward reaches them."""
        return (self.layer, SITE_KINDS.index(self.kind))

    @classmethod
    def from_name(cls, name: str) -> Site:
        layer, _, kind = name.partition(".")
        if not layer.isdigit() or kind not in SITE_KINDS:
            raise OpenscopeError(
                f"bad site name {name!r}; expected <layer>.<kind> with kind in {', '.join(SITE_KINDS)}"
            )
        return cls(int(layer), kind)


class SitePoint(NamedTuple):
    """Where a site lives in a particular model."""

    module: nn.Module
    """The module to hook."""
    path: str
    """Its dotted path inside the model (HF module name)."""
    io: str
    """"input" (forward pre-hook, first argument) or "output" (forward hook)."""

    @property
    def hook_point(self) -> str:
        """The Gemma Scope style hook-point name: module path, plus `.input` when reading an input."""
        return self.path if self.io == "output" else f"{self.path}.input"


def kind_at(rel: str, io: str) -> str | None:
    """The site kind read at module path `rel` (relative to a block; "" = the block) on side `io`,
    by the table alone (no model needed); None when no kind reads there."""
    for kind, points in _SITE_POINTS.items():
        if (rel, io) in points:
            return kind
    return None


def default_point(kind: str) -> tuple[str, str]:
    """Where a kind is read in the Gemma layout (the table's first candidate): (path in the block, io)."""
    if kind not in _SITE_POINTS:
        raise OpenscopeError(f"unknown site kind {kind!r}; expected one of {', '.join(SITE_KINDS)}")
    return _SITE_POINTS[kind][0]


def _submodule(block: nn.Module, rel: str) -> nn.Module | None:
    mod: nn.Module | None = block
    for part in filter(None, rel.split(".")):
        mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod


def locate(layers: nn.ModuleList, layers_path: str, site: Site) -> SitePoint:
    """Resolve a site to the module (and input/output side) that carries it."""
    check_layer(site.layer, len(layers))
    block = layers[site.layer]
    for rel, io in _SITE_POINTS[site.kind]:
        module = _submodule(block, rel)
        if module is not None:
            path = f"{layers_path}.{site.layer}" + (f".{rel}" if rel else "")
            return SitePoint(module, path, io)
    raise OpenscopeError(f"{type(block).__name__} has no module for site kind {site.kind!r}")


def site_width(point: SitePoint, d_model: int) -> int:
    """The width of the activation read at a site point."""
    if isinstance(point.module, nn.Linear):
        return point.module.in_features if point.io == "input" else point.module.out_features
    return d_model


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise OpenscopeError(
            f"layer {layer} is out of range: the model has {n_layers} layers (0-{n_layers - 1})"
        )


_PROSE = re.compile(r"layers?\s+([\d*:\-]+|mid)\s+(\w+|\*)", re.IGNORECASE)


def _parse_layers(text: str, n_layers: int) -> list[int]:
    if text in ("*", "all", ""):
        return list(range(n_layers))
    if text == "mid":
        return [n_layers // 2]
    match = re.fullmatch(r"(\d+)(?:[-:](\d+))?", text)
    if not match:
        raise OpenscopeError(f"bad layer selector {text!r}; use N, N-M, mid or *")
    lo = int(match.group(1))
    hi = int(match.group(2)) if match.group(2) is not None else lo
    for layer in (lo, hi):
        check_layer(layer, n_layers)
    return list(range(lo, hi + 1))


def parse_sites(spec: str | list[str] | tuple[str, ...], n_layers: int) -> list[Site]:
    """Expand a site spec (names and patterns) into sites, sorted in forward order, without repeats."""
    text = spec if isinstance(spec, str) else ",".join(spec)
    text = _PROSE.sub(lambda m: f"{m.group(1)}.{m.group(2)}", text)
    tokens = [tok for tok in re.split(r"[,\s]+", text.strip()) if tok]
    if not tokens:
        raise OpenscopeError(
            f"no sites given; kinds are {', '.join(SITE_KINDS)} (e.g. 6.resid_post, *.mlp_out)"
        )
    sites: set[Site] = set()
    for tok in tokens:
        layer_part, _, kind_part = tok.rpartition(".")
        if kind_part not in (*SITE_KINDS, "*"):
            raise OpenscopeError(
                f"unknown site {tok!r}: kind {kind_part!r} is not one of {', '.join(SITE_KINDS)} "
                "(write <layer>.<kind>, e.g. 6.resid_post or *.mlp_out)"
            )
        kinds = SITE_KINDS if kind_part == "*" else (kind_part,)
        sites.update(Site(layer, kind) for layer in _parse_layers(layer_part, n_layers) for kind in kinds)
    return sorted(sites, key=lambda s: s.order)
