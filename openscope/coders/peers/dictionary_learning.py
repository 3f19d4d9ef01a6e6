"""Read dictionary_learning (saprmarks) folders: `ae.pt` (a state dict) + `config.json`.

`ae.pt` is the only pickle openscope opens, and only through `torch.load(weights_only=True)`, whose
restricted unpickler builds tensors and plain containers and refuses anything else (a file that would
run code is an error, never executed). config.json is `{"trainer": {...}, "buffer": {...}}`; the
trainer's `dict_class`, `activation_dim`, `dict_size`, `k`, `layer`, `lm_name` and `submodule_name`
are read. The state-dict keys of each class (dictionary_learning's `dictionary.py` and `trainers/`):

- AutoEncoder: `bias` [D], `encoder.weight` [F, D], `encoder.bias` [F], `decoder.weight` [D, F];
  f = ReLU(W(x − bias) + b), x̂ = Df + bias. Its `from_pretrained` rescales the decoder columns to unit
  norm (encoder rows and bias times the norms); that rescaling is applied here too.
- AutoEncoderNew: `encoder.weight`, `encoder.bias`, `decoder.weight`, `decoder.bias`; no input bias.
- GatedAutoEncoder: `decoder_bias`, `encoder.weight`, `r_mag`, `gate_bias`, `mag_bias`,
  `decoder.weight` — a JumpReLU exactly as SAELens's gated SAE (see `peers.saelens`).
- JumpReluAutoEncoder: `W_enc` [D, F], `b_enc`, `W_dec` [F, D], `b_dec`, `threshold`.
- AutoEncoderTopK: `encoder.*`, `decoder.weight`, `b_dec`, `k`, `threshold`; TopK of ReLU(W(x − b_dec) + b).
- BatchTopKSAE and MatryoshkaBatchTopKSAE (`W_enc` [D, F], `b_enc`, `W_dec`, `b_dec`, `k`,
  `threshold`, `group_sizes`): their inference encoding keeps ReLU(z) above the one learned threshold,
  a JumpReLU with θ = max(threshold, 0) for every latent.

The site comes from `submodule_name` when it names a site kind (`resid_post_layer_3`) with `layer`, or
from the arguments of `load_dictionary`.
"""

from __future__ import annotations

import pickle
import re
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
    read_json,
    require,
)
from openscope.errors import OpenscopeError
from openscope.models.sites import SITE_KINDS

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
_KEYS = {
    "AutoEncoder": ["bias", "encoder.weight", "encoder.bias", "decoder.weight"],
    "AutoEncoderNew": ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"],
    "GatedAutoEncoder": [
        "decoder_bias",
        "encoder.weight",
        "r_mag",
        "gate_bias",
        "mag_bias",
        "decoder.weight",
    ],
    "JumpReluAutoEncoder": ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"],
    "AutoEncoderTopK": ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"],
    "BatchTopKSAE": ["encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"],
    "MatryoshkaBatchTopKSAE": ["W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"],
}


def is_dictionary_learning_folder(folder: Path) -> bool:
    """A folder with dictionary_learning's ae.pt."""
    return (folder / WEIGHTS_FILE).is_file()


