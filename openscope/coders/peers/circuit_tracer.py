"""Read circuit-tracer's native transcoder folders: a per-layer transcoder set or a cross-layer transcoder.

The layouts are the ones `openscope.coders.export.circuit_tracer` writes (its docstring has the
details, learned from circuit-tracer 0.5's loaders): `config.yaml` {`model_kind`, `model_name`,
`feature_input_hook`, `feature_output_hook`, optional `transcoders` list} and

- `transcoder_set`: `layer_{i}.safetensors` with `W_enc` [F, d_in], `W_dec` [F, d_out], `b_enc`,
  `b_dec`, `activation_function.threshold` [F] (JumpReLU: z·1[z > θ]; absent: ReLU) and `W_skip`
  [d_out, d_in] (skip-transcoders). Each layer is a dictionary of its own: `find_dictionaries` lists
  the files, and `load_dictionary(folder / "layer_3.safetensors")` loads layer 3.
- `cross_layer_transcoder`: `W_enc_{i}.safetensors` {`W_enc_{i}` [F, d_in], `b_enc_{i}`, `b_dec_{i}`,
  `threshold_{i}`} and `W_dec_{i}.safetensors` {`W_dec_{i}` [F, L − i, d_out]} for i = 0..L−1.

The hooks are TransformerLens names at each layer (`blocks.{i}.` + `mlp.hook_in` / `hook_mlp_out`).
A `transcoders:` list naming Hub files (hf://...) is not followed: load those files by Hub reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from openscope.coders.io import clt_from_layers, coder_from_tensors
from openscope.coders.peers.common import PeerCoder, read_tensors, read_yaml, require
from openscope.errors import OpenscopeError

CONFIG_FILE = "config.yaml"
KINDS = ("transcoder_set", "cross_layer_transcoder")
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors$")


def is_circuit_tracer_folder(folder: Path) -> bool:
    """A folder with a config.yaml and circuit-tracer's transcoder files."""
    if not (folder / CONFIG_FILE).is_file():
        return False
    return (folder / "layer_0.safetensors").is_file() or (folder / "W_enc_0.safetensors").is_file()


def _config(folder: Path) -> dict[str, Any]:
    config = read_yaml(folder / CONFIG_FILE)
    kind = config.get("model_kind")
    if kind not in KINDS:
        raise OpenscopeError(f"{folder / CONFIG_FILE}: model_kind {kind!r} is not one of {', '.join(KINDS)}")
    listed = config.get("transcoders")
    if isinstance(listed, list) and any(str(p).startswith("hf://") for p in listed):
        raise OpenscopeError(
            f"{folder / CONFIG_FILE} lists transcoders on the Hub; load them by their hf:// folder instead"
        )
    return config


def _hooks(config: dict[str, Any], layer: int) -> tuple[str, str]:
    hook_in = str(config.get("feature_input_hook", "mlp.hook_in"))
    hook_out = str(config.get("feature_output_hook", "hook_mlp_out"))
    return f"blocks.{layer}.{hook_in}", f"blocks.{layer}.{hook_out}"


def layer_files(folder: Path) -> list[Path]:
    """The layer files of a transcoder set, in layer order (0..N−1, no gaps), or [] for a CLT."""
    config = _config(folder)
    if config["model_kind"] != "transcoder_set":
        return []
    listed = config.get("transcoders")
    if isinstance(listed, list):
        return [folder / str(p) for p in listed]
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _LAYER_FILE.match(p.name)))
    layers = [i for i, _ in found]
    if layers != list(range(len(layers))):
        raise OpenscopeError(
            f"{folder} must hold layer_0 .. layer_{{N-1}}.safetensors without gaps; has {layers}"
        )
    return [p for _, p in found]


def read_transcoder_layer(path: Path) -> PeerCoder:
    """One layer file of a circuit-tracer transcoder set as a coder."""
    folder = path.parent
    config_yaml = _config(folder)
    files = layer_files(folder)
    if path not in files:
        raise OpenscopeError(f"{path} is not one of the layer files config.yaml lists in {folder}")
    layer = files.index(path)
    w = read_tensors(path)
    require(w, ["W_enc", "W_dec", "b_enc", "b_dec"], path, "circuit-tracer transcoder layer")
    threshold = w.get("activation_function.threshold")
    width = int(w["b_enc"].shape[0]) if w["b_enc"].ndim == 1 else -1
    params = {
        "w_enc": w["W_enc"].t(),
        "w_dec": w["W_dec"],
        "b_enc": w["b_enc"],
        "b_dec": w["b_dec"],
        "threshold": torch.zeros(max(width, 0)) if threshold is None else threshold.reshape(-1),
    }
    if "W_skip" in w:
        params["affine_skip_connection"] = w["W_skip"].t()
    hook_in, hook_out = _hooks(config_yaml, layer)
    config: dict[str, Any] = {
        "format": "circuit-tracer",
        "architecture": "jump_relu",
        "type": "transcoder",
        "affine_connection": "W_skip" in w,
        "hf_hook_point_in": hook_in,
        "hf_hook_point_out": hook_out,
        "model_name": config_yaml.get("model_name"),
        "circuit_tracer": {"model_kind": "transcoder_set", "layer": layer},
    }
    coder = coder_from_tensors(params, config, path)
    config["width"] = coder.cfg.width
    return PeerCoder(coder, config, f"{folder.name}/layer_{layer}")


def read_clt(folder: Path) -> PeerCoder:
    """A circuit-tracer cross-layer transcoder folder as a CrossLayerCoder."""
    config_yaml = _config(folder)
    n = 0
    while (folder / f"W_enc_{n}.safetensors").is_file():
        n += 1
    if n == 0:
        raise OpenscopeError(f"{folder} holds no W_enc_0.safetensors")
    layers: list[dict[str, Tensor]] = []
    paths = []
    for i in range(n):
        enc_path, dec_path = folder / f"W_enc_{i}.safetensors", folder / f"W_dec_{i}.safetensors"
        enc = read_tensors(enc_path)
        require(enc, [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"], enc_path, "circuit-tracer CLT encoder file")
        if not dec_path.is_file():
            raise OpenscopeError(f"{folder} has {enc_path.name} but no {dec_path.name}")
        dec = read_tensors(dec_path)
        require(dec, [f"W_dec_{i}"], dec_path, "circuit-tracer CLT decoder file")
        b_enc = enc[f"b_enc_{i}"]
        threshold = enc.get(f"threshold_{i}")
        layers.append(
            {
                "w_enc": enc[f"W_enc_{i}"].t(),
                "b_enc": b_enc,
                "threshold": torch.zeros(b_enc.shape) if threshold is None else threshold.reshape(-1),
                "w_dec": dec[f"W_dec_{i}"],
                "b_dec": enc[f"b_dec_{i}"],
            }
        )
        paths.append(enc_path)
    hook_in, hook_out = _hooks(config_yaml, 0)
    config: dict[str, Any] = {
        "format": "circuit-tracer",
        "architecture": "jump_relu",
        "type": "clt",
        "affine_connection": False,
        "hf_hook_point_in": hook_in,
        "hf_hook_point_out": hook_out,
        "model_name": config_yaml.get("model_name"),
        "circuit_tracer": {"model_kind": "cross_layer_transcoder"},
    }
    clt = clt_from_layers(layers, config, paths)
    config["width"] = clt.cfg.width
    return PeerCoder(clt, config, folder.name)
