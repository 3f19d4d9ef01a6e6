"""Cross-layer transcoders: the training pass, folding, training from a store or live, resume, init from
transcoders, and evaluation per layer. (Loading hand-made Gemma Scope 2 multi-layer files against the
documented formula, and the plain save/load round trip, are in test_formats.py.)"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from openscope.activations import ActivationStore
from openscope.cli import app
from openscope.coders import CoderConfig, SparseCoder
from openscope.coders.clt import CLTConfig, CrossLayerCoder, clt_from_transcoders
from openscope.coders.dictionary import Dictionary, load_dictionary
from openscope.coders.io import save_clt
from openscope.data.packing import iter_contexts, to_batch
from openscope.data.sources import open_source
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate
from openscope.models.hooks import capture
from openscope.models.sites import Site
from openscope.models.tokens import keep_mask
from openscope.train import TrainConfig, train
from openscope.train.clt import clt_layers, load_transcoders
from openscope.train.steps import StepConfig, clt_train_step, make_optimizer, train_step
from tests.coder_checks import check_coder_interface
from tests.conftest import small_store, tiny_train_config

D = 64  # the tiny model's d_model (= mlp_in and mlp_out width)


def perturbed_clt(n_layers: int = 3, width: int = 16, seed: int = 0, **kw) -> CrossLayerCoder:
    """A CLT whose every parameter (biases, skip, thresholds) is non-trivial."""
    clt = CrossLayerCoder(CLTConfig(n_layers=n_layers, d_in=12, d_out=10, width=width, seed=seed, **kw))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.3, generator=g)
        clt.b_dec.normal_(0, 0.3, generator=g)
        if clt.w_skip is not None:
            clt.w_skip.normal_(0, 0.1, generator=g)
        if clt.log_threshold is not None:
            clt.log_threshold.copy_(torch.rand(clt.log_threshold.shape, generator=g).log() - 0.5)
    return clt


def transcoder_like(clt: CrossLayerCoder) -> SparseCoder:
    """The single-layer (skip-)transcoder with the weights of a one-layer CLT."""
    cfg = clt.cfg
    kind = "skip_transcoder" if cfg.skip else "transcoder"
    coder = SparseCoder(CoderConfig(d_in=cfg.d_in, d_out=cfg.d_out, width=cfg.width, kind=kind))
    with torch.no_grad():
        coder.w_enc.copy_(clt.w_enc[0])
        coder.b_enc.copy_(clt.b_enc[0])
        coder.w_dec.copy_(clt.w_dec[0][:, 0])
        coder.b_dec.copy_(clt.b_dec[0])
        assert coder.log_threshold is not None and clt.log_threshold is not None
        coder.log_threshold.copy_(clt.log_threshold[0])
        if coder.w_skip is not None and clt.w_skip is not None:
            coder.w_skip.copy_(clt.w_skip[0])
    return coder


# ---- the coder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True])
def test_a_one_layer_clt_is_a_transcoder(skip: bool) -> None:
    clt = perturbed_clt(n_layers=1, skip=skip)
    coder = transcoder_like(clt)
    x = torch.randn(40, 12)
    with torch.no_grad():
        torch.testing.assert_close(clt.encode(x[None])[0], coder.encode(x))
        torch.testing.assert_close(clt(x[None]).reconstruction[0], coder.decode(coder.encode(x), x))
        # Training forward too: same L0 and firing rates (with their STE), same prefix reconstructions.
        a = clt.train_forward(x[None], prefixes=(5,), path="dense")
        b = coder(x, prefixes=(5,), path="dense")
        torch.testing.assert_close(a.reconstruction[0], b.reconstruction)
        torch.testing.assert_close(a.prefix_reconstructions[0][0], b.prefix_reconstructions[0])
        torch.testing.assert_close(a.l0[0], b.l0)
        torch.testing.assert_close(a.fire_rate[0], b.fire_rate)
    # The fold of a one-layer CLT is the transcoder's fold (latents scaled by C_out).
    coder.set_scales(3.0, 0.5)
    folded = clt.fold(torch.tensor([3.0]), torch.tensor([0.5]))
    with torch.no_grad():
        torch.testing.assert_close(
            folded(x[None]).reconstruction[0], coder.fold().decode(coder.fold().encode(x), x)
        )
        torch.testing.assert_close(folded.encode(x[None])[0], coder.fold().encode(x))


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
@pytest.mark.parametrize("skip", [False, True])
def test_clt_interface_all_layers_at_once_equal_layer_by_layer(activation: str, skip: bool) -> None:
    clt = perturbed_clt(activation=activation, skip=skip)
    assert clt.n_layers == 3 and clt.kind == "clt"
    x = torch.randn(3, 30, 12, generator=torch.Generator().manual_seed(4))
    check_coder_interface(clt, list(x))
    with torch.no_grad():  # reconstruct is the stacked forward
        torch.testing.assert_close(clt.reconstruct(list(x)).reconstruction, clt(x).reconstruction)


@pytest.mark.parametrize("skip", [False, True])
def test_a_one_layer_clt_runs_inside_a_model_like_its_transcoder(skip: bool) -> None:
    clt = perturbed_clt(n_layers=1, skip=skip)
    coder = transcoder_like(clt)
    x = torch.randn(40, 12)
    j = torch.tensor([1, 4, 9])
    with torch.no_grad():
        f = coder.encode_at(0, x)
        torch.testing.assert_close(clt.encode_at(0, x), f)
        torch.testing.assert_close(clt.decode_into(0, [f], x), coder.decode_into(0, [f], x))
        torch.testing.assert_close(clt.decoder_vectors(0, 0, j), coder.decoder_vectors(0, 0, j))
        torch.testing.assert_close(clt.encoder_vectors(0, j), coder.encoder_vectors(0, j))
        assert (clt.skip_at(0, x) is None) == (coder.skip_at(0, x) is None) == (not skip)
        # Built from an unfolded transcoder, the CLT takes its fold: latents scaled by C_out, same ŷ.
        coder.set_scales(3.0, 0.5)
        built, folded = clt_from_transcoders([coder]), coder.fold()
        torch.testing.assert_close(built.encode_at(0, x), folded.encode_at(0, x))
        torch.testing.assert_close(built.decoder_vectors(0, 0, j), folded.decoder_vectors(0, 0, j))
        torch.testing.assert_close(
            built.decode_into(0, [built.encode_at(0, x)], x), coder.decode_into(0, [coder.encode_at(0, x)], x)
        )


def test_a_one_layer_clt_trains_exactly_like_a_transcoder() -> None:
    """Same weights, same batch, same step config: after three steps the weights are the same."""
    clt = perturbed_clt(n_layers=1, skip=True)
    coder = transcoder_like(clt)
    cfg = StepConfig(
        lr=1e-2,
        lr_warmup_steps=0,
        target_l0=4.0,
        sparsity_warmup_steps=0,
        matryoshka_prefixes=(4,),
        freq_coeff=1.0,
        max_fire_rate=0.2,
        path="dense",
    )
    opt_clt = make_optimizer(clt, cfg.lr, threshold_lr_scale=10.0)  # type: ignore[arg-type]
    opt_coder = make_optimizer(coder, cfg.lr, threshold_lr_scale=10.0)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(32, 12, generator=g), torch.randn(32, 10, generator=g)
        a = clt_train_step(clt, opt_clt, x[None], y[None], cfg, step)
        b = train_step(coder, opt_coder, x, y, cfg, step)
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.l0[0] == pytest.approx(b.l0)
    torch.testing.assert_close(transcoder_like(clt).state_dict(), coder.state_dict(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("activation", "skip"), [("jumprelu", True), ("relu", False)])
def test_sparse_training_pass_equals_the_dense_one(activation: str, skip: bool) -> None:
    # A wide STE window (bandwidth 0.3) puts many pre-activations in it, so θ gets real gradient.
    clt = perturbed_clt(n_layers=3, activation=activation, skip=skip, bandwidth=0.3)  # type: ignore[arg-type]
    x = torch.randn(3, 48, 12)
    y = torch.randn(3, 48, 10)
    results = {}
    for path in ("dense", "sparse"):
        clt.zero_grad()
        out = clt.train_forward(x, prefixes=(4, 9), path=path)  # type: ignore[arg-type]
        loss = (
            (out.reconstruction - y).pow(2).sum()
            + sum((r - y).pow(2).sum() * 0.3 for r in out.prefix_reconstructions)
            + (out.l0 - 3).pow(2).sum()
            + out.fire_rate.pow(2).sum()
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in clt.named_parameters() if p.grad is not None}
        results[path] = (out, grads)
    (dense, g_dense), (sparse, g_sparse) = results["dense"], results["sparse"]
    assert 0 < float(dense.l0.detach().mean()) < 16
    torch.testing.assert_close(sparse.reconstruction, dense.reconstruction, rtol=1e-5, atol=1e-5)
    for a, b in zip(sparse.prefix_reconstructions, dense.prefix_reconstructions, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.l0, dense.l0)
    torch.testing.assert_close(sparse.fire_rate, dense.fire_rate)
    torch.testing.assert_close(sparse.l1, dense.l1, rtol=1e-5, atol=1e-5)
    assert set(g_sparse) == set(g_dense)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-4, atol=1e-4, msg=name)


def test_fold_takes_raw_activations_and_unfolds() -> None:
    clt = perturbed_clt(n_layers=3, skip=True)
    c_in, c_out = torch.tensor([2.0, 5.0, 0.5]), torch.tensor([3.0, 0.25, 7.0])
    x = torch.randn(3, 20, 12) * c_in.view(3, 1, 1)
    folded = clt.fold(c_in, c_out)
    with torch.no_grad():
        expected = clt(x / c_in.view(3, 1, 1)).reconstruction * c_out.view(3, 1, 1)
        torch.testing.assert_close(folded(x).reconstruction, expected, rtol=1e-5, atol=1e-5)
        # Layer ℓ's latents are the normalised ones times C_out[ℓ]: same firing pattern.
        torch.testing.assert_close(folded.encode(x), clt.encode(x / c_in.view(3, 1, 1)) * c_out.view(3, 1, 1))
        back = folded.fold(1 / c_in, 1 / c_out)
        for (name, p), q in zip(clt.named_parameters(), back.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_decoder_constraint_spans_all_target_layers() -> None:
    clt = perturbed_clt(n_layers=3)
    with torch.no_grad():
        for w in clt.w_dec:
            w.mul_(torch.rand(w.shape[0], 1, 1) * 3)
    clt.normalize_decoder_()
    torch.testing.assert_close(clt.decoder_norms(), torch.ones(3, 16))
    clt.zero_grad()
    x = torch.randn(3, 30, 12)
    clt(x).reconstruction.pow(3).sum().backward()
    clt.remove_parallel_grad_()
    for w in clt.w_dec:  # no gradient component along each (concatenated) row
        assert w.grad is not None
        dots = (w.grad.flatten(1) * w.flatten(1)).sum(1)
        torch.testing.assert_close(dots, torch.zeros_like(dots), atol=1e-4, rtol=0)


def test_clt_from_transcoders_reproduces_each_layer() -> None:
    transcoders = []
    for i in range(3):
        t = SparseCoder(CoderConfig(d_in=12, d_out=10, width=20, kind="skip_transcoder", seed=i))
        t.set_scales(2.0 + i, 0.5 + i)  # fold() must happen inside
        with torch.no_grad():
            t.w_dec.mul_(torch.rand(20, 1) + 0.5)  # rows not unit-norm (e.g. a Gemma Scope file)
            t.b_enc.normal_(0, 0.2)
            t.b_dec.normal_(0, 0.2)
            assert t.w_skip is not None and t.log_threshold is not None
            t.w_skip.normal_(0, 0.1)
            t.log_threshold.fill_(-1.5)
        transcoders.append(t)
    x = torch.randn(3, 25, 12) * 3
    for width in (20, 8):  # 8: the Matryoshka prefix of each transcoder
        clt = clt_from_transcoders(transcoders, width)
        assert clt.cfg.skip and clt.cfg.width == width
        torch.testing.assert_close(clt.decoder_norms(), torch.ones(3, width))
        with torch.no_grad():
            y = clt(x).reconstruction
            for i, t in enumerate(transcoders):
                f = t.encode(x[i])
                f[:, width:] = 0
                torch.testing.assert_close(y[i], t.decode(f, x[i]), rtol=1e-4, atol=1e-4)
                assert not clt.w_dec[i][:, 1:].any()  # later-layer blocks start at zero
    with pytest.raises(OpenscopeError, match="fewer than the CLT's 30"):
        clt_from_transcoders(transcoders, 30)
    with pytest.raises(OpenscopeError, match="needs one too"):
        clt_from_transcoders(transcoders, skip=False)


def test_clt_layers() -> None:
    sites = [f"{i}.{k}" for i in range(4) for k in ("mlp_in", "mlp_out")] + ["2.resid_post"]
    assert clt_layers("all", sites) == [0, 1, 2, 3]
    assert clt_layers("1-2.mlp_in", sites) == [1, 2]
    assert clt_layers("2.*", sites, n_layers=4) == [2]
    with pytest.raises(OpenscopeError, match="consecutive layers; got 0, 2"):
        clt_layers("0.mlp_in,2.mlp_in", sites)
    with pytest.raises(OpenscopeError, match=r"layer 3 needs 3.mlp_in and 3.mlp_out"):
        clt_layers("2-3.mlp_in", sites[:-3], n_layers=4)
    with pytest.raises(OpenscopeError, match="needs mlp_in and mlp_out"):
        clt_layers("all", ["2.resid_post"])


# ---- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_dir(tiny, tiny_model_dir, tmp_path_factory) -> Path:
    """Every layer's mlp_in and mlp_out of the tiny 3-layer model."""
    return small_store(
        tiny,
        tiny_model_dir,
        tmp_path_factory.mktemp("store"),
        "*.mlp_in,*.mlp_out",
        "the capital of France is Paris, of Italy Rome.",
    )


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    return tiny_train_config(
        store, out, **{"kind": "clt", "sites": "all", "tokens": 64 * 30, "target_l0": 6, **kw}
    )


