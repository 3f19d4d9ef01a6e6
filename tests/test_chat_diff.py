"""Base vs chat diffing: one dictionary on the tiny base model and on a copy fine-tuned on chat text here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from openscope.analysis.diff import DiffConfig, architecture_differences, chat_diff
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import load_dictionary
from openscope.coders.io import save_coder
from openscope.data.chat import MODEL
from openscope.data.contexts import chat_contexts
from openscope.data.packing import to_batch
from openscope.errors import OpenscopeError
from openscope.models.hooks import run_to_sites
from openscope.models.load import LoadedModel, load_model
from openscope.models.sites import Site, locate
from openscope.models.tokens import keep_mask
from tests.conftest import CORPUS, make_tiny_gemma, make_tokenizer

SITE = Site(1, "resid_post")
CONTEXT_LEN = 32


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "talks.jsonl"
    lines = []
    for i in range(30):
        msgs = [
            {"role": "user", "content": f"Tell me about item {i}."},
            {"role": "model", "content": CORPUS[i % len(CORPUS)]},
        ]
        lines.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tuned(tiny_model_dir: Path, chat_file: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model after a few SGD steps of next-token loss on the chat data, saved and reloaded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = make_tokenizer()
    contexts = [c.input_ids for c in chat_contexts(f"chat:{chat_file}", tok, CONTEXT_LEN)][:8]
    batch = to_batch(contexts, tok)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(0)
    for _ in range(4):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("tuned")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return load_model(str(out))


@pytest.fixture(scope="module")
def sae_folder(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=48, seed=1))
    with torch.no_grad():
        coder.b_enc.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        coder.log_threshold.fill_(-0.5)  # type: ignore[union-attr]
    hook = locate(tiny.arch.layers, tiny.arch.layers_path, SITE).hook_point
    return save_coder(coder, tmp_path_factory.mktemp("sae") / "sae", hook_point_in=hook, model_name=tiny.name)


def _cfg(sae: Path, chat_file: Path, out: Path, **kw) -> DiffConfig:
    base = dict(
        dictionary=sae,
        model_b="unused",
        source=f"chat:{chat_file}",
        tokens=8 * CONTEXT_LEN,
        context_len=CONTEXT_LEN,
        batch_size=4,
        min_fired=1,
        top=5,
        output=out,
        device="cpu",
    )
    base.update(kw)
    return DiffConfig(**base)  # type: ignore[arg-type]


def _frequencies(loaded: LoadedModel, sae: Path, chat_file: Path, role: int | None = None) -> torch.Tensor:
    """Brute force: run the model on the same contexts, encode, count firings per latent."""
    d = load_dictionary(sae, loaded)
    contexts = list(chat_contexts(f"chat:{chat_file}", loaded.tokenizer, CONTEXT_LEN))[:8]
    ids = torch.tensor([c.input_ids for c in contexts])
    keep = keep_mask(ids, loaded.tokenizer)
    if role is not None:
        keep &= torch.tensor([c.roles for c in contexts]) == role
    acts = run_to_sites(loaded, ids, [SITE], (ids != loaded.tokenizer.pad_token_id).long())[SITE][keep]
    return (d.coder.encode(acts) > 0).double().mean(0)


def test_same_checkpoint_shows_no_change(tiny, sae_folder, chat_file, tmp_path):
    r = chat_diff(_cfg(sae_folder, chat_file, tmp_path), tiny, tiny)
    assert r.a == r.b
    assert r.up == [] and r.down == [] and r.changed_2x == 0
    assert r.frequency_correlation == pytest.approx(1.0)


def test_base_vs_finetuned_copy(tiny, tuned, sae_folder, chat_file, tmp_path):
    r = chat_diff(_cfg(sae_folder, chat_file, tmp_path, roles="model"), tiny, tuned)
    # The per-latent frequencies are those of the dictionary on each model's own activations.
    for side, loaded in ((r.a, tiny), (r.b, tuned)):
        assert side.model == loaded.name
    freq_a = _frequencies(tiny, sae_folder, chat_file, MODEL)
    freq_b = _frequencies(tuned, sae_folder, chat_file, MODEL)
    for row in r.up + r.down:
        assert row.frequency_a == pytest.approx(float(freq_a[row.latent]))
        assert row.frequency_b == pytest.approx(float(freq_b[row.latent]))
        assert list(row.by_role) == ["model"]  # only the role asked for was measured
    assert r.up and all(x.frequency_b > x.frequency_a for x in r.up)
    assert [x.log10_change for x in r.up] == sorted((x.log10_change for x in r.up), reverse=True)
    assert all(x.frequency_b < x.frequency_a for x in r.down)
    # Fine-tuning moved the activations: the base dictionary reconstructs the copy differently.
    assert r.b.fvu != pytest.approx(r.a.fvu) and r.b.ce_clean < r.a.ce_clean
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kind"] == "diff" and report["a"]["fvu"] == pytest.approx(r.a.fvu)
    assert (tmp_path / "diff.png").is_file() and (tmp_path / "eval_b" / "report.json").is_file()
    eval_b = json.loads((tmp_path / "eval_b" / "report.json").read_text())["dictionaries"][0]
    assert eval_b["fvu"] == pytest.approx(r.b.fvu) and eval_b["delta_loss"] == pytest.approx(r.b.delta_loss)
    assert eval_b["n_tokens"] == r.b.n_tokens  # model tokens only (--roles model)


def test_another_architecture_is_a_clear_error(tiny, sae_folder, chat_file, tmp_path):
    other = tmp_path / "two-layers"
    tok = make_tokenizer()
    make_tiny_gemma(len(tok), n_layers=2).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(
        OpenscopeError, match=r"not the architecture of .* \(num_hidden_layers: 2 there, 3 in A\)"
    ):
        chat_diff(_cfg(sae_folder, chat_file, tmp_path / "out"), tiny, load_model(str(other)))
    wide = tiny.model.config.to_dict() | {"hidden_size": 128}
    from transformers import Gemma3TextConfig

    assert architecture_differences(tiny.model.config, Gemma3TextConfig(**wide))[0][:1] == ("hidden_size",)
    with pytest.raises(OpenscopeError, match="--model-b is required"):
        chat_diff(_cfg(sae_folder, chat_file, tmp_path / "out", model_b=""), tiny)


def test_chat_diff_command(tiny_model_dir, tuned, sae_folder, chat_file, tmp_path):
    from openscope.cli import app

    out = tmp_path / "cli"
    args = ["chat", "diff", "--dictionary", str(sae_folder), "--model-a", str(tiny_model_dir)]
    args += ["--model-b", tuned.name, "--source", f"chat:{chat_file}", "--tokens", "128"]
    args += ["--context-len", "32", "--output", str(out), "--device", "cpu", "--min-fired", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "delta loss" in result.output and (out / "report.md").is_file()
