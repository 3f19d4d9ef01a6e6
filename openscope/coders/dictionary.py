"""A dictionary bound to its place in a model: a coder plus the sites it reads and writes.

Everything downstream of training (evaluation, splicing, export, features, steering) takes
`Dictionary` values, whatever file format the coder came from. `load_dictionary` reads every format
openscope knows and `find_dictionaries` finds them under a folder:

- our own folders and Gemma Scope 2 single-layer folders: `params.safetensors` + `config.json`
  (SAE, transcoder, skip-transcoder) → `Dictionary.coder` is a `SparseCoder`;
- Gemma Scope 2 multi-layer folders: `params_layer_{i}.safetensors` per input layer → a cross-layer
  transcoder, `Dictionary.coder` is a `CrossLayerCoder` (see below);
- Gemma Scope 1 folders: `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold; read with
  allow_pickle=False) and no config.json: the site comes from the release name in the path
  (`gemma-scope-2b-pt-res/layer_9/...` → 9.resid_post; `-mlp` → mlp_out; `-att` → attn_out, the
  o_proj input; `-transcoders` → mlp_in → mlp_out) or from explicit `site_in`/`site_out`.
- other tools' folders (SAELens, sparsify, circuit-tracer, dictionary_learning), read by
  `openscope.coders.peers`; a circuit-tracer transcoder set is one dictionary per layer file;
- anywhere a folder is named, a Hub reference or a release name (`openscope.coders.hub`), fetched
  into the Hugging Face cache first.

Sites come, in this order, from explicit arguments, config.json's `hf_hook_point_in/out` (any spelling
`openscope.models.hookpoints` reads; with a model, checked against it), our provenance
`config["openscope"]["site_in"/"site_out"]`, and finally the folder's path (Gemma Scope 1 release
names, Gemma Scope 2 folder names such as `resid_post/layer_12_width_16k_l0_small`).

**Cross-layer transcoders and crosscoders.** For a CLT covering L consecutive layers, `coder` is a
`CrossLayerCoder` and `site_in`/`site_out` are the sites of its *first* layer; `sites_in`/`sites_out`
list all L of them (layer i of the coder = `site_in.layer + i`). A weakly causal crosscoder reads and
reconstructs one site kind at chosen layers that need not be consecutive (`layers`, e.g. 5, 9, 12, 15:
coder layer i = model layer `layers[i]`), from config.json's `layers`, a Gemma Scope 2 hook point
`model.layers.{5,9,12,15}.output` or a folder name `crosscoder/layer_5_9_12_15_width_65k_l0_medium`.
Their encode/decode take and return stacked activations [L, B, d]; inside a model every kind runs layer
by layer through the same methods (`openscope.coders.protocol.Coder`: `encode_at(i, x)` at
`sites_in[i]`, `decode_into(m, ...)` into `sites_out[m]`), so splicing, steering and attribution treat
them alike. `is_multilayer` tells them from single-layer dictionaries, for which
`sites_in == (site_in,)`.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import SparseCoder
from openscope.coders.hub import resolve
from openscope.coders.io import (
    CONFIG_FILE,
    PARAMS_FILE,
    coder_from_tensors,
    is_multilayer_folder,
    load_clt,
    read_coder_config,
    read_npz,
    read_params,
)
from openscope.coders.peers import peer_entries, peer_format, read_peer, refuse_pickles
from openscope.errors import OpenscopeError
from openscope.models.hookpoints import gemma_scope_hook_point, site_for_hook_point
from openscope.models.load import KNOWN_MODELS, LoadedModel
from openscope.models.sites import Site, check_layer, locate, site_width

log = logging.getLogger(__name__)

NPZ_FILE = "params.npz"
"""The weights file of a Gemma Scope 1 folder."""


class Dictionary(NamedTuple):
    """A coder and where it sits in the model."""

    coder: SparseCoder | CrossLayerCoder
    """The (folded, raw-activation) coder: a SparseCoder, or a CrossLayerCoder for a CLT."""
    site_in: Site
    """Site whose activation the coder encodes (a CLT: the site of its first layer)."""
    site_out: Site
    """Site the coder reconstructs (== site_in for an SAE; mlp_out for a transcoder; a CLT: its first
    layer's output site)."""
    name: str
    """Short label for reports (the folder name, or the site for in-memory dictionaries)."""
    folder: Path | None = None
    """Folder the coder was loaded from, if any."""
    config: dict[str, Any] | None = None
    """The folder's parsed config.json (or what was inferred for formats without one)."""
    layers: tuple[int, ...] | None = None
    """A multi-layer coder's model layers, one per coder layer in increasing order, the first site_in's
    (a crosscoder's chosen layers); None: consecutive from site_in's layer (a CLT)."""

    @property
    def is_multilayer(self) -> bool:
        """Whether the coder is a CLT or a crosscoder (stacked [L, B, d] activations)."""
        return self.coder.kind in ("clt", "crosscoder")

    @property
    def n_layers(self) -> int:
        """How many layers the coder reads (1 for a single-layer coder)."""
        return self.coder.n_layers

    @property
    def sites_in(self) -> tuple[Site, ...]:
        """Every site the coder reads, in layer order (one for a single-layer coder)."""
        if self.layers is not None:
            return tuple(Site(layer, self.site_in.kind) for layer in self.layers)
        return tuple(Site(self.site_in.layer + i, self.site_in.kind) for i in range(self.n_layers))

    @property
    def sites_out(self) -> tuple[Site, ...]:
        """Every site the coder writes, in layer order (one for a single-layer coder)."""
        if self.layers is not None:
            return tuple(Site(layer, self.site_out.kind) for layer in self.layers)
        return tuple(Site(self.site_out.layer + i, self.site_out.kind) for i in range(self.n_layers))


def check_layers(d: Dictionary) -> None:
    """A dictionary's explicit `layers` fit its coder: one per coder layer, increasing, the first
    site_in's and site_out's (a one-line error otherwise)."""
    if d.layers is None:
        return
    layers = list(d.layers)
    if len(layers) != d.n_layers or any(b <= a for a, b in itertools.pairwise(layers)):
        raise OpenscopeError(
            f"dictionary {d.name}: its {d.n_layers}-layer {d.coder.kind} needs {d.n_layers} increasing "
            f"layers, got {layers}"
        )
    if layers[0] != d.site_in.layer or layers[0] != d.site_out.layer:
        raise OpenscopeError(
            f"dictionary {d.name}: its first layer is {layers[0]}, but it reads {d.site_in.name} and "
            f"writes {d.site_out.name}"
        )


def in_memory(coder: SparseCoder, site_in: Site, site_out: Site | None = None, name: str = "") -> Dictionary:
    """A Dictionary for a coder that has no folder (tests, freshly trained coders)."""
    site_out = site_out or site_in
    return Dictionary(coder, site_in, site_out, name or f"{site_in.name}->{site_out.name}")


# ---- finding and loading ------------------------------------------------------------------------


def is_dictionary_folder(folder: Path) -> bool:
    """Whether a folder holds a dictionary in a format openscope reads."""
    return is_own_folder(folder) or peer_format(folder) is not None


def is_own_folder(folder: Path) -> bool:
    """Whether a folder holds a dictionary in openscope's or Gemma Scope's own layout."""
    return (folder / PARAMS_FILE).is_file() or (folder / NPZ_FILE).is_file() or is_multilayer_folder(folder)


def find_dictionaries(root: str | Path) -> list[Path]:
    """Every dictionary at or below root, sorted (a dictionary's own folder is not searched further).

    root may be a Hub reference or a release name (`openscope.coders.hub`; downloaded if needed). Each
    entry is a folder, except the layers of a circuit-tracer transcoder set: one layer file each."""
    root = resolve(root)
    if root.is_file() and peer_format(root) is not None:
        return [root]
    if not root.is_dir():
        raise OpenscopeError(f"no folder at {root} to search for dictionaries")
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if is_dictionary_folder(here):
            found.extend([here] if is_own_folder(here) else peer_entries(here))
            dirnames.clear()
        else:
            dirnames.sort()
    return sorted(found)


def load_dictionary(
    folder: str | Path,
    loaded: LoadedModel | None = None,
    *,
    site_in: Site | str | None = None,
    site_out: Site | str | None = None,
    device: str = "cpu",
) -> Dictionary:
    """Load a dictionary folder of any supported format (module docstring) and bind it to its sites.

    With `loaded`, hook points are resolved against that model and the result is validated: every
    layer exists and the coder's widths match the widths of its sites. `site_in`/`site_out` (a Site
    or a name such as `9.resid_post`) override what the folder says. `folder` may also be a Hub
    reference or a release name (`openscope.coders.hub`), a peer's folder (`openscope.coders.peers`:
    SAELens, sparsify, circuit-tracer, dictionary_learning) or one layer file of a circuit-tracer set.
    """
    folder = resolve(folder)
    if folder.is_file() and peer_format(folder) is not None:
        return _bind_peer(folder, loaded, _as_site(site_in), _as_site(site_out), device)
    if not folder.is_dir():
        raise OpenscopeError(f"no dictionary folder at {folder}")
    override_in, override_out = _as_site(site_in), _as_site(site_out)
    has_config = (folder / CONFIG_FILE).is_file()
    config: dict[str, Any] = read_coder_config(folder) if has_config else {}
    name = folder.name
    coder: SparseCoder | CrossLayerCoder
    layers: tuple[int, ...] | None = None
    if is_multilayer_folder(folder):
        coder = load_clt(folder, config)
        if coder.kind == "crosscoder":
            s_in, s_out, layers = _crosscoder_sites(folder, config, loaded, override_in, coder.n_layers)
        else:
            # Gemma Scope 2 CLTs read the MLP input and predict the MLP output of every layer from 0.
            gemma = (Site(0, "mlp_in"), Site(0, "mlp_out"))
            s_in, s_out = resolve_sites(
                folder, config, loaded, override_in, override_out, transcoder=True, default=gemma
            )
    elif (folder / PARAMS_FILE).is_file():
        if not has_config:
            config = _config_from_path(folder)
        coder = coder_from_tensors(read_params(folder), config, folder / PARAMS_FILE)
        is_transcoder = coder.cfg.kind != "sae"
        s_in, s_out = resolve_sites(
            folder, config, loaded, override_in, override_out, transcoder=is_transcoder
        )
    elif (folder / NPZ_FILE).is_file():
        s_in, s_out = resolve_sites(folder, config, loaded, override_in, override_out, transcoder=None)
        params = {key.lower(): value for key, value in read_npz(folder / NPZ_FILE).items()}
        config = {**_gemma_scope_1_config(folder, s_in, s_out, loaded), **config}
        coder = coder_from_tensors(params, config, folder / NPZ_FILE)
        config["width"] = coder.cfg.width
        name = "/".join(folder.parts[-3:])  # layer_9/width_16k/average_l0_71 says more than its last part
    elif peer_format(folder) is not None:
        return _bind_peer(folder, loaded, override_in, override_out, device)
    else:
        refuse_pickles(folder)
        raise OpenscopeError(
            f"{folder} holds no dictionary: expected {PARAMS_FILE}, params_layer_0.safetensors, {NPZ_FILE} "
            "or a SAELens, sparsify, circuit-tracer or dictionary_learning folder"
        )
    dictionary = Dictionary(coder.to(device), s_in, s_out, name, folder, config, layers)
    check_layers(dictionary)
    if loaded is not None:
        validate_dictionary(dictionary, loaded)
    log.debug("loaded %s: %s -> %s", folder, s_in.name, s_out.name)
    return dictionary


def _bind_peer(
    path: Path, loaded: LoadedModel | None, site_in: Site | None, site_out: Site | None, device: str
) -> Dictionary:
    """A peer's folder (or circuit-tracer layer file) read by `openscope.coders.peers` and bound to sites."""
    peer = read_peer(path)
    transcoder = peer.coder.kind != "sae"
    s_in, s_out = resolve_sites(path, peer.config, loaded, site_in, site_out, transcoder=transcoder)
    dictionary = Dictionary(peer.coder.to(device), s_in, s_out, peer.name, path, peer.config)
    if loaded is not None:
        validate_dictionary(dictionary, loaded)
    log.debug("loaded %s (%s): %s -> %s", path, peer.config.get("format"), s_in.name, s_out.name)
    return dictionary


def _as_site(site: Site | str | None) -> Site | None:
    return Site.from_name(site) if isinstance(site, str) else site


def validate_dictionary(dictionary: Dictionary, loaded: LoadedModel) -> None:
    """Check that every site of a dictionary exists in the model and has the coder's width."""
    check_layers(dictionary)
    arch = loaded.arch
    cfg = dictionary.coder.cfg
    for sites, width, side in (
        (dictionary.sites_in, cfg.d_in, "d_in"),
        (dictionary.sites_out, cfg.d_out, "d_out"),
    ):
        for site in sites:
            try:
                check_layer(site.layer, loaded.n_layers)
            except OpenscopeError as exc:
                raise OpenscopeError(f"dictionary {dictionary.name} uses site {site.name}: {exc}") from None
            have = site_width(locate(arch.layers, arch.layers_path, site), loaded.d_model)
            if have != width:
                raise OpenscopeError(
                    f"dictionary {dictionary.name} does not fit {loaded.name}: site {site.name} has width "
                    f"{have} but the coder's {side} is {width}"
                )


# ---- where a dictionary sits --------------------------------------------------------------------


def resolve_sites(
    folder: Path,
    config: dict[str, Any],
    loaded: LoadedModel | None,
    site_in: Site | None,
    site_out: Site | None,
    *,
    transcoder: bool | None,
    default: tuple[Site, Site] | None = None,
) -> tuple[Site, Site]:
    """(site_in, site_out) of a dictionary folder: explicit sites, config.json hook points, our
    provenance, the folder's path, then `default`. transcoder: whether the coder predicts another
    site (None: not known yet, an SAE unless something says otherwise)."""
    provenance = config.get("openscope")
    provenance = provenance if isinstance(provenance, dict) else {}
    from_path = sites_from_path(folder) or default
    s_in = site_in or _site_from(
        config.get("hf_hook_point_in"), provenance.get("site_in"), from_path and from_path[0], loaded
    )
    if s_in is None:
        raise OpenscopeError(
            f"cannot tell which site {folder} reads (no config.json hook point, no provenance, no "
            "Gemma Scope release name in its path); pass site_in, e.g. 9.resid_post"
        )
    path_out = from_path[1] if from_path is not None and from_path[0] == s_in else None
    s_out = site_out or _site_from(
        config.get("hf_hook_point_out"), provenance.get("site_out"), path_out, loaded
    )
    if s_out is None:
        if transcoder:
            raise OpenscopeError(f"cannot tell which site the transcoder in {folder} writes; pass site_out")
        s_out = s_in
    return s_in, s_out


_HOOK_LAYER_SET = re.compile(r"\{\s*(\d+)\s*(?:,\s*\d+\s*)*\}")
"""A Gemma Scope 2 crosscoder's hook point names its layers as a set: `model.layers.{5,9,12,15}.output`."""
_LAYER_LIST = re.compile(r"layer_(\d+(?:_\d+)+)(?:_|$)")
"""A crosscoder's folder name lists its layers: `layer_5_9_12_15_width_65k_l0_medium`."""


def crosscoder_layers(folder: Path, config: dict[str, Any]) -> tuple[int, ...] | None:
    """The model layers a crosscoder folder names: config.json's `layers`, else its hook point's layer
    set, else its folder name's layer list; None if nothing names them."""
    listed = config.get("layers")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(i, int) and i >= 0 for i in listed):
            raise OpenscopeError(f"config.json in {folder}: layers must be a list of layer numbers")
        return tuple(listed)
    hook = config.get("hf_hook_point_in")
    if isinstance(hook, str) and (m := _HOOK_LAYER_SET.search(hook)):
        return tuple(int(i) for i in re.findall(r"\d+", m.group(0)))
    if m := _LAYER_LIST.search(folder.name):
        return tuple(int(i) for i in m.group(1).split("_"))
    return None


