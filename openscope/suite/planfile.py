"""The plan file: a `SuitePlan` as YAML (or JSON), written to be read and edited by hand.

YAML puts one item on each line (a flow mapping), so a catalogue of hundreds of dictionaries stays a
list a person can scan, sort and cut; a `.json` file holds the same document. Reading checks every key
and value: a typo in a key is one line naming the key, its line in the file and the closest valid key;
a bad value names its line and its item.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from openscope.errors import OpenscopeError
from openscope.files import check_file_output, read_text, write_text
from openscope.suite.plan import ITEM_FIELDS, DataSettings, SuiteItem, SuitePlan, unknown_key

FORMAT = "openscope-suite-plan"
"""The `format` key of every plan file openscope writes."""
VERSION = 1
"""The plan file's version."""
TOP_KEYS = ("format", "version", "model", "preset", "scale", "data", "defaults", "items")
"""Keys of a plan file's top level."""
DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataSettings))
"""Keys of the `data` section."""
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader when PyYAML has it (ten times faster on a catalogue of a thousand lines)."""
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's safe dumper when PyYAML has it."""
_NUMBER = re.compile(r"^[+-]?(\d[\d_]*)(\.\d*)?([eE][+-]?\d+)?$")

HEADER = """\
# openscope suite plan: one line per dictionary. Edit freely (names, widths, target L0s, tokens; delete
# lines, add some); `openscope suite cost FILE` prices it again. Keys of an item: name (its folder),
# kind (sae, transcoder, skip_transcoder, clt, skip_clt, crosscoder), sites (a site spec; transcoders and
# CLTs their mlp_in), width (a CLT or crosscoder: the total), target_l0 (a CLT or crosscoder: per layer),
# tokens, and optionally options (any other `openscope train` setting for that item alone).
"""


class Locator:
    """Line numbers of the keys of a parsed document, for messages of the form `FILE:LINE: ...`."""

    def __init__(self, source: str, lines: dict[tuple[Any, ...], int]) -> None:
        self.source = source
        self.lines = lines

    def at(self, *path: Any) -> str:
        """`FILE:LINE: ` for the key at `path` (or the nearest enclosing one), `FILE: ` when unknown."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return f"{self.source}:{line}: "
        return f"{self.source}: "


def _key_lines(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            out.setdefault(sub, key.start_mark.line + 1)
            _key_lines(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out.setdefault((*path, i), value.start_mark.line + 1)
            _key_lines(value, (*path, i), out)


def _locator(text: str, source: str) -> Locator:
    lines: dict[tuple[Any, ...], int] = {}
    try:
        node = yaml.compose(text, Loader=LOADER)
    except yaml.YAMLError:
        node = None  # valid JSON that YAML cannot compose: messages then name the file only
    if node is not None:
        _key_lines(node, (), lines)
    return Locator(source, lines)


def _parse(text: str, path: Path) -> Any:
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.load(text, Loader=LOADER)
    except (ValueError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise OpenscopeError(f"{where}: not a readable plan ({' '.join(str(problem).split())})") from None


def _integer(value: Any) -> Any:
    """An integer given as such, as an integral float (4e9 in JSON) or as text (YAML reads `4e9` as text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value.replace("_", ""))
        return int(number) if number.is_integer() else number
    return value


def _number(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value.replace("_", ""))
    return value


