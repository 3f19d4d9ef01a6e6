"""Model dimensions known offline: the Gemma 3 sizes as data, and any local Hugging Face model's config.

Planning a suite (what it costs, which sites exist) needs a model's shape, not its weights. The five
Gemma 3 sizes ship here, read from their public config.json files (4B and larger are multimodal
wrappers whose text part has these numbers and whose decoder blocks live under
`model.language_model.layers`); `dims_of` also reads the config.json of any local model folder
(a multimodal config keeps its text part under `text_config`). Nothing is downloaded or loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from openscope.errors import OpenscopeError

TEXT_LAYERS = "model.layers"
"""Where a text-only model keeps its decoder blocks."""
MULTIMODAL_LAYERS = "model.language_model.layers"
"""Where Gemma 3 4B and larger (multimodal wrappers) keep them."""

UNGATED_MLP_TYPES = frozenset({"gpt2", "gpt_neox", "gptj", "gpt_neo", "opt", "bloom", "falcon", "phi"})
"""model_type values whose MLP has two matrices (up, down); every other model is taken as gated
(gate, up, down: Gemma, Llama, Mistral, Qwen ...)."""


class ModelDims(NamedTuple):
    """A decoder-only language model's shape: everything a cost estimate needs."""

    name: str
    """The name it is known by (catalogue name or the folder given)."""
    d_model: int
    """Residual stream width (hidden_size)."""
    n_layers: int
    """Decoder blocks."""
    n_heads: int
    """Query heads per block."""
    n_kv_heads: int
    """Key/value heads per block (grouped-query attention)."""
    head_dim: int
    """Width of one head; the `attn_out` site is n_heads × head_dim wide."""
    d_mlp: int
    """MLP hidden width (intermediate_size)."""
    vocab: int
    """Vocabulary size (the LM head, which harvesting never runs)."""
    layers_path: str = TEXT_LAYERS
    """Dotted path of the decoder blocks in the Hugging Face model."""
    gated_mlp: bool = True
    """Whether the MLP has a gate matrix besides up and down (3 matrices rather than 2)."""
    hub_ids: tuple[str, ...] = ()
    """Hugging Face Hub ids of the checkpoints of this shape (base and chat)."""

    @property
    def attn_width(self) -> int:
        """Width of the `attn_out` site: the heads concatenated, before the output projection."""
        return self.n_heads * self.head_dim


def _gemma3(
    size: str, d: int, layers: int, heads: int, kv: int, head_dim: int, mlp: int, vocab: int
) -> ModelDims:
    multimodal = size not in ("270m", "1b")
    return ModelDims(
        name=f"gemma-3-{size}",
        d_model=d,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=head_dim,
        d_mlp=mlp,
        vocab=vocab,
        layers_path=MULTIMODAL_LAYERS if multimodal else TEXT_LAYERS,
        hub_ids=(f"google/gemma-3-{size}-pt", f"google/gemma-3-{size}-it"),
    )


GEMMA_3: dict[str, ModelDims] = {
    d.name: d
    for d in (
        # size, d_model, layers, heads, kv heads, head_dim, MLP width, vocabulary (the multimodal
        # checkpoints' text vocabulary has 64 more entries, for image tokens)
        _gemma3("270m", 640, 18, 4, 1, 256, 2048, 262_144),
        _gemma3("1b", 1152, 26, 4, 1, 256, 6912, 262_144),
        _gemma3("4b", 2560, 34, 8, 4, 256, 10240, 262_208),
        _gemma3("12b", 3840, 48, 16, 8, 256, 15360, 262_208),
        _gemma3("27b", 5376, 62, 32, 16, 128, 21504, 262_208),
    )
}
"""The Gemma 3 sizes by catalogue name (`gemma-3-270m` … `gemma-3-27b`)."""


def catalogue_name(model: str) -> str | None:
    """The catalogue name of a Gemma 3 size given by name or hub id (`google/gemma-3-1b-it` ->
    `gemma-3-1b`), or None when `model` is not one of them."""
    key = model.strip()
    if key in GEMMA_3:
        return key
    for name, dims in GEMMA_3.items():
        if key in dims.hub_ids or key in (f"{name}-pt", f"{name}-it"):
            return name
    return None


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def dims_from_config(config: dict[str, Any], name: str) -> ModelDims:
    """A model's dimensions from its config.json contents (a multimodal config's `text_config` is used;
    GPT-2-style key names are understood too); a one-line error naming a missing key."""
    multimodal = isinstance(config.get("text_config"), dict)
    text = config["text_config"] if multimodal else config

    def need(*keys: str) -> int:
        value = _first(text, *keys)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise OpenscopeError(f"{name}: config.json has no positive {keys[0]}")
        return value

    d_model = need("hidden_size", "n_embd", "d_model")
    n_heads = need("num_attention_heads", "n_head")
    head_dim = _first(text, "head_dim") or d_model // n_heads
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    return ModelDims(
        name=name,
        d_model=d_model,
        n_layers=need("num_hidden_layers", "n_layer", "num_layers"),
        n_heads=n_heads,
        n_kv_heads=int(_first(text, "num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        d_mlp=int(_first(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * d_model),
        vocab=int(_first(text, "vocab_size") or _first(config, "vocab_size") or 0),
        layers_path=MULTIMODAL_LAYERS if multimodal else TEXT_LAYERS,
        gated_mlp=model_type not in UNGATED_MLP_TYPES,
    )


def dims_of(model: str) -> ModelDims:
    """The dimensions of `model`: a Gemma 3 size by name or hub id (from the catalogue), or a local
    Hugging Face model folder (its config.json; no weights are read). Anything else is a one-line error."""
    name = catalogue_name(model)
    if name is not None:
        return GEMMA_3[name]
    folder = Path(model).expanduser()
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise OpenscopeError(f"cannot read {config_file}: {' '.join(str(exc).split())}") from None
        if not isinstance(config, dict):
            raise OpenscopeError(f"{config_file} is not a JSON object")
        return dims_from_config(config, model)
    known = ", ".join(GEMMA_3)
    raise OpenscopeError(
        f"unknown model {model!r}: give a Gemma 3 size ({known}, or its hub id such as "
        "google/gemma-3-1b-pt) or a local Hugging Face model folder (its config.json is read)"
    )
