"""torchrun for the harvest: this process's rank, and the few collectives a harvest needs (a barrier, rank
0's decision shared with every rank, an error on any rank raised on all of them).

Under `torchrun` (WORLD_SIZE > 1) the process group is joined on first use: gloo for the objects these
collectives move, and NCCL beside it for CUDA tensors when a GPU is present. One process: rank 0 of 1 and
every collective a no-op.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from openscope.errors import OpenscopeError


class Ranks(NamedTuple):
    """This process's place among the harvest's processes."""

    rank: int
    """Its rank, 0..world-1."""
    world: int
    """How many processes harvest together (1: no torchrun)."""


def current_ranks() -> Ranks:
    """(rank, world size); under torchrun, joins the process group (gloo, plus NCCL for CUDA tensors)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(0, 1)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def leave_process_group() -> None:
    """Leave torchrun's process group if this process joined one (harvest or train): its end is then
    agreed with the other ranks instead of left to the interpreter's exit, where a gloo group torn down
    while a peer still holds its connection can abort the process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, ranks: Ranks) -> str:
    """A rank's own GPU under torchrun (`cuda` on rank r: `cuda:LOCAL_RANK`); other devices as given."""
    if ranks.world > 1 and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', ranks.rank)}"
    return device


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def from_rank0(value: Any, ranks: Ranks) -> Any:
    """Rank 0's `value`, on every rank."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(error: str | None, ranks: Ranks) -> None:
    """Raise the first rank's error (a one-line message, None: no error) on every rank, so that one
    rank's bad input stops all of them instead of leaving the others waiting at the next barrier."""
    errors = [error]
    if ranks.world > 1:
        errors = [None] * ranks.world
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise OpenscopeError(first)