def _crosscoder_sites(
    folder: Path, config: dict[str, Any], loaded: LoadedModel | None, site_in: Site | None, n_layers: int
) -> tuple[Site, Site, tuple[int, ...]]:
    """(first site, first site, model layers) of a crosscoder folder: it reads and reconstructs one site
    kind (where nothing else names its first site: config.json's `site_kind` at its first layer); its
    layers as `crosscoder_layers` finds them (else consecutive from the first site's)."""
    listed = crosscoder_layers(folder, config)
    kind = config.get("site_kind")
    default = Site.from_name(f"{listed[0] if listed else 0}.{kind}") if isinstance(kind, str) else None
    s_in, _ = resolve_sites(
        folder, config, loaded, site_in, site_in, transcoder=False, default=default and (default, default)
    )
    layers = listed or tuple(range(s_in.layer, s_in.layer + n_layers))
    if len(layers) != n_layers:
        raise OpenscopeError(
            f"the crosscoder in {folder} names {len(layers)} layers ({', '.join(map(str, layers))}) but "
            f"holds {n_layers} params_layer files"
        )
    if layers[0] != s_in.layer:
        raise OpenscopeError(
            f"the crosscoder in {folder} starts at layer {layers[0]}, not at {s_in.name}'s layer"
        )
    return s_in, s_in, layers


