"""Batches of activations: shuffled rows for training, and whole contexts for feature statistics.

- `ActivationBatch`: rows of an activation store or of a live model, shuffled (what training reads;
  `ActivationStore.batches` and `LiveActivations.batches` yield them).
- `TokenBatch`: whole contexts and the encoded rows of each site, in order, so the window around any
  row lies in the batch (what feature dashboards and role statistics read): `store_batches` reads them
  from a store that keeps its token ids, `live_batches` runs the model on a text source; `keep_roles`
  keeps only the rows of some chat roles.
- `batches_ahead`: any of these assembled by a background thread while the consumer works;
  `close_iterator` ends a stream of them (and whatever reads for it) now.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from openscope.data.contexts import source_contexts
from openscope.data.packing import to_batch
from openscope.errors import OpenscopeError
from openscope.models.hooks import run_to_sites
from openscope.models.load import LoadedModel
from openscope.models.sites import Site
from openscope.models.tokens import keep_mask

T = TypeVar("T")
_END = object()


def close_iterator(items: Iterator[Any]) -> None:
    """Close a generator now (its `finally` clauses run: reader threads stop); other iterators have
    nothing to close."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


def batches_ahead(batches: Iterator[T], depth: int) -> Generator[T]:
    """The same items in the same order, drawn by a background thread up to `depth` ahead of the consumer
    (0: drawn in the consumer's thread). A GPU step leaves the CPU idle while it runs; the thread uses
    that time to gather (and pin) the next batches. A failure while drawing raises in the consumer, at
    the item where it happened; a consumer that stops early stops the thread."""
    if depth < 1:
        yield from batches
        return
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                items.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            while not stop.is_set():  # checked before each draw, not only while waiting to hand one over
                item = next(batches, _END)
                if item is _END:
                    put("end", None)
                    return
                if not put("item", item):
                    return
        except BaseException as exc:  # raised again in the consumer, where the draw would have raised it
            put("error", exc)
        finally:
            close_iterator(batches)  # a generator's own clean-up (a store's reader thread) runs now, here

    thread = threading.Thread(target=fill, name="batches-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=1)  # a draw under way finishes on its own; the thread then sees `stop`


class ActivationBatch(NamedTuple):
    """A batch of stored rows."""

    acts: dict[str, Tensor]
    """Activations per site name, [batch, width], in float32."""
    token_ids: Tensor
    """Token id of each row [batch]."""
    context: Tensor
    """Global context index of each row [batch]."""
    position: Tensor
    """Position of each row inside its context [batch]."""
    role: Tensor | None = None
    """Role of each row's token [batch] (chat stores; index into the manifest's `roles`), else None."""

    def to(self, device: str | torch.device) -> ActivationBatch:
        """The activations on `device`; copies from page-locked memory (`batches(pin_memory=True)`) do not
        block, so the copy of the next batch overlaps the work on this one."""
        return self._replace(acts={k: v.to(device, non_blocking=v.is_pinned()) for k, v in self.acts.items()})


class TokenBatch(NamedTuple):
    """A batch of whole contexts and the encoded rows (kept positions) of each site."""

    index: int
    """Global batch index (resume and random keys use it)."""
    acts: dict[Site, Tensor]
    """Per input site, rows [N, d] (float32)."""
    contexts: Tensor
    """Token ids of the batch's contexts [C, L]."""
    context_ids: Tensor
    """Global id of each context [C]."""
    row_context: Tensor
    """Local context (0..C-1) of each row [N]."""
    row_position: Tensor
    """Position inside its context of each row [N]."""
    row_role: Tensor | None = None
    """Role of each row's token [N] (chat data; index into ROLES), else None."""


def keep_roles(batch: TokenBatch, wanted: Sequence[int]) -> TokenBatch:
    """The batch with only the rows of the given roles (its contexts stay whole, for the windows)."""
    if not wanted or batch.row_role is None:
        return batch
    rows = torch.isin(batch.row_role, torch.tensor(list(wanted), dtype=batch.row_role.dtype))
    return batch._replace(
        acts={s: a[rows] for s, a in batch.acts.items()},
        row_context=batch.row_context[rows],
        row_position=batch.row_position[rows],
        row_role=batch.row_role[rows],
    )


class ShardedStore(Protocol):
    """What `store_batches` reads of an activation store (`ActivationStore` is one; the store module
    imports this one for `ActivationBatch`, so it is named by its shape, not imported)."""

    root: Path | str

    @property
    def shards(self) -> list[dict[str, Any]]: ...

    @property
    def roles(self) -> list[str] | None: ...

    def check_site(self, site: str) -> str: ...

    def read_shard(self, index: int, keys: Sequence[str]) -> dict[str, Tensor]: ...

    def read_shard_keys(self, index: int) -> list[str]: ...


def check_context_store(store: ShardedStore, sites: Sequence[Site]) -> None:
    """Raise unless the store holds the sites and the token ids of its contexts (`store_batches` reads
    both)."""
    for site in sites:
        store.check_site(site.name)
    if not store.shards:
        raise OpenscopeError(f"the store at {store.root} has no finished shards")
    keys = set(store.read_shard_keys(0))
    missing = {"token_ids", "contexts", "context", "position"} - keys
    if missing:
        raise OpenscopeError(
            f"the store at {store.root} holds no token ids ({', '.join(sorted(missing))} missing); "
            "re-harvest it, or run live with --source"
        )


def store_batches(
    store: ShardedStore, sites: Sequence[Site], batch_contexts: int, start: int = 0
) -> Iterator[TokenBatch]:
    """Batches of `batch_contexts` whole contexts, shard by shard in order, from batch `start` on.

    A batch never spans two shards, so batch boundaries follow from the manifest alone and a
    resumed run skips finished shards without reading them.
    """
    index = 0
    for i, shard in enumerate(store.shards):
        n_ctx = int(shard["n_contexts"])
        n_batches = -(-n_ctx // batch_contexts)
        if index + n_batches <= start:
            index += n_batches
            continue
        roles = ["role"] if store.roles is not None else []
        data = store.read_shard(i, [*(s.name for s in sites), "contexts", "context", "position", *roles])
        first = int(shard.get("context_start", int(data["context"].min()) if len(data["context"]) else 0))
        local = data["context"].long() - first
        for b in range(n_batches):
            if index >= start:
                lo, hi = b * batch_contexts, min((b + 1) * batch_contexts, n_ctx)
                rows = ((local >= lo) & (local < hi)).nonzero().squeeze(1)
                yield TokenBatch(
                    index,
                    {s: data[s.name][rows].float() for s in sites},
                    data["contexts"][lo:hi].long(),
                    torch.arange(first + lo, first + hi),
                    local[rows] - lo,
                    data["position"][rows].long(),
                    data["role"][rows].long() if roles else None,
                )
            index += 1


def live_batches(
    loaded: LoadedModel,
    sites: Sequence[Site],
    source: str,
    text_field: str,
    context_len: int,
    batch_contexts: int,
    start: int = 0,
) -> Iterator[TokenBatch]:
    """Batches of whole contexts from a text source, run through the model up to the last site.

    Batches before `start` are tokenised but never run (a resumed run sees the same contexts).
    """
    contexts = source_contexts(source, text_field, loaded.tokenizer, context_len)
    device = loaded.device
    for index in itertools.count():
        chunk = list(itertools.islice(contexts, batch_contexts))
        if not chunk:
            return
        if index < start:
            continue
        batch = to_batch([c.input_ids for c in chunk], loaded.tokenizer)
        acts = run_to_sites(loaded, batch.input_ids.to(device), sites, batch.attention_mask.to(device))
        keep = keep_mask(batch.input_ids, loaded.tokenizer)
        row_context, row_position = keep.nonzero(as_tuple=True)
        roles = chunk[0].roles is not None
        yield TokenBatch(
            index,
            {s: acts[s][keep.to(device)].float().cpu() for s in sites},
            batch.input_ids,
            torch.arange(index * batch_contexts, index * batch_contexts + len(chunk)),
            row_context,
            row_position,
            torch.tensor([c.roles for c in chunk])[keep] if roles else None,
        )
