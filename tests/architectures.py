"""Tiny random models of every architecture the site table covers, built from config (no downloads), and
how each block writes to its residual stream, spelled out by hand from the Hugging Face code (what the
tests compare openscope's sites against)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

N_LAYERS = 3
D = 64
SPECIAL: dict[str, Any] = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
"""The tiny tokenizer's special ids (tests/conftest.py)."""
_COMMON: dict[str, Any] = {
    "hidden_size": D,
    "intermediate_size": 128,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    **SPECIAL,
}


class Arch(NamedTuple):
    """One architecture: how to build a tiny one and how its block is wired."""

    build: Callable[[int], nn.Module]
    """A tiny random model of a vocabulary size."""
    attn_write: Callable[[Any, Tensor], Tensor]
    """The attention's write to the residual from the attn_out site (block, attn_out)."""
    mlp_write: Callable[[Any, Tensor], Tensor]
    """The MLP's write to the residual from the mlp_in site (block, mlp_in): the transcoder's target."""
    mlp_input: Callable[[Any, Tensor, Tensor], Tensor]
    """The MLP's input from the residual stream (block, resid_pre, attention write)."""
    attribution: bool
    """Whether attribution graphs support it."""


def _perturb_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random init leaves norm gains at 1 (or Gemma's 0 offset) and biases at 0: perturb them so every
    norm matters in the tests."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _hf(config_cls: str, model_cls: str, **kw: Any) -> Callable[[int], nn.Module]:
    def build(vocab_size: int, seed: int = 0) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = getattr(transformers, config_cls)(vocab_size=vocab_size, **kw)
        return _perturb_norms(getattr(transformers, model_cls)(config), seed)

    return build


def _gemma3_multimodal(vocab_size: int, seed: int = 0) -> nn.Module:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    text = Gemma3TextConfig(
        vocab_size=vocab_size, head_dim=16, num_key_value_heads=1, sliding_window=8, **_COMMON
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, **SPECIAL
    )
    return _perturb_norms(Gemma3ForConditionalGeneration(config), seed)


def _gemma_attn(block: Any, a: Tensor) -> Tensor:
    return block.post_attention_layernorm(block.self_attn.o_proj(a))


def _gemma_mlp(block: Any, x: Tensor) -> Tensor:
    return block.post_feedforward_layernorm(block.mlp(x))


def _gemma_mlp_input(block: Any, resid: Tensor, attn: Tensor) -> Tensor:
    return block.pre_feedforward_layernorm(resid + attn)


def _llama_attn(block: Any, a: Tensor) -> Tensor:
    return block.self_attn.o_proj(a)


def _mlp(block: Any, x: Tensor) -> Tensor:
    return block.mlp(x)


def _llama_mlp_input(block: Any, resid: Tensor, attn: Tensor) -> Tensor:
    return block.post_attention_layernorm(resid + attn)  # Llama's "post-attention" norm is the pre-MLP norm


_LLAMA_KW: dict[str, Any] = {"num_key_value_heads": 2, "head_dim": 16, **_COMMON}
ARCHITECTURES: dict[str, Arch] = {
    "gemma3": Arch(
        _hf(
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            **_COMMON,
        ),
        _gemma_attn,
        _gemma_mlp,
        _gemma_mlp_input,
        True,
    ),
    "gemma3-multimodal": Arch(_gemma3_multimodal, _gemma_attn, _gemma_mlp, _gemma_mlp_input, True),
    "gemma2": Arch(
        _hf("Gemma2Config", "Gemma2ForCausalLM", sliding_window=8, **_LLAMA_KW),
        _gemma_attn,
        _gemma_mlp,
        _gemma_mlp_input,
        True,
    ),
    "llama": Arch(
        _hf("LlamaConfig", "LlamaForCausalLM", **_LLAMA_KW), _llama_attn, _mlp, _llama_mlp_input, True
    ),
    "mistral": Arch(
        _hf("MistralConfig", "MistralForCausalLM", **_LLAMA_KW), _llama_attn, _mlp, _llama_mlp_input, True
    ),
    "qwen2": Arch(
        _hf("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_KW), _llama_attn, _mlp, _llama_mlp_input, True
    ),
    "qwen3": Arch(
        _hf("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA_KW), _llama_attn, _mlp, _llama_mlp_input, True
    ),
    "phi3": Arch(
        _hf("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, **_COMMON),
        _llama_attn,
        _mlp,
        _llama_mlp_input,
        False,
    ),
    "gpt2": Arch(
        _hf(
            "GPT2Config", "GPT2LMHeadModel", n_embd=D, n_layer=N_LAYERS, n_head=4, n_positions=512, **SPECIAL
        ),
        lambda block, a: block.attn.c_proj(a),
        _mlp,
        lambda block, resid, attn: block.ln_2(resid + attn),
        False,
    ),
    "gpt_neox": Arch(
        _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", use_parallel_residual=True, **_COMMON),
        lambda block, a: block.attention.dense(a),
        _mlp,
        # Parallel attention and MLP: the MLP reads the block's input, not resid_pre + attention.
        lambda block, resid, _attn: block.post_attention_layernorm(resid),
        False,
    ),
}