def _site_from(hook: Any, provenance: Any, from_path: Site | None, loaded: LoadedModel | None) -> Site | None:
    """The site a config.json hook point names; else our provenance site; else the path's site.

    A hook point that names no site (of this model) is an error unless something later answers.
    """
    error: OpenscopeError | None = None
    if isinstance(hook, str) and hook:
        # A CLT's config may spell a per-layer template; its first layer is then layer 0. A crosscoder's
        # may name its layer set, {5,9,12,15}; its first layer is then the first of them.
        hook = hook.replace("{layer}", "0").replace("{i}", "0")
        hook = _HOOK_LAYER_SET.sub(lambda m: m.group(1), hook)
        try:
            return site_for_hook_point(hook, loaded)
        except OpenscopeError as exc:
            error = exc
    if isinstance(provenance, str):
        return Site.from_name(provenance)
    if from_path is not None:
        return from_path
    if error is not None:
        raise error
    return None


_GS1_RELEASE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)(?:-canonical)?$")
_GS2_FAMILY = re.compile(r"(resid_post|attn_out|mlp_out|transcoder|clt|crosscoder)(?:_all)?$")
_LAYER = re.compile(r"layer_(\d+)")
_KINDS_OF = {
    "res": ("resid_post", "resid_post"),
    "resid_post": ("resid_post", "resid_post"),
    "mlp": ("mlp_out", "mlp_out"),
    "mlp_out": ("mlp_out", "mlp_out"),
    "att": ("attn_out", "attn_out"),
    "attn_out": ("attn_out", "attn_out"),
    "transcoders": ("mlp_in", "mlp_out"),
    "transcoder": ("mlp_in", "mlp_out"),
    "clt": ("mlp_in", "mlp_out"),
    "crosscoder": ("resid_post", "resid_post"),
}


