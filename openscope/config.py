"""Typed configs: helpers shared by every dataclass config in openscope.

Each config is a dataclass whose fields carry a docstring (a string literal right after the
field). Those docstrings are the CLI's `--help` text (read here with `ast`), and configs are
saved as JSON beside their outputs so that a run can be checked and resumed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import textwrap
from pathlib import Path
from typing import Any, TypeVar

from openscope.errors import OpenscopeError
from openscope.files import write_text

T = TypeVar("T")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written under it (empty if none)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, [*body[1:], None], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def to_jsonable(obj: Any) -> Any:
    """A dataclass (or nested values) as plain JSON types; paths become strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | list):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


def save_json(path: Path, data: Any) -> None:
    """Write JSON atomically (`openscope.files.write_text`), so a crash never leaves half a file."""
    write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n", sync=False)


def flag(name: str) -> str:
    """The command-line flag of a config field: `checkpoint_every` -> `--checkpoint-every`."""
    return "--" + name.replace("_", "-")


def check_numbers(
    cfg: Any,
    *,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    fractions: tuple[str, ...] = (),
) -> None:
    """One-line OpenscopeError unless every float field of a config is finite, the fields named in
    `positive` are > 0, those in `non_negative` are >= 0 and those in `fractions` lie in [0, 1]
    (None, for optional fields, passes)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise OpenscopeError(f"{flag(f.name)} must be a finite number, got {value}")
    for names, ok, says in (
        (positive, lambda v: v > 0, "positive"),
        (non_negative, lambda v: v >= 0, "zero or more"),
        (fractions, lambda v: 0 <= v <= 1, "between 0 and 1"),
    ):
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not ok(value):
                raise OpenscopeError(f"{flag(name)} must be {says}, got {value}")


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """Comma-separated positive integers (`128,512,2048`), or a one-line error naming `what`."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise OpenscopeError(f"{what} must be comma-separated positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """Comma-separated positive finite numbers (`10,50,150`), or a one-line error naming `what`."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != len(parts) or not all(math.isfinite(v) and v > 0 for v in values):
        raise OpenscopeError(f"{what} must be comma-separated positive numbers, got {text!r}")
    return values
