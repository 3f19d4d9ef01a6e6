"""SAEBench's core metrics under its names: the streamed values equal a by-hand recomputation on the same
contexts, and `--format saebench` writes one file per eval type in SAEBench's layout and field names."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import in_memory
from openscope.coders.io import save_coder
from openscope.data.packing import iter_contexts, to_batch
from openscope.data.sources import open_source
from openscope.eval import EvalConfig, ablated, evaluate
from openscope.eval import metrics as m
from openscope.eval import saebench as sb
from openscope.models.hookpoints import gemma_scope_hook_point
from openscope.models.hooks import capture
from openscope.models.sites import Site
from openscope.models.tokens import keep_mask

D = 64

# SAEBench's core output: its metric categories and the field names of each (from its eval_output.py).
CORE_FIELDS = {
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {
        "ce_loss_score",
        "ce_loss_with_ablation",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
    },
    "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse", "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {
        "freq_over_1_percent",
        "freq_over_10_percent",
        "normalized_freq_over_1_percent",
        "normalized_freq_over_10_percent",
        "average_max_encoder_cosine_sim",
        "average_max_decoder_cosine_sim",
        "frac_alive",
    },
}
FEATURE_FIELDS = {
    "index",
    "feature_density",
    "consistent_activation_heuristic",
    "encoder_bias",
    "encoder_norm",
    "encoder_decoder_cosine_sim",
    "max_decoder_cosine_sim",
    "max_encoder_cosine_sim",
}
ENVELOPE = {
    "eval_type_id",
    "eval_config",
    "eval_id",
    "datetime_epoch_millis",
    "eval_result_metrics",
    "eval_result_details",
    "sae_bench_commit_hash",
    "sae_lens_id",
    "sae_lens_release_id",
    "sae_lens_version",
    "sae_cfg_dict",
    "eval_result_unstructured",
}


def _coder(seed: int = 3) -> SparseCoder:
    coder = SparseCoder(CoderConfig(d_in=D, d_out=D, width=96, activation="relu", seed=seed))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        coder.b_enc.normal_(0, 0.5, generator=g)
        coder.b_dec.normal_(0, 0.1, generator=g)
    return coder


def test_max_cosine_is_the_brute_force_one():
    v = torch.randn(37, 8, generator=torch.Generator().manual_seed(0))
    unit = F.normalize(v.double(), dim=-1)
    sims = unit @ unit.t()
    sims.fill_diagonal_(-math.inf)
    assert torch.allclose(sb._max_cosine(v, chunk=5), sims.max(1).values, atol=1e-6)


def test_core_metrics_equal_a_by_hand_recomputation(tiny, text_file, tmp_path, one_thread):
    cfg = EvalConfig(
        source=str(text_file),
        tokens=256,
        context_len=32,
        batch_size=3,
        output=tmp_path / "eval",
        device="cpu",
        format="saebench",
    )
    coder = _coder()
    site = Site(1, "resid_post")
    report = evaluate(cfg, tiny, [in_memory(coder, site, name="rand")], progress=False)
    core = report.dictionaries[0].saebench
    assert core is not None

    # The same 8 contexts all at once, by hand.
    docs = open_source(cfg.source).documents()
    ctx = [c for _, c in zip(range(8), iter_contexts(docs, tiny.tokenizer, 32), strict=False)]
    ids = to_batch(ctx, tiny.tokenizer).input_ids
    keep = keep_mask(ids, tiny.tokenizer)
    with capture(tiny, [site], stop=False) as acts, torch.no_grad():
        clean = tiny.model(input_ids=ids, use_cache=False).logits.float()
    x = acts[site][keep].double()
    with torch.no_grad():
        f = coder.encode(x.float()).double()
        xh = coder.decode(f.float()).double()
        with ablated(tiny, [site], keep=keep):
            zero = tiny.model(input_ids=ids, use_cache=False).logits.float()
    mask = m.ce_positions(keep)
    kl_zero = (F.log_softmax(clean, -1).exp() * (F.log_softmax(clean, -1) - F.log_softmax(zero, -1))).sum(-1)[
        :, :-1
    ][mask]
    ce_zero = F.cross_entropy(zero[:, :-1][mask], ids[:, 1:][mask]).item()

    lm = report.dictionaries[0].lm
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)  # noqa: E731
    assert close(core["model_behavior_preservation"]["kl_div_with_ablation"], kl_zero.mean().item())
    assert close(
        core["model_behavior_preservation"]["kl_div_score"],
        (kl_zero.mean().item() - lm.kl) / kl_zero.mean().item(),
    )
    assert close(core["model_performance_preservation"]["ce_loss_with_ablation"], ce_zero)
    assert core["model_performance_preservation"]["ce_loss_score"] == lm.loss_recovered
    assert core["reconstruction_quality"]["explained_variance"] == 1 - report.dictionaries[0].recon.fvu
    assert close(core["reconstruction_quality"]["cossim"], F.cosine_similarity(x, xh, dim=-1).mean().item())
    assert close(core["shrinkage"]["l2_norm_in"], x.norm(dim=-1).mean().item())
    assert close(core["shrinkage"]["l2_ratio"], (xh.norm(dim=-1) / x.norm(dim=-1)).mean().item())
    assert close(
        core["shrinkage"]["relative_reconstruction_bias"],
        (xh.pow(2).sum(-1).mean() / (x * xh).sum(-1).mean()).item(),
    )
    assert close(core["sparsity"]["l1"], f.sum(-1).mean().item())
    density = (f > 0).double().mean(0)
    assert close(core["misc_metrics"]["frac_alive"], (density > 0).double().mean().item())
    assert close(core["misc_metrics"]["freq_over_1_percent"], (density > 0.01).double().mean().item())

    # --format saebench: SAEBench's envelope and field names, per latent details included.
    data = json.loads((cfg.output / "saebench" / "core" / "rand_eval_results.json").read_text())
    assert set(data) == ENVELOPE and data["eval_type_id"] == "core"
    assert {k: set(v) for k, v in data["eval_result_metrics"].items()} == CORE_FIELDS
    details = data["eval_result_details"]
    assert len(details) == 96 and set(details[0]) == FEATURE_FIELDS
    # consistent activation heuristic: firings per context in which the latent fires, by hand
    fired = torch.zeros(8, 96)
    fired_rows = (f > 0).double()
    ctx_of_row = keep.nonzero()[:, 0]
    fired.index_add_(0, ctx_of_row, fired_rows.float())
    j = int(torch.argmax((fired > 0).sum(0)))
    expect = float(fired[:, j].sum() / (fired[:, j] > 0).sum())
    assert math.isclose(details[j]["consistent_activation_heuristic"], expect, rel_tol=1e-5)
    assert data["sae_cfg_dict"]["hook_name"] == "blocks.1.hook_resid_post"
    saved = json.loads((cfg.output / "report.json").read_text())["dictionaries"][0]
    assert saved["saebench"]["model_behavior_preservation"]["kl_div_with_ablation"] == lm.kl_zero


def test_format_saebench_from_the_command_line(tiny, tiny_model_dir, text_file, tmp_path):
    from openscope.cli import app  # the whole command line loads every package: only this test needs it

    folder = tmp_path / "d"
    save_coder(
        _coder(),
        folder,
        hook_point_in=gemma_scope_hook_point(Site(1, "resid_post")),
        model_name=str(tiny_model_dir),
    )
    out = tmp_path / "eval"
    args = ["eval", "--dictionaries", str(folder), "--model", str(tiny_model_dir), "--source", str(text_file)]
    args += [
        "--tokens",
        "64",
        "--context-len",
        "32",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--format",
        "saebench",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    files = list((out / "saebench" / "core").glob("*_eval_results.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["eval_type_id"] == "core"
    bad = CliRunner().invoke(app, [*args[:-1], "csv", "--overwrite"])
    assert "--format must be openscope or saebench" in str(bad.exception)  # exit 2: tests/test_bad_input.py
