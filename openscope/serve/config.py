"""`ServeConfig`: what `openscope serve` loads and how it listens (its fields are the CLI's flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from openscope.features.db import DEFAULT_DB


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
    max_graph_tokens: int = 32
    """Longest prompt (tokens, BOS included) the explorer computes a graph for (the graph grows with the square of its nodes)."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""
