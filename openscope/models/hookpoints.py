"""Hook-point names ↔ sites: read the names other tools write, write the names they read.

Three spellings name the same activation:

- ours (`SitePoint.hook_point`): the HF module path, plus `.input` when a module's input is read —
  `model.layers.9` (resid_post), `model.layers.9.self_attn.o_proj.input` (attn_out);
- Gemma Scope 2's `config.json` (`hf_hook_point_in` / `hf_hook_point_out`): the same path with the
  side always written — `model.layers.9.output`, `model.layers.9.self_attn.o_proj.input`,
  `model.layers.9.pre_feedforward_layernorm.output` (transcoder in),
  `model.layers.9.post_feedforward_layernorm.output` (mlp_out, transcoder out). Gemma Scope 2 writes
  `model.layers.L` even for the 4B+ multimodal checkpoints whose blocks live at
  `model.language_model.layers`, so any known layer-container prefix is accepted;
- TransformerLens (SAELens `hook_name`): `blocks.9.hook_resid_pre`, `blocks.9.attn.hook_z`
  (heads concatenated = our attn_out), `blocks.9.hook_mlp_in`, `blocks.9.hook_mlp_out`,
  `blocks.9.hook_resid_post`. TransformerLens has no hook at exactly the gained output of Gemma's
  `pre_feedforward_layernorm`; `hook_mlp_in` is what SAELens's own Gemma Scope 2 loader writes for
  transcoder inputs, and the exact HF name travels beside it (`hf_hook_name`).
"""

from __future__ import annotations

from typing import NamedTuple

from openscope.errors import OpenscopeError
from openscope.models.load import LoadedModel, layer_paths
from openscope.models.sites import SITE_KINDS, Site, check_layer, default_point, kind_at, locate

TL_HOOKS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "attn_out": "attn.hook_z",
    "mlp_in": "hook_mlp_in",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
"""TransformerLens hook name (after `blocks.L.`) written for each site kind."""

_TL_READ: dict[str, str] = {
    **{hook: kind for kind, hook in TL_HOOKS.items()},
    # Other spellings tools use for the MLP's input and output (circuit-tracer, older SAELens).
    "ln2.hook_normalized": "mlp_in",
    "mlp.hook_in": "mlp_in",
    "mlp.hook_out": "mlp_out",
}
TL_PREFIX = "blocks"


class ParsedHookPoint(NamedTuple):
    """A hook-point name split at its layer index."""

    prefix: str
    """The layer container, e.g. `model.layers` (HF) or `blocks` (TransformerLens)."""
    layer: int
    """The layer index."""
    rel: str
    """Module path inside the block ("" = the block itself), or the TransformerLens hook name."""
    io: str
    """"input" or "output" (HF names without a side read the output); "" for TransformerLens names."""


def parse_hook_point(hook_point: str) -> ParsedHookPoint:
    """Split a hook-point name at its first all-digit component (the layer index)."""
    parts = hook_point.strip().split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is None or index == 0:
        raise OpenscopeError(
            f"hook point {hook_point!r} names no layer (expected e.g. model.layers.9.output)"
        )
    prefix, layer, rest = ".".join(parts[:index]), int(parts[index]), parts[index + 1 :]
    if prefix == TL_PREFIX:
        return ParsedHookPoint(prefix, layer, ".".join(rest), "")
    io = "output"
    if rest and rest[-1] in ("input", "output"):
        io = rest.pop()
    return ParsedHookPoint(prefix, layer, ".".join(rest), io)


def site_for_hook_point(hook_point: str, loaded: LoadedModel | None = None) -> Site:
    """The site a hook-point name (any of the three spellings) reads.

    With a model, every site kind of the named layer is located in that model and compared, so the
    answer is exact for it (and a layer or module it lacks is an error); without one, the site table
    alone decides (Gemma-style and generic module names).
    """
    hp = parse_hook_point(hook_point)
    if hp.prefix == TL_PREFIX:
        kind = _TL_READ.get(hp.rel)
        if kind is None:
            raise OpenscopeError(
                f"hook point {hook_point!r} is not a site: known TransformerLens hooks are "
                f"{', '.join(sorted(_TL_READ))}"
            )
        if loaded is not None:
            _check_layer_of(hook_point, hp.layer, loaded)
        return Site(hp.layer, kind)
    containers = set(layer_paths()) | ({loaded.arch.layers_path} if loaded is not None else set())
    if hp.prefix not in containers:
        raise OpenscopeError(
            f"hook point {hook_point!r} does not start with a known layer container "
            f"({', '.join(sorted(containers))})"
        )
    if loaded is None:
        kind = kind_at(hp.rel, hp.io)
        if kind is None:
            raise OpenscopeError(f"hook point {hook_point!r} reads no site kind ({', '.join(SITE_KINDS)})")
        return Site(hp.layer, kind)
    _check_layer_of(hook_point, hp.layer, loaded)
    block_path = f"{loaded.arch.layers_path}.{hp.layer}"
    offered = []
    for kind in SITE_KINDS:
        try:
            point = locate(loaded.arch.layers, loaded.arch.layers_path, Site(hp.layer, kind))
        except OpenscopeError:
            continue  # this architecture has no module for the kind
        rel = point.path[len(block_path) :].lstrip(".")
        if (rel, point.io) == (hp.rel, hp.io):
            return Site(hp.layer, kind)
        offered.append(point.hook_point)
    raise OpenscopeError(
        f"model {loaded.name} has no hook point {hook_point!r}; layer {hp.layer} offers {', '.join(offered)}"
    )


def _check_layer_of(hook_point: str, layer: int, loaded: LoadedModel) -> None:
    try:
        check_layer(layer, loaded.n_layers)
    except OpenscopeError as exc:
        raise OpenscopeError(f"hook point {hook_point!r}: {exc}") from None


def gemma_scope_hook_point(site: Site, loaded: LoadedModel | None = None) -> str:
    """The Gemma Scope 2 `config.json` spelling of a site (side always written).

    With a model, the module path comes from it; without, from the Gemma layout under `model.layers`.
    """
    if loaded is not None:
        point = locate(loaded.arch.layers, loaded.arch.layers_path, site)
        return f"{point.path}.{point.io}"
    rel, io = default_point(site.kind)
    return ".".join(filter(None, (f"model.layers.{site.layer}", rel, io)))


def with_side(hook_point: str) -> str:
    """An HF hook-point name with its side written out (Gemma Scope 2 spelling): our `model.layers.9`
    becomes `model.layers.9.output`; TransformerLens names and names with a side are returned as given."""
    hp = parse_hook_point(hook_point)
    if hp.prefix == TL_PREFIX:
        return hook_point
    return ".".join(filter(None, (hp.prefix, str(hp.layer), hp.rel, hp.io)))


def tl_hook_name(site: Site) -> str:
    """The TransformerLens (SAELens) hook name of a site, e.g. `blocks.9.hook_resid_post`."""
    return f"{TL_PREFIX}.{site.layer}.{TL_HOOKS[site.kind]}"