def _release_of(folder: Path) -> tuple[str, re.Match[str] | None]:
    """The family named by the folder's path (Gemma Scope 1 release or Gemma Scope 2 folder) and, for
    Gemma Scope 1, the release match; ("", None) when the path names none."""
    for part in reversed(folder.parts):
        # Hugging Face cache folders spell repositories as models--google--<name>.
        name = part.rsplit("--", 1)[-1]
        if m := _GS1_RELEASE.search(name):
            return m.group(3), m
        if m := _GS2_FAMILY.fullmatch(name):
            return m.group(1), None
    return "", None


def sites_from_path(folder: Path) -> tuple[Site, Site] | None:
    """(site_in, site_out) named by a Gemma Scope folder path, or None.

    Gemma Scope 1: `gemma-scope-2b-pt-res/layer_9/width_16k/average_l0_71` → 9.resid_post (`-mlp` →
    mlp_out, `-att` → attn_out, `-transcoders` → mlp_in → mlp_out). Gemma Scope 2:
    `resid_post_all/layer_12_width_16k_l0_small` and likewise attn_out, mlp_out, transcoder, clt
    (a CLT without a layer in its name starts at layer 0), crosscoder (resid_post at its first layer:
    `crosscoder/layer_5_9_12_15_width_65k_l0_medium` → 5.resid_post).
    """
    family, _ = _release_of(folder)
    if not family:
        return None
    layers = [int(m.group(1)) for part in folder.parts if (m := _LAYER.search(part))]
    if not layers and family != "clt":
        return None
    layer = layers[-1] if layers else 0
    kind_in, kind_out = _KINDS_OF[family]
    return Site(layer, kind_in), Site(layer, kind_out)


