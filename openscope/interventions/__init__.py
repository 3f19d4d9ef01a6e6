"""Interventions: edit what the model computes while it runs.

- `steer`: add, clamp or scale dictionary latents during a forward or a generation (one steering
  path for single-layer coders and cross-layer transcoders), the prompt inspector's top latents.
- `directions`: edit a direction of the residual stream (project it out, set its projection).
"""

from openscope.interventions.steer import Intervention, generate, steering, top_latents

__all__ = ["Intervention", "generate", "steering", "top_latents"]
