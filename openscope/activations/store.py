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

import collections
import hashlib
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from safetensors import safe_open
from torch import Tensor

from openscope.activations.batches import ActivationBatch
from openscope.activations.remote import RemoteFolder, store_url
from openscope.config import save_json, to_jsonable
from openscope.errors import OpenscopeError
from openscope.files import Ownership, atomic_file

T = TypeVar("T")
U = TypeVar("U")
V = TypeVar("V")

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
_SHARD_FILE = re.compile(r"shard_\d{5,}(\.rank\d+)?\.safetensors")


def _check_fields(where: str, obj: dict[str, Any], fields: dict[str, type | tuple[type, ...]]) -> None:
    for key, kind in fields.items():
        if not isinstance(obj.get(key), kind):
            raise OpenscopeError(f"{where} is damaged: its {key!r} is missing or of the wrong type")


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """A parsed manifest, checked: one-line errors naming `where` for a foreign or damaged one."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OpenscopeError(f"{where} is not an openscope activation store manifest")
    _check_fields(where, manifest, _MANIFEST_FIELDS)
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise OpenscopeError(f"{where} is damaged: shard entry {i} is not an object")
        _check_fields(f"{where} (shard entry {i})", shard, _SHARD_FIELDS)
        # Shard names come from the file: only ours are read, so a doctored one cannot point elsewhere.
        if not _SHARD_FILE.fullmatch(shard["file"]):
            raise OpenscopeError(f"{where} is damaged: shard entry {i} names {shard['file']!r}")
    _check_fields(
        f"{where} (identity)", manifest["identity"], {"source": str, "context_len": int, "dtype": str}
    )
    if not isinstance(manifest["model"].get("name"), str):
        raise OpenscopeError(f"{where} is damaged: it names no model")
    return manifest


def parse_manifest(data: bytes | str, where: str) -> dict[str, Any]:
    """A manifest's text parsed and checked (`check_manifest`)."""
    try:
        manifest = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OpenscopeError(f"{where} is corrupt ({str(exc).splitlines()[0]})") from None
    return check_manifest(manifest, where)


def read_manifest(root: Path, name: str = MANIFEST) -> dict[str, Any]:
    """The manifest of a store, checked: one-line errors for a missing, corrupt or foreign one."""
    path = root / name
    if not path.is_file():
        raise OpenscopeError(f"{root} is not an activation store (no {name})")
    return parse_manifest(path.read_bytes(), str(path))


def read_remote_manifest(folder: RemoteFolder, name: str = MANIFEST) -> dict[str, Any]:
    """The manifest of a store at a URL, checked (see `read_manifest`)."""
    try:
        data = folder.read(name)
    except FileNotFoundError:
        raise OpenscopeError(f"{folder.shown} is not an activation store (no {name})") from None
    return parse_manifest(data, f"{folder.shown}/{name}")


def is_store(root: Path) -> bool:
    """Whether root holds an activation store manifest openscope wrote (it may be incomplete)."""
    try:
        read_manifest(root)
    except OpenscopeError:
        return False
    return True


def is_store_folder(root: Path) -> bool:
    """Whether root holds a store: its manifest, or the manifests of the ranks of a torchrun harvest still
    writing it (`manifest.rank0.json`, …)."""
    return is_store(root) or any(is_store_manifest(p) for p in root.glob("manifest.rank*.json"))


def is_store_manifest(path: Path) -> bool:
    try:
        parse_manifest(path.read_bytes(), str(path))
    except (OSError, OpenscopeError):
        return False
    return True


STORE = Ownership(
    "an activation store",
    files=(MANIFEST, STATS, "shard_*.safetensors", "*.tmp", "manifest.rank*.json"),
    manifest=is_store_folder,
)
"""What a store folder holds: `--overwrite` replaces a folder only if it holds nothing else."""


_DTYPES = {code: dtype for dtype, code in _ST_DTYPES.items()}


def shard_header(data: bytes) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header) of a safetensors file, from its first bytes (8 + header length)."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 + size:
        raise ValueError(f"the header is cut short ({len(data)} bytes of {8 + size})")
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    return 8 + size, header


def decode_tensor(info: dict[str, Any], data: bytes | bytearray | memoryview) -> Tensor:
    """One tensor from its header entry and its bytes (a copy the caller owns)."""
    dtype = _DTYPES[info["dtype"]]
    if not len(data):
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info["shape"])


