"""Activation stores at fsspec URLs (`s3://…`, `gs://…`, `memory://…`, `file://…`): naming, redaction and
whole-object reads and writes.

A store at a URL has the layout of a local one (`openscope.activations.store`). Object stores have no
rename, so every file is written whole in one request (a shard is built in a local spool file and
uploaded with one `put`), and the manifest is written after the files it lists: a reader never sees a
manifest that names a shard not yet whole. On a `file://` URL a file is written beside and renamed, as
for a local path. Credentials come only from each filesystem library's own environment (AWS_* variables
and ~/.aws for s3fs, GOOGLE_APPLICATION_CREDENTIALS for gcsfs, …); a URL is shown only with any
`user:password@` and query string masked (`redact`), and never written into a manifest.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.registry import known_implementations

from openscope.errors import OpenscopeError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/+)(.*)$", re.DOTALL)

PROBE = ".openscope-write-check-"
"""The name prefix of the small file `check_writable` writes and removes."""

EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "az"),
    "abfs": ("adlfs", "az"),
}
"""The package each common object-store protocol needs, and the openscope extra that installs it."""


def store_url(location: str | Path) -> str | None:
    """The fsspec URL a store location names, or None for a local path.

    Accepts the URL as typed (`s3://bucket/acts`) and the form a `Path` folds it into (`s3:/bucket/acts`:
    command-line options are paths), for protocols fsspec knows; anything else is a local path, exactly as
    before URLs were accepted.
    """
    match = _URL.match(os.fspath(location))
    if match is None:
        return None
    scheme, _, rest = match.groups()
    if scheme.lower() not in known_implementations:
        return None
    if scheme.lower() in ("file", "local"):
        return "file:///" + rest
    return f"{scheme}://{rest}"


def redact(url: str) -> str:
    """The URL fit for logs and messages: credentials in it (`user:secret@`) and any query string (signed
    URLs carry keys there) are replaced by `***`."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _reason(exc: BaseException, url: str, shown: str) -> str:
    """An exception as one line, with the URL (and so any credentials in it) masked."""
    text = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    for secret in {url, url.split("://", 1)[-1]}:
        text = text.replace(secret, shown)
    return f"{type(exc).__name__}: {text}"


class RemoteFolder:
    """A folder at an fsspec URL, read and written one whole file at a time."""

    def __init__(self, url: str):
        self.url = url
        self.shown = redact(url)
        """The URL as shown in logs and messages (credentials masked)."""
        scheme = url.split("://", 1)[0].lower()
        try:
            self.fs, path = fsspec.core.url_to_fs(url)
        except ImportError:
            package, extra = EXTRAS.get(scheme, (f"the fsspec implementation of {scheme}://", ""))
            how = (
                f": pip install 'openscope[{extra}]'" if extra else " (see fsspec's list of implementations)"
            )
            raise OpenscopeError(f"store URL {self.shown} needs {package}{how}") from None
        except Exception as exc:  # each filesystem library raises its own errors for a bad URL
            raise OpenscopeError(
                f"cannot open store URL {self.shown} ({_reason(exc, url, self.shown)})"
            ) from None
        self.path = str(path).rstrip("/")
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.local = "file" in protocols
        """A `file://` URL: files are written beside and renamed, as for a local path."""

    def key(self, name: str) -> str:
        return f"{self.path}/{name}"

    def error(self, doing: str, exc: BaseException) -> OpenscopeError:
        """A one-line error for a failed operation on this store."""
        return OpenscopeError(f"cannot {doing} store URL {self.shown} ({_reason(exc, self.url, self.shown)})")

    def exists(self, name: str) -> bool:
        try:
            return bool(self.fs.exists(self.key(name)))
        except Exception as exc:  # network and permission errors of the filesystem library
            raise self.error("reach", exc) from None

    def names(self) -> list[str]:
        """The names of the files directly in the folder ([] when it does not exist)."""
        try:
            if not self.fs.exists(self.path):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))
        except Exception as exc:  # network and permission errors of the filesystem library
            raise self.error("list", exc) from None

    def read(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """A file's bytes (or those of [start, end)); FileNotFoundError when it is absent."""
        try:
            return bytes(self.fs.cat_file(self.key(name), start=start, end=end))
        except FileNotFoundError:
            raise
        except Exception as exc:  # network and permission errors of the filesystem library
            raise self.error(f"read {name} of", exc) from None

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several byte ranges of one file, fetched together."""
        try:
            key = self.key(name)
            out = self.fs.cat_ranges([key] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])
        except Exception as exc:  # network and permission errors of the filesystem library
            raise self.error(f"read {name} of", exc) from None
        for part in out:
            if isinstance(part, BaseException):
                raise self.error(f"read {name} of", part)
        return [bytes(p) for p in out]

    def write(self, name: str, data: bytes) -> None:
        """Write a whole file in one request (beside and renamed on a `file://` URL)."""
        try:
            if self.local:
                self.fs.pipe_file(self.key(name + ".tmp"), data)
                self.fs.mv(self.key(name + ".tmp"), self.key(name))
            else:
                self.fs.pipe_file(self.key(name), data)
        except Exception as exc:  # network and permission errors of the filesystem library
            raise self.error(f"write {name} to", exc) from None

    def upload(self, name: str, local: Path) -> None:
        """Upload a local file whole (beside and renamed on a `file://` URL)."""
        try:
            if self.local:
                self.fs.put_file(str(local), self.key(name + ".tmp"))
                self.fs.mv(self.key(name + ".tmp"), self.key(name))
            else:
                self.fs.put_file(str(local), self.key(name))
        except Exception as exc:  # network and permission errors of the filesystem library
            raise self.error(f"write {name} to", exc) from None

    def remove(self, name: str) -> None:
        try:
            if self.fs.exists(self.key(name)):
                self.fs.rm_file(self.key(name))
        except Exception as exc:  # network and permission errors of the filesystem library
            raise self.error(f"remove {name} from", exc) from None

    def check_writable(self) -> None:
        """Create the folder and write (then remove) a small probe file: an unreachable or read-only store
        is a one-line error before any model is loaded."""
        probe = f"{PROBE}{os.getpid()}-{secrets.token_hex(4)}"  # one per process: ranks probe at once
        try:
            self.fs.makedirs(self.path, exist_ok=True)
        except Exception as exc:  # network and permission errors of the filesystem library
            raise self.error("write to", exc) from None
        self.write(probe, b"openscope")
        self.remove(probe)
