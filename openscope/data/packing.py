"""Tokenise documents and pack them into fixed-length contexts that each start with BOS.

Each document enters the token stream as `<bos> tokens…` (how Gemma saw documents in
pre-training); a context is the next `context_len` tokens of the stream, with a BOS put in
front when it would otherwise start mid-document. The last context is padded. BOS, EOS and
pad positions are masked out of everything openscope stores or measures (`keep_mask`).
`pack_labelled` packs sequences that carry a label per token the same way (chat roles:
`openscope.data.contexts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from openscope.models.tokens import bos_and_pad


class Contexts(NamedTuple):
    """A batch of packed contexts."""

    input_ids: Tensor
    """Token ids [n, context_len] (int64)."""
    attention_mask: Tensor
    """1 for real tokens, 0 for padding [n, context_len]."""


def _token_stream(
    docs: Iterable[str], tokenizer: Any, bos: int, docs_per_call: int = 64
) -> Iterator[list[int]]:
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            yield [bos, *ids]
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) == docs_per_call:
            yield from flush()
    if batch:
        yield from flush()


def pack_labelled(
    seqs: Iterable[tuple[list[int], list[int]]], context_len: int, bos: int, pad: int, fill: int = 0
) -> Iterator[tuple[list[int], list[int]]]:
    """Pack (ids, labels) sequences, each starting with BOS, into contexts of `context_len` ids.

    A label travels with its token (chat roles); a BOS put in front of a context that starts
    mid-sequence, and the padding of the last context, get the label `fill`.
    """
    if context_len < 2:
        raise ValueError("context_len must be at least 2")
    current: list[int] = []
    labels: list[int] = []
    for ids, labs in seqs:
        pos = 0
        while pos < len(ids):
            if not current and ids[pos] != bos:
                current.append(bos)
                labels.append(fill)
            take = min(context_len - len(current), len(ids) - pos)
            current.extend(ids[pos : pos + take])
            labels.extend(labs[pos : pos + take])
            pos += take
            if len(current) == context_len:
                yield current, labels
                current, labels = [], []
    if len(current) > 1:
        n_pad = context_len - len(current)
        yield current + [pad] * n_pad, labels + [fill] * n_pad


def iter_contexts(docs: Iterable[str], tokenizer: Any, context_len: int) -> Iterator[list[int]]:
    """Yield packed contexts (lists of `context_len` ids), each starting with BOS; the last is padded."""
    if context_len < 2:
        raise ValueError("context_len must be at least 2")
    bos, pad = bos_and_pad(tokenizer)
    seqs = ((ids, ids) for ids in _token_stream(docs, tokenizer, bos))  # documents carry no labels
    for ids, _ in pack_labelled(seqs, context_len, bos, pad):
        yield ids


def to_batch(contexts: list[list[int]], tokenizer: Any) -> Contexts:
    """Stack contexts into tensors with an attention mask that hides padding."""
    ids = torch.tensor(contexts, dtype=torch.long)
    pad = tokenizer.pad_token_id
    mask = torch.ones_like(ids) if pad is None else (ids != pad).long()
    return Contexts(ids, mask)
