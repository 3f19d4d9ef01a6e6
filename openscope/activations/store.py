"""The activation store on disk, and a reader that serves shuffled batches across shards.

Layout of a store folder:
- `manifest.json`: what was harvested (model, sites, data, dtype), every finished shard with
  its row count, checksum and statistics, and the per-site normalisation statistics.
- `shard_00000.safetensors`, …: one tensor per site `[rows, width]`; `token_ids`, `context`
  (global context index) and `position` per row; `contexts` `[n, context_len]`, the token ids
  of every context in the shard (dashboards show the text around a row); and `stats.sum.<site>`
  (float64 sum of the rows, for means). Stores of chat data also keep `role` (uint8) per row, the
  role of its token (index into the manifest's `roles` list: template, system, user, model).
- `stats.safetensors`: per-site mean activation vector, written when the store is complete.

Shards and the manifest are written to a temporary name and renamed, so a crash at any
moment leaves only whole files; a shard the manifest does not list is simply redone.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor

from openscope.activations.batches import ActivationBatch
from openscope.config import save_json
from openscope.errors import OpenscopeError
from openscope.files import Ownership, atomic_file

MANIFEST = "manifest.json"
STATS = "stats.safetensors"
FORMAT = "openscope-activations"
VERSION = 1


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CHECKSUM = "crc32"
"""The manifest key (and algorithm) of each shard's checksum. CRC-32 guards against truncation and
bit rot at ~3.5 GB/s here, where sha256 runs at ~1 GB/s: the writer thread shares the model's two
cores, so its time is the harvest's. Stores written with "sha256" still verify."""


def _crc32_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


def file_checksum(path: Path, kind: str = CHECKSUM) -> str:
    """The checksum of a file: crc32 (8 hex digits) or sha256 (hex)."""
    digest = hashlib.sha256() if kind == "sha256" else None
    crc = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            if digest is not None:
                digest.update(block)
            else:
                crc = zlib.crc32(block, crc)
    return digest.hexdigest() if digest is not None else _crc32_hex(crc)


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of a file."""
    return file_checksum(path, "sha256")


def shard_checksum(entry: dict[str, Any]) -> tuple[str, str]:
    """A shard manifest entry's (algorithm, checksum): crc32 in new stores, sha256 in older ones."""
    kind = CHECKSUM if CHECKSUM in entry else "sha256"
    return kind, str(entry.get(kind, ""))


def shard_intact(path: Path, entry: dict[str, Any]) -> bool:
    """Whether a shard file exists and matches its manifest entry's checksum (crc32 or sha256)."""
    kind, expected = shard_checksum(entry)
    return path.is_file() and bool(expected) and file_checksum(path, kind) == expected


def tokens_digest(contexts: Tensor) -> str:
    """A fingerprint of a shard's token ids: resuming checks the data stream still gives the same ones."""
    return sha256_bytes(contexts.to(torch.int32).contiguous().numpy().tobytes())


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.uint8: "U8",
}


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> str:
    """Write a safetensors file atomically and return its checksum (CHECKSUM: crc32).

    Streams each tensor's bytes straight to disk (no serialised copy of the whole file in
    memory) and hashes them on the way, through `openscope.files.atomic_file` (a fresh temporary
    file, flushed to disk, then renamed), so a crash leaves either the old state or the whole new
    file, and no planted link is followed. Same tensors, same bytes.
    """
    header: dict[str, Any] = {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to 8-byte alignment
    crc = 0
    with atomic_file(path) as fh:
        for chunk in (len(head).to_bytes(8, "little"), head):
            fh.write(chunk)
            crc = zlib.crc32(chunk, crc)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            # A byte view of the tensor's memory: written and hashed without a copy.
            view = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
            fh.write(view)
            crc = zlib.crc32(view, crc)
    return _crc32_hex(crc)


class SiteStats(NamedTuple):
    """Normalisation statistics of one site over the whole store."""

    n_rows: int
    """Rows (tokens) the statistics cover."""
    mean_sq_norm: float
    """E‖x‖² over rows."""
    norm_scale: float
    """C = sqrt(E‖x‖²): dividing by C gives E‖x‖² = 1, the units dictionaries train in."""


def site_stats(shards: Sequence[dict[str, Any]], site: str) -> SiteStats:
    n = sum(s["n_rows"] for s in shards)
    try:
        sq = sum(float(s["sum_sq_norm"][site]) for s in shards)
    except (KeyError, TypeError, ValueError):
        raise OpenscopeError(
            f"the store's manifest is damaged: a shard has no statistics for {site}"
        ) from None
    mean_sq = sq / n if n else 0.0
    return SiteStats(n, mean_sq, math.sqrt(mean_sq))


_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "identity": dict,
    "model": dict,
    "sites": dict,
    "shards": list,
    "complete": bool,
}
_SHARD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "file": str,
    "n_rows": int,
    "n_contexts": int,
    "context_start": int,
    "sum_sq_norm": dict,
}
_SHARD_FILE = re.compile(r"shard_\d{5,}\.safetensors")


