"""Live activations: model forwards feed training directly, through a block-shuffling buffer.

Instead of reading a store, the trainer can run the model itself: one forward per batch of
contexts captures every site it trains on. Rows are gathered into blocks of about
`block_tokens` tokens, shuffled within the block (seeded by the block's index) and served in
batches; the rows that don't fill a last batch are dropped. Because a block depends only on
its index, a resumed run recomputes just the block it stopped in and skips the batches it had
already used, and sees exactly the batches an uninterrupted run would.

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
    ):
        self.loaded, self.sites = loaded, list(sites)
        self.source, self.text_field = source, text_field
        self.context_len, self.forward_batch = context_len, forward_batch
        self.block_contexts = max(forward_batch, block_tokens // context_len // forward_batch * forward_batch)
        self.seed = seed

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
        """Batches forever (the text source repeats if it runs out), skipping the first `start_batch`."""
        served = 0
        block_index = 0
        contexts = self.contexts()
        while True:
            chunk = list(itertools.islice(contexts, self.block_contexts))
            if not chunk:
                if block_index == 0:
                    raise OpenscopeError(f"text source {self.source!r} gave no contexts")
                contexts = self.contexts()  # start the text again: more passes than the data has
                continue
            n_rows = self._rows_in(chunk)
            per_block = n_rows // batch_size
            if served + per_block <= start_batch:
                served += per_block  # a finished block of a resumed run: no forward needed
                block_index += 1
                continue
            data = self.block(chunk)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + block_index)
            perm = torch.randperm(n_rows, generator=gen)
            for i in range(per_block):
                if served >= start_batch:
                    idx = perm[i * batch_size : (i + 1) * batch_size]
                    yield ActivationBatch(
                        {s.name: data[s.name][idx] for s in self.sites},
                        data["token_ids"][idx],
                        torch.full((len(idx),), -1),
                        data["position"][idx],
                        data["role"][idx] if "role" in data else None,
                    )
                served += 1
            block_index += 1

    def _rows_in(self, chunk: list[LabelledContext]) -> int:
        ids = torch.tensor([c.input_ids for c in chunk], dtype=torch.long)
        return int(keep_mask(ids, self.loaded.tokenizer).sum())
