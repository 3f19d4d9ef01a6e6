"""`openscope releases`: the released dictionaries openscope knows by name, and which are cached."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from openscope.cli.app import app, console
from openscope.coders.hub import cache_root, cached_ids, releases
from openscope.errors import OpenscopeError


@app.command("releases")
def releases_command(
    release: Optional[str] = typer.Argument(None, help="A release name: list its ids instead."),  # noqa: UP045
    cached: bool = typer.Option(False, "--cached", help="Only releases (or ids) with a folder in the cache."),
    cache_dir: Optional[Path] = typer.Option(  # noqa: UP045
        None, help="Hugging Face hub cache (default: HF_HUB_CACHE, else HF_HOME/hub)."
    ),
) -> None:
    """List the released dictionaries (Gemma Scope 1 and 2) that --dictionaries and export accept by
    name (RELEASE:ID, or hf://REPO/FOLDER), and which are in the Hugging Face cache."""
    known = releases()
    if release is not None:
        if release not in known:
            close = difflib.get_close_matches(release, list(known), n=3, cutoff=0.5)
            hint = f"; nearest: {', '.join(close)}" if close else ""
            raise OpenscopeError(f"unknown release {release!r}{hint}")
        r = known[release]
        have = set(cached_ids(r, cache_dir))
        table = Table(title=f"{release}: {r.repo} ({r.model}); use as {release}:ID")
        for col in ("id", "folder", "cached"):
            table.add_column(col, overflow="fold")
        for i, folder in sorted(r.folders.items()):
            if not cached or i in have:
                table.add_row(i, folder, "yes" if i in have else "")
        console.print(table)
        return
    table = Table(title=f"released dictionaries (cache: {cache_root(cache_dir)})")
    for col in ("release", "repository", "model", "dictionaries", "cached"):
        table.add_column(col, overflow="fold")
    for name, r in sorted(known.items()):
        n_cached = len(cached_ids(r, cache_dir))
        if not cached or n_cached:
            table.add_row(name, r.repo, r.model, str(len(r.folders)), str(n_cached) if n_cached else "")
    console.print(table)
