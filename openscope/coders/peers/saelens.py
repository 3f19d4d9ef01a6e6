"""Read SAELens folders: `cfg.json` + `sae_weights.safetensors` (SAELens 6.x, and the older flat
configs that SAELens itself upgrades).

The SAELens folder, as `SAE.save_model` writes it (sae_lens 6.54; key names from its `SAEConfig` and
SAE classes): cfg.json holds `architecture`, `d_in`, `d_sae` (+ `d_out` for transcoders), `k` and
`rescale_acts_by_decoder_norm` (topk), `apply_b_dec_to_input`, `normalize_activations`,
`reshape_activations` and `metadata` {`model_name`, `hook_name`, `hook_head_index`, `hf_hook_name`,
`hook_name_out`, `hf_hook_name_out`, ...}; the weights are `W_enc` [d_in, F], `W_dec` [F, d_out],
`b_enc` [F], `b_dec` [d_out], plus `threshold` [F] (JumpReLU), `W_skip` [d_out, d_in] (skip
transcoders), `b_gate`, `b_mag`, `r_mag` [F] (gated, whose encoder has no `b_enc`).

Every inference architecture SAELens saves becomes a `SparseCoder` with the same latents and outputs:

- standard (ReLU), jumprelu (ReLU(z)·1[z > θ]), topk (with `rescale_acts_by_decoder_norm` folded:
  W_enc, b_enc times ‖W_dec row‖, W_dec rows over it);
- gated: f = 1[x̃W + b_gate > 0]·ReLU(x̃W·e^r + b_mag) is a JumpReLU with W' = W·e^r, b' = b_mag and
  θ = max(b_mag − e^r·b_gate, 0);
- transcoder, skip_transcoder (ReLU), jumprelu_transcoder, jumprelu_skip_transcoder (W_skip
  transposed into our affine_skip_connection [d_in, d_out]).

`apply_b_dec_to_input` (x − b_dec before the encoder) is folded into b_enc. `normalize_activations`:
"none", "expected_average_only_in" and "covariance_whitening" are identities when SAELens loads a
folder (it folds them before saving), so they are here; the per-token "constant_norm_rescale" and
"layer_norm" have no equivalent in a fixed linear coder and are refused, as are abstopk, temporal,
matching-pursuit and training-only (batchtopk, matryoshka) checkpoints, and single-head SAEs.
The sites come from `metadata.hf_hook_name` (the exact Hugging Face module) or else `hook_name`
(TransformerLens), and `_out` of each for transcoders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from openscope.coders.io import coder_from_tensors
from openscope.coders.peers.common import (
    PeerCoder,
    expect,
    fold_input_bias,
    jumprelu_threshold,
    positive_int,
    read_json,
    read_tensors,
    require,
)
from openscope.errors import OpenscopeError

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SUPPORTED = (
    "standard",
    "jumprelu",
    "topk",
    "gated",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)
_REFUSED = {
    "abstopk": "keeps the k largest |z| with their signs",
    "temporal": "attends over earlier tokens",
    "matching_pursuit": "encodes by iterative matching pursuit",
    "batchtopk": "is a training checkpoint (SAELens saves the inference model as jumprelu)",
    "matryoshka_batchtopk": "is a training checkpoint (SAELens saves the inference model as jumprelu)",
}
_IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")


def is_saelens_folder(folder: Path) -> bool:
    """A folder with SAELens's cfg.json and sae_weights.safetensors."""
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _meta(cfg: dict[str, Any], key: str) -> Any:
    """A metadata field of a 6.x config, else the same field at the top (older flat configs)."""
    meta = cfg.get("metadata")
    value = meta.get(key) if isinstance(meta, dict) else None
    return value if value is not None else cfg.get(key)


def _architecture(cfg: dict[str, Any], path: Path) -> str:
    arch = cfg.get("architecture")
    if arch is None:  # configs older than SAELens 6: standard, or topk through activation_fn
        activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if activation == "topk" and isinstance(kwargs, dict) and "k" in kwargs:
            cfg["k"] = kwargs["k"]
            return "topk"
        return "standard"
    if arch in _REFUSED:
        raise OpenscopeError(
            f"{path}: SAELens architecture {arch!r} {_REFUSED[arch]}; openscope cannot read it"
        )
    if arch not in SUPPORTED:
        raise OpenscopeError(
            f"{path}: unknown SAELens architecture {arch!r} (openscope reads {', '.join(SUPPORTED)})"
        )
    return str(arch)


