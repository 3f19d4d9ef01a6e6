"""Fast evaluation: a forward restarted at a block from the clean forward's record equals the full
forward for every site kind (on a tiny Gemma 3 with both sliding-window and global attention layers, a
logit soft-cap and padding), the blockwise head losses equal CE and KL on full logits, and evaluate()
gives the same numbers with restarts as with its full-forward reference."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tokenizer

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory
from openscope.eval import EvalConfig, ablated, evaluate, spliced
from openscope.eval import metrics as m
from openscope.eval.restart import Variant, clean_forward, full_losses, restarted_losses
from openscope.models.load import LoadedModel, load_model
from openscope.models.restart import record_forward, run_from, unembedding
from openscope.models.sites import Site
from openscope.models.tokens import keep_mask

D = 64
N_LAYERS = 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny random Gemma 3 whose layers alternate sliding-window (window 4) and global attention, with
    Gemma 2's final logit soft-cap switched on so the capped head is exercised too."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = tmp_path_factory.mktemp("mixed-gemma3")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=D,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=LAYER_TYPES,
        final_logit_softcapping=30.0,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    loaded = load_model(str(path))
    assert list(getattr(loaded.model.config, "layer_types")) == LAYER_TYPES  # noqa: B009
    return loaded


def _batch(loaded: LoadedModel, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two contexts of 20 tokens (longer than the sliding window), the second padded after 14, a BOS
    mid-way through the first (a packed second document)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(loaded.tokenizer), (2, 20), generator=g)
    ids[:, 0] = loaded.tokenizer.bos_token_id
    ids[0, 9] = loaded.tokenizer.bos_token_id
    ids[1, 14:] = loaded.tokenizer.pad_token_id
    attn = (ids != loaded.tokenizer.pad_token_id).long()
    return ids, attn


def _coder(kind: str = "sae", seed: int = 1, width: int = 48) -> SparseCoder:
    coder = SparseCoder(CoderConfig(d_in=D, d_out=D, width=width, kind=kind, seed=seed))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        coder.b_dec.normal_(0, 0.1, generator=g)
        if coder.w_skip is not None:
            coder.w_skip.normal_(0, 0.05, generator=g)
    return coder


def _clt(first: int, n_layers: int, seed: int = 0) -> Dictionary:
    coder = CrossLayerCoder(CLTConfig(n_layers=n_layers, d_in=D, d_out=D, width=32, skip=True, seed=seed))
    g = torch.Generator().manual_seed(seed)
    assert coder.w_skip is not None
    with torch.no_grad():
        coder.w_skip.normal_(0, 0.05, generator=g)
        coder.b_dec.normal_(0, 0.1, generator=g)
    return Dictionary(coder, Site(first, "mlp_in"), Site(first, "mlp_out"), f"clt{first}")


def _dictionaries() -> dict[str, Dictionary]:
    """One dictionary of every site kind, at blocks of both attention types, and CLTs spanning layers."""
    out = {
        f"{layer}.{kind}": in_memory(_coder(seed=layer + 7), Site(layer, kind), name=f"{layer}.{kind}")
        for layer in (1, 2)
        for kind in ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
    }
    out["0.resid_pre"] = in_memory(_coder(seed=3), Site(0, "resid_pre"), name="0.resid_pre")
    out["3.resid_post"] = in_memory(_coder(seed=4), Site(3, "resid_post"), name="3.resid_post")
    for layer, kind in ((1, "transcoder"), (2, "skip_transcoder")):
        out[f"{layer}.{kind}"] = in_memory(
            _coder(kind, seed=layer), Site(layer, "mlp_in"), Site(layer, "mlp_out"), name=f"{layer}.{kind}"
        )
    out["clt1-3"] = _clt(1, 3)
    out["clt0-1"] = _clt(0, 2, seed=5)
    return out


DICTS = _dictionaries()


def _variant(loaded: LoadedModel, name: str, keep: torch.Tensor, zero: bool = False) -> Variant:
    d = DICTS[name]
    hooks: Callable[[], AbstractContextManager[Any]] = (
        (lambda: ablated(loaded, d.sites_out, keep=keep)) if zero else (lambda: spliced(loaded, d, keep=keep))
    )
    return Variant(name, (*d.sites_in, *d.sites_out), hooks)


@torch.inference_mode()
@pytest.mark.parametrize("zero", [False, True], ids=["spliced", "zero-ablated"])
@pytest.mark.parametrize("name", sorted(DICTS))
def test_restarted_forward_equals_full_forward(mixed, name, zero, one_thread):
    ids, attn = _batch(mixed)
    keep = keep_mask(ids, mixed.tokenizer)
    v = _variant(mixed, name, keep, zero)
    with v.hooks():
        full = mixed.model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
    prefix = record_forward(mixed, ids, attn, 0)
    head = unembedding(mixed)
    with v.hooks():
        hidden = run_from(mixed, prefix, v.start)
    rows = keep.reshape(-1).nonzero().squeeze(1)  # the restart unembeds only positions that count
    restarted = head.logits(head.normed(hidden.reshape(-1, D)[rows]))
    expected = full.reshape(-1, full.shape[-1])[rows]
    torch.testing.assert_close(restarted, expected, rtol=1e-5, atol=1e-5)
    # The splice really acts: the restart is not the clean forward.
    clean = head.logits(head.normed(prefix.final.reshape(-1, D)[rows]))  # type: ignore[union-attr]
    assert (restarted - clean).abs().max() > 1e-3


@torch.inference_mode()
def test_restart_without_hooks_is_the_clean_forward_at_every_block(mixed, one_thread):
    ids, attn = _batch(mixed, seed=1)
    logits = mixed.model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
    prefix = record_forward(mixed, ids, attn, 0)
    head = unembedding(mixed)
    for layer in range(N_LAYERS):
        out = head.logits(head.normed(run_from(mixed, prefix, layer)))
        torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_head_losses_equal_ce_and_kl_on_full_logits(mixed, one_thread, monkeypatch):
    # Small vocabulary blocks, so the running log-sum-exp is rescaled across many blocks.
    monkeypatch.setattr(m, "_VOCAB_BLOCK", 37)
    ids, attn = _batch(mixed, seed=2)
    keep = keep_mask(ids, mixed.tokenizer)
    mask = m.ce_positions(keep)
    names = ["2.resid_post", "1.transcoder", "clt1-3"]
    variants = [_variant(mixed, n, keep) for n in names] + [_variant(mixed, names[0], keep, zero=True)]
    readers: dict[Site, Callable[[torch.Tensor], None]] = {}
    ref = full_losses(mixed, ids, attn, readers, variants, mask)
    prefix = clean_forward(mixed, ids, attn, readers, min(v.start for v in variants))
    fast = restarted_losses(mixed, prefix, variants, mask, ids)
    torch.testing.assert_close(fast.ce_clean, ref.ce_clean[ref.mask], rtol=1e-5, atol=1e-6)
    for i in range(len(variants)):
        torch.testing.assert_close(fast.ce[i], ref.ce[i][ref.mask], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.kl[i], ref.kl[i][ref.mask], rtol=1e-4, atol=1e-6)
        assert float(fast.kl[i].min()) > 0


def _report(path: Path) -> dict[str, Any]:
    return json.loads((path / "report.json").read_text())


LM_FIELDS = ("ce_clean", "ce_spliced", "delta_loss", "kl", "ce_zero", "loss_recovered", "kl_zero")
RECON_FIELDS = ("n_tokens", "l0", "fvu", "mse", "dead", "dense")


def _same_reports(fast: dict[str, Any], slow: dict[str, Any]) -> None:
    assert fast["n_tokens"] == slow["n_tokens"] and fast["n_ce_positions"] == slow["n_ce_positions"]
    rows = [*zip(fast["dictionaries"], slow["dictionaries"], strict=True)]
    if slow.get("joint"):
        rows.append((fast["joint"], slow["joint"]))
    for a, b in rows:
        for key in LM_FIELDS:
            # Loss recovered divides by CE_zero − CE_clean, which can be small: it carries larger rounding.
            rel = 1e-4 if key == "loss_recovered" else 1e-5
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-7), (a.get("name"), key)
        for key in RECON_FIELDS:
            if key in b:
                assert a[key] == b[key], (a.get("name"), key)


def test_evaluate_fast_equals_the_full_forward_reference(mixed, text_file, tmp_path, one_thread):
    # Eight dictionaries at one site (sharing the clean forward, the prefix and the zero-ablation),
    # beside a transcoder, a skip transcoder and a CLT spanning layers.
    same_site = [in_memory(_coder(seed=s), Site(2, "resid_post"), name=f"sae{s}") for s in range(8)]
    others = [DICTS["1.transcoder"], DICTS["2.skip_transcoder"], DICTS["clt1-3"], DICTS["1.attn_out"]]
    dicts = same_site + others
    reports = {}
    for fast in (True, False):
        out = tmp_path / f"f{fast}"
        cfg = EvalConfig(
            source=str(text_file), tokens=160, context_len=24, batch_size=3, output=out, device="cpu"
        )
        evaluate(cfg, mixed, dicts, progress=False, fast=fast)
        reports[fast] = _report(cfg.output)
    _same_reports(reports[True], reports[False])
    assert reports[True]["dictionaries"][0]["kl"] > 1e-3


def test_evaluate_all_at_once_fast_equals_reference(mixed, text_file, tmp_path, one_thread):
    dicts = [DICTS["1.resid_pre"], DICTS["2.skip_transcoder"], DICTS["3.resid_post"]]
    reports = {}
    for fast in (True, False):
        out = tmp_path / f"f{fast}"
        cfg = EvalConfig(
            source=str(text_file), tokens=96, context_len=24, all_at_once=True, output=out, device="cpu"
        )
        evaluate(cfg, mixed, dicts, progress=False, fast=fast)
        reports[fast] = _report(out)
    assert reports[True]["joint"] is not None
    _same_reports(reports[True], reports[False])


def test_a_model_without_a_linear_head_falls_back_to_full_forwards(mixed, text_file, tmp_path, one_thread):
    headless = dataclasses.replace(mixed, arch=mixed.arch._replace(lm_head=None))
    d = [DICTS["2.resid_post"]]
    cfg = EvalConfig(source=str(text_file), tokens=48, context_len=24, output=tmp_path / "a", device="cpu")
    evaluate(cfg, headless, d, progress=False)
    ref = dataclasses.replace(cfg, output=tmp_path / "b")
    evaluate(ref, mixed, d, progress=False, fast=False)
    _same_reports(_report(cfg.output), _report(ref.output))
