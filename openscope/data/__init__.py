"""Text sources and tokenisation into packed, masked contexts."""

from openscope.data.packing import Contexts, iter_contexts
from openscope.data.sources import SOURCES, TextSource, open_source
from openscope.models.tokens import keep_mask

__all__ = ["SOURCES", "Contexts", "TextSource", "iter_contexts", "keep_mask", "open_source"]