def _normalisation(cfg: dict[str, Any], path: Path) -> None:
    norm = cfg.get("normalize_activations", "none")
    if norm is None or norm is False:
        norm = "none"
    if norm is True:
        norm = "expected_average_only_in"
    if norm not in _IDENTITY_NORMS:
        raise OpenscopeError(
            f"{path}: normalize_activations={norm!r} rescales every token by its own norm, which a "
            "fixed linear coder cannot represent; openscope refuses it"
        )
    if norm != "none":
        log.warning("%s: normalize_activations=%s is not applied when loading (as in SAELens)", path, norm)


def read_saelens(folder: Path) -> PeerCoder:
    """A SAELens folder as a coder (module docstring)."""
    cfg_path, path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = read_json(cfg_path)
    arch = _architecture(cfg, cfg_path)
    _normalisation(cfg, cfg_path)
    if _meta(cfg, "hook_head_index") is not None:
        raise OpenscopeError(f"{cfg_path}: SAEs of a single attention head are not supported")
    d_in, d_sae = positive_int(cfg, "d_in", cfg_path), positive_int(cfg, "d_sae", cfg_path)
    transcoder = "transcoder" in arch
    d_out = positive_int(cfg, "d_out", cfg_path) if transcoder else d_in
    w = read_tensors(path)
    encoder = ["b_gate", "b_mag", "r_mag"] if arch == "gated" else ["b_enc"]
    keys = ["W_enc", "W_dec", "b_dec", *encoder]
    keys += ["threshold"] if arch.startswith("jumprelu") else []
    keys += ["W_skip"] if "skip" in arch else []
    require(w, keys, path, f"SAELens {arch} SAE")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in)}
    shapes |= {k: (d_sae,) for k in ("b_enc", "threshold", "b_gate", "b_mag", "r_mag")}
    for key in keys:
        expect(key, w[key], shapes[key], path, f"cfg.json (d_in={d_in}, d_sae={d_sae}, d_out={d_out})")

    w_enc, w_dec, b_dec = w["W_enc"], w["W_dec"], w["b_dec"]
    if "finetuning_scaling_factor" in w:  # pre-6 SAELens scaled the latents before decoding
        w_dec = w_dec * w["finetuning_scaling_factor"].reshape(-1, 1)
    threshold: Tensor | None = jumprelu_threshold(w["threshold"]) if "threshold" in w else None
    if arch == "gated":
        scale = w["r_mag"].exp()
        w_enc, b_enc = w_enc * scale, w["b_mag"]
        threshold = jumprelu_threshold(w["b_mag"] - scale * w["b_gate"])
    else:
        b_enc = w["b_enc"]
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", not transcoder))
    if apply_b_dec and transcoder:
        raise OpenscopeError(
            f"{cfg_path}: apply_b_dec_to_input is not possible for a transcoder (d_out ≠ d_in)"
        )
    if apply_b_dec:
        b_enc = fold_input_bias(w_enc, b_enc, b_dec)
    k = None
    if arch == "topk":
        k = positive_int(cfg, "k", cfg_path)
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = w_dec.norm(dim=-1)
            if not bool((norms > 0).all()):
                raise OpenscopeError(f"{path}: W_dec has zero rows, so its norms cannot be folded")
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    if arch in ("standard", "transcoder", "skip_transcoder"):
        threshold = torch.zeros(d_sae)  # ReLU = JumpReLU with θ = 0
    params = {"w_enc": w_enc, "w_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec}
    if threshold is not None:
        params["threshold"] = threshold
    if "skip" in arch:
        params["affine_skip_connection"] = w["W_skip"].t()

    hook_in = _meta(cfg, "hf_hook_name") or _meta(cfg, "hook_name") or _meta(cfg, "hook_point")
    hook_out = (_meta(cfg, "hf_hook_name_out") or _meta(cfg, "hook_name_out")) if transcoder else hook_in
    config: dict[str, Any] = {
        "format": "saelens",
        "architecture": "topk" if k is not None else "jump_relu",
        "type": "transcoder" if transcoder else "sae",
        "affine_connection": "skip" in arch,
        "width": d_sae,
        "hf_hook_point_in": hook_in,
        "hf_hook_point_out": hook_out,
        "model_name": _meta(cfg, "model_name"),
        "saelens": {"architecture": arch, "apply_b_dec_to_input": apply_b_dec},
    }
    if k is not None:
        config["k"] = k
    coder = coder_from_tensors(params, config, path)
    return PeerCoder(coder, config, folder.name)
