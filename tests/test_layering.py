"""The shape of the package, read from its source alone (nothing is imported or run).

openscope is built in layers. The top-level helpers (`errors`, `config`, `files`, `reports`) come first;
then the packages, each of which may import only from layers before it:

    models → data → activations → coders → train → eval → features → interp → suite → interventions
    → attribution → analysis → serve → the entry points (`cli.py`, `demo.py` and the deprecated alias
    `steer.py`)

Checked here, for every module under openscope/: no import cycle between modules, none between packages,
no import of a later layer, no private name (leading underscore) imported from another module, no file
over 600 lines, no function over 100 lines, and every import inside a function says why it is there.
Each failure names the file, the line and the rule. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "openscope"

TOP_LEVEL = ("errors", "config", "files", "reports")
"""Top-level helper modules: the first layer (openscope/__init__.py, which holds only the version, too)."""

PACKAGES = (
    "models",
    "data",
    "activations",
    "coders",
    "train",
    "eval",
    "features",
    "interp",
    "suite",
    "interventions",
    "attribution",
    "analysis",
    "serve",
)
"""The packages in layer order: each imports only the top-level helpers and packages before it."""

ENTRY_POINTS = ("cli", "demo", "steer")
"""The last layer: the command line (a package), the demo and the deprecated alias `openscope.steer`."""

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 100

ROUTE_TABLES = {("openscope/serve/app.py", "_add_routes")}
"""Functions exempt from the length limit: they only register the explorer's FastAPI routes, one short
handler after another, and read best as the single table of the API they are."""

PRAGMA = re.compile(r"^(noqa\b.*|type:\s*ignore.*|pyright:.*|pragma:.*|fmt:.*)$")
"""Comments that are tool directives, not reasons."""


class Violation(NamedTuple):
    """One broken rule at one place."""

    path: str
    """File, relative to the repository root."""
    line: int
    """1-based line number."""
    rule: str
    """The rule's name."""
    detail: str
    """What is wrong there."""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.detail}"


class Edge(NamedTuple):
    """One import of one openscope module by another."""

    source: str
    """The importing module (dotted name)."""
    target: str
    """The imported module (dotted name; a package's `__init__` is the package's own name)."""
    path: str
    """The importing file, relative to the repository root."""
    line: int
    """Line of the import statement."""


@dataclass
class Module:
    """One parsed module of the package."""

    name: str
    """Dotted name (`openscope.eval.splice`; a package's `__init__` is the package's name)."""
    path: str
    """File, relative to the repository root."""
    is_package: bool
    """Whether this is a package's `__init__.py` (relative imports then start from the package itself)."""
    source: str
    """The file's text."""
    tree: ast.Module = field(repr=False)
    """Its syntax tree."""


# ---- reading the package ---------------------------------------------------------------------------


def read_package(root: Path) -> dict[str, Module]:
    """Every module under root (a package folder) by dotted name."""
    modules = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        source = file.read_text(encoding="utf-8")
        name = ".".join(parts)
        path = file.relative_to(root.parent).as_posix()
        modules[name] = Module(name, path, is_package, source, ast.parse(source, filename=path))
    return modules


