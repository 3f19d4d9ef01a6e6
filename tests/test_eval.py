"""Evaluation: splicing means what it says (checked against hand-written hooks), the metrics match
hand-computed cases, and evaluate() writes a report whose numbers are the pure functions' values."""

from __future__ import annotations

import json
import math
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory
from openscope.coders.io import save_coder
from openscope.data.packing import iter_contexts, to_batch
from openscope.data.sources import open_source
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, ablated, evaluate, spliced
from openscope.eval import metrics as m
from openscope.models.hooks import capture, hook_site
from openscope.models.load import LoadedModel
from openscope.models.sites import Site, locate
from openscope.models.tokens import keep_mask

D = 64  # the tiny model's d_model (and n_heads·head_dim)


def _ids(loaded: LoadedModel, n: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(loaded.tokenizer), (n, t), generator=g)
    ids[:, 0] = loaded.tokenizer.bos_token_id
    return ids


def _logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=ids, use_cache=False).logits


def perfect_sae(d: int = D) -> SparseCoder:
    """decode(encode(x)) == x exactly: f = [relu(x), relu(−x)], x̂ = relu(x) − relu(−x)."""
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, width=2 * d, activation="relu", pre_encoder_bias=False))
    eye = torch.eye(d)
    with torch.no_grad():
        coder.w_enc.copy_(torch.cat([eye, -eye], dim=1))
        coder.w_dec.copy_(torch.cat([eye, -eye], dim=0))
        coder.b_enc.zero_()
        coder.b_dec.zero_()
    return coder


def random_coder(
    kind: str = "sae", d_in: int = D, d_out: int = D, width: int = 96, seed: int = 1
) -> SparseCoder:
    coder = SparseCoder(CoderConfig(d_in=d_in, d_out=d_out, width=width, kind=kind, seed=seed))  # type: ignore[arg-type]
    with torch.no_grad():
        coder.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return coder


# ---- splicing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["0.attn_out", "1.resid_post", "2.mlp_out", "1.resid_pre"])
def test_perfect_dictionary_leaves_logits_unchanged(tiny, site):
    ids = _ids(tiny)
    clean = _logits(tiny, ids)
    coder = perfect_sae()
    x = torch.randn(5, D)
    assert torch.equal(coder.decode(coder.encode(x)), x)
    with spliced(tiny, in_memory(coder, Site.from_name(site))):
        out = _logits(tiny, ids)
    torch.testing.assert_close(out, clean, rtol=0, atol=1e-6)


def test_add_error_leaves_logits_unchanged_and_without_it_they_change(tiny):
    ids = _ids(tiny, seed=2)
    clean = _logits(tiny, ids)
    d = in_memory(random_coder(), Site(1, "resid_post"))
    with spliced(tiny, d, add_error=True, record=True) as handle:
        kept = _logits(tiny, ids)
    torch.testing.assert_close(kept, clean, rtol=0, atol=1e-5)
    terms = handle.terms[Site(1, "resid_post")]
    assert terms.error is not None and not terms.error.requires_grad
    # ŷ and ε are separate terms whose sum is the clean activation.
    acts = _clean_acts(tiny, ids, [Site(1, "resid_post")])[Site(1, "resid_post")].reshape(-1, D)
    torch.testing.assert_close(terms.reconstruction + terms.error, acts, rtol=0, atol=1e-5)
    with spliced(tiny, d):
        changed = _logits(tiny, ids)
    assert (changed - clean).abs().max() > 1e-2


def test_detached_error_lets_gradients_reach_the_dictionary_only_through_its_reconstruction(tiny):
    ids = _ids(tiny, seed=9)
    coder = random_coder(seed=2)
    d = in_memory(coder, Site(1, "resid_post"))
    grads = {}
    for detach in (True, False):
        coder.zero_grad()
        with spliced(tiny, d, add_error=True, detach_error=detach):
            tiny.model(input_ids=ids, use_cache=False).logits.sum().backward()
        assert coder.w_dec.grad is not None
        grads[detach] = coder.w_dec.grad.abs().max().item()
    # Frozen ε: the output still equals the clean one, yet the decoder gets a gradient (what
    # attribution needs); a live ε cancels ŷ exactly, so no gradient reaches the dictionary.
    assert grads[True] > 1e-3 and grads[False] < 1e-6


