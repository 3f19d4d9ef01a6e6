"""Deprecated alias of `openscope.interventions.steer` (kept for one release; import from there)."""

from openscope.interventions.steer import *  # noqa: F403
from openscope.interventions.steer import (
    Intervention,
    generate,
    generate_ids,
    steer_request,
    steering,
    top_latents,
)
from openscope.models.tokens import prompt_ids

__all__ = [
    "Intervention",
    "generate",
    "generate_ids",
    "prompt_ids",
    "steer_request",
    "steering",
    "top_latents",
]
