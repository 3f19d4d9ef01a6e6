"""How much memory an attribution will take, stated before its backward passes start, and a limit.

Attribution holds four big things at once; each is known (or measured cheaply) once the prompt's clean
run has found the active latents:

- **the row store**: one float32 row per logit and per attributed latent, over every column (active
  latents, error nodes, tokens, logits): (k + budget) × n_cols × 4 bytes; it grows with the prompt
  (active latents ∝ tokens) times the feature budget, and dominates long prompts;
- **the batched forward**: the autograd graph of the replacement model on `batch` copies of the
  prompt. Measured, not guessed: the replacement forward runs once on 1 and once on 2 copies while
  `torch.autograd.graph.saved_tensors_hooks` counts the bytes autograd saves (each storage once; the
  model's and dictionaries' weights excluded), and the graph of `batch` copies is the first plus
  (batch − 1) times the difference;
- **one backward pass**: the gradients at every probe (embeddings and MLP outputs) of a batch, plus the
  working tensors of the pass, and the read-out's padded decoder blocks;
- **the graph**: the adjacency matrix [N, N] of the nodes kept, assembled while the store is alive, then
  pruned (row-sized copies of its feature and logit rows).

The estimate is the larger of the three phases (rows + forward + backward, rows + adjacency, adjacency +
pruning), plus `SLACK`, on top of what the process holds already (its resident set once the forward has
been measured). `check_memory` refuses a run
whose estimate exceeds the limit, before any backward pass; the default limit is the machine's physical
memory, so a run that cannot fit says so instead of being killed. `peak_rss` / `reset_peak_rss` read and
reset the process's high-water mark (Linux), so benchmarks can hold the estimate against the peak.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from openscope.attribution.replacement import ReplacementModel
from openscope.attribution.rows import INFLUENCE_CHUNK_BYTES
from openscope.errors import OpenscopeError

log = logging.getLogger(__name__)

GIB = 2**30

SLACK = 0.2
"""Fraction added to the estimated peak: tensors freed but kept by the allocator, fragmentation, and
the forward's transient tensors that autograd does not save (on Gemma 3 270M the parts come to 85-90%
of the measured peak; with the slack the estimate is within a few percent above it)."""


class MemoryEstimate(NamedTuple):
    """Bytes an attribution will hold at its peak, by part (module docstring)."""

    baseline: int
    """What the process holds already (resident set): the model, the dictionaries, the clean run."""
    rows: int
    """The row store."""
    forward: int
    """The autograd graph of the batched forward."""
    backward: int
    """One backward pass's gradients and working tensors, the read-out's decoder blocks and the
    ranking's working rows."""
    graph: int
    """The adjacency matrix of the kept nodes."""
    pruning: int
    """Pruning's copies of the adjacency's feature and logit rows."""

    @property
    def peak(self) -> int:
        """Bytes above the baseline at the worst phase, plus SLACK for the allocator."""
        worst = max(
            self.rows + self.forward + self.backward, self.rows + self.graph, self.graph + self.pruning
        )
        return int(worst * (1 + SLACK))

    @property
    def total(self) -> int:
        """Baseline plus peak: the process's expected high-water mark."""
        return self.baseline + self.peak

    def describe(self) -> str:
        """One line: the total and its parts in GiB."""
        parts = ", ".join(
            f"{name} {value / GIB:.2f}"
            for name, value in (
                ("row store", self.rows),
                ("forward", self.forward),
                ("backward", self.backward),
                ("graph", self.graph),
                ("pruning", self.pruning),
                ("already held", self.baseline),
            )
        )
        return f"{self.total / GIB:.2f} GiB ({parts} GiB)"


def current_rss() -> int:
    """The process's resident set size now, in bytes (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's resident high-water mark in bytes (since start, or since `reset_peak_rss`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident set (Linux: /proc/self/clear_refs); whether it did."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def physical_memory() -> int | None:
    """The machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _storages(tensors: Iterable[Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_bytes(rm: ReplacementModel, batch: int, exclude: set[int]) -> int:
    """Bytes autograd saves for a backward pass in the replacement forward on `batch` copies (each
    storage counted once; storages in `exclude`, the weights, not at all)."""
    sizes: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run = rm.run(batch=batch, grad=True)
    del run
    return sum(sizes.values())


def forward_bytes(rm: ReplacementModel, batch: int) -> int:
    """The autograd graph of the replacement forward on `batch` copies, measured on 1 and 2 copies."""
    modules: list[nn.Module] = [rm.loaded.model, *(slot.coder for slot in rm.slots)]
    exclude = _storages(t for m in modules for t in (*m.parameters(), *m.buffers()))
    one = saved_bytes(rm, 1, exclude)
    two = saved_bytes(rm, 2, exclude)
    return one + (batch - 1) * max(0, two - one)


def estimate_memory(
    rm: ReplacementModel,
    *,
    batch: int,
    n_rows: int,
    n_cols: int,
    n_kept: int,
    readout: int,
) -> MemoryEstimate:
    """The MemoryEstimate of an attribution: `n_rows` rows (logits + feature budget) over `n_cols`
    columns, `n_kept` nodes in the final graph, `readout` bytes of decoder blocks, `batch` copies. The baseline is read after the forward is measured, so memory the
    measuring freed but the allocator kept counts as held."""
    forward = forward_bytes(rm, batch)
    t, d = rm.n_tokens, rm.clean.embeddings.shape[-1]
    widest = max([d, *(p.shape[-1] for p in rm.frozen_projections)])
    size = rm.clean.embeddings.element_size()
    multilayer = any(slot.dictionary.is_multilayer for slot in rm.slots)
    # Gradients at every probe, a CLT read-out's concatenation of them, and a few working tensors.
    copies = (rm.n_layers + 1) * (2 if multilayer else 1) + 4
    backward = batch * t * (copies * d + 2 * widest) * size + readout
    backward += INFLUENCE_CHUNK_BYTES
    graph = 4 * n_kept * n_kept
    compact = 4 * (n_rows + 1) * n_kept  # feature and logit rows of the graph
    return MemoryEstimate(
        baseline=current_rss(),
        rows=4 * n_rows * n_cols + 4 * n_rows * n_rows,  # the store, and the ranking's square block
        forward=forward,
        backward=backward,
        graph=graph,
        pruning=3 * compact + n_kept * n_kept,  # three float copies of those rows, the bool edge mask
    )


def check_memory(estimate: MemoryEstimate, limit_gb: float | None) -> None:
    """Refuse (one line) when the estimate exceeds the limit (None: the machine's physical memory)."""
    limit = int(limit_gb * GIB) if limit_gb is not None else physical_memory()
    if limit is None or estimate.total <= limit:
        return
    what = f"--max-memory-gb {limit_gb:g}" if limit_gb is not None else "this machine's memory"
    raise OpenscopeError(
        f"this attribution needs about {estimate.describe()}, more than {what} ({limit / GIB:.1f} GiB); "
        "the row store grows with --max-feature-nodes times the prompt's active latents, the forward with "
        "--batch-size times its tokens: lower them, or shorten the prompt"
    )
