"""What every peer-format reader shares: the result type, key and shape checks, JSON/YAML reading, and
the refusal of pickles.

Each reader turns a peer's folder into Gemma Scope tensors (w_enc [d_in, F], w_dec [F, d_out], b_enc,
b_dec, threshold, optional affine_skip_connection [d_in, d_out]) and a config.json-style dict, and
`openscope.coders.io.coder_from_tensors` (or `clt_from_layers`) makes the checked coder; the config's
`hf_hook_point_in/out` and `model_name` then bind it to sites like any Gemma Scope folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from torch import Tensor

from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import SparseCoder
from openscope.coders.io import read_safetensors
from openscope.errors import OpenscopeError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")
"""File endings of Python pickles (torch.save, pickle, joblib): never unpickled, except dictionary_learning's
`ae.pt` through torch.load(weights_only=True)."""


class PeerCoder(NamedTuple):
    """A coder read from a peer's folder."""

    coder: SparseCoder | CrossLayerCoder
    """The coder, taking and returning raw activations (CPU, float32)."""
    config: dict[str, Any]
    """config.json-style facts: format, hf_hook_point_in/out, model_name, width, the peer's own config."""
    name: str
    """A short label (the folder name; `folder/layer_3` for one layer of a circuit-tracer set)."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file (one-line errors when missing or malformed)."""
    if not path.is_file():
        raise OpenscopeError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenscopeError(f"{path} is not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise OpenscopeError(f"{path} must hold a JSON object")
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file, read with the safe loader (no Python objects)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise OpenscopeError(f"{path} is not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict):
        raise OpenscopeError(f"{path} must hold a YAML mapping")
    return data


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors, floating ones as float32 (peers save bf16/fp16 too)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in read_safetensors(path).items()}


def require(tensors: dict[str, Tensor], keys: list[str], path: Path, what: str) -> None:
    """Every key present, else one line naming the missing ones and the format that needs them."""
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise OpenscopeError(f"{path} is missing {', '.join(missing)} (a {what} needs {', '.join(keys)})")


def expect(name: str, t: Tensor, shape: tuple[int, ...], path: Path, source: str) -> None:
    """A tensor has the shape its config says (source: where that shape comes from)."""
    if tuple(t.shape) != shape:
        raise OpenscopeError(f"{name} in {path} has shape {list(t.shape)}, but {source} says {list(shape)}")


def positive_int(config: dict[str, Any], key: str, path: Path) -> int:
    """config[key] as a positive integer (one-line error otherwise)."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OpenscopeError(f"{path} needs a positive integer {key}, got {value!r}")
    return value


def fold_input_bias(w_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """The encoder bias that makes x W + b' equal (x − b_dec) W + b: b' = b − b_dec W."""
    return b_enc - b_dec @ w_enc


def jumprelu_threshold(threshold: Tensor) -> Tensor:
    """Peers compute ReLU(z)·1[z > θ] (SAELens, dictionary_learning): for θ < 0 that is ReLU, i.e. θ = 0."""
    return threshold.clamp_min(0.0)


def pickles_in(folder: Path) -> list[str]:
    """Names of the pickle files in a folder (none are ever opened)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def refuse_pickles(folder: Path) -> None:
    """The error for a folder whose weights are only pickles."""
    found = pickles_in(folder)
    if found:
        raise OpenscopeError(
            f"{folder} holds only pickled weights ({', '.join(found[:3])}); openscope never unpickles files "
            "(they can run code): save them as safetensors"
        )