def _config_from_path(folder: Path) -> dict[str, Any]:
    """What a params.safetensors folder without config.json says through its path (Gemma Scope 2)."""
    family, _ = _release_of(folder)
    config: dict[str, Any] = {"architecture": "jump_relu"}
    if family in ("transcoder", "transcoders"):
        config["type"] = "transcoder"  # whether it has a skip, its tensors say
    return config


def _gemma_scope_1_config(
    folder: Path, s_in: Site, s_out: Site, loaded: LoadedModel | None
) -> dict[str, Any]:
    """The config.json a Gemma Scope 1 folder would have had."""
    _, release = _release_of(folder)
    config: dict[str, Any] = {
        "format": "gemma-scope-1",
        "architecture": "jump_relu",
        "type": "sae" if s_in == s_out else "transcoder",
        "affine_connection": False,
        "hf_hook_point_in": gemma_scope_hook_point(s_in, loaded),
        "hf_hook_point_out": gemma_scope_hook_point(s_out, loaded),
    }
    if release is not None:
        size, variant = release.group(1), release.group(2)
        config["model_name"] = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    return config


# ---- sets of dictionaries (the commands that take --dictionaries) ----------------------------------


def dictionary_folders(paths: Sequence[Path]) -> list[Path]:
    """Dictionary folders named by paths: each is a dictionary folder or a tree to search."""
    found: list[Path] = []
    for path in paths:
        path = resolve(path)
        if not path.exists():
            raise OpenscopeError(f"no dictionary folder at {path}")
        inside = find_dictionaries(path)
        if not inside:
            refuse_pickles(path)
            raise OpenscopeError(f"{path} holds no dictionary")
        found.extend(inside)
    return list(dict.fromkeys(found))


