"""Live activations: model forwards feed training directly, through a block-shuffling buffer.

Instead of reading a store, the trainer can run the model itself: one forward per batch of
contexts captures every site it trains on. Rows are gathered into blocks of about
`block_tokens` tokens, shuffled within the block (seeded by the block's index) and served in
batches; the rows that don't fill a last batch are dropped. Because a block depends only on
its index, a resumed run recomputes just the block it stopped in and skips the batches it had
already used, and sees exactly the batches an uninterrupted run would.

Data-parallel replicas shard the contexts (`shard`: index i of n): of every block, replica i runs the
forward on contexts i, i + n, i + 2n, … only, and serves batches of batch_size / n rows of its own rows.
Every replica must take the same number of steps per block (each step ends in collectives), so a
block's batch count is that of its smallest share, counted from the tokens alone (no forward).

The contexts come from `openscope.data.contexts.source_contexts`, as for a harvest: a chat source
is rendered with the model's chat template and every row carries its token's role.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch

from openscope.activations.batches import ActivationBatch
from openscope.data.contexts import LabelledContext, source_contexts
from openscope.data.packing import to_batch
from openscope.errors import OpenscopeError
from openscope.models.hooks import run_to_sites
from openscope.models.load import LoadedModel
from openscope.models.sites import Site
from openscope.models.tokens import keep_mask


class LiveActivations:
    """Shuffled batches of activations computed on the fly from a model and a text source."""

    def __init__(
        self,
        loaded: LoadedModel,
        sites: Sequence[Site],
        source: str = "wiki",
        context_len: int = 256,
        forward_batch: int = 16,
        block_tokens: int = 65_536,
        seed: int = 0,
        text_field: str = "text",
        shard: tuple[int, int] = (0, 1),
    ):
        self.loaded, self.sites = loaded, list(sites)
        self.source, self.text_field = source, text_field
        self.context_len, self.forward_batch = context_len, forward_batch
        self.block_contexts = max(forward_batch, block_tokens // context_len // forward_batch * forward_batch)
        self.seed = seed
        index, count = shard
        if not 0 <= index < count:
            raise OpenscopeError(f"live shard {index} of {count} does not exist (0 <= index < count)")
        self.shard = (index, count)
        """(this replica's index, replicas): its contexts of each block are chunk[index::count]."""

    def contexts(self) -> Iterator[LabelledContext]:
        """The packed contexts of the source (with roles for a chat source), from the start."""
        return source_contexts(self.source, self.text_field, self.loaded.tokenizer, self.context_len)

    def block(self, contexts: Sequence[LabelledContext]) -> dict[str, torch.Tensor]:
        """Activations of every kept position of `contexts`, per site name (plus token ids, positions
        and, for a chat source, roles)."""
        ctx = torch.tensor([c.input_ids for c in contexts], dtype=torch.long)
        keep = keep_mask(ctx, self.loaded.tokenizer)
        device = self.loaded.device
        parts: dict[str, list[torch.Tensor]] = {s.name: [] for s in self.sites}
        for b in range(0, len(ctx), self.forward_batch):
            batch = to_batch(ctx[b : b + self.forward_batch].tolist(), self.loaded.tokenizer)
            acts = run_to_sites(
                self.loaded, batch.input_ids.to(device), self.sites, batch.attention_mask.to(device)
            )
            k = keep[b : b + self.forward_batch].to(device)
            for s in self.sites:
                parts[s.name].append(acts[s][k].float())
        out = {name: torch.cat(p) for name, p in parts.items()}
        positions = torch.arange(ctx.shape[1]).expand_as(ctx)
        out["token_ids"] = ctx[keep]
        out["position"] = positions[keep]
        if contexts and contexts[0].roles is not None:
            out["role"] = torch.tensor([c.roles for c in contexts], dtype=torch.uint8)[keep]
        return out

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[ActivationBatch]:
        """Batches forever (the text source repeats if it runs out), skipping the first `start_batch`.
        `batch_size` is the global batch: a shard of n replicas yields batch_size / n rows per batch."""
        index, count = self.shard
        if batch_size % count or batch_size < count:
            raise OpenscopeError(
                f"batch size {batch_size} does not split evenly over {count} data-parallel replicas"
            )
        local = batch_size // count
        served = 0
        block_index = 0
        served_at_pass = 0  # batches counted when the current pass over the source began
        contexts = self.contexts()
        while True:
            chunk = list(itertools.islice(contexts, self.block_contexts))
            if not chunk:
                if block_index == 0:
                    raise OpenscopeError(f"text source {self.source!r} gave no contexts")
                if served == served_at_pass:  # a whole pass without one batch: it never would give one
                    raise OpenscopeError(
                        f"text source {self.source!r} gives fewer rows per block than one batch of {local} "
                        "(lower --batch-size or raise --block-tokens)"
                    )
                served_at_pass = served
                contexts = self.contexts()  # start the text again: more passes than the data has
                continue
            mine = chunk[index::count]
            # Counted from the tokens on every replica alike, so all of them agree without talking.
            per_block = min(self._rows_in(chunk[i::count]) for i in range(count)) // local
            if per_block == 0 or served + per_block <= start_batch:
                served += per_block  # a finished block of a resumed run (or one too small): no forward
                block_index += 1
                continue
            data = self.block(mine)
            n_rows = data["token_ids"].shape[0]
            # (seed, block) alone for one replica, as before sharding; each replica its own order.
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + block_index) * count + index)
            perm = torch.randperm(n_rows, generator=gen)
            for i in range(per_block):
                if served >= start_batch:
                    idx = perm[i * local : (i + 1) * local]
                    yield ActivationBatch(
                        {s.name: data[s.name][idx] for s in self.sites},
                        data["token_ids"][idx],
                        torch.full((len(idx),), -1),
                        data["position"][idx],
                        data["role"][idx] if "role" in data else None,
                    )
                served += 1
            block_index += 1

    def _rows_in(self, chunk: Sequence[LabelledContext]) -> int:
        """Kept positions of `chunk` (the rows its forward would give), from its token ids alone."""
        if not chunk:
            return 0
        ids = torch.tensor([c.input_ids for c in chunk], dtype=torch.long)
        return int(keep_mask(ids, self.loaded.tokenizer).sum())