def _clean_acts(loaded: LoadedModel, ids: torch.Tensor, sites: list[Site]) -> dict[Site, torch.Tensor]:
    with capture(loaded, sites, stop=False) as acts, torch.no_grad():
        loaded.model(input_ids=ids, use_cache=False)
    return dict(acts)


def _manual_transcoders(
    loaded: LoadedModel, coders: dict[int, SparseCoder], ids: torch.Tensor
) -> torch.Tensor:
    """Logits with mlp_out of each layer replaced by its transcoder's prediction, by raw hook_site hooks."""
    inputs: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        for layer, coder in coders.items():

            def read(x: torch.Tensor, layer: int = layer) -> None:
                inputs[layer] = x

            def write(y: torch.Tensor, layer: int = layer, coder: SparseCoder = coder) -> torch.Tensor:
                x = inputs[layer].reshape(-1, D)
                return coder.decode(coder.encode(x), x).reshape(y.shape)

            stack.enter_context(hook_site(loaded, Site(layer, "mlp_in"), read))
            stack.enter_context(hook_site(loaded, Site(layer, "mlp_out"), write))
        return _logits(loaded, ids)


def _sparse(d: Dictionary) -> SparseCoder:
    assert isinstance(d.coder, SparseCoder)
    return d.coder


def _transcoder(layer: int, seed: int, kind: str = "transcoder") -> Dictionary:
    coder = random_coder(kind=kind, seed=seed)
    if coder.w_skip is not None:
        with torch.no_grad():
            coder.w_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return in_memory(coder, Site(layer, "mlp_in"), Site(layer, "mlp_out"))


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
def test_transcoder_splice_replaces_mlp_out(tiny, kind):
    ids = _ids(tiny, seed=3)
    d = _transcoder(1, seed=4, kind=kind)
    expected = _manual_transcoders(tiny, {1: _sparse(d)}, ids)
    with spliced(tiny, d):
        out = _logits(tiny, ids)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - _logits(tiny, ids)).abs().max() > 1e-2


def test_several_dictionaries_at_once_is_the_whole_replacement(tiny):
    ids = _ids(tiny, seed=5)
    dicts = [_transcoder(layer, seed=10 + layer) for layer in range(tiny.n_layers)]
    expected = _manual_transcoders(tiny, {d.site_in.layer: _sparse(d) for d in dicts}, ids)
    with spliced(tiny, dicts):
        out = _logits(tiny, ids)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # Splicing layer by layer differs from the joint splice: downstream layers read upstream replacements.
    with spliced(tiny, dicts[-1]):
        last_only = _logits(tiny, ids)
    assert (out - last_only).abs().max() > 1e-3
    with spliced(tiny, [*dicts, in_memory(random_coder(), Site(0, "resid_post"))], add_error=True):
        unchanged = _logits(tiny, ids)
    torch.testing.assert_close(unchanged, _logits(tiny, ids), rtol=0, atol=1e-5)


