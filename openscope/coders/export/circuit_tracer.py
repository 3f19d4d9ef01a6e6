"""Export transcoders for circuit-tracer: `config.yaml` + per-layer safetensors.

Learned from safety-research/circuit-tracer (`circuit_tracer/utils/hf_utils.py` `load_transcoders`,
`transcoder/single_layer_transcoder.py` and its tests, `transcoder/cross_layer_transcoder.py`
`load_clt`/`to_safetensors`, `utils/tl_nnsight_mapping.py`):

- A transcoder set (one single-layer transcoder per layer 0..N−1, all the same width): `config.yaml`
  {`model_name`, `model_kind: transcoder_set`, `feature_input_hook`, `feature_output_hook`} and
  `layer_{i}.safetensors` with `W_enc` [F, d_in] (one row per feature), `W_dec` [F, d_out], `b_enc` [F],
  `b_dec` [d_out], `activation_function.threshold` [F] (JumpReLU; absent for ReLU), `W_skip`
  [d_out, d_in] (skip-transcoders; circuit-tracer adds x @ W_skip.T).
- A cross-layer transcoder covering layers 0..L−1: `config.yaml` with `model_kind:
  cross_layer_transcoder`, `W_enc_{i}.safetensors` {`W_enc_{i}` [F, d_in], `b_enc_{i}` [F],
  `b_dec_{i}` [d_out], `threshold_{i}` [F]} and `W_dec_{i}.safetensors` {`W_dec_{i}` [F, L−i, d_out]}.

No `transcoders:` list is written: circuit-tracer then finds the `layer_{i}.safetensors` files itself.
Loading the folder (circuit-tracer 0.5, whose Gemma 3 support is its nnsight backend):

    from circuit_tracer import ReplacementModel
    model = ReplacementModel.from_pretrained(model_dir, "/abs/path/to/export", backend="nnsight")

with the export's **absolute** path: circuit-tracer looks a transcoder reference up in its cache folder
first, and joining an absolute path to that folder gives the path itself, so the local folder is found
(a relative path is taken for a Hugging Face repo id); `model_dir` is the model's folder or hub id. The
same folder works as is when uploaded to the hub (`"user/repo"`). The hooks are
the circuit-tracer names of the MLP input and output — `mlp.hook_in` (Gemma 3: output of
`pre_feedforward_layernorm`, our mlp_in) and `hook_mlp_out` (output of `post_feedforward_layernorm`,
our mlp_out) — so only mlp_in → mlp_out transcoders are exportable. TopK/BatchTopK coders are refused
(convert them with `topk_to_jumprelu`); circuit-tracer's CLT files have no skip connection, so neither
does an exportable CLT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import Dictionary
from openscope.coders.export.saelens import model_name_of
from openscope.coders.export.target import CIRCUIT_TRACER_CONFIG, staged_folder, write_tensors
from openscope.errors import OpenscopeError
from openscope.files import write_text
from openscope.models.sites import Site

log = logging.getLogger(__name__)

CONFIG_FILE = CIRCUIT_TRACER_CONFIG
FEATURE_HOOKS: dict[str, str] = {"mlp_in": "mlp.hook_in", "mlp_out": "hook_mlp_out"}
"""circuit-tracer's name for each site kind a transcoder may read or write."""


def _check_sites(d: Dictionary) -> None:
    if d.site_in.kind != "mlp_in" or d.site_out != Site(d.site_in.layer, "mlp_out"):
        raise OpenscopeError(
            f"circuit-tracer replaces MLPs: {d.name} maps {d.site_in.name} -> {d.site_out.name}, "
            "expected L.mlp_in -> L.mlp_out"
        )


def transcoder_layer_tensors(coder: SparseCoder) -> dict[str, Tensor]:
    """The `layer_{i}.safetensors` tensors of one single-layer transcoder (module docstring)."""
    if coder.cfg.kind == "sae":
        raise OpenscopeError("circuit-tracer needs transcoders, got an SAE")
    if coder.cfg.activation not in ("jumprelu", "relu"):
        raise OpenscopeError(
            f"circuit-tracer reads JumpReLU or ReLU transcoders, got {coder.cfg.activation}; "
            "convert it with topk_to_jumprelu first"
        )
    folded = coder.fold()
    with torch.no_grad():
        tensors: dict[str, Tensor] = {
            "W_enc": folded.w_enc.t(),
            "W_dec": folded.w_dec,
            "b_enc": folded.b_enc,
            "b_dec": folded.b_dec,
        }
        if folded.log_threshold is not None:
            tensors["activation_function.threshold"] = folded.threshold()
        if folded.w_skip is not None:
            tensors["W_skip"] = folded.w_skip.t()
        return {k: v.detach().float() for k, v in tensors.items()}