def _check_fields(where: str, obj: dict[str, Any], fields: dict[str, type | tuple[type, ...]]) -> None:
    for key, kind in fields.items():
        if not isinstance(obj.get(key), kind):
            raise OpenscopeError(f"{where} is damaged: its {key!r} is missing or of the wrong type")


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a store, checked: one-line errors for a missing, corrupt or foreign one."""
    path = root / MANIFEST
    if not path.is_file():
        raise OpenscopeError(f"{root} is not an activation store (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenscopeError(f"{path} is corrupt ({str(exc).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OpenscopeError(f"{path} is not an openscope activation store manifest")
    _check_fields(str(path), manifest, _MANIFEST_FIELDS)
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise OpenscopeError(f"{path} is damaged: shard entry {i} is not an object")
        _check_fields(f"{path} (shard entry {i})", shard, _SHARD_FIELDS)
        # Shard names come from the file: only ours are read, so a doctored one cannot point elsewhere.
        if not _SHARD_FILE.fullmatch(shard["file"]):
            raise OpenscopeError(f"{path} is damaged: shard entry {i} names {shard['file']!r}")
    _check_fields(
        f"{path} (identity)", manifest["identity"], {"source": str, "context_len": int, "dtype": str}
    )
    if not isinstance(manifest["model"].get("name"), str):
        raise OpenscopeError(f"{path} is damaged: it names no model")
    return manifest


def is_store(root: Path) -> bool:
    """Whether root holds an activation store manifest openscope wrote (it may be incomplete)."""
    try:
        read_manifest(root)
    except OpenscopeError:
        return False
    return True


STORE = Ownership(
    "an activation store",
    files=(MANIFEST, STATS, "shard_*.safetensors", "*.tmp"),
    manifest=is_store,
)
"""What a store folder holds: `--overwrite` replaces a folder only if it holds nothing else."""


class ActivationStore:
    """Read access to a (possibly still growing) store: its finished shards, statistics, and batches."""

    def __init__(self, root: str | Path, verify: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.verify = verify
        self._verified: set[int] = set()

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def n_rows(self) -> int:
        return sum(s["n_rows"] for s in self.shards)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def roles(self) -> list[str] | None:
        """Names of the roles its rows are labelled with (chat data), or None (plain text, older stores)."""
        roles = self.manifest.get("roles")
        return list(roles) if roles else None

    def check_roles(self, roles: Sequence[int]) -> None:
        """Raise unless the store can filter rows by role (it was harvested from a chat source)."""
        if roles and self.roles is None:
            raise OpenscopeError(
                f"the store at {self.root} has no token roles (not harvested from a chat source); "
                "drop --roles or harvest --source sharegpt / chat:PATH"
            )

    def width(self, site: str) -> int:
        return int(self.manifest["sites"][self.check_site(site)]["width"])

    def check_site(self, site: str) -> str:
        if site not in self.manifest["sites"]:
            raise OpenscopeError(
                f"the store at {self.root} holds no site {site!r}; it has {', '.join(self.sites)}"
            )
        return site

    def stats(self, site: str) -> SiteStats:
        return site_stats(self.shards, self.check_site(site))

    def mean(self, site: str) -> Tensor:
        """Per-site mean activation (from the shards' float64 sums)."""
        total = torch.zeros(self.width(site), dtype=torch.float64)
        for i in range(len(self.shards)):
            total += self.read_shard(i, [f"stats.sum.{site}"])[f"stats.sum.{site}"]
        return (total / max(self.n_rows, 1)).float()

    def shard_path(self, index: int) -> Path:
        return self.root / self.shards[index]["file"]

    def check_shard(self, index: int) -> None:
        """Raise if a shard is missing or its checksum does not match the manifest."""
        path = self.shard_path(index)
        if not path.is_file():
            raise OpenscopeError(f"shard {path.name} of {self.root} is missing")
        if not shard_intact(path, self.shards[index]):
            raise OpenscopeError(f"shard {path.name} of {self.root} is corrupt (checksum mismatch)")

    def read_shard(self, index: int, keys: Sequence[str]) -> dict[str, Tensor]:
        """Load the named tensors of one shard (memory-mapped; only those keys are read)."""
        if self.verify and index not in self._verified:
            self.check_shard(index)
            self._verified.add(index)
        try:
            with safe_open(str(self.shard_path(index)), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in keys}
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise OpenscopeError(f"cannot read shard {self.shard_path(index).name}: {exc}") from None

    def read_shard_keys(self, index: int) -> list[str]:
        """Names of every tensor in a shard."""
        with safe_open(str(self.shard_path(index)), framework="pt") as fh:
            return list(fh.keys())

    def batches(
        self,
        sites: Sequence[str],
        batch_size: int,
        seed: int = 0,
        shards_in_memory: int = 2,
        epochs: int | None = 1,
        drop_last: bool = False,
        roles: Sequence[int] = (),
    ) -> Iterator[ActivationBatch]:
        """Shuffled batches across shards, deterministic for a seed.

        Each epoch visits the shards in a seeded random order, `shards_in_memory` at a time; the
        rows of that window (plus the leftover of the last one) are shuffled and cut into batches.
        Memory holds at most that window, never the whole store. `roles` (ids; chat stores) keeps
        only rows of those roles.
        """
        keys = [self.check_site(s) for s in sites]
        self.check_roles(roles)
        meta = ["token_ids", "context", "position"] + (["role"] if self.roles is not None else [])
        wanted = torch.tensor(list(roles), dtype=torch.uint8)
        epoch = 0
        while epochs is None or epoch < epochs:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.shards), generator=gen).tolist()
            carry: dict[str, Tensor] | None = None
            for start in range(0, len(order), shards_in_memory):
                parts = [self.read_shard(i, keys + meta) for i in order[start : start + shards_in_memory]]
                if carry is not None:
                    parts.insert(0, carry)
                window = {k: torch.cat([p[k] for p in parts]) for k in keys + meta}
                if len(wanted):
                    sel = torch.isin(window["role"], wanted)
                    window = {k: v[sel] for k, v in window.items()}
                perm = torch.randperm(len(window["token_ids"]), generator=gen)
                n_full = len(perm) // batch_size * batch_size
                for b in range(0, n_full, batch_size):
                    idx = perm[b : b + batch_size]
                    yield ActivationBatch(
                        {k: window[k][idx].float() for k in keys},
                        window["token_ids"][idx],
                        window["context"][idx],
                        window["position"][idx],
                        window["role"][idx] if "role" in window else None,
                    )
                rest = perm[n_full:]
                carry = {k: v[rest] for k, v in window.items()} if len(rest) else None
            if carry is not None and not drop_last:
                yield ActivationBatch(
                    {k: carry[k].float() for k in keys},
                    carry["token_ids"],
                    carry["context"],
                    carry["position"],
                    carry.get("role"),
                )
            epoch += 1


def save_manifest(root: Path, manifest: dict[str, Any]) -> None:
    save_json(root / MANIFEST, manifest)