def test_zero_ablation_matches_a_hand_written_hook(tiny):
    ids = _ids(tiny, seed=6)
    site = Site(1, "mlp_out")
    with hook_site(tiny, site, torch.zeros_like):
        expected = _logits(tiny, ids)
    with ablated(tiny, site):
        out = _logits(tiny, ids)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out - _logits(tiny, ids)).abs().max() > 1e-3
    # With a keep mask only the kept positions are zeroed.
    keep = keep_mask(ids, tiny.tokenizer)

    def zero_kept(y: torch.Tensor) -> torch.Tensor:
        return torch.where(keep.unsqueeze(-1), torch.zeros_like(y), y)

    with hook_site(tiny, site, zero_kept):
        expected = _logits(tiny, ids)
    with ablated(tiny, site) as handle:
        handle.keep = keep
        out = _logits(tiny, ids)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bos_positions_are_not_spliced(tiny):
    ids = _ids(tiny, seed=7)
    keep = keep_mask(ids, tiny.tokenizer)
    assert not keep[:, 0].any() and keep[:, 1:].all()
    site = Site(0, "resid_post")
    d = in_memory(random_coder(), site)
    clean_logits = _logits(tiny, ids)
    clean = _clean_acts(tiny, ids, [site])[site]
    seen: dict[str, torch.Tensor] = {}
    with (
        spliced(tiny, d, record=True) as handle,
        hook_site(tiny, Site(1, "resid_pre"), lambda x: seen.update(x=x)),
    ):
        handle.keep = keep
        logits = _logits(tiny, ids)
    spliced_act = seen["x"]
    # BOS rows pass through exactly; every other row is the reconstruction.
    torch.testing.assert_close(spliced_act[:, 0], clean[:, 0], rtol=0, atol=0)
    coder = _sparse(d)
    recon = coder.decode(coder.encode(clean[:, 1:].reshape(-1, D))).reshape(2, -1, D)
    torch.testing.assert_close(spliced_act[:, 1:], recon, rtol=1e-5, atol=1e-5)
    terms = handle.terms[site]
    assert terms.rows is not None and terms.rows.tolist() == keep.reshape(-1).nonzero().squeeze(1).tolist()
    # Causal attention: position 0 sees only BOS, so its logits are exactly the clean ones.
    torch.testing.assert_close(logits[:, 0], clean_logits[:, 0], rtol=0, atol=0)
    assert (logits[:, 1:] - clean_logits[:, 1:]).abs().max() > 1e-2
    with pytest.raises(OpenscopeError, match=r"keep mask has shape \[1, 12\]"), spliced(tiny, d) as handle:
        handle.keep = keep[:1]
        _logits(tiny, ids)


def random_clt(n_layers: int = 3, width: int = 32, seed: int = 0) -> CrossLayerCoder:
    coder = CrossLayerCoder(CLTConfig(n_layers=n_layers, d_in=D, d_out=D, width=width, skip=True, seed=seed))
    g = torch.Generator().manual_seed(seed)
    assert coder.w_skip is not None
    with torch.no_grad():
        coder.w_skip.normal_(0, 0.05, generator=g)
        coder.b_dec.normal_(0, 0.1, generator=g)
    return coder


def test_clt_layer_by_layer_equals_the_stacked_coder():
    coder = random_clt()
    x = torch.randn(3, 10, D)
    a = coder.encode(x)
    latents = [coder.encode_at(i, x[i]) for i in range(3)]
    for i in range(3):
        torch.testing.assert_close(latents[i], a[i])
    y = coder.decode(a, x)
    for layer in range(3):
        torch.testing.assert_close(coder.decode_into(layer, latents[: layer + 1], x[layer]), y[layer])