def _raw(store: Path, layers: range = range(3), n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    batch = next(
        ActivationStore(store).batches([f"{i}.{k}" for i in layers for k in ("mlp_in", "mlp_out")], n)
    )
    x = torch.stack([batch.acts[f"{i}.mlp_in"] for i in layers])
    y = torch.stack([batch.acts[f"{i}.mlp_out"] for i in layers])
    return x, y


def test_cli_trains_a_clt_that_learns_and_reloads(store_dir, tmp_path) -> None:
    out = tmp_path / "d"
    args = ["train", "--store", str(store_dir), "--kind", "skip_clt", "--width", "32", "--batch-size", "64"]
    args += [
        "--tokens",
        str(64 * 40),
        "--lr",
        "3e-3",
        "--lr-warmup-steps",
        "2",
        "--sparsity-warmup-steps",
        "5",
    ]
    args += [
        "--target-l0",
        "6",
        "--output",
        str(out),
        "--device",
        "cpu",
        "--log-every",
        "1",
        "--matryoshka",
        "8",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = out / "0-2_skip_clt_jumprelu_w32"
    assert "0.mlp_in" in result.output and "2.mlp_in" in result.output  # a row per layer
    config = json.loads((folder / "config.json").read_text())
    assert config["type"] == "clt" and config["affine_connection"] is True and config["n_layers"] == 3
    assert config["hf_hook_point_in"] == "model.layers.0.pre_feedforward_layernorm"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and len(rows[-1]["l0_per_layer"]) == 3
    # Step 0 measures the data-dependent start: every layer at the target L0 and better than its mean
    # (per-latent thresholds: each latent fires on 12 of the 64 rows, up to ties between the tiny store's
    # repeated rows, where θ lands on a value the encoder-scale fit may round to either side).
    assert rows[0]["l0_per_layer"] == pytest.approx([6, 6, 6], abs=0.3)
    assert all(0.5 < f < 1 for f in rows[0]["fvu_per_layer"]), rows[0]["fvu_per_layer"]
    assert sum(r["loss"] for r in rows[-5:]) < 0.7 * sum(r["loss"] for r in rows[:5])
    run = json.loads((out / "run.json").read_text())
    assert run["layers"] == [0, 1, 2] and run["config"]["kind"] == "skip_clt"

    # The folder loads as a Dictionary bound to layers 0-2, takes raw activations, and on held data
    # each layer's L0 is near the target and its FVU well below 1.
    d = load_dictionary(folder)
    assert isinstance(d.coder, CrossLayerCoder) and d.sites_out[2] == Site(2, "mlp_out")
    x, y = _raw(store_dir)
    with torch.no_grad():
        out_ = d.coder(x)
    l0 = (out_.latents > 0).float().sum(-1).mean(-1)
    fvu = (y - out_.reconstruction).pow(2).sum((1, 2)) / (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2))
    assert ((l0 > 6 * 0.6) & (l0 < 6 * 1.5)).all(), l0
    assert (fvu < 0.8).all(), fvu
    assert run["final"]["1.mlp_in"]["l0"] == pytest.approx(config["openscope"]["final_l0"][1])


def test_resume_equals_uninterrupted(store_dir, tmp_path) -> None:
    full = train(_cfg(store_dir, tmp_path / "full"), progress=False)
    part = tmp_path / "part"
    stopped = train(_cfg(store_dir, part), progress=False, stop_after=7)
    assert stopped.steps == 7 and not stopped.folders
    with pytest.raises(OpenscopeError, match="already holds a run's checkpoint"):
        train(_cfg(store_dir, part), progress=False)
    resumed = train(_cfg(store_dir, part, resume=True), progress=False)
    a, b = load_dictionary(full.folders["0.mlp_in"]).coder, load_dictionary(resumed.folders["0.mlp_in"]).coder
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(OpenscopeError, match=r"from another run \(width: 32 there, 16 now\)"):
        train(_cfg(store_dir, part, resume=True, width=16), progress=False)


def test_a_layer_range_and_bad_requests(store_dir, tmp_path) -> None:
    result = train(_cfg(store_dir, tmp_path / "r", sites="1-2.mlp_in", tokens=64 * 3), progress=False)
    (folder,) = result.folders.values()
    d = load_dictionary(folder)
    assert d.sites_in == (Site(1, "mlp_in"), Site(2, "mlp_in")) and set(result.final) == {
        "1.mlp_in",
        "2.mlp_in",
    }
    with pytest.raises(OpenscopeError, match="jumprelu or relu, not topk"):
        train(_cfg(store_dir, tmp_path / "a", activation="topk", k=4), progress=False)
    with pytest.raises(OpenscopeError, match="no transcoder 0.mlp_in -> 0.mlp_out"):
        train(_cfg(store_dir, tmp_path / "c", init_from=tmp_path / "r"), progress=False)


def test_init_from_transcoders_reproduces_them_at_step_0(store_dir, tmp_path) -> None:
    tdir = tmp_path / "t"
    base = _cfg(store_dir, tdir, kind="skip_transcoder", sites="all", tokens=64 * 6)
    transcoders = train(base, progress=False)
    assert len(transcoders.folders) == 3
    out = tmp_path / "clt"
    cfg = _cfg(store_dir, out, kind="skip_clt", init_from=tdir, width=16)  # a prefix of the 32
    train(cfg, progress=False, stop_after=0)
    # The checkpoint at step 0 holds the CLT in normalised units: fold it with the store's scales.
    state = torch.load(out / "checkpoint.pt", weights_only=True)["dicts"][0]["coder"]
    clt = CrossLayerCoder(CLTConfig(n_layers=3, d_in=D, d_out=D, width=16, skip=True))
    clt.load_state_dict(state)
    store = ActivationStore(store_dir)
    c_in = torch.tensor([store.stats(f"{i}.mlp_in").norm_scale for i in range(3)])
    c_out = torch.tensor([store.stats(f"{i}.mlp_out").norm_scale for i in range(3)])
    raw = clt.fold(c_in, c_out)
    x, _ = _raw(store_dir)
    coders = load_transcoders(tdir, [0, 1, 2])
    with torch.no_grad():
        y = raw(x).reconstruction
        for i, t in enumerate(coders):
            f = t.encode(x[i])
            f[:, 16:] = 0
            torch.testing.assert_close(y[i], t.decode(f, x[i]), rtol=1e-4, atol=1e-4)
            assert not raw.w_dec[i][:, 1:].any()
    # Training from there works and is told apart from a run from scratch on resume.
    train(dataclasses.replace(cfg, resume=True), progress=False)


def test_live_clt(tiny_model_dir, text_file, tmp_path) -> None:
    cfg = _cfg(
        Path("unused"),
        tmp_path / "live",
        model=str(tiny_model_dir),
        source=str(text_file),
        context_len=32,
        block_tokens=1024,
        tokens=64 * 4,
        sites="1-2.mlp_in",
    )
    result = train(cfg, progress=False)
    assert set(result.final) == {"1.mlp_in", "2.mlp_in"}
    d = load_dictionary(result.folders["1.mlp_in"])
    assert d.sites_out == (Site(1, "mlp_out"), Site(2, "mlp_out"))


# ---- evaluation ------------------------------------------------------------------------------------


def test_eval_reports_a_clt_per_layer(tiny, store_dir, text_file, tmp_path) -> None:
    result = train(_cfg(store_dir, tmp_path / "d", tokens=64 * 5), progress=False)
    cfg = EvalConfig(
        dictionaries=[tmp_path / "d"],
        source=str(text_file),
        tokens=96,
        context_len=32,
        output=tmp_path / "e",
        device="cpu",
    )
    report = evaluate(cfg, tiny, progress=False)
    (d,) = report.dictionaries
    assert d.kind == "clt" and len(d.layers) == 3
    # Per layer, by hand from the clean activations of the same contexts.
    docs = open_source(cfg.source).documents()
    contexts = list(itertools.islice(iter_contexts(docs, tiny.tokenizer, cfg.context_len), 3))
    ids = to_batch(contexts, tiny.tokenizer).input_ids
    flat = keep_mask(ids, tiny.tokenizer).reshape(-1)
    sites = [Site(i, k) for i in range(3) for k in ("mlp_in", "mlp_out")]
    with capture(tiny, sites, stop=False) as acts, torch.no_grad():
        tiny.model(input_ids=ids, use_cache=False)
    x = torch.stack([acts[Site(i, "mlp_in")].reshape(-1, D)[flat] for i in range(3)])
    y = torch.stack([acts[Site(i, "mlp_out")].reshape(-1, D)[flat] for i in range(3)])
    coder = load_dictionary(result.folders["0.mlp_in"]).coder
    with torch.no_grad():
        out = coder(x)
    for i, layer in enumerate(d.layers):
        fvu = float((y[i] - out.reconstruction[i]).pow(2).sum() / (y[i] - y[i].mean(0)).pow(2).sum())
        assert layer.fvu == pytest.approx(fvu, rel=1e-3)
        assert layer.l0 == pytest.approx(float((out.latents[i] != 0).sum(-1).float().mean()), rel=1e-5)
    assert d.recon.l0 == pytest.approx(sum(r.l0 for r in d.layers), rel=1e-6)
    row = json.loads((cfg.output / "report.json").read_text())["dictionaries"][0]
    assert [r["site_out"] for r in row["layers"]] == ["0.mlp_out", "1.mlp_out", "2.mlp_out"]
    assert row["layers"][1]["fvu"] == pytest.approx(d.layers[1].fvu)
    md = (cfg.output / "report.md").read_text()
    assert "per layer" in md and "| 2 | 2.mlp_in->2.mlp_out |" in md
    assert (cfg.output / "depth.png").is_file()
    # A CLT is spliced with all its layers at once: the same delta loss as a joint splice of it alone.
    assert d.lm.delta_loss == pytest.approx(d.lm.ce_spliced - d.lm.ce_clean)
    single = Dictionary(coder, Site(0, "mlp_in"), Site(0, "mlp_out"), "again")
    again = evaluate(
        dataclasses.replace(cfg, output=tmp_path / "e2", all_at_once=True), tiny, [single], progress=False
    )
    assert again.joint is not None and again.joint.ce_spliced == pytest.approx(d.lm.ce_spliced, rel=1e-6)


def test_save_of_a_trained_clt_is_what_it_computes(tmp_path) -> None:
    """save_clt of a folded CLT reloads to the same raw-activation outputs as the normalised coder."""
    clt = perturbed_clt(n_layers=2, skip=True)
    c_in, c_out = torch.tensor([4.0, 9.0]), torch.tensor([2.0, 30.0])
    folder = save_clt(
        clt.fold(c_in, c_out),
        tmp_path / "c",
        hook_point_in="model.layers.0.pre_feedforward_layernorm",
        hook_point_out="model.layers.0.post_feedforward_layernorm",
        model_name="m",
    )
    back = load_dictionary(folder).coder
    x = torch.randn(2, 30, 12) * c_in.view(2, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            back(x).reconstruction,
            clt(x / c_in.view(2, 1, 1)).reconstruction * c_out.view(2, 1, 1),
            rtol=1e-4,
            atol=1e-4,
        )