def clt_tensors(clt: CrossLayerCoder) -> dict[str, dict[str, Tensor]]:
    """File name → tensors of circuit-tracer's CLT layout (module docstring)."""
    if clt.w_skip is not None:
        raise OpenscopeError("circuit-tracer's CLT files have no skip connection; this CLT has one")
    files: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        for i in range(clt.cfg.n_layers):
            enc = {f"W_enc_{i}": clt.w_enc[i].t(), f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i]}
            if clt.log_threshold is not None:
                enc[f"threshold_{i}"] = clt.threshold()[i]
            files[f"W_enc_{i}.safetensors"] = {k: v.detach().float() for k, v in enc.items()}
            files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": clt.w_dec[i].detach().float()}
    return files


def circuit_tracer_files(
    dictionaries: Sequence[Dictionary], model_name: str | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """(config.yaml contents, file name → tensors) for a transcoder set or one CLT."""
    if not dictionaries:
        raise OpenscopeError("nothing to export: no dictionaries given")
    for d in dictionaries:
        _check_sites(d)
    first = dictionaries[0]
    config: dict[str, Any] = {
        "model_name": model_name_of(first, model_name),
        "feature_input_hook": FEATURE_HOOKS["mlp_in"],
        "feature_output_hook": FEATURE_HOOKS["mlp_out"],
    }
    if any(d.is_multilayer for d in dictionaries):
        if len(dictionaries) != 1 or not isinstance(first.coder, CrossLayerCoder):
            raise OpenscopeError("export one cross-layer transcoder at a time, without other dictionaries")
        if first.site_in.layer != 0:
            raise OpenscopeError(
                f"circuit-tracer's CLTs start at layer 0; {first.name} starts at {first.site_in.layer}"
            )
        config["model_kind"] = "cross_layer_transcoder"
        files = clt_tensors(first.coder)
        sites = [s.name for s in first.sites_in]
    else:
        by_layer = sorted(dictionaries, key=lambda d: d.site_in.layer)
        layers = [d.site_in.layer for d in by_layer]
        if layers != list(range(len(layers))):
            raise OpenscopeError(
                f"circuit-tracer needs exactly one transcoder per layer 0..N-1; got layers {layers}"
            )
        coders = [d.coder for d in by_layer if isinstance(d.coder, SparseCoder)]
        widths = {c.cfg.width for c in coders}
        kinds = {c.cfg.kind for c in coders}
        if len(widths) > 1 or len(kinds) > 1:
            raise OpenscopeError(
                f"a circuit-tracer transcoder set needs one width and one kind; got widths {sorted(widths)}, "
                f"kinds {sorted(kinds)}"
            )
        config["model_kind"] = "transcoder_set"
        files = {f"layer_{i}.safetensors": transcoder_layer_tensors(c) for i, c in enumerate(coders)}
        sites = [d.site_in.name for d in by_layer]
        dictionaries = by_layer  # `sources` below lines up with `sites_in`
    config["openscope"] = {
        "sites_in": sites,
        "sources": [str(d.folder) if d.folder is not None else d.name for d in dictionaries],
    }
    return config, files


def export_circuit_tracer(
    dictionaries: Dictionary | Sequence[Dictionary],
    target: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a circuit-tracer transcoder folder (a set of per-layer transcoders, or one CLT) to target.
    Everything is checked before anything is written; the target appears in one rename."""
    many = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    config, files = circuit_tracer_files(many, model_name)
    target = Path(target)
    with staged_folder(target, overwrite, [d.folder for d in many if d.folder is not None]) as tmp:
        for name, tensors in files.items():
            write_tensors(tmp / name, tensors)
        write_text(tmp / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False), sync=False)
    log.info("exported %s (%d files) for circuit-tracer to %s", config["model_kind"], len(files), target)
    return target
