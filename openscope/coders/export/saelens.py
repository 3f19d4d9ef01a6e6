"""Export dictionaries for SAELens 6.x: a folder with `cfg.json` + `sae_weights.safetensors`.

`SAE.load_from_disk(folder)` of SAELens ≥ 6.0 reads it (learned from sae_lens 6.54.12:
`saes/sae.py` `SAEConfig.to_dict`/`load_from_disk`, `saes/jumprelu_sae.py`, `saes/topk_sae.py`,
`saes/transcoder.py`, `loading/pretrained_sae_loaders.py`):

- cfg.json: the config dataclass flat — `architecture`, `d_in`, `d_sae` (+ `d_out` for transcoders,
  `k` and `rescale_acts_by_decoder_norm` for TopK), `dtype`, `device`, `apply_b_dec_to_input` (false:
  our weights are folded and take raw activations), `normalize_activations` ("none"),
  `reshape_activations` ("hook_z" for attention SAEs, whose TransformerLens hook `attn.hook_z` is
  [.., heads, d_head]) — and `metadata` {`sae_lens_version`, `model_name`, `hook_name`,
  `hook_head_index`, `hf_hook_name`, (`hook_name_out`, `hf_hook_name_out`), `prepend_bos`,
  `openscope` {site_in, site_out, name, source}}. `sae_lens_version` is "6.0.0", the first release
  of this layout: older versions make SAELens convert the config as a pre-6 one.
- sae_weights.safetensors: `W_enc` [d_in, F], `W_dec` [F, d_out], `b_enc` [F], `b_dec` [d_out],
  `threshold` [F] (JumpReLU; a ReLU coder is exported as JumpReLU with θ = 0, which is the same
  function), `W_skip` [d_out, d_in] (skip-transcoders; SAELens adds x @ W_skip.T in `forward`, not in
  `decode`).

Architectures: SAE → `jumprelu` or `topk`; transcoder → `jumprelu_transcoder`; skip-transcoder →
`jumprelu_skip_transcoder`. BatchTopK (batch-dependent; convert with `topk_to_jumprelu`), TopK
transcoders and cross-layer transcoders have no SAELens class and are refused.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import Dictionary
from openscope.coders.export.target import SAELENS_CFG, SAELENS_WEIGHTS, staged_folder, write_tensors
from openscope.config import save_json
from openscope.errors import OpenscopeError
from openscope.models.hookpoints import gemma_scope_hook_point, site_for_hook_point, tl_hook_name, with_side

log = logging.getLogger(__name__)

CFG_FILE = SAELENS_CFG
WEIGHTS_FILE = SAELENS_WEIGHTS
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: the first SAELens release that reads this layout as is."""


def model_name_of(dictionary: Dictionary, model_name: str | None) -> str:
    """The model name to record: the explicit one, else the dictionary's config.json `model_name`."""
    name = model_name or (dictionary.config or {}).get("model_name")
    if not name:
        raise OpenscopeError(f"dictionary {dictionary.name} records no model_name; pass --model-name")
    return str(name)


def hf_hook_points(dictionary: Dictionary) -> tuple[str, str]:
    """The Hugging Face hook points (Gemma Scope 2 spelling, side written) the dictionary reads and
    writes: its config.json's when they name its sites, else the Gemma layout's."""
    config = dictionary.config or {}
    points = []
    for key, site in (("hf_hook_point_in", dictionary.site_in), ("hf_hook_point_out", dictionary.site_out)):
        hook = config.get(key)
        try:
            ok = isinstance(hook, str) and site_for_hook_point(hook) == site
        except OpenscopeError:
            ok = False
        points.append(with_side(hook) if ok and isinstance(hook, str) else gemma_scope_hook_point(site))
    return points[0], points[1]


def saelens_architecture(coder: SparseCoder) -> str:
    """The SAELens architecture name for a coder, or a one-line error when SAELens has none."""
    cfg = coder.cfg
    if cfg.activation == "batchtopk":
        raise OpenscopeError(
            "SAELens has no inference BatchTopK (it depends on the batch); convert the coder with "
            "topk_to_jumprelu first"
        )
    if cfg.kind == "sae":
        return "topk" if cfg.activation == "topk" else "jumprelu"
    if cfg.activation == "topk":
        raise OpenscopeError("SAELens has no TopK transcoder; convert the coder with topk_to_jumprelu first")
    return "jumprelu_skip_transcoder" if cfg.kind == "skip_transcoder" else "jumprelu_transcoder"


