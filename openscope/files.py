"""Safe writes: the one rule every openscope command follows when it writes or replaces files.

A user's files are never at stake:

- **Files are written beside and renamed** (`atomic_file`, `write_bytes`, `write_text`): a
  temporary `NAME.tmp` is created fresh (a stale one, or a symbolic link planted under that name, is
  removed, never written through), flushed to disk and renamed over `NAME`. A crash leaves either
  the old file or the whole new one, and no write ever leaves the folder through a link.
- **A folder is replaced only if openscope made it** (`check_replaceable`): every entry in it must
  be something the command itself writes (an `Ownership` says which: an activation store's shards
  and manifest, a training run's dictionaries and metrics, a report's files, an export), so an
  `--output` that holds anything else — a home directory, a source tree, another tool's output — is
  refused with a one-line error naming what was found there. The target may not be a symbolic link,
  the current directory or one of its parents, nor hold the command's own inputs.
- **A replacement is staged** (`Staged`): the new content is written into a hidden sibling folder,
  `.NAME.openscope-new`, and swapped in with two renames once it is whole; the old folder is deleted
  only after that. A failure (or `kill -9`) at any moment leaves the old content whole; the next run
  finishes a swap that was cut short between its two renames (`recover`) and resumes a staged
  harvest or training run where it stopped.
- `--overwrite` is the only way in, and the command logs what it will remove.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from openscope.errors import OpenscopeError

log = logging.getLogger(__name__)

NEW_SUFFIX = ".openscope-new"
"""A staged replacement of folder NAME is written into the hidden sibling `.NAME.openscope-new`."""
OLD_SUFFIX = ".openscope-old"
"""During the swap the old folder sits at `.NAME.openscope-old` until the new one is in place."""
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


# ---- files ------------------------------------------------------------------------------------------


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under before its rename."""
    return path.with_name(path.name + ".tmp")


def _remove_entry(path: Path) -> None:
    """Remove a file or a symbolic link (never what a link points to); nothing if absent."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", *, sync: bool = True) -> Iterator[IO[Any]]:
    """An open file whose contents replace `path` in one rename when the block ends without error.

    The temporary file is created exclusively (O_EXCL, O_NOFOLLOW) after whatever had its name is
    removed, so a link planted there is never followed. On an error the temporary file is removed and
    `path` is left as it was. `sync` flushes the data to disk before the rename.
    """
    path = Path(path)
    tmp = temp_path(path)
    _remove_entry(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | Path, data: bytes, *, sync: bool = True) -> None:
    """Write bytes atomically (see `atomic_file`)."""
    with atomic_file(path, "wb", sync=sync) as fh:
        fh.write(data)


def write_text(path: str | Path, text: str, *, sync: bool = True) -> None:
    """Write UTF-8 text atomically (see `atomic_file`)."""
    with atomic_file(path, "w", sync=sync) as fh:
        fh.write(text)


def write_new(path: str | Path, data: bytes) -> bool:
    """Create `path` with `data` only if nothing has that name yet (atomic: of two concurrent writers
    exactly one wins); True if this call created it. Never follows a link."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    write_bytes(tmp, data)
    try:
        os.link(tmp, path)  # fails if the name exists, whatever it is
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


# ---- names and paths ------------------------------------------------------------------------------


_UNSAFE = re.compile(r"[^\w.#+-]+")


def safe_name(name: str, fallback: str = "item") -> str:
    """A file or folder name made from any label: letters, digits and `. _ # + -` only, never `.`, `..`
    or hidden (so it stays inside the folder it is joined to)."""
    out = _UNSAFE.sub("_", name).strip("._") or fallback
    return out


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, with every link resolved, lies inside `root` (resolved too)."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def child(root: Path, name: str) -> Path:
    """root/name, refusing any name that would leave root (separators, `..`, links out of it)."""
    path = root / name
    if not name or name in (".", "..") or "/" in name or "\\" in name or not inside(root, path):
        raise OpenscopeError(f"{name!r} is not a name inside {root}")
    return path


def absolute(path: str | Path) -> Path:
    """The path made absolute and normalised (`.` and `..` folded), without resolving links."""
    return Path(os.path.abspath(os.fspath(path)))


# ---- what openscope owns ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ownership:
    """What one kind of openscope output holds, so a folder can be recognised as one.

    An entry of the folder is openscope's when its name matches one of `files` (a plain file) or
    `folders` (a folder that `folder_check`, when given, accepts too); `manifest`, when given, must
    accept the folder itself (e.g. its manifest.json says it is an activation store).
    """

    what: str
    """What it is, for messages: `an activation store`, `a training run`, `an evaluation report`."""
    files: tuple[str, ...] = ()
    """Glob patterns of the plain files it writes."""
    folders: tuple[str, ...] = ()
    """Glob patterns of the sub-folders it writes."""
    folder_check: Callable[[Path], bool] | None = None
    """Whether a sub-folder matching `folders` really is one of its own (e.g. a dictionary folder)."""
    manifest: Callable[[Path], bool] | None = None
    """Whether the folder as a whole is one of its own (checked when it is not empty)."""

    def owns(self, entry: Path) -> bool:
        """Whether one entry of the folder is something this kind writes."""
        if entry.is_symlink():
            return False  # openscope never writes links
        if entry.is_dir():
            return any(fnmatch.fnmatchcase(entry.name, p) for p in self.folders) and (
                self.folder_check is None or self.folder_check(entry)
            )
        return entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in self.files)

    def foreign(self, folder: Path) -> list[str]:
        """The names of the entries of `folder` this kind does not write, sorted."""
        return sorted(
            p.name + ("/" if p.is_dir() and not p.is_symlink() else "")
            for p in folder.iterdir()
            if not self.owns(p)
        )


