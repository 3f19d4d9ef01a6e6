"""Training on several processes under `torchrun`: which rank trains which dictionaries on which rows,
and the reductions that make a data-parallel step equal a single process's step on the whole batch.

The world of W ranks is G dictionary groups × R data-parallel replicas (`--data-parallel R`; ranks
g·R .. g·R + R − 1 form group g, so replicas sit next to each other, on one node where they can).
Dictionary i of a run belongs to group i mod G; the R replicas of a group hold the same dictionaries,
each trains on its own R-th of every global batch (`local_rows` of a store's batches; live, each replica
runs the model on its own share of the contexts), and their gradients are averaged.

Exact equality with one process needs more than averaged gradients, since some losses are not a mean
over tokens: the quadratic L0 loss and the frequency penalty are non-linear in the batch's L0 and
firing rates, AuxK divides by the batch's residual norm, and BatchTopK keeps the k·B largest
pre-activations of the whole batch. So every batch statistic is all-reduced before the losses use it,
in a form whose value is the global one and whose gradient is the replica's own (`global_means`):
the average of the replicas' gradients is then exactly the gradient of the global loss. BatchTopK's
cut-off is found over all replicas' pre-activations (`Replicas.batchtopk_cutoff`); dead-latent counters
and BatchTopK's threshold statistics are updated from the reduced values, so every replica holds the
same state and a group's checkpoint (written by its first replica) is the state of a single process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from openscope.activations.batches import ActivationBatch
from openscope.activations.ranks import leave_process_group
from openscope.coders.activations import ThresholdEstimator
from openscope.errors import OpenscopeError
from openscope.models.load import resolve_device
from openscope.train.memory import keep_freed_memory


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process. Read before
    the process group exists, so a bad layout fails on every rank without waiting on the others."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


class Layout(NamedTuple):
    """How a run's ranks divide the work: dictionary groups × data-parallel replicas."""

    rank: int
    """This process's rank."""
    world: int
    """Processes in the run."""
    replicas: int
    """Data-parallel replicas per dictionary group (1: dictionaries are only shared out)."""

    @property
    def groups(self) -> int:
        """Dictionary groups: the run's dictionaries are shared out across them."""
        return self.world // self.replicas

    @property
    def group(self) -> int:
        """This rank's dictionary group (it trains dictionaries i with i mod groups == group)."""
        return self.rank // self.replicas

    @property
    def replica(self) -> int:
        """This rank's place among its group's replicas (0 writes the group's checkpoint and metrics)."""
        return self.rank % self.replicas

    def describe(self) -> str:
        """The layout in words, e.g. `4 processes (2 dictionary groups x 2 data-parallel replicas)`."""
        if self.world == 1:
            return "1 process"
        return (
            f"{self.world} processes ({self.groups} dictionary group{'s' if self.groups > 1 else ''} x "
            f"{self.replicas} data-parallel replica{'s' if self.replicas > 1 else ''})"
        )


