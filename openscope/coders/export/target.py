"""Export targets that never lose data: an export is written beside its target, then renamed into place.

The rule is `openscope.files`'s: a target that exists and is not empty is replaced only with
`overwrite`, and only if it holds an earlier openscope export and nothing else (SAELens folders with
our `metadata.openscope`, circuit-tracer folders with our `config.yaml`); a target that is a link,
the current folder, or a folder holding the dictionaries being exported is refused. The old folder
stays whole until the new one is complete. A crash or an error midway leaves the target exactly as
it was (plus, at worst, a hidden `.NAME.openscope-new` folder that the next export clears).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import yaml
from torch import Tensor

from openscope.files import Ownership, replacing, write_bytes

log = logging.getLogger(__name__)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
CIRCUIT_TRACER_CONFIG = "config.yaml"
GEMMA_SCOPE_CONFIG = "config.json"


def _saelens_ours(folder: Path) -> bool:
    """A SAELens folder openscope exported: cfg.json with `metadata.openscope`."""
    try:
        cfg = json.loads((folder / SAELENS_CFG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("metadata"), dict) and "openscope" in cfg["metadata"]


def _circuit_tracer_ours(folder: Path) -> bool:
    """A circuit-tracer folder openscope exported: config.yaml with an `openscope` section."""
    try:
        cfg = yaml.safe_load((folder / CIRCUIT_TRACER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(cfg, dict) and "openscope" in cfg


def _gemma_scope_ours(folder: Path) -> bool:
    """A Gemma Scope folder openscope exported (`export --to gemma-scope`): config.json with `openscope`."""
    try:
        cfg = json.loads((folder / GEMMA_SCOPE_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("openscope"), dict) and "from" in cfg["openscope"]


def _one_export(folder: Path) -> bool:
    return _saelens_ours(folder) or _gemma_scope_ours(folder)


_SAELENS_FOLDER = Ownership(
    "a SAELens or Gemma Scope export",
    files=(
        SAELENS_CFG,
        SAELENS_WEIGHTS,
        GEMMA_SCOPE_CONFIG,
        "params.safetensors",
        "params_layer_*.safetensors",
    ),
    manifest=_one_export,
)


def _export_ours(folder: Path) -> bool:
    """One export openscope wrote: a SAELens folder, a folder of them, or a circuit-tracer folder."""
    if _one_export(folder) or _circuit_tracer_ours(folder):
        return True
    subfolders = [p for p in folder.iterdir() if p.is_dir()]
    return bool(subfolders) and all(not _SAELENS_FOLDER.foreign(p) and _one_export(p) for p in subfolders)


EXPORT = Ownership(
    "an openscope export",
    files=(
        SAELENS_CFG,
        SAELENS_WEIGHTS,
        CIRCUIT_TRACER_CONFIG,
        GEMMA_SCOPE_CONFIG,
        "params.safetensors",
        "params_layer_*.safetensors",
        "layer_*.safetensors",
        "W_enc_*.safetensors",
        "W_dec_*.safetensors",
        "*.tmp",
    ),
    folders=("*",),
    folder_check=lambda p: not _SAELENS_FOLDER.foreign(p) and _one_export(p),
    manifest=_export_ours,
)
"""What `--out` may hold for `--overwrite` to replace it: an earlier export and nothing else."""


@contextmanager
def staged_folder(
    target: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yield an empty folder to write into; when the block ends without error it becomes `target`.
    `inputs` are the folders exported from: a target holding one of them is never replaced."""
    with replacing(target, EXPORT, overwrite=overwrite, inputs=inputs, flag="--out") as folder:
        yield folder
    log.info("wrote %s", target)


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file of contiguous CPU tensors, written atomically."""
    data = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    write_bytes(path, data, sync=False)
