"""`ServeConfig`: what `openscope serve` loads and how it listens (its fields are the CLI's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from openscope.config import check_numbers
from openscope.errors import OpenscopeError
from openscope.features.index import DEFAULT_DB
from openscope.suite.folder import CATALOGUE


@dataclass
class ServeConfig:
    """Serve the feature explorer: dashboards from a feature database, and a live model for the
    prompt inspector and the steering playground."""

    db: Path = DEFAULT_DB
    """Feature database written by `openscope features`."""
    dictionaries: list[Path] = field(default_factory=list)
    """Dictionary folders (or folders to search) to load for the inspector and steering; repeat the flag for several. Default: the folders recorded in the database."""
    model: str | None = None
    """Model (name, local directory or hub id). Default: the model the dictionaries name."""
    host: str = "127.0.0.1"
    """Address to listen on (127.0.0.1: this machine only)."""
    port: int = 8000
    """Port to listen on."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Extra Host header names to answer to (repeat the flag; `*`: any). Loopback names and --host are always allowed; requests naming any other host are refused (a defence against DNS rebinding)."""
    max_prompt_chars: int = 512
    """Longest prompt (characters) the inspector, text search and steering accept."""
    max_new_tokens: int = 64
    """Most tokens one steering request may generate (each is a forward of the model, twice)."""
    max_top_k: int = 32
    """Most latents per token the inspector may return."""
    graphs: Path | None = None
    """Folder of attribution-graph JSON files (written by `openscope attribute` or the explorer) to show and add to. Default: `graphs` next to --db."""
    chat_reports: Path | None = None
    """Folder of `openscope chat` reports (subfolders with report.json) for the chat page. Default: openscope-out/chat."""
    suite: Path | None = None
    """An `openscope suite run` folder to show on the Suite page (its catalogue, linked to the dashboards this database has). Default: the database's folder, when it holds a catalogue.json."""
    max_graph_tokens: int = 32
    """Longest prompt (tokens, BOS included) the explorer computes a graph for (the graph grows with the square of its nodes)."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""


def check_serve_config(config: ServeConfig) -> None:
    """One-line errors for settings the server cannot run with (checked before anything starts)."""
    check_numbers(config, positive=("max_prompt_chars", "max_new_tokens", "max_top_k", "max_graph_tokens"))
    if not 0 < config.port < 65536:
        raise OpenscopeError(f"--port must be between 1 and 65535, got {config.port}")
    if config.suite is not None and not (Path(config.suite) / CATALOGUE).is_file():
        raise OpenscopeError(
            f"--suite {config.suite} holds no {CATALOGUE} (give an `openscope suite run` folder)"
        )
