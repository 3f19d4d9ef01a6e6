"""Export dictionaries in the Gemma Scope 2 layout, openscope's own: the way a peer's folder (SAELens,
sparsify, circuit-tracer, dictionary_learning) comes in for good (`openscope export --from saelens
DIR --to gemma-scope --out OUT`).

One dictionary → `target` is its folder; several → one subfolder each, named after the dictionary.
Single-layer coders are written by `openscope.coders.io.save_coder` (params.safetensors + config.json),
CLTs and crosscoders by `save_clt`; config.json keeps the hook points (Gemma Scope 2 spelling), the
model name and `openscope` {site_in, site_out, name, source, from}, which marks the folder as an export
that `--overwrite` may replace. A TopK coder keeps its architecture and k (Gemma Scope readers other
than openscope expect JumpReLU: convert it with `topk_to_jumprelu` first).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from openscope.coders.clt import CrossLayerCoder
from openscope.coders.dictionary import Dictionary
from openscope.coders.export.saelens import hf_hook_points, model_name_of
from openscope.coders.export.target import staged_folder
from openscope.coders.io import save_clt, save_coder
from openscope.models.hookpoints import TL_PREFIX, gemma_scope_hook_point

log = logging.getLogger(__name__)


def _subfolder_names(dictionaries: Sequence[Dictionary]) -> list[str]:
    names: list[str] = []
    for d in dictionaries:
        base = re.sub(r"[^\w.-]+", "_", d.name).strip("._") or d.site_in.name
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def _save(d: Dictionary, folder: Path, model_name: str | None) -> None:
    # Hugging Face spelling even when the peer wrote TransformerLens names (SAELens, circuit-tracer).
    hook_in, hook_out = (
        gemma_scope_hook_point(site) if hook.startswith(f"{TL_PREFIX}.") else hook
        for hook, site in zip(hf_hook_points(d), (d.site_in, d.site_out), strict=True)
    )
    fmt = (d.config or {}).get("format", "openscope")
    provenance: dict[str, Any] = {
        "openscope": {
            "site_in": d.site_in.name,
            "site_out": d.site_out.name,
            "name": d.name,
            "source": str(d.folder) if d.folder is not None else None,
            "from": fmt,
        }
    }
    common: dict[str, Any] = {
        "hook_point_in": hook_in,
        "hook_point_out": hook_out,
        "model_name": model_name_of(d, model_name),
        "provenance": provenance,
    }
    if isinstance(d.coder, CrossLayerCoder):
        site_kind = d.site_in.kind if d.coder.kind == "crosscoder" else None
        save_clt(d.coder, folder, layers=d.layers, site_kind=site_kind, **common)
    else:
        save_coder(d.coder, folder, **common)


def export_gemma_scope(
    dictionaries: Dictionary | Sequence[Dictionary],
    target: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write Gemma Scope 2 folders (module docstring); the target appears in one rename. Returns it."""
    many = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    for d in many:
        model_name_of(d, model_name)  # every dictionary must name its model before anything is written
    target = Path(target)
    with staged_folder(target, overwrite, [d.folder for d in many if d.folder is not None]) as tmp:
        subfolders = [tmp] if len(many) == 1 else [tmp / name for name in _subfolder_names(many)]
        for d, folder in zip(many, subfolders, strict=True):
            _save(d, folder, model_name)
    log.info("exported %d dictionaries in the Gemma Scope 2 layout to %s", len(many), target)
    return target
