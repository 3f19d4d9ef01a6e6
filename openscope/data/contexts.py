"""The one entry point from a source spec to packed contexts: `source_contexts`.

Every command that reads text (harvest, live training, evaluation, features, chat diffing and role
statistics) turns its `--source` into contexts here, so a source is tokenised and packed the same
way everywhere:

- plain text (`openscope.data.sources`): documents packed by `openscope.data.packing.iter_contexts`,
  roles None;
- a chat source (`sharegpt`, `chat:PATH`: `openscope.data.conversations`): each conversation rendered
  with the model's chat template (`openscope.data.chat`) and packed like documents
  (`pack_labelled`): `<bos>` then its tokens, contexts of `context_len` tokens, every token with its
  role; a BOS put in front of a context that starts mid-conversation, and padding, are `template`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from openscope.data.chat import TEMPLATE
from openscope.data.conversations import ChatSource, rendered_sequences
from openscope.data.packing import iter_contexts, pack_labelled
from openscope.data.sources import is_chat_source, open_source
from openscope.models.tokens import bos_and_pad


class LabelledContext(NamedTuple):
    """One packed context and the role of each of its tokens."""

    input_ids: list[int]
    """Token ids (context_len of them, BOS first)."""
    roles: list[int] | None
    """Role id of each token (index into ROLES); None for plain text."""


def chat_contexts(spec: str, tokenizer: Any, context_len: int) -> Iterator[LabelledContext]:
    """Packed contexts of a chat source with the role of every token."""
    bos, pad = bos_and_pad(tokenizer)
    seqs = rendered_sequences(ChatSource(spec).conversations(), tokenizer)
    for ids, roles in pack_labelled(seqs, context_len, bos, pad, fill=TEMPLATE):
        yield LabelledContext(ids, roles)


def source_contexts(
    spec: str, text_field: str, tokenizer: Any, context_len: int
) -> Iterator[LabelledContext]:
    """Packed contexts of any source: chat sources carry roles, plain text has roles None."""
    if is_chat_source(spec):
        yield from chat_contexts(spec, tokenizer, context_len)
        return
    docs = open_source(spec, text_field).documents()
    for ids in iter_contexts(docs, tokenizer, context_len):
        yield LabelledContext(ids, None)
