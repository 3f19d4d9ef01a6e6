"""Released dictionaries by name: Hugging Face Hub references and the registry of Gemma Scope releases.

Wherever a dictionary folder is accepted, two kinds of names work as well:

- **Hub references** `hf://OWNER/REPO/PATH` (optionally `hf://OWNER/REPO@REVISION/PATH`, or
  `.../PATH@REVISION`): the folder PATH of a model repository, e.g.
  `hf://google/gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_medium`. A path written through
  `pathlib.Path` loses one slash (`hf:/google/...`); that spelling is read too.
- **Release names** in SAELens's style, `RELEASE:ID` or `RELEASE/ID`:
  `gemma-scope-2-270m-pt-res:layer_9_width_16k_l0_medium`, `gemma-scope-2b-pt-res-canonical/layer_0/width_16k/canonical`
  (optionally `@REVISION` at the end). The release → repository/folder table is the registry shipped
  with openscope (`releases.json`, every Gemma Scope 1 and 2 release; `scripts/build_releases.py`).

Names are checked before anything touches the network: an unknown release, an id or a folder that is
not in the registry (for Google's Gemma Scope repositories) is a one-line error with the nearest known
names (difflib). A folder of a known repository that the registry does not list is still accepted when
it is spelled like a Gemma Scope folder (`transcoder/layer_9_width_65k_l0_big_affine`,
`layer_3/width_131k/average_l0_40`), since the registry follows SAELens's list, not the repositories.

Downloads go through `huggingface_hub` into its usual cache (HF_HOME / HF_HUB_CACHE), only the one
folder (`allow_patterns`), never a pickle (`*.pt` other than dictionary_learning's `ae.pt`, `*.bin`,
`*.pkl`, ...; openscope never unpickles), with huggingface_hub's progress bars. Offline first: the cache
is tried before the network, and with HF_HUB_OFFLINE=1 the cache alone is used.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import json
import logging
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from openscope.errors import OpenscopeError

log = logging.getLogger(__name__)

REGISTRY_FILE = "releases.json"
SCHEME = "hf://"
DOWNLOAD_PATTERNS = ("*.safetensors", "*.json", "*.yaml", "*.npz", "ae.pt")
"""The files fetched from a dictionary folder: every format openscope reads, and no other pickle."""

_GS2_FOLDER = re.compile(
    r"(?:(?:resid_post|attn_out|mlp_out|transcoder)(?:_all)?/layer_\d+_width_\d+[km]_l0_(?:small|medium|big)"
    r"(?:_affine)?(?:_seed_\d+)?|clt/width_\d+[km]_l0_(?:small|medium|big)(?:_affine)?"
    r"|crosscoder/layer_\d+(?:_\d+)+_width_\d+[km]_l0_(?:small|medium|big))"
)
_GS1_FOLDER = re.compile(r"(?:layer_\d+|embedding)/width_\d+[km]/(?:average_l0_\d+|canonical)")


class Release(NamedTuple):
    """One release of the registry."""

    name: str
    """The release name, e.g. gemma-scope-2-270m-pt-res."""
    repo: str
    """The Hugging Face model repository, e.g. google/gemma-scope-2-270m-pt."""
    model: str
    """The model the dictionaries were trained on, as the release names it."""
    folders: dict[str, str]
    """id → folder inside the repository."""


class HubRef(NamedTuple):
    """A dictionary folder in a Hub repository."""

    repo: str
    """owner/name of the model repository."""
    path: str
    """The folder inside the repository ("" = its root)."""
    revision: str | None = None
    """Branch, tag or commit; None = main."""

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{SCHEME}{self.repo}{rev}/{self.path}".rstrip("/")


def expand(pattern: str) -> list[str]:
    """The names a brace pattern stands for: `a_{1,2}_b_{x,y}` → a_1_b_x, a_1_b_y, a_2_b_x, a_2_b_y."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


@functools.lru_cache(maxsize=1)
def releases() -> dict[str, Release]:
    """The shipped registry: release name → Release."""
    text = resources.files("openscope.coders").joinpath(REGISTRY_FILE).read_text(encoding="utf-8")
    out: dict[str, Release] = {}
    for name, entry in json.loads(text)["releases"].items():
        if "paths" in entry:
            folders = dict(entry["paths"])
        else:
            prefix = f"{entry['folder']}/" if entry.get("folder") else ""
            folders = {i: prefix + i for p in entry["ids"] for i in expand(p)}
        out[name] = Release(name, entry["repo"], entry["model"], folders)
    return out


def repo_folders() -> dict[str, set[str]]:
    """Every registry repository → the folders its releases name."""
    out: dict[str, set[str]] = {}
    for r in releases().values():
        out.setdefault(r.repo, set()).update(r.folders.values())
    return out


def _nearest(word: str, candidates: list[str] | set[str], n: int = 3) -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=n, cutoff=0.5)
    return f"; nearest: {', '.join(close)}" if close else ""


def _split_revision(text: str) -> tuple[str, str | None]:
    if "@" in text:
        head, rev = text.rsplit("@", 1)
        if not rev or "/" in rev:
            raise OpenscopeError(f"bad revision in {text!r}: write NAME@REVISION (a branch, tag or commit)")
        return head, rev
    return text, None


