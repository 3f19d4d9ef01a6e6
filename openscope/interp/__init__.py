"""Autointerp: a chat model explains each latent from its dashboard, and a scorer model tests the
explanation on held-out texts (detection and fuzzing scores). Results live in the feature database
beside the dashboards; `openscope autointerp` runs it, the explorer shows and searches it."""

from openscope.interp.config import AutointerpConfig
from openscope.interp.report import AutointerpResult
from openscope.interp.run import dry_run, run_autointerp
from openscope.interp.store import Explanation, read_explanation, read_explanations, search_explanations

__all__ = [
    "AutointerpConfig",
    "AutointerpResult",
    "Explanation",
    "dry_run",
    "read_explanation",
    "read_explanations",
    "run_autointerp",
    "search_explanations",
]
