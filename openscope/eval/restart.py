"""Next-token losses of one batch under several altered forwards: restarted (fast) or full (reference).

An altered forward (`Variant`) is the model with some hooks in place: a dictionary spliced in, several
at once, sites zero-ablated. Evaluation needs, for each, the cross-entropy at the counted positions
(input and target both kept) and the KL divergence from the clean model's next-token distribution.

`restarted_losses` gets them cheaply and exactly: the clean forward (`record_forward`, which also feeds
the caller's readers) is run once and records each block's input and arguments; each variant restarts
at the first block its hooks touch (`run_from`: the blocks before it would compute the clean values
again), keeps only the counted positions of its last residual stream, and all versions go through the
final norm and the 262k-entry unembedding together, a vocabulary block at a time (`head_losses`), never
as [batch·seq, vocab] logits. Several dictionaries at one site share the clean forward, the recorded
prefix, the zero-ablated forward and the clean distribution.

`full_losses` is the reference: one full forward with full logits per variant, as evaluation ran before
restarts existed; tests check the two agree, benchmarks time them side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from openscope.errors import OpenscopeError
from openscope.eval import metrics as m
from openscope.models.hooks import reading
from openscope.models.load import LoadedModel
from openscope.models.restart import Prefix, record_forward, run_from, unembedding
from openscope.models.sites import Site


class Variant(NamedTuple):
    """One altered forward of a batch."""

    what: str
    """How errors name it, e.g. `dictionary x spliced in`."""
    sites: tuple[Site, ...]
    """Every site its hooks read or write: the forward can restart at the earliest one's block."""
    hooks: Callable[[], AbstractContextManager[Any]]
    """Installs its hooks for the forwards inside the block (e.g. `spliced(loaded, d, keep=keep)`)."""

    @property
    def start(self) -> int:
        """The first block its hooks touch."""
        return min(s.layer for s in self.sites)


class BatchLosses(NamedTuple):
    """Per-position losses of one batch; every tensor is masked by `mask` when summed."""

    ce_clean: Tensor
    """Clean cross-entropy, float64."""
    ce: list[Tensor]
    """Per variant, its cross-entropy, float64."""
    kl: list[Tensor]
    """Per variant, KL(clean ‖ variant) of the next-token distributions, float64."""
    mask: Tensor
    """Bool, the shape of the others: which positions count."""


def check_finite(t: Tensor, what: str) -> None:
    """A one-line error naming `what` when t holds NaN or inf."""
    if not bool(torch.isfinite(t).all()):
        raise OpenscopeError(f"{what} contain NaN or inf")


def clean_forward(
    loaded: LoadedModel,
    ids: Tensor,
    attn: Tensor,
    readers: Mapping[Site, Callable[[Tensor], None]],
    start: int,
) -> Prefix:
    """The clean forward, once: it feeds the readers and records what restarts at blocks ≥ start need;
    it stops at the final norm (`RestartUnsupported` when this model cannot be restarted)."""
    with reading(loaded, readers, stop=False):
        return record_forward(loaded, ids, attn, start)


def restarted_losses(
    loaded: LoadedModel, prefix: Prefix, variants: Sequence[Variant], mask: Tensor, ids: Tensor
) -> BatchLosses:
    """The losses at the positions of mask [B, T−1] (input and target counted), each variant restarted
    at its first hooked block from the clean forward's record (`clean_forward`)."""
    head = unembedding(loaded)
    t = ids.shape[1]
    pos = mask.nonzero()
    flat = pos[:, 0] * t + pos[:, 1]  # [N] rows of the flattened [B·T] positions that count
    targets = ids[pos[:, 0], pos[:, 1] + 1].to(loaded.device)
    flat = flat.to(loaded.device)

    def counted(hidden: Tensor, what: str) -> Tensor:
        normed = head.normed(hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat))
        check_finite(normed, what)
        return normed

    assert prefix.final is not None  # record_forward refuses a record without it
    versions = [counted(prefix.final, "the clean model's logits")]
    for v in variants:
        with v.hooks():
            versions.append(counted(run_from(loaded, prefix, v.start), f"logits with {v.what}"))
    ce, kl = m.head_losses(torch.stack(versions), targets, head.weight, head.bias, head.softcap)
    check_finite(ce[0], "the clean model's logits")
    for i, v in enumerate(variants, start=1):
        check_finite(ce[i], f"logits with {v.what}")
        check_finite(kl[i], f"logits with {v.what}")
    ones = torch.ones(len(flat), dtype=torch.bool, device=ce.device)
    return BatchLosses(ce[0], list(ce[1:]), list(kl[1:]), ones)


def full_losses(
    loaded: LoadedModel,
    ids: Tensor,
    attn: Tensor,
    readers: Mapping[Site, Callable[[Tensor], None]],
    variants: Iterable[Variant],
    mask: Tensor,
    after_clean: Callable[[], None] = lambda: None,
) -> BatchLosses:
    """The reference: a full forward with full logits for the clean model (which feeds the readers;
    `after_clean` runs right after it) and for each variant."""

    def forward() -> Tensor:
        return loaded.model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()

    with reading(loaded, readers, stop=False):
        clean_logits = forward()
    after_clean()
    check_finite(clean_logits, "the clean model's logits")
    ce, kl = [], []
    for v in variants:
        with v.hooks():
            logits = forward()
        check_finite(logits, f"logits with {v.what}")
        ce.append(m.next_token_ce(logits, ids))
        kl.append(m.next_token_kl(clean_logits, logits)[:, :-1])
    return BatchLosses(m.next_token_ce(clean_logits, ids), ce, kl, mask)
