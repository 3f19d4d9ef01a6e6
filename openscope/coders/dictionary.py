"""A dictionary bound to its place in a model: a coder plus the sites it reads and writes.

Everything downstream of training (evaluation, splicing, export, features, steering) takes
`Dictionary` values, whatever file format the coder came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from openscope.coders.coder import SparseCoder
from openscope.models.sites import Site


class Dictionary(NamedTuple):
    """A coder and where it sits in the model."""

    coder: SparseCoder
    """The (folded, raw-activation) coder."""
    site_in: Site
    """Site whose activation the coder encodes."""
    site_out: Site
    """Site the coder reconstructs (== site_in for an SAE; mlp_out for a transcoder)."""
    name: str
    """Short label for reports (the folder name, or the site for in-memory dictionaries)."""
    folder: Path | None = None
    """Folder the coder was loaded from, if any."""
    config: dict[str, Any] | None = None
    """The folder's parsed config.json (or what was inferred for formats without one)."""


def in_memory(coder: SparseCoder, site_in: Site, site_out: Site | None = None, name: str = "") -> Dictionary:
    """A Dictionary for a coder that has no folder (tests, freshly trained coders)."""
    site_out = site_out or site_in
    return Dictionary(coder, site_in, site_out, name or f"{site_in.name}->{site_out.name}")