def model_of(dicts: Sequence[Dictionary]) -> str:
    """The model named by the dictionaries' configs (`model_name`); a known short name wins over a hub id
    (Gemma Scope writes `google/gemma-3-270m`, which openscope loads from its PyPI package)."""
    names = {str((d.config or {}).get("model_name") or "") for d in dicts}
    names.discard("")
    if not names:
        raise OpenscopeError("the dictionaries' config.json names no model_name; pass --model")
    if len(names) > 1:
        raise OpenscopeError(
            f"the dictionaries were made for different models ({', '.join(sorted(names))}); pass --model"
        )
    name = names.pop()
    if Path(name).exists():
        return name
    short = name.rsplit("/", 1)[-1]
    for candidate in (short, short.removesuffix("-pt")):
        if candidate in KNOWN_MODELS:
            return candidate
    return name


def unique_names(dicts: list[Dictionary], taken: Sequence[str] = ()) -> list[Dictionary]:
    """Dictionaries with distinct names: the one naming rule of reports, feature databases and the explorer.

    A name that several dictionaries share (or one of `taken`, names already in use) becomes
    `parent/name` (the folder's parent and its own name); a clash left after that, or of a
    dictionary without a folder, gets a counter: `name#2`, `name#3`, ...
    """
    reserved = set(taken)
    counts: dict[str, int] = {}
    for d in dicts:
        counts[d.name] = counts.get(d.name, 0) + 1
    seen = dict.fromkeys(reserved, 1)
    out = []
    for d in dicts:
        name = d.name
        if (counts[name] > 1 or name in reserved) and d.folder is not None:
            name = f"{d.folder.parent.name}/{d.folder.name}"
        seen[name] = seen.get(name, 0) + 1
        out.append(d._replace(name=name if seen[name] == 1 else f"{name}#{seen[name]}"))
    return out
