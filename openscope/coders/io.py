"""Save and load dictionaries in the Gemma Scope 2 folder layouts, and read Gemma Scope 1.

A folder holds `params.safetensors` (w_enc [d_in, d_sae], w_dec [d_sae, d_out], b_enc, b_dec,
threshold, optional affine_skip_connection [d_in, d_out]) and `config.json` (hf_hook_point_in,
hf_hook_point_out, width, model_name, architecture, l0, affine_connection, type, plus provenance).
Saved weights are folded: they take raw activations. Nothing is ever unpickled: safetensors + JSON.

architecture is "jump_relu" (JumpReLU, and ReLU saved exactly as JumpReLU with θ = 0); TopK and
BatchTopK coders are saved as "topk"/"batch_topk" with their `k` (convert them with
`topk_to_jumprelu` first for a file every Gemma Scope reader understands).

Multi-layer folders (cross-layer transcoders and crosscoders, `save_clt`/`load_clt`) hold
`params_layer_{i}.safetensors` per input layer i (w_enc [d_in, F], b_enc, threshold, w_dec [F, L, d_out],
b_dec, optional affine_skip_connection) and a config.json whose hook points name the coder's first
layer; `type` is clt or crosscoder, and a crosscoder's config also lists its model `layers` (i counts
the chosen layers: params_layer_1 is the second of them) and its `site_kind`. Gemma Scope 1
`params.npz` arrays are read by `read_npz` with allow_pickle=False. `coder_from_tensors` turns any of
these tensor sets into a checked SparseCoder; binding coders to sites is `coders.dictionary`'s job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.config import save_json
from openscope.errors import OpenscopeError

log = logging.getLogger(__name__)

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
ARCHITECTURES = {"jump_relu": "jumprelu", "topk": "topk", "batch_topk": "batchtopk"}
_ARCH_OF = {"jumprelu": "jump_relu", "relu": "jump_relu", "topk": "topk", "batchtopk": "batch_topk"}


def save_coder(
    coder: SparseCoder,
    folder: str | Path,
    *,
    hook_point_in: str,
    hook_point_out: str | None = None,
    model_name: str,
    l0: float | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a folded copy of the coder to folder (created if needed); returns the folder.

    hook_point_out defaults to hook_point_in (SAEs); l0 is the measured mean L0 to record;
    provenance keys are added to config.json (they may not overwrite the standard keys).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folded = coder.fold()
    cfg = folded.cfg
    tensors: dict[str, Tensor] = {
        "w_enc": folded.w_enc,
        "w_dec": folded.w_dec,
        "b_enc": folded.b_enc,
        "b_dec": folded.b_dec,
    }
    if cfg.activation == "jumprelu":
        tensors["threshold"] = folded.threshold()
    elif cfg.activation == "relu":
        tensors["threshold"] = torch.zeros(cfg.width)
    if folded.w_skip is not None:
        tensors["affine_skip_connection"] = folded.w_skip
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}

    config: dict[str, Any] = {
        "hf_hook_point_in": hook_point_in,
        "hf_hook_point_out": hook_point_out if hook_point_out is not None else hook_point_in,
        "width": cfg.width,
        "model_name": model_name,
        "architecture": _ARCH_OF[cfg.activation],
        "l0": l0,
        "affine_connection": cfg.kind == "skip_transcoder",
        "type": "sae" if cfg.kind == "sae" else "transcoder",
    }
    if cfg.k is not None:
        config["k"] = cfg.k
    for key, value in (provenance or {}).items():
        if key in config:
            raise OpenscopeError(f"provenance key {key!r} would overwrite a standard config.json field")
        config[key] = value

    # Write the weights under a temporary name first so a crash never leaves a half file.
    tmp = folder / (PARAMS_FILE + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp))
    tmp.replace(folder / PARAMS_FILE)
    save_json(folder / CONFIG_FILE, config)
    log.info("saved %s coder (width %d) to %s", config["type"], cfg.width, folder)
    return folder


def read_coder_config(folder: str | Path) -> dict[str, Any]:
    """The parsed config.json of a coder folder (clear errors if missing or malformed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OpenscopeError(f"no coder folder at {folder}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise OpenscopeError(f"missing {CONFIG_FILE} in coder folder {folder}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenscopeError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise OpenscopeError(f"{path} must hold a JSON object")
    return config


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file (one-line errors if missing, truncated or corrupt)."""
    if not path.is_file():
        raise OpenscopeError(f"missing {path.name} in coder folder {path.parent}")
    try:
        # safetensors parses a header and raw bytes only: no code runs, nothing is unpickled.
        return safetensors.torch.load(path.read_bytes())
    except Exception as exc:  # the parser raises its own error types for every kind of damage
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise OpenscopeError(f"{path} is truncated or corrupt ({reason})") from None


def read_npz(path: Path) -> dict[str, Tensor]:
    """All arrays of a numpy `.npz` file (Gemma Scope 1 `params.npz`) as float32 tensors.

    Loaded with allow_pickle=False: an object array (the only kind that needs unpickling, and the
    way a malicious file would run code) is refused, never unpickled.
    """
    if not path.is_file():
        raise OpenscopeError(f"missing {path.name} in coder folder {path.parent}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise OpenscopeError(
                f"{path} holds an object array, which would need unpickling; refusing to load it"
            ) from None
        raise OpenscopeError(f"{path} is truncated or corrupt ({' '.join(str(exc).split())})") from None
    except Exception as exc:  # zipfile, EOF and format errors for every kind of damage
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise OpenscopeError(f"{path} is truncated or corrupt ({reason})") from None
    out: dict[str, Tensor] = {}
    for name, array in arrays.items():
        if array.dtype.kind not in "fiu":
            raise OpenscopeError(f"{name} in {path} has dtype {array.dtype}, expected numbers")
        out[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return out


def read_params(folder: Path) -> dict[str, Tensor]:
    """The tensors of a single-layer folder's params.safetensors (one-line errors if damaged)."""
    return read_safetensors(folder / PARAMS_FILE)


def _expect_shape(name: str, t: Tensor, shape: tuple[int, ...], path: Path) -> None:
    if tuple(t.shape) != shape:
        raise OpenscopeError(f"{name} in {path} has shape {list(t.shape)}, expected {list(shape)}")


def load_coder(folder: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
    """Load a coder folder into a (folded, raw-activation) SparseCoder in float32."""
    folder = Path(folder)
    config = read_coder_config(folder)
    return coder_from_tensors(read_params(folder), config, folder / PARAMS_FILE).to(device)


def coder_type(config: dict[str, Any], affine: bool = False) -> str:
    """sae or transcoder: config.json's `type`, else a transcoder when it reads and writes different
    hook points or has a skip connection (Gemma Scope 2 configs may leave `type` out)."""
    ctype = config.get("type")
    if ctype is not None:
        return ctype
    hook_in, hook_out = config.get("hf_hook_point_in"), config.get("hf_hook_point_out")
    differs = hook_out is not None and hook_out != hook_in
    return "transcoder" if differs or affine else "sae"


def coder_from_tensors(params: dict[str, Tensor], config: dict[str, Any], path: Path) -> SparseCoder:
    """A SparseCoder (CPU, float32) from Gemma Scope tensors (w_enc [d_in, F], w_dec [F, d_out], b_enc,
    b_dec, threshold, optional affine_skip_connection [d_in, d_out]) and a config.json-style dict.

    `path` names the file the tensors came from in error messages. Shapes, finiteness and thresholds
    are checked; each problem is a one-line OpenscopeError.
    """
    arch = config.get("architecture", "jump_relu")
    if arch not in ARCHITECTURES:
        raise OpenscopeError(f"unsupported architecture {arch!r} for {path}")
    # A config without affine_connection (one inferred from a path) lets the tensors say.
    affine = bool(config.get("affine_connection", "affine_skip_connection" in params))
    ctype = coder_type(config, affine)
    if ctype not in ("sae", "transcoder"):
        raise OpenscopeError(f"unsupported coder type {ctype!r} for {path} (sae or transcoder)")
    required = ["w_enc", "w_dec", "b_enc", "b_dec"]
    if arch == "jump_relu":
        required.append("threshold")
    if affine:
        required.append("affine_skip_connection")
    missing = [k for k in required if k not in params]
    if missing:
        raise OpenscopeError(f"{path} is missing {', '.join(missing)}")
    w_enc = params["w_enc"]
    if w_enc.ndim != 2:
        raise OpenscopeError(f"w_enc in {path} must be 2-D [d_in, width], got shape {list(w_enc.shape)}")
    d_in, width = w_enc.shape
    w_dec = params["w_dec"]
    if w_dec.ndim != 2:
        raise OpenscopeError(f"w_dec in {path} must be 2-D [width, d_out], got shape {list(w_dec.shape)}")
    d_out = w_dec.shape[1]
    _expect_shape("w_dec", w_dec, (width, d_out), path)
    _expect_shape("b_enc", params["b_enc"], (width,), path)
    _expect_shape("b_dec", params["b_dec"], (d_out,), path)
    if "threshold" in required:
        _expect_shape("threshold", params["threshold"], (width,), path)
    if affine:
        _expect_shape("affine_skip_connection", params["affine_skip_connection"], (d_in, d_out), path)
    if "width" in config and config["width"] != width:
        raise OpenscopeError(f"the config of {path} says width {config['width']}, weights have {width}")
    for name in required:
        _check_finite(name, params[name], path)
    if "threshold" in required and bool((params["threshold"] < 0).any()):
        raise OpenscopeError(f"threshold in {path} has negative values")

    kind = "sae" if ctype == "sae" else ("skip_transcoder" if affine else "transcoder")
    k = config.get("k")
    if arch != "jump_relu" and not (isinstance(k, int) and k >= 1):
        raise OpenscopeError(f"{arch} coder {path} needs a positive integer k in its config")
    cfg = CoderConfig(
        d_in=int(d_in),
        d_out=int(d_out),
        width=int(width),
        kind=kind,
        activation=ARCHITECTURES[arch],  # type: ignore[arg-type]
        k=k if arch != "jump_relu" else None,
        pre_encoder_bias=False,
    )
    coder = SparseCoder(cfg)
    with torch.no_grad():
        coder.w_enc.copy_(w_enc)
        coder.w_dec.copy_(w_dec)
        coder.b_enc.copy_(params["b_enc"])
        coder.b_dec.copy_(params["b_dec"])
        if coder.log_threshold is not None:
            # θ = 0 (a ReLU saved as JumpReLU) becomes log θ = −inf, which exp() maps back exactly.
            coder.log_threshold.copy_(params["threshold"].float().log())
        if coder.w_skip is not None:
            coder.w_skip.copy_(params["affine_skip_connection"])
    return coder


# ---- multi-layer folders (cross-layer transcoders, crosscoders) ----------------------------------

CLT_FILE = "params_layer_{}.safetensors"


def is_multilayer_folder(folder: Path) -> bool:
    """Whether a folder holds a Gemma Scope 2 multi-layer coder (`params_layer_0.safetensors`, ...)."""
    return (folder / CLT_FILE.format(0)).is_file()


def _check_finite(name: str, t: Tensor, path: Path) -> None:
    if not t.is_floating_point() or not bool(torch.isfinite(t.float()).all()):
        raise OpenscopeError(f"{name} in {path} contains NaN/inf or is not floating point")


def save_clt(
    clt: CrossLayerCoder,
    folder: str | Path,
    *,
    hook_point_in: str,
    hook_point_out: str,
    model_name: str,
    l0: float | None = None,
    provenance: dict[str, Any] | None = None,
    layers: Sequence[int] | None = None,
    site_kind: str | None = None,
) -> Path:
    """Write a CLT or a crosscoder in the Gemma Scope 2 multi-layer layout; returns the folder.

    One `params_layer_{i}.safetensors` per input layer i: w_enc [d_in, F], b_enc [F], threshold [F],
    w_dec [F, L, d_out] (all L target layers, zeros where m < i, as Gemma Scope 2 stores them), b_dec
    [d_out] (the bias of output layer i), affine_skip_connection [d_in, d_out] when the CLT has a skip.
    config.json's hook points name the sites of the coder's first layer; `layers` (the model layers, one
    per coder layer) and `site_kind` are written when given (a crosscoder's chosen layers).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = clt.cfg
    n = cfg.n_layers
    if layers is not None and len(layers) != n:
        raise OpenscopeError(f"a {n}-layer {clt.kind} names {n} layers, got {list(layers)}")
    config: dict[str, Any] = {
        "hf_hook_point_in": hook_point_in,
        "hf_hook_point_out": hook_point_out,
        "width": cfg.width,
        "n_layers": n,
        "model_name": model_name,
        "architecture": "jump_relu",
        "l0": l0,
        "affine_connection": cfg.skip,
        "type": clt.kind,
    }
    if layers is not None:
        config["layers"] = [int(i) for i in layers]
    if site_kind is not None:
        config["site_kind"] = site_kind
    for key, value in (provenance or {}).items():
        if key in config:
            raise OpenscopeError(f"provenance key {key!r} would overwrite a standard config.json field")
        config[key] = value
    with torch.no_grad():
        threshold = clt.threshold() if clt.log_threshold is not None else torch.zeros(n, cfg.width)
        for src in range(n):
            w_dec = torch.zeros(cfg.width, n, cfg.d_out)
            w_dec[:, src:] = clt.w_dec[src].detach().cpu()
            tensors = {
                "w_enc": clt.w_enc[src],
                "b_enc": clt.b_enc[src],
                "threshold": threshold[src],
                "w_dec": w_dec,
                "b_dec": clt.b_dec[src],
            }
            if clt.w_skip is not None:
                tensors["affine_skip_connection"] = clt.w_skip[src]
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
            path = folder / CLT_FILE.format(src)
            tmp = path.with_name(path.name + ".tmp")
            safetensors.torch.save_file(tensors, str(tmp))
            tmp.replace(path)
    save_json(folder / CONFIG_FILE, config)
    log.info("saved %s (%d layers x %d latents) to %s", clt.kind, n, cfg.width, folder)
    return folder


def load_clt(folder: str | Path, config: dict[str, Any] | None = None) -> CrossLayerCoder:
    """Load a Gemma Scope 2 multi-layer folder into a CrossLayerCoder (CPU, float32): a crosscoder when
    config.json's `type` says so, else a CLT.

    Layers are the files params_layer_0 .. params_layer_{L−1} (no gaps); see `clt_from_layers`.
    """
    folder = Path(folder)
    if config is None:
        config = read_coder_config(folder) if (folder / CONFIG_FILE).is_file() else {}
    n = 0
    while (folder / CLT_FILE.format(n)).is_file():
        n += 1
    extra = sorted(p.name for p in folder.glob("params_layer_*.safetensors"))
    if n == 0 or len(extra) != n:
        raise OpenscopeError(
            f"{folder} must hold params_layer_0 .. params_layer_{{L-1}}.safetensors without gaps; found {', '.join(extra) or 'none'}"
        )
    paths = [folder / CLT_FILE.format(i) for i in range(n)]
    return clt_from_layers([read_safetensors(p) for p in paths], config, paths)


def clt_from_layers(
    layers: Sequence[dict[str, Tensor]], config: dict[str, Any], paths: Sequence[Path]
) -> CrossLayerCoder:
    """A CrossLayerCoder (CPU, float32) from one Gemma Scope 2 tensor set per input layer i (w_enc
    [d_in, F], b_enc, threshold, w_dec, b_dec, optional affine_skip_connection); `paths` name each
    layer's file in error messages.

    w_dec may hold all L target layers (Gemma Scope 2; entries for targets m < i are ignored: a latent
    never writes backwards) or only the L − i layers from i on. config's `width` may count one layer's
    latents (as openscope writes it) or all of them (as Gemma Scope 2 does).
    """
    folder = paths[0].parent
    arch = config.get("architecture", "jump_relu")
    if arch != "jump_relu":
        raise OpenscopeError(f"unsupported architecture {arch!r} for the multi-layer coder in {folder}")
    n = len(layers)
    affine = bool(config.get("affine_connection", False))
    first = paths[0]
    if "w_enc" not in layers[0] or layers[0]["w_enc"].ndim != 2:
        raise OpenscopeError(f"{first} needs a 2-D w_enc [d_in, width]")
    d_in, width = layers[0]["w_enc"].shape
    if "b_dec" not in layers[0] or layers[0]["b_dec"].ndim != 1:
        raise OpenscopeError(f"{first} needs a 1-D b_dec [d_out]")
    d_out = layers[0]["b_dec"].shape[0]
    affine = affine or "affine_skip_connection" in layers[0]
    if "width" in config and config["width"] not in (width, n * width):
        raise OpenscopeError(f"the config of {folder} says width {config['width']}, weights have {width}")
    kind = "crosscoder" if config.get("type") == "crosscoder" else "clt"
    if kind == "crosscoder" and (affine or d_in != d_out):
        raise OpenscopeError(
            f"the crosscoder in {folder} must reconstruct what it reads: no affine_skip_connection and "
            f"d_in = d_out (it has {'a skip, ' if affine else ''}{d_in} -> {d_out})"
        )
    clt = CrossLayerCoder(
        CLTConfig(n_layers=n, d_in=int(d_in), d_out=int(d_out), width=int(width), skip=affine, kind=kind)
    )
    required = ["w_enc", "b_enc", "threshold", "w_dec", "b_dec"] + (
        ["affine_skip_connection"] if affine else []
    )
    with torch.no_grad():
        for i, params in enumerate(layers):
            path = paths[i]
            missing = [k for k in required if k not in params]
            if missing:
                raise OpenscopeError(f"{path} is missing {', '.join(missing)}")
            w_dec = params["w_dec"]
            if w_dec.ndim != 3 or w_dec.shape[1] not in (n, n - i):
                raise OpenscopeError(
                    f"w_dec in {path} has shape {list(w_dec.shape)}, expected [{width}, {n} (or {n - i}), {d_out}]"
                )
            _expect_shape("w_dec", w_dec, (width, w_dec.shape[1], d_out), path)
            _expect_shape("w_enc", params["w_enc"], (d_in, width), path)
            _expect_shape("b_enc", params["b_enc"], (width,), path)
            _expect_shape("threshold", params["threshold"], (width,), path)
            _expect_shape("b_dec", params["b_dec"], (d_out,), path)
            if affine:
                _expect_shape("affine_skip_connection", params["affine_skip_connection"], (d_in, d_out), path)
            for name in required:
                _check_finite(name, params[name], path)
            if bool((params["threshold"] < 0).any()):
                raise OpenscopeError(f"threshold in {path} has negative values")
            clt.w_enc[i].copy_(params["w_enc"])
            clt.b_enc[i].copy_(params["b_enc"])
            clt.b_dec[i].copy_(params["b_dec"])
            assert clt.log_threshold is not None
            clt.log_threshold[i].copy_(params["threshold"].float().log())
            clt.w_dec[i].copy_(w_dec[:, w_dec.shape[1] - (n - i) :])
            if clt.w_skip is not None:
                clt.w_skip[i].copy_(params["affine_skip_connection"])
    return clt