def parse_reference(source: str | Path) -> HubRef | None:
    """The Hub folder a name refers to, or None when it is no reference (a local path).

    An existing local path is never a reference. Names that look like references but are wrong (an
    unknown release, a typo in an id or in a Gemma Scope folder) are one-line errors with the nearest
    known names; nothing here touches the network.
    """
    text = str(source)
    if text.startswith(("hf:/", "hf:\\")):
        rest = text[len("hf:") :].lstrip("/\\").replace("\\", "/")
        parts = rest.split("/", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise OpenscopeError(f"a Hub reference is hf://OWNER/REPO/FOLDER, got {text!r}")
        name, revision = _split_revision(parts[1])
        path = parts[2].strip("/") if len(parts) > 2 else ""
        if revision is None and "@" in path:
            path, revision = _split_revision(path)
        ref = HubRef(f"{parts[0]}/{name}", path, revision)
        check_reference(ref)
        return ref
    if Path(text).expanduser().exists():
        return None
    return _release_reference(text)


def _release_reference(text: str) -> HubRef | None:
    """`RELEASE:ID` or `RELEASE/ID` (+ optional @REVISION); None when the text names no release."""
    m = re.match(r"([A-Za-z0-9][\w.-]*)[:/](.+)$", text)
    if m is None:
        return None
    name, sae_id = m.group(1), m.group(2)
    known = releases()
    if name not in known:
        if name.startswith("gemma-scope"):
            raise OpenscopeError(
                f"unknown release {name!r}{_nearest(name, list(known))} (see `openscope releases`)"
            )
        return None
    sae_id, revision = _split_revision(sae_id)
    release = known[name]
    folder = release.folders.get(sae_id.strip("/"))
    if folder is None:
        raise OpenscopeError(
            f"release {name} ({release.repo}) has no id {sae_id!r}{_nearest(sae_id, list(release.folders))}"
        )
    return HubRef(release.repo, folder, revision)


def check_reference(ref: HubRef) -> None:
    """Refuse a reference into a Gemma Scope repository that names no known or well-formed folder."""
    folders = repo_folders()
    if ref.repo not in folders:
        if ref.repo.lower().startswith("google/gemma-scope"):
            raise OpenscopeError(
                f"unknown Gemma Scope repository {ref.repo}{_nearest(ref.repo, list(folders))}"
            )
        return  # someone else's repository: the Hub will say
    if ref.path in folders[ref.repo] or _GS2_FOLDER.fullmatch(ref.path) or _GS1_FOLDER.fullmatch(ref.path):
        return
    raise OpenscopeError(
        f"{ref.repo} has no dictionary folder {ref.path!r}{_nearest(ref.path, folders[ref.repo])}"
    )


# ---- the cache and the download --------------------------------------------------------------------


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def _is_dictionary(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.is_file() and any(p.match(pattern) for pattern in DOWNLOAD_PATTERNS) for p in folder.iterdir()
    )


def fetch(ref: HubRef, cache_dir: str | Path | None = None) -> Path:
    """The local folder of a Hub reference: from the cache when there (offline first), else downloaded
    (only that folder's files). One-line errors for a missing repository, revision or folder."""
    # huggingface_hub is imported here: every command that never names a Hub folder starts without it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [f"{ref.path}/{p}" if ref.path else p for p in DOWNLOAD_PATTERNS]
    where = f"{ref.path or '(root)'} of {ref.repo}" + (f" at revision {ref.revision}" if ref.revision else "")
    # The cache is looked up when called (not when huggingface_hub was imported): HF_HOME set later counts.
    cache = str(cache_root(cache_dir))
    common: dict[str, Any] = {"revision": ref.revision, "cache_dir": cache, "allow_patterns": patterns}
    root: Path | None = None
    try:
        root = Path(snapshot_download(ref.repo, local_files_only=True, **common))
    except (LocalEntryNotFoundError, OSError, ValueError):
        root = None
    if root is None or not _is_dictionary(root / ref.path):
        if _offline():
            rev = f"revision {ref.revision} of " if ref.revision else ""
            raise OpenscopeError(
                f"{ref.path or '(root)'} of {rev}{ref.repo} is not in the Hugging Face cache and "
                "HF_HUB_OFFLINE is set; download it once online"
            )
        log.info("downloading %s", where)
        try:
            root = Path(snapshot_download(ref.repo, **common))
        except RevisionNotFoundError:
            raise OpenscopeError(f"{ref.repo} has no revision {ref.revision!r}") from None
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            kind = (
                "is gated (log in with `hf auth login`)"
                if isinstance(exc, GatedRepoError)
                else "was not found"
            )
            raise OpenscopeError(f"repository {ref.repo} {kind}") from None
        except (EntryNotFoundError, LocalEntryNotFoundError, OSError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise OpenscopeError(f"could not download {where}: {reason}") from None
    folder = root / ref.path
    if not _is_dictionary(folder):
        raise OpenscopeError(f"{where} holds no dictionary files ({', '.join(DOWNLOAD_PATTERNS)})")
    return folder


def resolve(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local folder for a folder path, a Hub reference or a release name (downloaded if needed)."""
    ref = parse_reference(source)
    return Path(source).expanduser() if ref is None else fetch(ref, cache_dir)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """huggingface_hub's cache folder (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_ids(release: Release, cache_dir: str | Path | None = None) -> list[str]:
    """The ids of a release whose folder is in the cache (any cached revision)."""
    repo_dir = cache_root(cache_dir) / ("models--" + release.repo.replace("/", "--"))
    snapshots = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
    return [i for i, folder in release.folders.items() if any(_is_dictionary(s / folder) for s in snapshots)]