def decode_tensors(data: bytes, keys: Sequence[str]) -> dict[str, Tensor]:
    """The named tensors of a whole safetensors file held in memory (the reverse of `write_tensors`)."""
    start, header = shard_header(data)
    view = memoryview(data)
    out = {}
    for k in keys:
        a, b = header[k]["data_offsets"]
        out[k] = decode_tensor(header[k], view[start + a : start + b])
    return out


class ActivationStore:
    """Read access to a (possibly still growing) store: its finished shards, statistics, and batches.

    `root` is a local folder or an fsspec URL (`openscope.activations.remote`); a URL's shards are read
    whole and checked once, or (unchecked) only the byte ranges of the tensors asked for.
    """

    def __init__(self, root: str | Path, verify: bool = True, manifest: dict[str, Any] | None = None):
        url = store_url(root)
        self.remote = RemoteFolder(url) if url is not None else None
        self.root: Path | str = Path(root) if self.remote is None else self.remote.shown
        """The store's folder, or its URL as shown (credentials masked)."""
        self.location: Path | str = Path(root) if url is None else url
        """Where the store is: the folder, or the URL itself (reopen it with this)."""
        if manifest is not None:  # a harvest finishing a store: its manifest is not written yet
            self.manifest = manifest
        elif self.remote is not None:
            self.manifest = read_remote_manifest(self.remote)
        else:
            self.manifest = read_manifest(Path(root))
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
        """A shard's file (a local store's)."""
        return Path(self.location) / self.shards[index]["file"]

    def check_shard(self, index: int) -> None:
        """Raise if a shard is missing or its checksum does not match the manifest."""
        if self.remote is not None:
            self._remote_whole(index)
            return
        path = self.shard_path(index)
        if not path.is_file():
            raise OpenscopeError(f"shard {path.name} of {self.root} is missing")
        if not shard_intact(path, self.shards[index]):
            raise OpenscopeError(f"shard {path.name} of {self.root} is corrupt (checksum mismatch)")

    def _remote_whole(self, index: int) -> bytes:
        """A remote shard's bytes, checked against its manifest checksum."""
        assert self.remote is not None
        name = self.shards[index]["file"]
        try:
            data = self.remote.read(name)
        except FileNotFoundError:
            raise OpenscopeError(f"shard {name} of {self.root} is missing") from None
        kind, expected = shard_checksum(self.shards[index])
        actual = sha256_bytes(data) if kind == "sha256" else _crc32_hex(zlib.crc32(data))
        if actual != expected:
            raise OpenscopeError(f"shard {name} of {self.root} is corrupt (checksum mismatch)")
        self._verified.add(index)
        return data

    def _remote_keys(self, index: int, keys: Sequence[str]) -> dict[str, Tensor]:
        """Only the byte ranges of the named tensors of a remote shard (and its header)."""
        assert self.remote is not None
        name = self.shards[index]["file"]
        try:
            head = self.remote.read(name, 0, 8)
            head += self.remote.read(name, 8, 8 + int.from_bytes(head[:8], "little"))
        except FileNotFoundError:
            raise OpenscopeError(f"shard {name} of {self.root} is missing") from None
        start, header = shard_header(head)
        ranges = [(start + header[k]["data_offsets"][0], start + header[k]["data_offsets"][1]) for k in keys]
        parts = self.remote.read_ranges(name, ranges) if ranges else []
        return {k: decode_tensor(header[k], p) for k, p in zip(keys, parts, strict=True)}

    def read_shard(self, index: int, keys: Sequence[str]) -> dict[str, Tensor]:
        """Load the named tensors of one shard (memory-mapped; only those keys are read)."""
        if self.remote is not None:
            name = self.shards[index]["file"]
            try:
                if self.verify and index not in self._verified:
                    return decode_tensors(self._remote_whole(index), keys)
                return self._remote_keys(index, keys)
            except (ValueError, KeyError) as exc:  # a damaged header: bad JSON, offsets or a missing key
                raise OpenscopeError(f"cannot read shard {name} of {self.root}: {exc!r}") from None
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
        if self.remote is not None:
            name = self.shards[index]["file"]
            head = self.remote.read(name, 0, 8)
            head += self.remote.read(name, 8, 8 + int.from_bytes(head[:8], "little"))
            return list(shard_header(head)[1])
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
        prefetch: int = 1,
        pin_memory: bool = False,
    ) -> Iterator[ActivationBatch]:
        """Shuffled batches across shards, deterministic for a seed.

        Each epoch visits the shards in a seeded random order, `shards_in_memory` at a time; the
        rows of that window (plus the leftover of the last one) are shuffled and cut into batches.
        Memory holds at most that window and the `prefetch` windows read ahead by a background thread
        (read, checked and decoded while the consumer works on the current one), never the whole
        store. `roles` (ids; chat stores) keeps only rows of those roles. `pin_memory` (CUDA only)
        serves activations in page-locked memory, so `ActivationBatch.to(device)` copies without
        blocking. Prefetching and pinning never change which rows come in which batch.
        """
        keys = [self.check_site(s) for s in sites]
        self.check_roles(roles)
        meta = ["token_ids", "context", "position"] + (["role"] if self.roles is not None else [])
        wanted = torch.tensor(list(roles), dtype=torch.uint8)
        pin = pin_memory and torch.cuda.is_available()
        if not self.shards:
            return

        def load(group: list[int]) -> list[dict[str, Tensor]]:  # runs in the read-ahead thread
            parts = [self.read_shard(i, keys + meta) for i in group]
            if len(wanted):
                parts = [{k: v[torch.isin(p["role"], wanted)] for k, v in p.items()} for p in parts]
            return parts

        carry: dict[str, Tensor] | None = None
        for (gen, last), parts in read_ahead(self._windows(seed, epochs, shards_in_memory), load, prefetch):
            if carry is not None:
                parts.insert(0, carry)
            window = {k: torch.cat([p[k] for p in parts]) for k in keys + meta}
            perm = torch.randperm(len(window["token_ids"]), generator=gen)
            n_full = len(perm) // batch_size * batch_size
            for b in range(0, n_full, batch_size):
                idx = perm[b : b + batch_size]
                yield ActivationBatch(
                    {k: gather_rows(window[k], idx, pin) for k in keys},
                    window["token_ids"][idx],
                    window["context"][idx],
                    window["position"][idx],
                    window["role"][idx] if "role" in window else None,
                )
            rest = perm[n_full:]
            carry = {k: v[rest] for k, v in window.items()} if len(rest) else None
            if last:  # the end of an epoch: its leftover rows are one short batch, or dropped
                if carry is not None and not drop_last:
                    yield ActivationBatch(
                        {k: gather_rows(carry[k], torch.arange(len(carry[k])), pin) for k in keys},
                        carry["token_ids"],
                        carry["context"],
                        carry["position"],
                        carry.get("role"),
                    )
                carry = None

    def _windows(
        self, seed: int, epochs: int | None, shards_in_memory: int
    ) -> Iterator[tuple[tuple[torch.Generator, bool], list[int]]]:
        """((the epoch's generator, last window of the epoch?), shard indices) of each window in order.

        Each epoch's generator draws the shard order first, then (in `batches`) each window's shuffle."""
        epoch = 0
        while epochs is None or epoch < epochs:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.shards), generator=gen).tolist()
            starts = range(0, len(order), shards_in_memory)
            for start in starts:
                yield (gen, start == starts[-1]), order[start : start + shards_in_memory]
            epoch += 1


