"""Shared fixtures: a tiny random Gemma 3 (with a tiny BPE tokenizer) for speed, and the real 270M once;
`small_store` harvests a small activation store of the tiny model for training tests (`paris_resid_store`:
one per test module), and `tiny_train_config` sets a small, fast training run on one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from openscope.models.load import LoadedModel, load_model

if TYPE_CHECKING:
    from openscope.train import TrainConfig

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Sparse autoencoders find interpretable features in language models.",
    "def add(a, b):\n    return a + b\n",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Gemma 3 is a family of open models from 270M to 27B parameters.",
]


def make_tokenizer():
    """A small byte-level BPE tokenizer with Gemma's special-token ids (pad 0, eos 1, bos 2, unk 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny_gemma(vocab_size: int, n_layers: int = 3, seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = Gemma3ForCausalLM(config)
    # Random init leaves the norm gains at zero-ish offsets; perturb them so every norm matters in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors on a shared 2-core machine: one thread avoids costly thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 3 and its tokenizer saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-gemma3")
    tok = make_tokenizer()
    make_tiny_gemma(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


def small_store(loaded: LoadedModel, model_dir: Path, root: Path, sites: str, sentence: str) -> Path:
    """3000 tokens of the tiny model at `sites` (contexts of 32) over 150 numbered copies of `sentence`
    (`Document {i}: sentence`), harvested into root/s; root/docs.jsonl holds the text."""
    from openscope.activations import HarvestConfig, harvest

    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"Document {i}: {sentence}"}) + "\n" for i in range(150)))
    out = root / "s"
    cfg = HarvestConfig(
        model=str(model_dir),
        sites=sites,
        source=str(src),
        tokens=3000,
        context_len=32,
        batch_size=8,
        output=out,
        device="cpu",
    )
    harvest(cfg, loaded=loaded, progress=False)
    return out


@pytest.fixture(scope="module")
def paris_resid_store(
    tiny: LoadedModel, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A `small_store` of 1.resid_post over "the capital of France is Paris.", one per test module."""
    return small_store(
        tiny,
        tiny_model_dir,
        tmp_path_factory.mktemp("store"),
        "1.resid_post",
        "the capital of France is Paris.",
    )


def tiny_train_config(store: Path | None, out: Path, **overrides: Any) -> TrainConfig:
    """A small, fast TrainConfig on a test store: 1.resid_post, width 32, target L0 8, 20 batches of 64
    tokens, lr 3e-3 with 2 warm-up steps, 5 sparsity warm-up steps, a checkpoint every 5 steps and a log row
    every step, on the CPU, written to `out`. `store` None leaves TrainConfig's default store (live mode: pass
    `model` and `source`); `overrides` replace any field."""
    from openscope.train import TrainConfig

    base: dict[str, Any] = dict(
        sites="1.resid_post",
        width=32,
        batch_size=64,
        tokens=64 * 20,
        lr=3e-3,
        lr_warmup_steps=2,
        sparsity_warmup_steps=5,
        target_l0=8,
        output=out,
        checkpoint_every=5,
        device="cpu",
        log_every=1,
    )
    if store is not None:
        base["store"] = store
    return TrainConfig(**(base | overrides))


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """The real Gemma 3 270M, loaded once per test session (converted from its PyPI package on first use)."""
    return load_model("gemma-3-270m")


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A .jsonl text source with enough text for a few shards of the tiny model."""
    import json

    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"{CORPUS[i % len(CORPUS)]} Document {i}."}) for i in range(120)]
    path.write_text("\n".join(lines) + "\n")
    return path