def absolute_base(module: Module, node: ast.ImportFrom) -> str:
    """The dotted module a `from ... import` statement reads from, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    parts = module.name.split(".")
    if not module.is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def known(name: str, modules: dict[str, Module]) -> str | None:
    """The module of the package that `name` (a module or a name inside one) belongs to, if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: Module, modules: dict[str, Module]) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """(statement, imported module) for every import of another module of the package, at any depth
    (inside functions and `if TYPE_CHECKING:` blocks too: they are dependencies all the same)."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute_base(module, node)
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            resolved = known(target, modules)
            if resolved is not None and resolved != module.name:
                yield node, resolved


def import_edges(modules: dict[str, Module]) -> list[Edge]:
    """Every import between two modules of the package."""
    return [
        Edge(m.name, target, m.path, node.lineno)
        for m in modules.values()
        for node, target in imports(m, modules)
    ]


def package_of(name: str) -> str:
    """`openscope.eval.splice` -> `openscope.eval`; a top-level module is its own package."""
    return ".".join(name.split(".")[:2])


def layer_of(name: str) -> int | None:
    """The layer of a module (0: the top-level helpers), None when the layer order does not name it."""
    parts = name.split(".")
    if len(parts) == 1:
        return 0  # openscope/__init__.py: the version only
    head = parts[1]
    if head in TOP_LEVEL and len(parts) == 2:
        return 0
    if head in PACKAGES:
        return 1 + PACKAGES.index(head)
    if head in ENTRY_POINTS:
        return 1 + len(PACKAGES)
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def comment_lines(source: str) -> tuple[dict[int, str], set[int]]:
    """(line -> comment text without the `#`, lines holding nothing but a comment)."""
    comments: dict[int, str] = {}
    alone: set[int] = set()
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = (comments.get(row, "") + " " + tok.string.lstrip("#").strip()).strip()
            if lines[row - 1].lstrip().startswith("#"):
                alone.add(row)
    return comments, alone


def is_reason(comment: str) -> bool:
    """Whether a comment says something beyond tool directives (`# noqa: F401`, `# type: ignore`)."""
    words = [part.strip() for part in comment.split("#")]
    return any(part and not PRAGMA.match(part) for part in words)


# ---- the rules ---------------------------------------------------------------------------------------


def module_cycle_violations(modules: dict[str, Module]) -> list[Violation]:
    edges = import_edges(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for e in edges:
        graph[e.source].add(e.target)
    out = []
    for component in cycles(graph):
        members = set(component)
        loop = " ↔ ".join(component)
        for e in sorted(edges, key=lambda e: (e.path, e.line)):
            if e.source in members and e.target in members:
                out.append(
                    Violation(e.path, e.line, "module cycle", f"{e.source} imports {e.target}; cycle: {loop}")
                )
    return out


def package_cycle_violations(modules: dict[str, Module]) -> list[Violation]:
    edges = [e for e in import_edges(modules) if package_of(e.source) != package_of(e.target)]
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(package_of(e.source), set()).add(package_of(e.target))
    out = []
    for component in cycles(graph):
        members = set(component)
        loop = " ↔ ".join(component)
        for e in sorted(edges, key=lambda e: (e.path, e.line)):
            if package_of(e.source) in members and package_of(e.target) in members:
                out.append(
                    Violation(
                        e.path, e.line, "package cycle", f"{e.source} imports {e.target}; cycle: {loop}"
                    )
                )
    return out


def layer_violations(modules: dict[str, Module]) -> list[Violation]:
    out = []
    for m in modules.values():
        if layer_of(m.name) is None:
            out.append(Violation(m.path, 1, "layer order", f"{m.name} is in no layer: add it to the order"))
    for e in import_edges(modules):
        source, target = layer_of(e.source), layer_of(e.target)
        if source is not None and target is not None and target > source:
            out.append(
                Violation(
                    e.path,
                    e.line,
                    "layer order",
                    f"{e.source} imports {e.target}, from a later layer ({package_of(e.target)} comes after "
                    f"{package_of(e.source)})",
                )
            )
    return out


def private_import_violations(modules: dict[str, Module]) -> list[Violation]:
    out = []
    for m in modules.values():
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom):
                base = absolute_base(m, node)
                names = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for full in names:
                parts = full.split(".")
                private = [p for p in parts[1:] if p.startswith("_") and not p.startswith("__")]
                if parts[0] == "openscope" and private and known(full, modules) != m.name:
                    out.append(Violation(m.path, node.lineno, "private import", f"{m.name} imports {full}"))
    return out


def file_length_violations(modules: dict[str, Module]) -> list[Violation]:
    return [
        Violation(m.path, MAX_FILE_LINES + 1, "file length", f"{n} lines (at most {MAX_FILE_LINES})")
        for m in modules.values()
        if (n := len(m.source.splitlines())) > MAX_FILE_LINES
    ]


def function_length_violations(modules: dict[str, Module]) -> list[Violation]:
    out = []
    for m in modules.values():
        for node in ast.walk(m.tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > MAX_FUNCTION_LINES and (m.path, node.name) not in ROUTE_TABLES:
                out.append(
                    Violation(
                        m.path,
                        node.lineno,
                        "function length",
                        f"{node.name} has {size} lines (at most {MAX_FUNCTION_LINES})",
                    )
                )
    return out


def deferred_import_violations(modules: dict[str, Module]) -> list[Violation]:
    """An import inside a function needs a reason: a comment on its own line(s) or alone on the line
    just above it. Consecutive imports (no blank line between) share the comment above the first."""
    out = []
    for m in modules.values():
        comments, alone = comment_lines(m.source)
        inner = sorted(
            {
                (sub.lineno, sub.end_lineno or sub.lineno)
                for fn in ast.walk(m.tree)
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                for sub in ast.walk(fn)
                if isinstance(sub, ast.Import | ast.ImportFrom)
            }
        )
        explained_until = -1  # last line of the latest explained import
        for first, last in inner:
            own = any(is_reason(comments.get(row, "")) for row in range(first, last + 1))
            above = first - 1 in alone and is_reason(comments[first - 1])
            if own or above or explained_until == first - 1:
                explained_until = last
                continue
            code = m.source.splitlines()[first - 1].strip()
            out.append(
                Violation(m.path, first, "import in a function", f"`{code}` needs a comment saying why")
            )
    return out


RULES = {
    "module cycle": module_cycle_violations,
    "package cycle": package_cycle_violations,
    "layer order": layer_violations,
    "private import": private_import_violations,
    "file length": file_length_violations,
    "function length": function_length_violations,
    "import in a function": deferred_import_violations,
}


# ---- the package -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package() -> dict[str, Module]:
    return read_package(PACKAGE)


@pytest.mark.parametrize("rule", list(RULES))
def test_openscope_keeps_the_rule(rule: str, package: dict[str, Module]) -> None:
    found = RULES[rule](package)
    assert not found, f"{len(found)} place(s) break the rule '{rule}':\n" + "\n".join(map(str, found))


def test_the_layer_order_names_every_package(package: dict[str, Module]) -> None:
    on_disk = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert on_disk - set(ENTRY_POINTS) == set(PACKAGES), (
        "a package is missing from the layer order (or the order names a ghost)"
    )


# ---- the checks themselves catch what they are meant to --------------------------------------------


BROKEN = {
    "openscope/__init__.py": '"""Root."""\n',
    "openscope/errors.py": "from openscope.data.d import D\n",  # against the order; half a package cycle
    "openscope/models/__init__.py": "",
    "openscope/models/a.py": "from openscope.models.b import B\nA = 1\n",  # a module cycle with b
    "openscope/models/b.py": "from openscope.models.a import A\nfrom openscope.data.c import _hidden\nB = 2\n",
    "openscope/data/__init__.py": "",
    "openscope/data/d.py": "D = 1\n",
    "openscope/data/e.py": "from openscope.errors import D\n",  # the other half of the package cycle
    "openscope/data/c.py": (
        "def f():\n"
        "    import json\n"  # no reason
        "\n"
        "    # json only when asked\n"
        "    import json as j\n"
        "    from openscope.data import d\n"  # shares the reason above
        "\n"
        "    import os  # noqa: F401\n"  # a directive is no reason
        "    return j, d\n"
        "\n"
        "\n"
        "def long():\n" + "    x = 1\n" * 100 + "_hidden = 0\n"
    ),
    "openscope/gadget.py": "X = 1\n",  # in no layer
}


def test_the_checks_find_each_kind_of_break(tmp_path: Path) -> None:
    for rel, text in BROKEN.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = read_package(tmp_path / "openscope")
    found = {rule: {(v.path, v.line) for v in check(modules)} for rule, check in RULES.items()}
    assert found == {
        "module cycle": {("openscope/models/a.py", 1), ("openscope/models/b.py", 1)},
        "package cycle": {("openscope/errors.py", 1), ("openscope/data/e.py", 1)},
        "layer order": {("openscope/errors.py", 1), ("openscope/gadget.py", 1), ("openscope/models/b.py", 2)},
        "private import": {("openscope/models/b.py", 2)},
        "file length": set(),
        "function length": {("openscope/data/c.py", 12)},
        "import in a function": {("openscope/data/c.py", 2), ("openscope/data/c.py", 8)},
    }
    sizes = {"big": MAX_FILE_LINES + 1, "small": MAX_FILE_LINES}
    for name, n in sizes.items():
        (tmp_path / f"openscope/{name}.py").write_text("x = 1\n" * n)
    lengths = file_length_violations(read_package(tmp_path / "openscope"))
    assert [v.path for v in lengths] == ["openscope/big.py"]
