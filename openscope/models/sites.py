"""The site table: every place in every layer where openscope reads (or writes) activations.

A site is (layer, kind). Kinds, in the order the forward pass reaches them inside a block:

| kind        | reads                                                                           |
|-------------|---------------------------------------------------------------------------------|
| resid_pre   | input of block L (the residual stream before it)                                |
| attn_out    | input of the attention's output projection (heads concatenated, before W_O)     |
| mlp_in      | the MLP's input (Gemma: output of `pre_feedforward_layernorm`, gain included)   |
| mlp_out     | the MLP's write to the residual (Gemma: output of `post_feedforward_layernorm`) |
| resid_post  | output of block L (the residual stream after it)                                |

Each architecture has a `SiteMap`: its block class, where its blocks and final norm live, and which
module (and side, input or output) carries each kind. A loaded model gets the map of its block class;
a block no map claims is a one-line error naming the supported ones and how to add a map (a JSON file
beside the model's config.json, or `register_site_map`). docs/models.md has the table per architecture.

Names are `<layer>.<kind>` (e.g. `6.resid_post`). Patterns select many: `*.mlp_out` or
`mlp_out` (every layer), `0-5.resid_post` (a range), `6.*` (every kind at layer 6), `mid.resid_post` (the middle
layer), and the prose form `layer 6 resid_post`; separate several with commas or spaces.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from torch import Tensor, nn

from openscope.errors import OpenscopeError

SITE_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
IO_SIDES = ("input", "output")
SITE_MAP_FILE = "openscope_sites.json"
"""A site map beside a model's config.json (same fields as `SiteMap`) teaches openscope a new architecture."""
HOW_TO_ADD = (
    f"add a site map: a {SITE_MAP_FILE} beside the model's config.json, "
    "or openscope.models.sites.register_site_map (docs/models.md)"
)


class SiteMap(NamedTuple):
    """Where one architecture's sites live: which blocks it has, and per kind the module and side read."""

    name: str
    """Short name, as errors and docs list it (`llama`)."""
    models: str
    """The models it covers, in words (`Llama, Mistral, Qwen2, Qwen3`)."""
    blocks: tuple[str, ...]
    """Class names of its decoder blocks: a loaded model gets the map whose block class it has."""
    layers: tuple[str, ...]
    """Dotted paths of the block list inside the model, tried in order."""
    final_norm: tuple[str, ...]
    """Dotted paths of the norm after the last block, tried in order."""
    points: dict[str, tuple[str, str]]
    """Per site kind: (module path relative to the block, "" = the block; "input" or "output")."""
    parallel: bool = False
    """Attention and MLP both read the block's input (GPT-NeoX): no residual stream lies between them."""
    attribution: str = ""
    """Empty when attribution graphs can freeze this architecture; otherwise why not (one clause)."""


_LLAMA_POINTS = {
    "resid_pre": ("", "input"),
    "attn_out": ("self_attn.o_proj", "input"),
    "mlp_in": ("mlp", "input"),
    "mlp_out": ("mlp", "output"),
    "resid_post": ("", "output"),
}
_GEMMA_POINTS = {
    **_LLAMA_POINTS,
    "mlp_in": ("pre_feedforward_layernorm", "output"),
    "mlp_out": ("post_feedforward_layernorm", "output"),
}
_FUSED_QK = "its attention projects queries and keys in one fused module, whose pattern it cannot freeze"
_LAYERNORM = "its LayerNorms (mean-centred, with a bias) are not RMSNorms, whose scales it freezes"

BUILTIN_SITE_MAPS: tuple[SiteMap, ...] = (
    SiteMap(
        "gemma3",
        "Gemma 3 (text, and the 4B+ multimodal wrapper)",
        ("Gemma3DecoderLayer",),
        ("model.layers", "model.language_model.layers", "language_model.model.layers"),
        ("model.norm", "model.language_model.norm", "language_model.model.norm"),
        _GEMMA_POINTS,
    ),
    SiteMap("gemma2", "Gemma 2", ("Gemma2DecoderLayer",), ("model.layers",), ("model.norm",), _GEMMA_POINTS),
    SiteMap(
        "llama",
        "Llama, Mistral, Qwen2, Qwen3",
        ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"),
        ("model.layers",),
        ("model.norm",),
        _LLAMA_POINTS,
    ),
    SiteMap(
        "phi3",
        "Phi-3",
        ("Phi3DecoderLayer",),
        ("model.layers",),
        ("model.norm",),
        _LLAMA_POINTS,
        False,
        _FUSED_QK,
    ),
    SiteMap(
        "gpt2",
        "GPT-2",
        ("GPT2Block",),
        ("transformer.h",),
        ("transformer.ln_f",),
        {**_LLAMA_POINTS, "attn_out": ("attn.c_proj", "input")},
        False,
        f"{_LAYERNORM}, and {_FUSED_QK}",
    ),
    SiteMap(
        "gpt_neox",
        "GPT-NeoX (Pythia)",
        ("GPTNeoXLayer",),
        ("gpt_neox.layers",),
        ("gpt_neox.final_layer_norm",),
        {**_LLAMA_POINTS, "attn_out": ("attention.dense", "input")},
        True,
        f"{_LAYERNORM}, and {_FUSED_QK}",
    ),
)
_SITE_MAPS: dict[str, SiteMap] = {m.name: m for m in BUILTIN_SITE_MAPS}


