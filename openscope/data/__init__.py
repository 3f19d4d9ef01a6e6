"""The data layer: text and chat sources, the chat renderer, prompt sets, and packing into contexts.

- `sources`: plain-text sources (named packages, the user's files), source-spec slices;
- `chat`: the chat renderer (a conversation in, token ids and a role per token out);
- `conversations`: chat sources (conversation files, ShareGPT), read and normalised;
- `prompts`: the chat analyses' prompt sets (AdvBench, ShareGPT first turns, jailbreak templates)
  and chain-of-thought questions (`cot_arithmetic.json`);
- `packing`: tokenised documents packed into fixed-length contexts that start with BOS;
- `contexts`: `source_contexts`, the one entry point from a source spec to packed contexts.
"""

from openscope.data.contexts import LabelledContext, source_contexts
from openscope.data.packing import Contexts, iter_contexts
from openscope.data.sources import SOURCES, TextSource, is_chat_source, open_source
from openscope.models.tokens import keep_mask

__all__ = [
    "SOURCES",
    "Contexts",
    "LabelledContext",
    "TextSource",
    "is_chat_source",
    "iter_contexts",
    "keep_mask",
    "open_source",
    "source_contexts",
]
