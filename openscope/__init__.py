"""openscope: an open microscope for language models.

Harvest activations from any Hugging Face causal LM (Gemma 3 first), train sparse
dictionaries on every layer, evaluate them by splicing, and use them to explore features.
"""

__version__ = "0.1.0"
