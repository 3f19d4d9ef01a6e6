"""The documentation: the site builds in strict mode (a broken link, a missing anchor or an unlisted
page fails), the README's links resolve, and every `openscope ...` command line shown in the README or
the docs names a real command and only flags that command has (so an example that stops working
fails here; tests/test_docs_run.py also runs the walk-throughs on the tiny model). The CLI and API pages
are generated from the code (scripts/docs_hooks.py)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from openscope.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_site_builds_strict(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    site = tmp_path / "site"
    cli = (site / "cli" / "index.html").read_text()
    # The reference is generated from the commands: every command and a field docstring are there.
    for command in ("openscope harvest", "openscope train", "openscope suite run", "openscope chat contrast"):
        assert command in cli, command
    assert "Steps between held-out evaluations" in cli
    assert "openscope.train" in (site / "api" / "index.html").read_text()


def _anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page (GitHub's and MkDocs' slugs agree on these headings)."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), link
        if anchor:
            assert anchor in _anchors(target), link


def _command_lines(page: Path) -> list[str]:
    """Every `openscope ...` line in the page's bash code blocks (environment assignments dropped)."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a line continued with a backslash is one
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words and words[0] == "openscope":
                lines.append(shlex.join(words))
    return lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_command_lines_name_real_commands_and_flags(page):
    root: Any = typer.main.get_command(app)
    for line in _command_lines(page):
        words = shlex.split(line)[1:]
        command = root
        while getattr(command, "commands", None) and words and words[0] in command.commands:
            command = command.commands[words.pop(0)]
        assert not getattr(command, "commands", None), f"{line}: no such command"
        flags = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"--help"}
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in flags, f"{line}: {command.name} has no {word}"
