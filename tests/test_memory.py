"""The CPU training memory policy: freed blocks stay in the process and are reused without new pages."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from openscope.train.memory import keep_freed_memory


def _faults_of_a_round() -> int:
    """Page faults (minor) taken by one round of what a training step does: allocate a few blocks too big
    for the heap under glibc's default policy (40 MB each; its largest threshold is 32 MB), fill them,
    keep a small tensor made in between, free the blocks."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(10 * 2**20) for _ in range(4)]
    _small = torch.ones(100)
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy is glibc's (Linux)")
def test_freed_blocks_are_reused_without_new_pages() -> None:
    assert keep_freed_memory()
    # Under the default policy every round maps its 160 MB anew: 41k faults of 4 kB pages, every time.
    # Kept, the heap settles after a few rounds (PyTorch's aligned blocks fit the freed ones only once
    # neighbours have merged) and a round then takes no new page.
    faults = [_faults_of_a_round() for _ in range(10)]
    assert min(faults[-3:]) < 1000, faults
    assert keep_freed_memory()  # once per process; a second call is a no-op that still says it applies
