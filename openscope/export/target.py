"""Export targets that never lose data: a folder is written beside its target, then renamed into place.

A target that exists and is not empty is refused unless overwrite is asked for; even then the old
folder is only moved aside until the new one is complete, and removed after the rename. A crash or
an error midway leaves the target exactly as it was (plus, at worst, a hidden `.name.tmp-PID` folder).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
from torch import Tensor

from openscope.errors import OpenscopeError

log = logging.getLogger(__name__)


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder when overwrite is off."""
    if target.exists() and not target.is_dir():
        raise OpenscopeError(f"export target {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OpenscopeError(
            f"export target {target} exists and is not empty; pass --overwrite to replace it"
        )


@contextmanager
def staged_folder(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty folder to write into; when the block ends without error it becomes `target`."""
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old)
    log.info("wrote %s", target)


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file of contiguous CPU tensors."""
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