def load_state(path: Path) -> dict[str, Tensor]:
    """ae.pt's tensors through torch.load(weights_only=True): anything but tensors is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise OpenscopeError(
            f"{path} is not a plain state dict of tensors; refusing to unpickle it ({reason})"
        ) from None
    except (EOFError, OSError, ValueError) as exc:
        raise OpenscopeError(f"{path} is truncated or corrupt ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise OpenscopeError(f"{path} must hold a state dict (tensor name -> tensor)")
    return {str(k): v.float() if v.is_floating_point() else v for k, v in state.items()}


def _dict_class(trainer: dict[str, Any], state: dict[str, Tensor], path: Path) -> str:
    name = trainer.get("dict_class")
    if name is None:  # no config.json: the keys tell the class, unless they fit several (TopK, BatchTopK)
        keys = set(state)
        fits = [c for c, need in _KEYS.items() if set(need) <= keys and keys - set(need) <= {"threshold"}]
        if len(fits) != 1:
            raise OpenscopeError(
                f"{path}: without config.json its keys fit {', '.join(fits) or 'no dictionary_learning class'}; "
                "add the trainer's config.json (trainer.dict_class)"
            )
        name = fits[0]
    if name not in _KEYS:
        raise OpenscopeError(
            f"{path}: dictionary_learning class {name!r} is not read (known: {', '.join(_KEYS)})"
        )
    return str(name)


def _params(cls: str, s: dict[str, Tensor]) -> tuple[dict[str, Tensor], int | None]:
    """Gemma Scope tensors (and k for TopK) from a state dict of class cls."""
    if cls in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        w_enc, b_enc, w_dec, b_dec = s["W_enc"], s["b_enc"], s["W_dec"], s["b_dec"]
    elif cls == "AutoEncoderNew":
        w_enc, b_enc, w_dec, b_dec = (
            s["encoder.weight"].t(),
            s["encoder.bias"],
            s["decoder.weight"].t(),
            s["decoder.bias"],
        )
    elif cls == "GatedAutoEncoder":
        scale = s["r_mag"].exp()
        w_enc, w_dec, b_dec = s["encoder.weight"].t() * scale, s["decoder.weight"].t(), s["decoder_bias"]
        b_enc = s["mag_bias"]
        threshold = jumprelu_threshold(s["mag_bias"] - scale * s["gate_bias"])
        return {
            "w_enc": w_enc,
            "b_enc": fold_input_bias(w_enc, b_enc, b_dec),
            "w_dec": w_dec,
            "b_dec": b_dec,
            "threshold": threshold,
        }, None
    else:
        bias = s["bias"] if cls == "AutoEncoder" else s["b_dec"]
        w_enc, b_enc, w_dec, b_dec = s["encoder.weight"].t(), s["encoder.bias"], s["decoder.weight"].t(), bias
    if cls != "AutoEncoderNew" and cls != "JumpReluAutoEncoder":
        b_enc = fold_input_bias(w_enc, b_enc, b_dec)
    if cls == "AutoEncoder":  # as its from_pretrained: unit decoder rows, latents scaled by the norms
        norms = w_dec.norm(dim=1)
        w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    params = {"w_enc": w_enc, "b_enc": b_enc, "w_dec": w_dec, "b_dec": b_dec}
    if cls in ("AutoEncoderTopK",):
        return params, int(s["k"])
    if cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        params["threshold"] = jumprelu_threshold(s["threshold"].reshape(()).expand(w_enc.shape[1]).clone())
    elif cls == "JumpReluAutoEncoder":
        params["threshold"] = jumprelu_threshold(s["threshold"])
    else:  # ReLU
        params["threshold"] = torch.zeros(w_enc.shape[1])
    return params, None


def _site_hook(trainer: dict[str, Any]) -> str | None:
    """A Hugging Face hook point for the trainer's submodule, when its name says the site kind."""
    name, layer = str(trainer.get("submodule_name") or ""), trainer.get("layer")
    kind = next((k for k in sorted(SITE_KINDS, key=len, reverse=True) if k in name), None)
    if kind is None:
        return None
    m = re.search(r"(\d+)", name.replace(kind, ""))
    index = layer if isinstance(layer, int) else int(m.group(1)) if m else None
    return (
        None
        if index is None
        else f"model.layers.{index}"
        + {
            "resid_post": ".output",
            "resid_pre": ".input",
            "mlp_in": ".mlp.input",
            "mlp_out": ".mlp.output",
            "attn_out": ".self_attn.o_proj.input",
        }[kind]
    )


def read_dictionary_learning(folder: Path) -> PeerCoder:
    """A dictionary_learning folder as a coder (module docstring)."""
    path = folder / WEIGHTS_FILE
    state = load_state(path)
    trainer: dict[str, Any] = {}
    if (folder / CONFIG_FILE).is_file():
        raw = read_json(folder / CONFIG_FILE).get("trainer")
        trainer = raw if isinstance(raw, dict) else {}
    cls = _dict_class(trainer, state, path)
    require(state, _KEYS[cls], path, f"dictionary_learning {cls}")
    params, k = _params(cls, state)
    d, f = params["w_enc"].shape
    for key, value in (("activation_dim", d), ("dict_size", f)):
        if key in trainer and trainer[key] != value:
            raise OpenscopeError(f"{path}: config.json says {key} {trainer[key]}, the weights have {value}")
    expect("decoder", params["w_dec"], (f, d), path, f"the encoder [{d}, {f}]")
    if isinstance(trainer.get("k"), int) and k is not None and trainer["k"] != k:
        raise OpenscopeError(f"{path}: config.json says k {trainer['k']}, ae.pt says {k}")
    hook = _site_hook(trainer)
    config: dict[str, Any] = {
        "format": "dictionary_learning",
        "architecture": "topk" if k is not None else "jump_relu",
        "type": "sae",
        "affine_connection": False,
        "width": int(f),
        "hf_hook_point_in": hook,
        "hf_hook_point_out": hook,
        "model_name": trainer.get("lm_name"),
        "dictionary_learning": {"dict_class": cls},
    }
    if k is not None:
        config["k"] = k
    return PeerCoder(coder_from_tensors(params, config, path), config, folder.name)