def gather_rows(src: Tensor, idx: Tensor, pin: bool) -> Tensor:
    """src[idx] in float32, in page-locked memory when `pin` (so a copy to the GPU need not block)."""
    if not pin:
        return src[idx].float()
    out = torch.empty((len(idx), *src.shape[1:]), dtype=torch.float32, pin_memory=True)
    if src.dtype == torch.float32:
        torch.index_select(src, 0, idx, out=out)
    else:
        out.copy_(src[idx])
    return out


def read_ahead(items: Iterator[tuple[T, U]], load: Callable[[U], V], depth: int = 1) -> Iterator[tuple[T, V]]:
    """(tag, load(item)) for each (tag, item), with `load` running in a background thread up to `depth`
    items ahead of the consumer (depth 0: in the consumer's thread). The items are drawn in the
    consumer's thread, in order; a failed load raises in the consumer, where it would have."""
    if depth < 1:
        for tag, item in items:
            yield tag, load(item)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-reader")
    pending: collections.deque[tuple[T, Future[V]]] = collections.deque()
    try:
        for tag, item in items:
            pending.append((tag, pool.submit(load, item)))
            if len(pending) > depth:
                tag0, fut = pending.popleft()
                yield tag0, fut.result()
        while pending:
            tag0, fut = pending.popleft()
            yield tag0, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def save_manifest(root: Path, manifest: dict[str, Any], name: str = MANIFEST) -> None:
    save_json(root / name, manifest)


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """A manifest as `save_manifest` writes it (the same bytes at a URL as in a local folder)."""
    return (json.dumps(to_jsonable(manifest), indent=2, sort_keys=True) + "\n").encode()