def saelens_files(
    dictionary: Dictionary, model_name: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg.json contents, sae_weights tensors) for one single-layer dictionary (module docstring)."""
    if not isinstance(dictionary.coder, SparseCoder):
        raise OpenscopeError(
            f"{dictionary.name} is a cross-layer transcoder; SAELens has none (export it for circuit-tracer)"
        )
    arch = saelens_architecture(dictionary.coder)
    coder = dictionary.coder.fold()
    cfg = coder.cfg
    transcoder = cfg.kind != "sae"
    hook_in, hook_out = hf_hook_points(dictionary)
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name_of(dictionary, model_name),
        "hook_name": tl_hook_name(dictionary.site_in),
        "hook_head_index": None,
        "hf_hook_name": hook_in,
        "prepend_bos": True,
        "openscope": {
            "site_in": dictionary.site_in.name,
            "site_out": dictionary.site_out.name,
            "name": dictionary.name,
            "source": str(dictionary.folder) if dictionary.folder is not None else None,
        },
    }
    if transcoder:
        metadata |= {
            "hook_name_out": tl_hook_name(dictionary.site_out),
            "hook_head_index_out": None,
            "hf_hook_name_out": hook_out,
        }
    reshape = "hook_z" if not transcoder and dictionary.site_in.kind == "attn_out" else "none"
    config: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": reshape,
        "metadata": metadata,
    }
    if transcoder:
        config["d_out"] = cfg.d_out
    if arch == "topk":
        config |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    with torch.no_grad():
        tensors: dict[str, Tensor] = {
            "W_enc": coder.w_enc,
            "W_dec": coder.w_dec,
            "b_enc": coder.b_enc,
            "b_dec": coder.b_dec,
        }
        if arch != "topk":
            tensors["threshold"] = (
                coder.threshold() if coder.log_threshold is not None else torch.zeros(cfg.width)
            )
        if coder.w_skip is not None:
            tensors["W_skip"] = coder.w_skip.t()
        tensors = {k: v.detach().float() for k, v in tensors.items()}
    return config, tensors


def _folder_names(dictionaries: Sequence[Dictionary]) -> list[str]:
    """One distinct, filesystem-safe subfolder name per dictionary: its folder's path below the folders'
    common parent (resid_post_all/layer_0_... and attn_out_all/layer_0_... stay apart), else its name."""
    folders = [d.folder for d in dictionaries]
    if all(f is not None for f in folders) and len(set(folders)) == len(folders):
        parent = Path(os.path.commonpath([str(f) for f in folders if f is not None]))
        labels = [str(Path(f).relative_to(parent)) if f is not None else "" for f in folders]
    else:
        labels = [d.name for d in dictionaries]
    names: list[str] = []
    for d, label in zip(dictionaries, labels, strict=True):
        base = re.sub(r"[^\w.-]+", "_", label).strip("._") or d.site_in.name
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def export_saelens(
    dictionaries: Dictionary | Sequence[Dictionary],
    target: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write SAELens folders: one dictionary → `target` is the SAELens folder; several → one
    subfolder of `target` each (named after the dictionary). Everything is checked before anything is
    written, and the target appears in one rename (see `export.target`). Returns target."""
    many = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    if not many:
        raise OpenscopeError("nothing to export: no dictionaries given")
    files = [saelens_files(d, model_name) for d in many]
    target = Path(target)
    with staged_folder(target, overwrite, [d.folder for d in many if d.folder is not None]) as tmp:
        subfolders = [tmp] if len(many) == 1 else [tmp / name for name in _folder_names(many)]
        for folder, (config, tensors) in zip(subfolders, files, strict=True):
            folder.mkdir(exist_ok=True)
            write_tensors(folder / WEIGHTS_FILE, tensors)
            save_json(folder / CFG_FILE, config)
    log.info("exported %d dictionaries for SAELens to %s", len(many), target)
    return target
