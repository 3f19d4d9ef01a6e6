"""Read sparsify (EleutherAI) folders: `cfg.json` + `sae.safetensors`, one folder per hook point.

The layout `SparseCoder.save_to_disk` writes (EleutherAI/sparsify, `sparse_coder.py` and `config.py`):
cfg.json is the `SparseCoderConfig` flat plus `d_in` — `activation` ("topk" or "groupmax"),
`expansion_factor`, `num_latents` (0 = d_in × expansion_factor), `k`, `normalize_decoder`,
`multi_topk`, `skip_connection`, `transcode`; sae.safetensors holds `encoder.weight` [F, d_in],
`encoder.bias` [F], `W_dec` [F, d_out], `b_dec` [d_out] and, with a skip connection, `W_skip`
[d_out, d_in]. Encoding is TopK of ReLU(x̃ Wᵀ + b) with x̃ = x − b_dec for an SAE and x itself for a
transcoder; decoding is Σ f W_dec + b_dec (+ x W_skipᵀ). TopK of ReLU equals our ReLU of TopK, the
input bias is folded into b_enc, and W_skip is transposed into affine_skip_connection. "groupmax"
(the largest latent of each of k groups) has no openscope equivalent and is refused. `multi_topk` only
changes training (its forward then reconstructs from the top 4k latents for the Multi-TopK loss);
`encode` keeps k latents, and that is what is read.

sparsify names each folder after its hook point, a module of the base model: `layers.9` (the block's
output, our resid_post), `layers.9.mlp` (a transcoder reads the module's input and predicts its
output: mlp_in → mlp_out). The hook points written to the config are those module paths under
`model.` (`model.layers.9.mlp.input` / `.output`), read like any Hugging Face hook point; for a model
whose modules differ (Gemma's MLP output is normalised once more before the residual), pass the sites.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openscope.coders.io import coder_from_tensors
from openscope.coders.peers.common import (
    PeerCoder,
    expect,
    fold_input_bias,
    positive_int,
    read_json,
    read_tensors,
    require,
)
from openscope.errors import OpenscopeError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def is_sparsify_folder(folder: Path) -> bool:
    """A folder with sparsify's cfg.json and sae.safetensors."""
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _hook_point(folder: Path) -> str:
    name = folder.name
    return name if name.startswith("model.") else f"model.{name}"


def read_sparsify(folder: Path) -> PeerCoder:
    """A sparsify folder as a coder (module docstring)."""
    cfg_path, path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = read_json(cfg_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise OpenscopeError(
            f"{cfg_path}: sparsify activation {activation!r} has no openscope equivalent (only topk is read)"
        )
    d_in, k = positive_int(cfg, "d_in", cfg_path), positive_int(cfg, "k", cfg_path)
    num_latents = cfg.get("num_latents") or d_in * positive_int(cfg, "expansion_factor", cfg_path)
    transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    w = read_tensors(path)
    keys = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
    require(w, keys, path, "sparsify sparse coder")
    d_out = int(w["b_dec"].shape[0]) if w["b_dec"].ndim == 1 else -1
    source = f"cfg.json (d_in={d_in}, {num_latents} latents)"
    expect("encoder.weight", w["encoder.weight"], (num_latents, d_in), path, source)
    expect("encoder.bias", w["encoder.bias"], (num_latents,), path, source)
    expect("W_dec", w["W_dec"], (num_latents, d_out), path, f"{source} and b_dec [{d_out}]")
    if not transcode:
        expect("b_dec", w["b_dec"], (d_in,), path, source)
    if skip:
        expect("W_skip", w["W_skip"], (d_out, d_in), path, f"{source} and b_dec [{d_out}]")
    w_enc = w["encoder.weight"].t()
    b_enc = w["encoder.bias"] if transcode else fold_input_bias(w_enc, w["encoder.bias"], w["b_dec"])
    params = {"w_enc": w_enc, "w_dec": w["W_dec"], "b_enc": b_enc, "b_dec": w["b_dec"]}
    if skip:
        params["affine_skip_connection"] = w["W_skip"].t()
    hook = _hook_point(folder)
    config: dict[str, Any] = {
        "format": "sparsify",
        "architecture": "topk",
        "k": k,
        # An SAE with a skip connection reads and writes one site: a skip-transcoder onto its own input.
        "type": "transcoder" if transcode or skip else "sae",
        "affine_connection": skip,
        "width": num_latents,
        "hf_hook_point_in": f"{hook}.input" if transcode else f"{hook}.output",
        "hf_hook_point_out": f"{hook}.output",
        "model_name": cfg.get("model_name"),
        "sparsify": {k: cfg[k] for k in sorted(cfg) if k != "d_in"},
    }
    return PeerCoder(coder_from_tensors(params, config, path), config, folder.name)
