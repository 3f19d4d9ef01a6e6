"""MkDocs hooks of the documentation site (`mkdocs.yml`'s `hooks:`), so nothing is written twice:

- `cli.md`, the command-line reference, is generated from the Typer app itself: every command's help
  and every option's help (the configs' field docstrings), type and default;
- `api.md`, the Python API, from each package's docstring and the docstrings of the names it exports;
- every other page under docs/ that the navigation does not list (topic pages added by other parts of
  the project) goes into the navigation under "Topics", so a strict build never omits one.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import typer
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

from openscope.cli import app

PACKAGES = (
    "models",
    "data",
    "activations",
    "coders",
    "train",
    "eval",
    "features",
    "suite",
    "interventions",
    "attribution",
    "analysis",
    "serve",
)
"""The packages of the API page, in the layer order (docs/architecture.md)."""
GENERATED = ("cli.md", "api.md")


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _commands(command: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    """(words, command) of every leaf command under `command`, in its order."""
    subs = getattr(command, "commands", None)
    if not subs:
        return [(path, command)]
    found: list[tuple[list[str], Any]] = []
    for name, sub in subs.items():
        if not getattr(sub, "hidden", False):
            found += _commands(sub, [*path, name])
    return found


def _option_row(param: Any) -> str:
    flags = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    default = param.default
    shown = "" if default is None or callable(default) or param.required else f"`{default}`"
    kind = "flag" if param.is_flag else "text" if default in (None, "") else type(default).__name__
    return f"| {flags} | {kind} | {shown} | {_cell(getattr(param, 'help', '') or '')} |"


def cli_reference() -> str:
    """The command-line reference: one section per command, its help and a table of its options."""
    root = typer.main.get_command(app)
    out = [
        "# Command-line reference",
        "",
        "Generated from the `openscope` command itself (`openscope COMMAND --help` prints the same).",
        "",
    ]
    for words, command in _commands(root, ["openscope"]):
        params = [p for p in command.params if p.param_type_name == "option"]
        args = [p for p in command.params if p.param_type_name == "argument"]
        usage = " ".join([*words, *(p.name.upper() for p in args), "[OPTIONS]"])
        out += [f"## {' '.join(words)}", "", _cell(command.help or ""), "", f"```\n{usage}\n```", ""]
        for arg in args:
            out.append(f"- `{arg.name.upper()}`: {_cell(getattr(arg, 'help', '') or '')}")
        out += ["", "| option | type | default | what |", "|---|---|---|---|"] if params else []
        out += [_option_row(p) for p in params]
        out.append("")
    return "\n".join(out)


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return _cell(doc.split("\n\n")[0])


def api_reference() -> str:
    """The Python API: per package its docstring and, per exported name, its signature and summary."""
    out = ["# Python API", "", "Each package's exports, from their docstrings, in the layer order.", ""]
    for name in PACKAGES:
        module = importlib.import_module(f"openscope.{name}")
        out += [f"## openscope.{name}", "", inspect.getdoc(module) or "", ""]
        for export in getattr(module, "__all__", []):
            obj = getattr(module, export)
            if inspect.ismodule(obj):
                continue
            try:
                signature = str(inspect.signature(obj)) if callable(obj) else ""
            except (TypeError, ValueError):
                signature = ""
            out += [f"### `{export}`", "", f"```python\n{export}{signature}\n```", "", _summary(obj), ""]
    return "\n".join(out)


def _listed(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_listed(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_listed(v) for v in nav)) if nav else set()
    return set()


def _title(page: Path) -> str:
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return page.stem.replace("-", " ").capitalize()


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Pages under docs/ the navigation does not list go under Topics (before the reference)."""
    docs = Path(config.docs_dir)
    listed = _listed(config.nav)
    extra = sorted(
        p.relative_to(docs).as_posix()
        for p in docs.rglob("*.md")
        if p.relative_to(docs).as_posix() not in listed
    )
    if extra and config.nav is not None:
        topics = {"Topics": [{_title(docs / p): p} for p in extra]}
        at = next((i for i, e in enumerate(config.nav) if isinstance(e, dict) and "Reference" in e), None)
        config.nav.insert(len(config.nav) if at is None else at, topics)
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated pages."""
    for name, text in zip(GENERATED, (cli_reference(), api_reference()), strict=True):
        files.append(File.generated(config, name, content=text))
    return files