def _mapping(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise OpenscopeError(f"{where}{what} must be a mapping of keys to values, got {type(value).__name__}")
    return value


def _keys(doc: dict[str, Any], expected: tuple[str, ...], what: str, loc: Locator, *path: Any) -> None:
    for key in doc:
        if key not in expected:
            raise OpenscopeError(f"{loc.at(*path, key)}{unknown_key(str(key), expected, what)}")


def _item(raw: Any, i: int, loc: Locator) -> SuiteItem:
    where = loc.at("items", i)
    doc = _mapping(raw, f"item {i + 1}", where)
    name = doc.get("name")
    what = f"item {name!r}" if isinstance(name, str) else f"item {i + 1}"
    _keys(doc, ITEM_FIELDS, what, loc, "items", i)
    missing = [k for k in ITEM_FIELDS if k not in doc and k != "options"]
    if missing:
        raise OpenscopeError(f"{where}{what} has no {', '.join(missing)}")
    for key in ("name", "kind", "sites"):
        if not isinstance(doc[key], str):
            raise OpenscopeError(f"{loc.at('items', i, key)}{what}: {key} must be text, got {doc[key]!r}")
    options = _mapping(doc.get("options") or {}, f"the options of {what}", loc.at("items", i, "options"))
    return SuiteItem(
        name=doc["name"],
        kind=doc["kind"],
        sites=doc["sites"],
        width=_integer(doc["width"]),
        target_l0=_number(doc["target_l0"]),
        tokens=_integer(doc["tokens"]),
        options=dict(options),
    )


def plan_from_document(doc: Any, loc: Locator) -> SuitePlan:
    """A `SuitePlan` from a parsed plan document; one-line errors with the file and line of the problem.
    Checks the document's shape and keys only (`openscope.suite.plan.check_plan` checks the values)."""
    doc = _mapping(doc, "a plan", loc.at())
    if doc.get("format", FORMAT) != FORMAT:  # another file openscope wrote: say what it is first
        raise OpenscopeError(f"{loc.at('format')}format is {doc['format']!r}, not {FORMAT!r}")
    _keys(doc, TOP_KEYS, "the plan", loc)
    for key in ("model", "items"):
        if key not in doc:
            raise OpenscopeError(f"{loc.at()}the plan has no {key!r}")
    if not isinstance(doc["model"], str) or not doc["model"].strip():
        raise OpenscopeError(f"{loc.at('model')}model must be a model name, hub id or folder")
    data = _mapping(doc.get("data") or {}, "data", loc.at("data"))
    _keys(data, DATA_KEYS, "data", loc, "data")
    items = doc["items"]
    if not isinstance(items, list) or not items:
        raise OpenscopeError(f"{loc.at('items')}items must be a non-empty list")
    scale = _number(doc.get("scale", 1.0))
    if (
        not isinstance(scale, int | float)
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise OpenscopeError(f"{loc.at('scale')}scale must be a positive number, got {scale!r}")
    return SuitePlan(
        model=doc["model"],
        items=[_item(raw, i, loc) for i, raw in enumerate(items)],
        data=DataSettings(
            **{k: _integer(v) if k in ("context_len", "batch_size") else v for k, v in data.items()}
        ),
        defaults=dict(_mapping(doc.get("defaults") or {}, "defaults", loc.at("defaults"))),
        preset=str(doc.get("preset") or ""),
        scale=float(scale),
    )


def read_plan(path: str | Path) -> tuple[SuitePlan, Locator]:
    """Read a plan file (YAML, or JSON when it ends in .json) and the line numbers of its keys."""
    path = Path(path)
    if not path.is_file():
        why = "a folder" if path.is_dir() else "no such file"
        raise OpenscopeError(f"{path} is not a plan file ({why})")
    text = read_text(path)
    loc = _locator(text, str(path))
    return plan_from_document(_parse(text, path), loc), loc


def plan_document(plan: SuitePlan) -> dict[str, Any]:
    """The plan as a plain document (the keys of a plan file, in their order)."""
    items = []
    for item in plan.items:
        row = dataclasses.asdict(item)
        if not row["options"]:
            del row["options"]
        items.append(row)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": plan.model,
        "preset": plan.preset,
        "scale": plan.scale,
        "data": dataclasses.asdict(plan.data),
        "defaults": dict(plan.defaults),
        "items": items,
    }


def plan_text(plan: SuitePlan, as_json: bool = False) -> str:
    """The plan file's text: JSON, or YAML with a header and one line per item."""
    doc = plan_document(plan)
    if as_json:
        return json.dumps(doc, indent=2) + "\n"
    items = doc.pop("items")
    head = yaml.dump(doc, Dumper=DUMPER, sort_keys=False, default_flow_style=False, width=10**9)
    lines = [
        "- " + yaml.dump(row, Dumper=DUMPER, sort_keys=False, default_flow_style=True, width=10**9).strip()
        for row in items
    ]
    return HEADER + head + "items:\n" + "\n".join(lines) + "\n"


def is_plan(path: Path) -> bool:
    """Whether the file is a plan openscope wrote (its `format` key says so)."""
    try:
        doc = _parse(read_text(path), path)
    except (OSError, OpenscopeError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def write_plan(plan: SuitePlan, path: str | Path, *, overwrite: bool, flag: str = "--output") -> Path:
    """Write the plan (JSON for a .json path, else YAML). An existing file is replaced only if it is a
    plan and `overwrite` is set; anything else there is refused. Returns the path written."""
    target = check_file_output(path, "a suite plan", is_plan, overwrite=overwrite, flag=flag)
    write_text(target, plan_text(plan, as_json=target.suffix.lower() == ".json"))
    return target