def site_maps() -> tuple[SiteMap, ...]:
    """Every site map openscope knows: the built-in ones, then those registered."""
    return tuple(_SITE_MAPS.values())


def supported() -> str:
    """The supported architectures in words, for error messages."""
    return "; ".join(f"{m.name} ({m.models})" for m in _SITE_MAPS.values())


def check_site_map(site_map: SiteMap) -> SiteMap:
    """The site map if it is complete and well formed, else a one-line error naming what is wrong."""
    problems = []
    if not site_map.name or not site_map.blocks or not site_map.layers:
        problems.append("it needs a name, block class names and layer paths")
    missing = [kind for kind in SITE_KINDS if kind not in site_map.points]
    if missing:
        problems.append(f"no point for {', '.join(missing)}")
    extra = [kind for kind in site_map.points if kind not in SITE_KINDS]
    if extra:
        problems.append(f"unknown kinds {', '.join(extra)} (kinds are {', '.join(SITE_KINDS)})")
    bad = [kind for kind, (_rel, io) in site_map.points.items() if io not in IO_SIDES]
    if bad:
        problems.append(f"the side of {', '.join(bad)} is not input or output")
    if problems:
        raise OpenscopeError(
            f"site map {site_map.name or '(unnamed)'!r} is incomplete: {'; '.join(problems)}"
        )
    return site_map


def register_site_map(site_map: SiteMap) -> SiteMap:
    """Teach openscope an architecture (for this process): its blocks are then located by `site_map`.

    A map registered under an existing name replaces it; a block class another map claims moves to it.
    """
    check_site_map(site_map)
    for other in list(_SITE_MAPS.values()):
        if other.name != site_map.name and set(other.blocks) & set(site_map.blocks):
            _SITE_MAPS[other.name] = other._replace(
                blocks=tuple(b for b in other.blocks if b not in site_map.blocks)
            )
    _SITE_MAPS[site_map.name] = site_map
    return site_map


def site_map_from_json(data: object, source: str) -> SiteMap:
    """A site map from its JSON form (the fields of `SiteMap`; points as {kind: [path, side]})."""
    if not isinstance(data, dict):
        raise OpenscopeError(f"{source}: a site map must be a JSON object with the fields of SiteMap")
    fields = set(SiteMap._fields)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise OpenscopeError(
            f"{source}: unknown field {unknown[0]!r}; fields are {', '.join(SiteMap._fields)}"
        )
    try:
        points = {str(k): (str(v[0]), str(v[1])) for k, v in dict(data.get("points", {})).items()}

        def paths(key: str) -> tuple[str, ...]:
            value = data.get(key, ())
            return (value,) if isinstance(value, str) else tuple(str(v) for v in value)

        site_map = SiteMap(
            name=str(data.get("name", "")),
            models=str(data.get("models", data.get("name", ""))),
            blocks=paths("blocks"),
            layers=paths("layers"),
            final_norm=paths("final_norm"),
            points=points,
            parallel=bool(data.get("parallel", False)),
            attribution=str(data.get("attribution", "this site map does not say it supports attribution")),
        )
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise OpenscopeError(f"{source}: malformed site map ({exc})") from None
    try:
        return check_site_map(site_map)
    except OpenscopeError as exc:
        raise OpenscopeError(f"{source}: {exc}") from None


def site_map_of(block: nn.Module) -> SiteMap | None:
    """The site map of a decoder block, by its class; None when openscope knows no map for it."""
    name = type(block).__name__
    return next((m for m in _SITE_MAPS.values() if name in m.blocks), None)


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
    by the site maps alone (no model needed; Gemma's first); None when no kind reads there."""
    for site_map in _SITE_MAPS.values():
        for kind, point in site_map.points.items():
            if point == (rel, io):
                return kind
    return None


def default_point(kind: str) -> tuple[str, str]:
    """Where a kind is read in the Gemma layout: (path in the block, io)."""
    if kind not in SITE_KINDS:
        raise OpenscopeError(f"unknown site kind {kind!r}; expected one of {', '.join(SITE_KINDS)}")
    return _GEMMA_POINTS[kind]


def _submodule(block: nn.Module, rel: str) -> nn.Module | None:
    mod: nn.Module | None = block
    for part in filter(None, rel.split(".")):
        mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod


def locate(layers: nn.ModuleList, layers_path: str, site: Site) -> SitePoint:
    """Resolve a site to the module (and input/output side) that carries it, by the block's site map."""
    check_layer(site.layer, len(layers))
    block = layers[site.layer]
    site_map = site_map_of(block)
    if site_map is None:
        raise OpenscopeError(
            f"openscope has no site map for {type(block).__name__} blocks; supported: {supported()}; {HOW_TO_ADD}"
        )
    rel, io = site_map.points[site.kind]
    module = _submodule(block, rel)
    if module is None:
        raise OpenscopeError(
            f"{type(block).__name__} has no module {rel!r} for site kind {site.kind!r} "
            f"(site map {site_map.name!r})"
        )
    path = f"{layers_path}.{site.layer}" + (f".{rel}" if rel else "")
    return SitePoint(module, path, io)


def site_width(point: SitePoint, d_model: int) -> int:
    """The width of the activation read at a site point: a linear layer's input or output features
    (nn.Linear, or GPT-2's Conv1D whose weight is [in, out]); any other module carries d_model."""
    module = point.module
    if isinstance(module, nn.Linear):
        return module.in_features if point.io == "input" else module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.ndim == 2:
        return int(weight.shape[0] if point.io == "input" else weight.shape[1])
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