def test_clt_splices_all_its_layers_at_once(tiny):
    ids = _ids(tiny, seed=8)
    coder = random_clt()
    d = Dictionary(coder, Site(0, "mlp_in"), Site(0, "mlp_out"), "clt")
    # By hand: layer m's output is the stacked coder's prediction from the inputs of layers <= m as the
    # spliced forward produced them (later layers' inputs do not matter for ŷ_m: zeros stand in).
    inputs: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        for layer in range(3):

            def read(x: torch.Tensor, layer: int = layer) -> None:
                inputs[layer] = x.reshape(-1, D)

            def write(y: torch.Tensor, layer: int = layer) -> torch.Tensor:
                zeros = torch.zeros_like(inputs[0])
                x = torch.stack([inputs[i] if i <= layer else zeros for i in range(3)])
                return coder.decode(coder.encode(x), x)[layer].reshape(y.shape)

            stack.enter_context(hook_site(tiny, Site(layer, "mlp_in"), read))
            stack.enter_context(hook_site(tiny, Site(layer, "mlp_out"), write))
        expected = _logits(tiny, ids)
    with spliced(tiny, d, record=True) as handle:
        out = _logits(tiny, ids)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert set(handle.terms) == {Site(i, "mlp_out") for i in range(3)}
    clean = _logits(tiny, ids)
    assert (out - clean).abs().max() > 1e-2
    with spliced(tiny, d, add_error=True):
        torch.testing.assert_close(_logits(tiny, ids), clean, rtol=0, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------


def test_width_mismatch_is_one_line_naming_both_widths(tiny):
    d = in_memory(random_coder(d_in=32, d_out=32), Site(1, "resid_post"), name="narrow")
    with (
        pytest.raises(
            OpenscopeError,
            match=r"narrow does not fit .*: site 1.resid_post has width 64 but the coder's d_in is 32",
        ) as err,
        spliced(tiny, d),
    ):
        pass
    assert "\n" not in str(err.value)
    d = in_memory(random_coder(kind="transcoder", d_out=48), Site(1, "mlp_in"), Site(1, "mlp_out"), name="t")
    with (
        pytest.raises(OpenscopeError, match=r"site 1.mlp_out has width 64 but the coder's d_out is 48"),
        spliced(tiny, d),
    ):
        pass


def test_missing_layer_and_double_writers_are_named(tiny):
    d = in_memory(random_coder(), Site(5, "resid_post"), name="deep")
    with (
        pytest.raises(
            OpenscopeError,
            match=r"deep uses site 5.resid_post: layer 5 is out of range: the model has 3 layers",
        ),
        spliced(tiny, d),
    ):
        pass
    a, b = in_memory(random_coder(), Site(1, "mlp_out"), name="a"), _transcoder(1, seed=2)
    with pytest.raises(OpenscopeError, match="both replace site 1.mlp_out"), spliced(tiny, [a, b]):
        pass


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_nan_activations_or_logits_are_a_clear_error(tiny, text_file, tmp_path):
    cfg = EvalConfig(source=str(text_file), tokens=64, context_len=32, output=tmp_path / "e", device="cpu")
    dicts = [in_memory(perfect_sae(), Site(1, "resid_post"))]
    n_hooks = hook_count(tiny.model)

    def poison(x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, math.nan)

    with (
        hook_site(tiny, Site(1, "resid_post"), poison),
        pytest.raises(OpenscopeError, match="activations at site 1.resid_post contain NaN"),
    ):
        evaluate(cfg, tiny, dicts, progress=False)
    assert tiny.arch.final_norm is not None
    handle = tiny.arch.final_norm.register_forward_hook(lambda _m, _a, out: torch.full_like(out, math.nan))
    try:
        with pytest.raises(OpenscopeError, match="clean model's logits contain NaN"):
            evaluate(cfg, tiny, dicts, progress=False)
    finally:
        handle.remove()
    assert hook_count(tiny.model) == n_hooks  # evaluation's hooks are gone although it failed midway


# ---- metrics -------------------------------------------------------------------------------------


def test_reconstruction_metrics_hand_case():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0]])
    y_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0], [1.0, 2.0], [3.0, 4.0]])
    # ȳ = (2, 3): Σ‖y − ȳ‖² = 4·2 = 8; Σ‖y − ŷ‖² = 1 + 1 = 2.
    assert m.fvu(y, y_hat) == pytest.approx(0.25)
    assert m.mse(y, y_hat) == pytest.approx(2 / 8)
    f = torch.tensor(
        [
            [0.0, 1.5, 0.0, 0.0, 2.0],
            [0.0, 2.0, 3.0, 0.0, 0.0],
            [0.0, 0.5, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0, 0.0],
        ]
    )
    assert m.l0(f) == pytest.approx(6 / 4)
    counts = m.fired(f).sum(0)
    freqs = m.firing_frequencies(counts, 4)
    assert freqs.tolist() == [0.0, 1.0, 0.25, 0.0, 0.25]
    assert m.dead_latents(freqs) == 2
    assert m.dense_latents(freqs) == 3  # 1.0, 0.25, 0.25 are all above 10%
    assert m.dense_latents(freqs, 0.5) == 1
    # Streaming over two batches gives the same numbers as the one-shot functions.
    sums = m.ReconstructionSums(width=5, d_out=2)
    sums.add(y[:1], y_hat[:1], f[:1])
    sums.add(y[1:], y_hat[1:], f[1:])
    r = sums.result()
    assert (r.n_tokens, r.dead, r.dense) == (4, 2, 3)
    assert (r.fvu, r.mse, r.l0) == (pytest.approx(0.25), pytest.approx(0.25), pytest.approx(1.5))
    assert r.frequencies.tolist() == freqs.tolist()
    hist = m.frequency_histogram(r.frequencies, bins=4, n_tokens=4)
    assert hist.dead == 2 and sum(hist.counts) == 3 and hist.edges[-1] == 0.0