def plan_layout(rank: int, world: int, data_parallel: int, n_dicts: int, batch_size: int) -> Layout:
    """The layout of a run of `n_dicts` dictionaries on `world` processes. `data_parallel` 0 (auto):
    world / gcd(world, n_dicts) replicas, so every group gets the same number of dictionaries and no rank
    is idle (dictionaries only shared out when the world divides their number; a CLT, one dictionary,
    on every rank). One-line errors when the replicas do not divide the world or the batch."""
    replicas = data_parallel or world // math.gcd(world, max(n_dicts, 1))
    if world % replicas:
        valid = [d for d in range(1, world + 1) if world % d == 0]
        raise OpenscopeError(
            f"--data-parallel {replicas} does not divide the {world} process{'es' if world > 1 else ''} of "
            "this run; choose one of "
            f"{', '.join(map(str, valid))} (or 0: auto)"
        )
    if world // replicas > n_dicts:
        valid = [d for d in range(1, world + 1) if world % d == 0 and world // d <= n_dicts]
        raise OpenscopeError(
            f"--data-parallel {replicas} makes {world // replicas} dictionary groups of the {world} processes "
            f"for {n_dicts} dictionar{'ies' if n_dicts > 1 else 'y'}, so some would idle; choose one of "
            f"{', '.join(map(str, valid))} (or 0: auto)"
        )
    if batch_size % replicas:
        lower, upper = batch_size - batch_size % replicas, batch_size - batch_size % replicas + replicas
        sizes = [str(b) for b in (lower, upper) if b > 0]
        counts = [d for d in range(1, world + 1) if world % d == 0 and batch_size % d == 0]
        nearest = sorted(counts, key=lambda d: (abs(d - replicas), d))[:2]
        raise OpenscopeError(
            f"--batch-size {batch_size} does not split evenly over {replicas} data-parallel replicas "
            f"({world} processes): choose --batch-size {' or '.join(sizes)}, or --data-parallel "
            f"{' or '.join(map(str, sorted(nearest)))}"
        )
    return Layout(rank, world, replicas)


def init_process_group(device: str) -> None:
    """Join torchrun's process group (nccl for a CUDA run, gloo otherwise), once per process."""
    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def leave_process_groups() -> None:
    """Leave torchrun's process group and forget the replica groups made in it (a later run in this
    process makes its own); nothing when this process joined none (`ranks.leave_process_group`)."""
    _GROUPS.clear()
    leave_process_group()


_GROUPS: dict[tuple[int, int], Any] = {}
"""The replica process groups made so far, per (world, replicas): every rank must create each group
in the same order, once (several runs in one process reuse them)."""


def replica_group(layout: Layout) -> Replicas | None:
    """This rank's replicas (None with one replica per group: nothing to synchronise). Collective: every
    rank of the run calls it."""
    if layout.replicas == 1:
        return None
    if layout.replicas == layout.world:
        return Replicas(layout.replicas, layout.replica, None)
    key = (layout.world, layout.replicas)
    if key not in _GROUPS:
        r = layout.replicas
        _GROUPS[key] = [dist.new_group(list(range(g * r, g * r + r))) for g in range(layout.groups)]
    return Replicas(layout.replicas, layout.replica, _GROUPS[key][layout.group])


def local_rows(batch: ActivationBatch, index: int, count: int) -> ActivationBatch:
    """Replica `index` of `count`'s rows of a global batch: the `index`-th of `count` equal contiguous
    slices (the batch size divides evenly: `plan_layout`). Store batches only: a live run's replicas
    compute their own rows (`openscope.train.loop.replica_batches`)."""
    rows = replica_rows(batch.token_ids.shape[0], index, count)
    return ActivationBatch(
        {s: a[rows] for s, a in batch.acts.items()},
        batch.token_ids[rows],
        batch.context[rows],
        batch.position[rows],
        None if batch.role is None else batch.role[rows],
    )


def replica_rows(batch_size: int, index: int, count: int) -> slice:
    """Replica `index` of `count`'s rows of a global batch of `batch_size` rows."""
    n = batch_size // count
    return slice(index * n, (index + 1) * n)


class Replicas:
    """The data-parallel replicas of one dictionary group, seen from one of them."""

    def __init__(self, size: int, index: int, group: Any) -> None:
        self.size = size
        """Replicas in the group."""
        self.index = index
        """This replica's place in the group (its rows of each batch: `local_rows`)."""
        self.group = group
        """The process group (None: the whole world)."""

    def sum_(self, t: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
        """All-reduce t in place over the replicas (sum, or `op`), and return it."""
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def average_grads_(self, module: nn.Module) -> None:
        """Average the parameters' gradients over the replicas, in one all-reduce (a parameter without a
        gradient counts as a zero one)."""
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        flat /= self.size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def gather_rows(self, t: Tensor, dim: int = 0) -> Tensor:
        """The replicas' tensors `t` (the same shape on each) joined along `dim` in replica order: from
        their `local_rows`, the global batch exactly."""
        t = t.contiguous()
        gathered = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(gathered, t, group=self.group)
        return torch.cat(gathered, dim=dim)

    def all_true(self, flags: Tensor) -> Tensor:
        """Element-wise AND of boolean `flags` over the replicas (one all-reduce), so that every replica
        takes the same decision (e.g. to stop on non-finite data) and none waits on one that stopped."""
        return self.sum_(flags.to(torch.int32), dist.ReduceOp.MIN).bool()

    def batchtopk_cutoff(self, k: int, global_rows: int) -> Callable[[Tensor], Tensor]:
        """For a replica's pre-activations z: the (k·B)-th largest pre-activation of the whole global batch
        of B rows (each replica's k·B largest, gathered). Keeping z ≥ it keeps the global batch's k·B
        largest, as one process would (up to exact ties)."""

        def cutoff(z: Tensor) -> Tensor:
            n = min(k * global_rows, z.numel() * self.size)
            local = z.detach().reshape(-1).topk(min(n, z.numel())).values.contiguous()
            gathered = [torch.empty_like(local) for _ in range(self.size)]
            dist.all_gather(gathered, local, group=self.group)
            return torch.cat(gathered).topk(n).values[-1]

        return cutoff

    def global_means(self, means: dict[str, Tensor], sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """One all-reduce for a step's batch statistics. `means` (over this replica's rows, with their
        autograd graph) come back with the global batch's value and this replica's gradient (t + (ḡ − t)
        detached), so averaging the replicas' gradients gives the global loss's gradient; `sums` (no
        gradient) come back summed over the replicas. Computed in float64."""
        items = [*means.items(), *sums.items()]
        flat = self.sum_(torch.cat([t.detach().reshape(-1).double() for _, t in items]))
        out: dict[str, Tensor] = {}
        offset = 0
        for name, t in items:
            value = flat[offset : offset + t.numel()].view(t.shape)
            offset += t.numel()
            if name in means:
                out[name] = t + (value / self.size).to(t.dtype) - t.detach()
            else:
                out[name] = value
        return out


def fvu_sums(target: Tensor, recon: Tensor, dims: tuple[int, ...]) -> dict[str, Tensor]:
    """The sums a fraction of variance unexplained over a batch split across replicas needs (rows on
    the dimension before the last; `dims` the leading dimensions kept, () for one site, (0,) per layer)."""
    rows = target.shape[-2]
    over = tuple(d for d in range(target.ndim) if d not in dims)
    return {
        "fvu_err": (target - recon).detach().double().pow(2).sum(over),
        "fvu_y": target.detach().double().sum(-2),
        "fvu_y2": target.detach().double().pow(2).sum(over),
        "fvu_rows": torch.tensor(float(rows), dtype=torch.float64, device=target.device),
    }


def fvu_of(sums: dict[str, Tensor]) -> Tensor:
    """FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² from the replicas' summed `fvu_sums` (Σ‖y − ȳ‖² = Σ‖y‖² − B‖ȳ‖²)."""
    n = sums["fvu_rows"]
    total = sums["fvu_y2"] - sums["fvu_y"].pow(2).sum(-1) / n
    return sums["fvu_err"] / total.clamp_min(1e-12)


def rank_device(device: str) -> str:
    """Under torchrun, `cuda` is the local rank's GPU (`cuda:<LOCAL_RANK>`); any other device as given."""
    _, world, local_rank = env_world()
    return f"cuda:{local_rank}" if device == "cuda" and world > 1 else device


def training_device(name: str) -> str:
    """The device this process trains on: `name` resolved (`auto`: cuda where available), under torchrun
    the local rank's GPU; on the CPU with the memory policy of `openscope.train.memory` applied (a step
    frees and allocates the same blocks every step: keep them)."""
    device = rank_device(resolve_device(name))
    keep_freed_memory(device)
    return device


def update_thresholds(estimator: ThresholdEstimator, latents: Tensor, replicas: Replicas) -> None:
    """BatchTopK's threshold statistics from each replica's kept latents [B/R, F] (found with the whole
    batch's cut-off): the batch's and each latent's smallest kept activation, reduced (min) over the
    replicas, so every replica adds what one process would on the whole batch."""
    f = latents.detach().double()
    big = torch.where(f > 0, f, torch.full_like(f, torch.inf))
    minima = replicas.sum_(torch.cat([big.min().view(1), big.min(dim=0).values]), dist.ReduceOp.MIN).cpu()
    if bool(torch.isfinite(minima[0])):
        estimator.add(float(minima[0]), minima[1:])
