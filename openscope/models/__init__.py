"""Models: loading (HF path, hub id, or the Gemma 3 270M PyPI package), the site table, hooks."""

from openscope.models.hooks import capture, run_to_sites
from openscope.models.load import KNOWN_MODELS, LoadedModel, load_model
from openscope.models.sites import SITE_KINDS, Site, parse_sites

__all__ = [
    "KNOWN_MODELS",
    "SITE_KINDS",
    "LoadedModel",
    "Site",
    "capture",
    "load_model",
    "parse_sites",
    "run_to_sites",
]