def test_streaming_fvu_is_stable_for_large_offsets():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1000, 8, generator=g, dtype=torch.float64) + 1e4
    y_hat = y + 0.1 * torch.randn(1000, 8, generator=g, dtype=torch.float64)
    sums = m.ReconstructionSums(width=3, d_out=8)
    for part in range(0, 1000, 97):
        sums.add(y[part : part + 97], y_hat[part : part + 97], torch.zeros(len(y[part : part + 97]), 3))
    assert sums.result().fvu == pytest.approx(m.fvu(y, y_hat), rel=1e-9)


def test_lm_metrics_hand_case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    ce = m.next_token_ce(logits, ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(ce, expected.double().reshape(2, 4), rtol=1e-6, atol=1e-6)
    other = torch.randn(2, 5, 7, generator=g)
    kl = m.next_token_kl(logits, other)
    p, q = logits.softmax(-1), other.softmax(-1)
    torch.testing.assert_close(kl, (p * (p.log() - q.log())).sum(-1).double(), rtol=1e-5, atol=1e-6)
    assert m.next_token_kl(logits, logits).abs().max() < 1e-6
    keep = torch.tensor([[False, True, True, True, False], [False, True, True, True, True]])
    assert m.ce_positions(keep).tolist() == [[False, True, True, False], [False, True, True, True]]
    assert m.loss_recovered(2.0, 2.5, 7.0) == pytest.approx(0.9)
    assert math.isnan(m.loss_recovered(2.0, 2.5, 2.0))
    acc = m.MeanSum()
    acc.add(torch.tensor([1.0, 2.0, 10.0]), torch.tensor([True, True, False]))
    assert acc.mean == 1.5 and acc.count == 2


def test_pareto_front():
    xs = [10.0, 20.0, 15.0, 30.0, 5.0, math.nan]
    ys = [0.5, 0.2, 0.6, 0.25, 0.9, 0.0]
    # (5, .9), (10, .5), (20, .2) are not beaten on both axes; (15, .6) and (30, .25) are.
    assert m.pareto_front(xs, ys) == [4, 0, 1]


# ---- evaluate ------------------------------------------------------------------------------------


def _contexts(loaded: LoadedModel, cfg: EvalConfig) -> torch.Tensor:
    docs = open_source(cfg.source).documents()
    n = -(-cfg.tokens // cfg.context_len)
    ctx = [c for _, c in zip(range(n), iter_contexts(docs, loaded.tokenizer, cfg.context_len), strict=False)]
    return to_batch(ctx, loaded.tokenizer).input_ids


def test_evaluate_writes_a_report_that_matches_the_pure_functions(tiny, text_file, tmp_path):
    cfg = EvalConfig(
        source=str(text_file),
        tokens=256,
        context_len=32,
        batch_size=3,
        all_at_once=True,
        output=tmp_path / "eval",
        device="cpu",
    )
    dicts = [
        in_memory(perfect_sae(), Site(1, "resid_post"), name="perfect"),
        in_memory(random_coder(seed=3), Site(0, "resid_post"), name="random"),
        _transcoder(2, seed=5),
    ]
    report = evaluate(cfg, tiny, dicts, progress=False)
    out = cfg.output
    for name in (
        "report.json",
        "report.md",
        "frequencies.safetensors",
        "l0_vs_fvu.png",
        "l0_vs_delta_loss.png",
        "depth.png",
        "frequencies.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert out / name in report.files
    assert (out / "l0_vs_fvu.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "report.json").read_text())

    # Recompute everything by hand on the same contexts, all at once (no streaming).
    ids = _contexts(tiny, cfg)
    keep = keep_mask(ids, tiny.tokenizer)
    assert data["n_contexts"] == len(ids) == 8 and data["n_tokens"] == int(keep.sum()) < ids.numel()
    sites = [Site(0, "resid_post"), Site(1, "resid_post"), Site(2, "mlp_in"), Site(2, "mlp_out")]
    acts = _clean_acts(tiny, ids, sites)
    flat = keep.reshape(-1)
    clean_logits = _logits(tiny, ids)
    mask = m.ce_positions(keep)
    targets = ids[:, 1:]
    ce_clean = F.cross_entropy(clean_logits[:, :-1][mask], targets[mask]).item()
    assert data["n_ce_positions"] == int(mask.sum())
    for d, row in zip(dicts, data["dictionaries"], strict=True):
        assert row["name"] == d.name and row["site_out"] == d.site_out.name
        x = acts[d.site_in].reshape(-1, D)[flat]
        y = acts[d.site_out].reshape(-1, D)[flat]
        with torch.no_grad():
            f = _sparse(d).encode(x)
            y_hat = _sparse(d).decode(f, x)
        freqs = m.firing_frequencies(m.fired(f).sum(0), len(x))
        assert row["n_tokens"] == len(x)
        assert row["fvu"] == pytest.approx(m.fvu(y, y_hat), rel=1e-6)
        assert row["explained_variance"] == pytest.approx(1 - m.fvu(y, y_hat), rel=1e-6)
        assert row["mse"] == pytest.approx(m.mse(y, y_hat), rel=1e-6)
        assert row["l0"] == pytest.approx(m.l0(f), rel=1e-9)
        assert row["dead"] == m.dead_latents(freqs) and row["dense"] == m.dense_latents(freqs)
        assert (
            sum(row["frequency_histogram"]["counts"]) + row["frequency_histogram"]["dead"]
            == d.coder.cfg.width
        )
        assert row["ce_clean"] == pytest.approx(ce_clean, rel=1e-5)
        with spliced(tiny, d, keep=keep):
            logits = _logits(tiny, ids)
        ce = F.cross_entropy(logits[:, :-1][mask], targets[mask]).item()
        assert row["delta_loss"] == pytest.approx(ce - ce_clean, abs=1e-5)
        kl = F.kl_div(
            logits[:, :-1][mask].log_softmax(-1),
            clean_logits[:, :-1][mask].log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
        assert row["kl"] == pytest.approx(kl.item(), abs=1e-5)
        with ablated(tiny, d.site_out, keep=keep):
            zero = _logits(tiny, ids)
        ce_zero = F.cross_entropy(zero[:, :-1][mask], targets[mask]).item()
        assert row["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
        assert row["loss_recovered"] == pytest.approx((ce_zero - ce) / (ce_zero - ce_clean), rel=1e-4)
    perfect = data["dictionaries"][0]
    assert perfect["fvu"] == 0 and abs(perfect["delta_loss"]) < 1e-6 and abs(perfect["kl"]) < 1e-6
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["dead"] == 0
    assert data["dictionaries"][1]["delta_loss"] > 0.01
    assert data["joint"]["delta_loss"] > 0.01 and data["joint"]["ce_zero"] > data["joint"]["ce_clean"]
    md = (out / "report.md").read_text()
    assert "| perfect | 1.resid_post | 128 |" in md and "2.mlp_in->2.mlp_out" in md
    assert "All dictionaries spliced at once" in md
    assert report.dictionaries[0].recon.fvu == perfect["fvu"]


def test_evaluate_a_clt(tiny, text_file, tmp_path):
    cfg = EvalConfig(source=str(text_file), tokens=96, context_len=32, output=tmp_path / "e", device="cpu")
    coder = random_clt(seed=2)
    d = Dictionary(coder, Site(0, "mlp_in"), Site(0, "mlp_out"), "clt")
    report = evaluate(cfg, tiny, [d], progress=False)
    row = json.loads((cfg.output / "report.json").read_text())["dictionaries"][0]
    assert (row["kind"], row["n_layers"], row["width"]) == ("clt", 3, 96)
    assert "| clt | 0-2.mlp_in->mlp_out | 96 |" in (cfg.output / "report.md").read_text()
    ids = _contexts(tiny, cfg)
    flat = keep_mask(ids, tiny.tokenizer).reshape(-1)
    acts = _clean_acts(tiny, ids, [Site(i, k) for i in range(3) for k in ("mlp_in", "mlp_out")])
    x = torch.stack([acts[Site(i, "mlp_in")].reshape(-1, D)[flat] for i in range(3)])
    y = torch.stack([acts[Site(i, "mlp_out")].reshape(-1, D)[flat] for i in range(3)])
    with torch.no_grad():
        a = coder.encode(x)
        y_hat = coder.decode(a, x)
    # FVU pools the layers: Σ over layers of squared error / Σ over layers of variance about each mean.
    variance = sum(float((y[i].double() - y[i].double().mean(0)).pow(2).sum()) for i in range(3))
    assert row["fvu"] == pytest.approx(float((y - y_hat).double().pow(2).sum()) / variance, rel=1e-6)
    assert row["l0"] == pytest.approx(float((a != 0).sum()) / int(flat.sum()), rel=1e-9)
    assert report.dictionaries[0].lm.delta_loss > 0 and row["ce_zero"] > row["ce_clean"]


def test_evaluate_from_folders_and_the_cli(tiny, tiny_model_dir, text_file, tmp_path):
    from openscope.cli import app

    tree = tmp_path / "dicts"
    for layer in range(2):
        coder = random_coder(seed=layer)
        point = locate(tiny.arch.layers, tiny.arch.layers_path, Site(layer, "resid_post"))
        save_coder(
            coder,
            tree / f"run/{layer}_resid_post",
            hook_point_in=point.hook_point,
            model_name=str(tiny_model_dir),
            provenance={"openscope": {"site_in": f"{layer}.resid_post", "site_out": f"{layer}.resid_post"}},
        )
    out = tmp_path / "eval"
    args = ["eval", "--dictionaries", str(tree), "--source", str(text_file), "--tokens", "64"]
    args += ["--context-len", "32", "--output", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "0_resid_post" in result.output and "delta loss" in result.output
    data = json.loads((out / "report.json").read_text())
    assert [d["site_in"] for d in data["dictionaries"]] == ["0.resid_post", "1.resid_post"]
    assert data["config"]["tokens"] == 64
    # The same dictionary in memory gives the same numbers.
    cfg = EvalConfig(source=str(text_file), tokens=64, context_len=32, output=tmp_path / "mem", device="cpu")
    mem = evaluate(cfg, tiny, [in_memory(random_coder(seed=0), Site(0, "resid_post"))], progress=False)
    assert mem.dictionaries[0].recon.fvu == pytest.approx(data["dictionaries"][0]["fvu"], rel=1e-5)
    assert mem.dictionaries[0].lm.delta_loss == pytest.approx(data["dictionaries"][0]["delta_loss"], abs=1e-5)


def test_evaluate_bad_paths(tmp_path):
    with pytest.raises(OpenscopeError, match="no dictionary folder at"):
        evaluate(EvalConfig(dictionaries=[tmp_path / "missing"]))
    with pytest.raises(OpenscopeError, match="holds no dictionary"):
        evaluate(EvalConfig(dictionaries=[tmp_path]))
