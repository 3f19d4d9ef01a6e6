"""Direction edits: change the activation at a site along one direction, at every position.

Three edits (a `DirectionEdit`, applied by forward hooks through `openscope.models.hooks.hook_site`,
generated positions too):

- **ablate**: x ← x − (x·r̂) r̂, directional ablation (Arditi et al. 2024);
- **add**: x ← x + s·r, activation addition;
- **set**: x ← x − (x·r̂) r̂ + c r̂, the projection set to c (a number, or a [batch, seq] tensor such as
  the projections recorded in a clean run, which restores the clean forward exactly).

Latent edits (add, clamp or scale a dictionary latent) are `openscope.interventions.steer`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from openscope.errors import OpenscopeError
from openscope.models.hooks import hook_site
from openscope.models.load import LoadedModel
from openscope.models.sites import Site


def unit(v: Tensor) -> Tensor:
    """v / ‖v‖ (float64); a zero vector is an error: it has no direction."""
    v = v.detach().to(torch.float64).cpu()
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise OpenscopeError("the direction is zero (the two sets have the same mean): nothing to follow")
    return v / norm


EditMode = Literal["ablate", "add", "set"]


class DirectionEdit(NamedTuple):
    """One edit of the activation at one site along one direction, at every position."""

    site: Site
    """Where to edit."""
    direction: Tensor
    """r [d]. ablate and set use r̂ = r/‖r‖; add adds value·r as given."""
    mode: EditMode = "ablate"
    """ablate: remove the component along r̂; add: add value·r; set: set the component along r̂ to value."""
    value: float | Tensor = 1.0
    """add: the multiple of r; set: the projection to write (a number or a [batch, seq] tensor)."""


# ---- the math (pure) ---------------------------------------------------------------------------------


def project_out(x: Tensor, u: Tensor) -> Tensor:
    """x − (x·u) u for a unit u [d] and x [..., d] (out of place)."""
    u = u.to(x.device, x.dtype)
    return x - (x @ u).unsqueeze(-1) * u


def set_projection(x: Tensor, u: Tensor, value: float | Tensor) -> Tensor:
    """x with its component along the unit u replaced by value (a number or a tensor of x's leading shape)."""
    u = u.to(x.device, x.dtype)
    c = (
        value.to(x.device, x.dtype)
        if isinstance(value, Tensor)
        else torch.tensor(value, dtype=x.dtype, device=x.device)
    )
    if c.ndim and tuple(c.shape) != tuple(x.shape[:-1]):
        raise OpenscopeError(
            f"the projection to set has shape {list(c.shape)}, the activation {list(x.shape[:-1])}"
        )
    return project_out(x, u) + c.unsqueeze(-1) * u


def apply_edit(x: Tensor, edit: DirectionEdit) -> Tensor:
    """The activation after one edit."""
    if edit.mode == "add":
        if isinstance(edit.value, Tensor):
            raise OpenscopeError("an add edit takes a number (the multiple of the direction)")
        return x + edit.value * edit.direction.to(x.device, x.dtype)
    u = unit(edit.direction)
    if edit.mode == "ablate":
        return project_out(x, u)
    if edit.mode == "set":
        return set_projection(x, u, edit.value)
    raise OpenscopeError(f"unknown direction edit {edit.mode!r}; choose ablate, add or set")


@contextmanager
def direction_edits(loaded: LoadedModel, edits: Sequence[DirectionEdit]) -> Iterator[None]:
    """Apply the edits in every forward inside the block (edits at one site apply in the given order)."""
    with ExitStack() as stack:
        for edit in edits:
            stack.enter_context(hook_site(loaded, edit.site, lambda x, e=edit: apply_edit(x, e)))
        yield
