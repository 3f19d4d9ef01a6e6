"""Save and load single-layer dictionaries in the Gemma Scope 2 folder layout (DESIGN §4).

A folder holds `params.safetensors` (w_enc [d_in, d_sae], w_dec [d_sae, d_out], b_enc, b_dec,
threshold, optional affine_skip_connection [d_in, d_out]) and `config.json` (hf_hook_point_in,
hf_hook_point_out, width, model_name, architecture, l0, affine_connection, type, plus provenance).
Saved weights are folded: they take raw activations. Nothing is ever unpickled: safetensors + JSON.

architecture is "jump_relu" (JumpReLU, and ReLU saved exactly as JumpReLU with θ = 0); TopK and
BatchTopK coders are saved as "topk"/"batch_topk" with their `k` (convert them with
`topk_to_jumprelu` first for a file every Gemma Scope reader understands).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

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


def _read_params(folder: Path) -> dict[str, Tensor]:
    path = folder / PARAMS_FILE
    if not path.is_file():
        raise OpenscopeError(f"missing {PARAMS_FILE} in coder folder {folder}")
    try:
        # safetensors parses a header and raw bytes only: no code runs, nothing is unpickled.
        return safetensors.torch.load(path.read_bytes())
    except Exception as exc:  # the parser raises its own error types for every kind of damage
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise OpenscopeError(f"{path} is truncated or corrupt ({reason})") from None


def _expect_shape(name: str, t: Tensor, shape: tuple[int, ...], path: Path) -> None:
    if tuple(t.shape) != shape:
        raise OpenscopeError(f"{name} in {path} has shape {list(t.shape)}, expected {list(shape)}")


def load_coder(folder: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
    """Load a coder folder into a (folded, raw-activation) SparseCoder in float32."""
    folder = Path(folder)
    config = read_coder_config(folder)
    arch = config.get("architecture", "jump_relu")
    if arch not in ARCHITECTURES:
        raise OpenscopeError(f"unsupported architecture {arch!r} in {folder / CONFIG_FILE}")
    ctype = config.get("type", "sae")
    if ctype not in ("sae", "transcoder"):
        raise OpenscopeError(
            f"unsupported coder type {ctype!r} in {folder / CONFIG_FILE} (sae or transcoder)"
        )
    affine = bool(config.get("affine_connection", False))

    params = _read_params(folder)
    path = folder / PARAMS_FILE
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
        raise OpenscopeError(f"config.json in {folder} says width {config['width']}, weights have {width}")
    for name in required:
        t = params[name]
        if not t.is_floating_point() or not bool(torch.isfinite(t.float()).all()):
            raise OpenscopeError(f"{name} in {path} contains NaN/inf or is not floating point")
    if "threshold" in required and bool((params["threshold"] < 0).any()):
        raise OpenscopeError(f"threshold in {path} has negative values")

    kind = "sae" if ctype == "sae" else ("skip_transcoder" if affine else "transcoder")
    k = config.get("k")
    if arch != "jump_relu" and not (isinstance(k, int) and k >= 1):
        raise OpenscopeError(f"{arch} coder in {folder} needs a positive integer k in config.json")
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
    return coder.to(device)