def _listing(names: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def is_empty_folder(path: Path) -> bool:
    """Whether path is an existing folder with nothing in it."""
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def check_target(target: Path, flag: str = "--output") -> None:
    """Refuse a target that is a symbolic link or exists and is not a folder (one line)."""
    if target.is_symlink():
        raise OpenscopeError(
            f"{flag} {target} is a symbolic link (to {os.readlink(target)}); give the folder it points to"
        )
    if target.exists() and not target.is_dir():
        raise OpenscopeError(f"{flag} {target} exists and is not a folder")


def check_replaceable(
    target: Path, owner: Ownership, *, inputs: Sequence[str | Path] = (), flag: str = "--output"
) -> None:
    """Raise unless openscope may delete and rewrite `target` (module docstring): not a link, not a
    file, not the current folder or one of its parents, holding none of `inputs` (paths the command
    reads), and every entry something `owner` writes."""
    check_target(target, flag)
    if not target.exists():
        return
    real = target.resolve()
    for source in inputs:
        if source and Path(source).exists() and inside(real, Path(source)):
            raise OpenscopeError(
                f"{flag} {target} holds {source}, which this command reads; refusing to replace it: "
                f"choose another {flag}"
            )
    foreign = owner.foreign(target)
    if foreign:
        raise OpenscopeError(
            f"{flag} {target} holds {_listing(foreign)}, which openscope did not write as {owner.what}; "
            f"refusing to replace it: choose another {flag} (or an empty folder)"
        )
    if Path.cwd().resolve().is_relative_to(real):
        raise OpenscopeError(
            f"{flag} {target} is the current folder or holds it; refusing to replace it: choose another {flag}"
        )
    if owner.manifest is not None and not is_empty_folder(target) and not owner.manifest(target):
        raise OpenscopeError(
            f"{flag} {target} is not {owner.what} openscope wrote (its manifest is missing or not ours); "
            f"refusing to replace it: choose another {flag}"
        )


def describe(folder: Path) -> str:
    """A short account of a folder for `--overwrite` messages: its entries and their total size."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    size = sum(p.stat().st_size for p in files)
    return f"{len(files)} files, {size / 2**20:.1f} MiB"


# ---- staged replacement ---------------------------------------------------------------------------------


def staged_path(target: Path) -> Path:
    """Where the replacement of `target` is written: `.NAME.openscope-new` beside it."""
    return target.with_name(f".{target.name}{NEW_SUFFIX}")


def _old_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{OLD_SUFFIX}")


def recover(target: Path) -> None:
    """Finish a swap cut short between its two renames: if `target` is gone but its old copy is
    beside it, the staged one goes into place (or, if there is none, the old one goes back)."""
    old, new = _old_path(target), staged_path(target)
    if target.exists() or target.is_symlink() or not old.is_dir():
        if old.is_dir() and not old.is_symlink() and target.is_dir():
            shutil.rmtree(old)  # the swap finished; only the clean-up was cut short
        return
    if new.is_dir() and not new.is_symlink():
        new.rename(target)
        shutil.rmtree(old)
        log.info("finished replacing %s (a run was interrupted while swapping folders)", target)
    else:
        old.rename(target)
        log.info("restored %s (a replacement was interrupted before its new content was whole)", target)


def swap_in(staged: Path, target: Path) -> None:
    """Put the finished folder `staged` in place of `target` (two renames, then the old one goes)."""
    old = _old_path(target)
    _remove_entry(old)
    had = target.exists()
    if had:
        target.rename(old)
    staged.rename(target)
    if had:
        shutil.rmtree(old)


@dataclass
class Staged:
    """Where a command writes its folder: `target` itself, or its staged replacement.

    `folder` is the place to write. Once everything is written, `commit()` swaps a staged folder into
    place (a no-op when the command wrote `target` directly).
    """

    target: Path
    """The folder the user named."""
    folder: Path
    """Where to write now: target itself, or `staged_path(target)`."""

    @property
    def replacing(self) -> bool:
        """Whether the writes go to a staged copy that will replace target."""
        return self.folder != self.target

    def commit(self) -> Path:
        """Swap the staged folder into place; returns target."""
        if self.replacing:
            swap_in(self.folder, self.target)
            log.info("replaced %s", self.target)
        return self.target


def check_output(
    target: str | Path,
    owner: Ownership,
    *,
    overwrite: bool,
    inputs: Sequence[str | Path] = (),
    flag: str = "--output",
) -> bool:
    """The checks of `prepare_output`, with nothing written: call it before long work so a bad
    `--output` is refused at once. Returns whether the target is absent or empty."""
    target = absolute(target)
    check_target(target, flag)
    if not target.exists() or is_empty_folder(target):
        return True
    check_replaceable(target, owner, inputs=inputs, flag=flag)
    if not overwrite:
        raise OpenscopeError(
            f"{flag} {target} holds {owner.what} already; pass --overwrite to replace it, or choose another {flag}"
        )
    return False


def prepare_output(
    target: str | Path,
    owner: Ownership,
    *,
    overwrite: bool,
    inputs: Sequence[str | Path] = (),
    flag: str = "--output",
    fresh: bool = True,
    stage_always: bool = False,
) -> Staged:
    """Decide where a command that writes the folder `target` writes (module docstring).

    - target absent or empty: written directly;
    - target holds `owner`'s output and `overwrite`: written into the staged copy (kept as it is when
      `fresh` is False, so a staged harvest or training run resumes; emptied otherwise), swapped in by
      `Staged.commit()`; the old content is described in the log;
    - target holds that output and no `overwrite`: a one-line error asking for `--overwrite`;
    - target holds anything else: a one-line error naming it, `--overwrite` or not.

    `stage_always`: write a new folder beside its target too, so it appears whole in one rename.
    """
    target = absolute(target)
    recover(target)
    empty = check_output(target, owner, overwrite=overwrite, inputs=inputs, flag=flag)
    holds_cwd = target.exists() and Path.cwd().resolve().is_relative_to(target.resolve())
    if empty and (not stage_always or holds_cwd):  # (renaming the current folder would strand the shell)
        target.mkdir(parents=True, exist_ok=True)
        return Staged(target, target)
    if not empty:
        log.warning(
            "--overwrite: %s (%s, %s) will be removed once the new one is complete",
            target,
            owner.what,
            describe(target),
        )
    staged = staged_path(target)
    check_target(staged, "the staging folder")
    if staged.exists() and (fresh or staged.is_file()):
        _remove_entry(staged)
    staged.mkdir(parents=True, exist_ok=True)
    return Staged(target, staged)


@contextlib.contextmanager
def replacing(
    target: str | Path,
    owner: Ownership,
    *,
    overwrite: bool,
    inputs: Sequence[str | Path] = (),
    flag: str = "--output",
) -> Iterator[Path]:
    """A folder to write `owner`'s output into; when the block ends without error it becomes `target`
    in one rename (replacing an earlier one only with `overwrite`, see `prepare_output`). On an error
    the staged folder is removed and `target` is left as it was."""
    staged = prepare_output(target, owner, overwrite=overwrite, inputs=inputs, flag=flag, stage_always=True)
    try:
        yield staged.folder
    except BaseException:
        shutil.rmtree(staged.folder, ignore_errors=True)
        raise
    staged.commit()


def check_file_output(
    path: str | Path,
    what: str,
    ours: Callable[[Path], bool],
    *,
    overwrite: bool,
    flag: str = "--output",
) -> Path:
    """The rule for commands that write one file (a graph, a JSON result): an existing file is replaced
    only with `overwrite` and only if `ours` recognises it as `what` openscope wrote; a link or a folder
    there is refused. Returns the path made absolute. Write it with `write_text`/`atomic_file`."""
    path = absolute(path)
    if path.is_symlink():
        raise OpenscopeError(
            f"{flag} {path} is a symbolic link (to {os.readlink(path)}); give the file itself"
        )
    if path.is_dir():
        raise OpenscopeError(f"{flag} {path} is a folder; give a file name")
    if path.exists():
        if not ours(path):
            raise OpenscopeError(
                f"{flag} {path} exists and is not {what} openscope wrote; refusing to replace it: "
                f"choose another {flag}"
            )
        if not overwrite:
            raise OpenscopeError(f"{flag} {path} exists ({what}); pass --overwrite to replace it")
    return path


def json_with(keys: Sequence[str]) -> Callable[[Path], bool]:
    """A recogniser for `check_file_output`: the file is a JSON object holding all these keys."""

    def ours(path: Path) -> bool:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and all(k in doc for k in keys)

    return ours


def read_text(path: str | Path) -> str:
    """A text file's contents (UTF-8), or a one-line error naming the file when it is missing, a
    folder, binary or not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OpenscopeError(f"cannot read {path} ({exc.strerror or exc})") from None
    if b"\x00" in data[:8192]:
        raise OpenscopeError(f"{path} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OpenscopeError(f"{path} is not UTF-8 text (byte {exc.start})") from None


def read_json(path: str | Path) -> Any:
    """A JSON file's value, or a one-line error naming the file (see `read_text`)."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise OpenscopeError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
