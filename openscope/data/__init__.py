"""Text sources and tokenisation into packed, masked contexts."""

from openscope.data.packing import Contexts, iter_contexts, keep_mask
from openscope.data.sources import SOURCES, TextSource, open_source

__all__ = ["SOURCES", "Contexts", "TextSource", "iter_contexts", "keep_mask", "open_source"]
