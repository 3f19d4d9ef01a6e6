"""Weakly causal crosscoders: a CrossLayerCoder that reads and reconstructs one site kind at chosen layers.

A one-layer crosscoder is an SAE; a latent never writes to an earlier layer (gradients and saved blocks);
training, saving and loading round-trip; evaluation splices all chosen layers at once and reports each;
feature dashboards number a latent of layer i as i·F + j. The tiny model here has 5 layers so that the
chosen layers (0, 2, 4) are not consecutive.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from openscope.activations import ActivationStore
from openscope.cli import app
from openscope.coders import CoderConfig, SparseCoder
from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.dictionary import Dictionary, check_layers, in_memory, load_dictionary
from openscope.coders.io import CONFIG_FILE, save_clt
from openscope.data.packing import iter_contexts, to_batch
from openscope.data.sources import open_source
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate
from openscope.eval.splice import spliced
from openscope.features import FeatureDB, FeaturesConfig, compute_features
from openscope.models.hooks import capture
from openscope.models.load import LoadedModel, load_model
from openscope.models.sites import Site
from openscope.models.tokens import keep_mask
from openscope.train.clt import crosscoder_sites, expand_layer_lists
from tests.coder_checks import check_coder_interface
from tests.conftest import make_tiny_gemma, make_tokenizer, small_store

D = 64  # the tiny model's d_model
LAYERS = (0, 2, 4)
SITES = tuple(Site(i, "resid_post") for i in LAYERS)
WIDTH = 16


def perturbed_crosscoder(
    n_layers: int = 3, d: int = 12, width: int = WIDTH, seed: int = 0
) -> CrossLayerCoder:
    """A crosscoder whose biases and thresholds are non-trivial."""
    cc = CrossLayerCoder(
        CLTConfig(n_layers=n_layers, d_in=d, d_out=d, width=width, seed=seed, kind="crosscoder")
    )
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.3, generator=g)
        cc.b_dec.normal_(0, 0.3, generator=g)
        assert cc.log_threshold is not None
        cc.log_threshold.copy_(torch.rand(cc.log_threshold.shape, generator=g).log() - 0.5)
    return cc.eval()


def sae_of_layer(cc: CrossLayerCoder, i: int) -> SparseCoder:
    """The SAE with layer i's encoder, threshold, own-layer decoder block and bias."""
    cfg = cc.cfg
    sae = SparseCoder(CoderConfig(d_in=cfg.d_in, d_out=cfg.d_out, width=cfg.width, pre_encoder_bias=False))
    with torch.no_grad():
        sae.w_enc.copy_(cc.w_enc[i])
        sae.b_enc.copy_(cc.b_enc[i])
        sae.w_dec.copy_(cc.decoder(i, i))
        sae.b_dec.copy_(cc.b_dec[i])
        assert sae.log_threshold is not None and cc.log_threshold is not None
        sae.log_threshold.copy_(cc.log_threshold[i])
    return sae.eval()


@pytest.fixture(scope="module")
def tiny5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 3 with 5 layers (so 0, 2, 4 are chosen layers with gaps between them)."""
    path = tmp_path_factory.mktemp("tiny-gemma3-5")
    tok = make_tokenizer()
    make_tiny_gemma(len(tok), n_layers=5).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny5(tiny5_dir: Path) -> LoadedModel:
    return load_model(str(tiny5_dir))


@pytest.fixture(scope="module")
def store5(tiny5, tiny5_dir, tmp_path_factory) -> Path:
    """The residual stream of layers 0, 2 and 4 (and layer 1's mlp_out, a second site kind)."""
    sites = ",".join(s.name for s in SITES) + ",1.mlp_out"
    return small_store(
        tiny5, tiny5_dir, tmp_path_factory.mktemp("store"), sites, "the capital of France is Paris."
    )


@pytest.fixture(scope="module")
def trained(store5, tmp_path_factory) -> Path:
    """`openscope train --kind crosscoder --sites 0,2,4.resid_post` on the store: the run folder."""
    out = tmp_path_factory.mktemp("run") / "d"
    args = ["train", "--store", str(store5), "--kind", "crosscoder", "--sites", "0,2,4.resid_post"]
    args += ["--width", str(WIDTH), "--target-l0", "4", "--batch-size", "64", "--tokens", str(64 * 60)]
    args += ["--lr", "3e-3", "--lr-warmup-steps", "2", "--sparsity-warmup-steps", "5", "--matryoshka", "8"]
    args += ["--output", str(out), "--device", "cpu", "--log-every", "1", "--checkpoint-every", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "0.resid_post" in result.output and "4.resid_post" in result.output  # a row per layer
    return out


FOLDER = "0_2_4_resid_post_crosscoder_jumprelu_w16"


# ---- the coder -----------------------------------------------------------------------------------


def test_a_one_layer_crosscoder_is_an_sae(tiny) -> None:
    site = Site(1, "resid_post")
    cc = perturbed_crosscoder(n_layers=1, d=D)
    sae = sae_of_layer(cc, 0)
    assert cc.kind == "crosscoder" and cc.n_layers == 1
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        f = sae.encode(x)
        assert bool((f > 0).any())
        torch.testing.assert_close(cc.encode_at(0, x), f)
        torch.testing.assert_close(cc.decode_into(0, [f], x), sae.decode(f))
        torch.testing.assert_close(cc(x[None]).reconstruction[0], sae.decode(f))
    check_coder_interface(cc, [x])
    # Spliced into a model: the same logits as the SAE, and not the clean ones.
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        clean = tiny.model(input_ids=ids).logits
        with spliced(tiny, Dictionary(cc, site, site, "cc", layers=(1,))):
            got = tiny.model(input_ids=ids).logits
        with spliced(tiny, in_memory(sae, site)):
            want = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, clean)


def test_crosscoder_interface_and_config() -> None:
    cc = perturbed_crosscoder()
    x = torch.randn(3, 30, 12, generator=torch.Generator().manual_seed(4)) * 2
    check_coder_interface(cc, list(x))
    with pytest.raises(OpenscopeError, match="reconstructs what it reads"):
        CLTConfig(n_layers=2, d_in=12, d_out=10, width=4, kind="crosscoder")
    with pytest.raises(OpenscopeError, match="reconstructs what it reads"):
        CLTConfig(n_layers=2, d_in=12, d_out=12, width=4, kind="crosscoder", skip=True)
    assert cc.fold(torch.tensor([2.0, 3, 4]), torch.tensor([2.0, 3, 4])).kind == "crosscoder"


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_a_latent_never_writes_to_an_earlier_layer(path: str) -> None:
    """The loss on layer m's reconstruction has zero gradient w.r.t. the latents and parameters of later
    groups; and a latent's encoder reads its own layer only."""
    cc = perturbed_crosscoder()
    x = torch.randn(3, 40, 12, generator=torch.Generator().manual_seed(5)) * 2
    a = cc.encode(x).detach().requires_grad_(True)
    y = cc.decode(a)
    for m in range(3):
        (g,) = torch.autograd.grad((x[m] - y[m]).pow(2).sum(), a, retain_graph=True)
        assert not g[m + 1 :].any()
        assert all(bool(g[i].any()) for i in range(m + 1))
    out = cc.train_forward(x, path=path, sparse_max_density=1.0)  # type: ignore[arg-type]
    assert cc.log_threshold is not None
    for m in range(3):
        loss = (x[m] - out.reconstruction[m]).pow(2).sum()
        params = [cc.w_enc, cc.b_enc, cc.log_threshold, *cc.w_dec]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        w_enc, b_enc, log_theta, *w_dec = (
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        )
        for later in range(m + 1, 3):
            assert not w_enc[later].any() and not b_enc[later].any() and not log_theta[later].any()
            assert not w_dec[later].any()
        assert w_enc[m].any() and w_dec[m][:, 0].any()
    # Block-diagonal encoder: layer l's pre-activations depend on x_l only.
    xr = x.clone().requires_grad_(True)
    z = cc.pre_activations(xr)
    for i in range(3):
        (g,) = torch.autograd.grad(z[i].sum(), xr, retain_graph=True)
        assert g[i].any() and not torch.cat([g[:i], g[i + 1 :]]).any()


def test_zero_cross_layer_blocks_splice_like_one_sae_per_layer(tiny5) -> None:
    """All chosen layers spliced at once: with its cross-layer blocks zero, a crosscoder is the SAEs of
    its layers spliced together; with them, it differs."""
    cc = perturbed_crosscoder(d=D)
    with torch.no_grad():
        for w in cc.w_dec:
            w[:, 1:] = 0
    d = Dictionary(cc, SITES[0], SITES[0], "cc", layers=LAYERS)
    assert d.sites_in == d.sites_out == SITES and d.is_multilayer
    saes = [in_memory(sae_of_layer(cc, i), site) for i, site in enumerate(SITES)]
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    with torch.no_grad():
        clean = tiny5.model(input_ids=ids).logits
        with spliced(tiny5, d):
            got = tiny5.model(input_ids=ids).logits
        with spliced(tiny5, saes):
            want = tiny5.model(input_ids=ids).logits
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, clean)
        full = perturbed_crosscoder(d=D)
        with spliced(tiny5, d._replace(coder=full)):
            assert not torch.allclose(tiny5.model(input_ids=ids).logits, got)


def test_site_specs() -> None:
    assert (
        expand_layer_lists("5,9,12,15.resid_post") == "5.resid_post,9.resid_post,12.resid_post,15.resid_post"
    )
    assert expand_layer_lists("1-2,4.attn_out, 6.mlp_out") == "1-2.attn_out,4.attn_out,6.mlp_out"
    have = ["0.resid_post", "2.resid_post", "4.resid_post", "1.mlp_out"]
    assert crosscoder_sites("4,0,2.resid_post", have, 5) == ["0.resid_post", "2.resid_post", "4.resid_post"]
    assert crosscoder_sites("2.resid_post", have, 5) == ["2.resid_post"]
    with pytest.raises(OpenscopeError, match="one site kind"):
        crosscoder_sites("0.resid_post,1.mlp_out", have, 5)
    with pytest.raises(OpenscopeError, match="one site kind and the data holds mlp_out, resid_post"):
        crosscoder_sites("all", have, 5)
    with pytest.raises(OpenscopeError, match="3.resid_post needs that site"):
        crosscoder_sites("2,3.resid_post", have, 5)
    assert crosscoder_sites("all", have[:3]) == have[:3]


# ---- training, files ------------------------------------------------------------------------------


def test_train_save_load_round_trip(trained, store5, tiny5) -> None:
    folder = trained / FOLDER
    config = json.loads((folder / CONFIG_FILE).read_text())
    manifest = ActivationStore(store5).manifest["sites"]
    assert (
        config["type"] == "crosscoder"
        and config["layers"] == list(LAYERS)
        and config["site_kind"] == "resid_post"
    )
    assert config["hf_hook_point_in"] == config["hf_hook_point_out"] == manifest["0.resid_post"]["hook_point"]
    assert config["width"] == WIDTH and config["affine_connection"] is False
    run = json.loads((trained / "run.json").read_text())
    assert run["layers"] == list(LAYERS) and set(run["final"]) == {s.name for s in SITES}

    d = load_dictionary(folder, tiny5)
    assert d.coder.kind == "crosscoder" and d.layers == LAYERS and d.sites_in == d.sites_out == SITES
    # What was saved is the trained coder (normalised units, in the checkpoint) folded for raw activations.
    state = torch.load(trained / "checkpoint.pt", weights_only=True)["dicts"][0]["coder"]
    cc = CrossLayerCoder(CLTConfig(n_layers=3, d_in=D, d_out=D, width=WIDTH, kind="crosscoder"))
    cc.load_state_dict(state)
    store = ActivationStore(store5)
    c = torch.tensor([store.stats(s.name).norm_scale for s in SITES])
    folded = cc.fold(c, c)
    for (name, p), q in zip(folded.named_parameters(), d.coder.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    # Saved in the multi-layer layout: layer l's w_dec holds all 3 targets, zero for the earlier ones.
    for i in range(3):
        w_dec = safetensors.torch.load_file(str(folder / f"params_layer_{i}.safetensors"))["w_dec"]
        assert w_dec.shape == (WIDTH, 3, D) and not w_dec[:, :i].any() and w_dec[:, i].any()
    # It learned: on held data each layer's L0 is near the target and its FVU below 1.
    batch = next(store.batches([s.name for s in SITES], 400))
    x = torch.stack([batch.acts[s.name] for s in SITES])
    with torch.no_grad():
        out = d.coder(x)
    fvu = (x - out.reconstruction).pow(2).sum((1, 2)) / (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
    assert (fvu < 0.9).all(), fvu
    l0 = (out.latents > 0).float().sum(-1).mean(-1)
    assert ((l0 > 4 * 0.5) & (l0 < 4 * 1.75)).all(), l0
    # Saving the loaded coder again gives a folder that loads to the same coder.
    again = save_clt(
        d.coder,
        trained.parent / "again",
        hook_point_in=config["hf_hook_point_in"],
        hook_point_out=config["hf_hook_point_out"],
        model_name=config["model_name"],
        layers=LAYERS,
        site_kind="resid_post",
    )
    back = load_dictionary(again, tiny5)
    assert back.sites_in == SITES
    for p, q in zip(back.coder.parameters(), d.coder.parameters(), strict=True):
        assert torch.equal(p, q)


def test_gemma_scope_2_crosscoder_folders_bind_their_layers(tmp_path, tiny5) -> None:
    """Gemma Scope 2 names a crosscoder's layers in its hook points (`{0,2,4}`) and its folder name, and
    counts all latents in `width`."""
    cc = perturbed_crosscoder(d=D)
    for name, hook in (
        ("layer_0_2_4_width_48_l0_small", "model.layers.{0,2,4}.output"),
        ("layer_0_2_4_width_48_l0_big", None),
    ):
        folder = save_clt(
            cc, tmp_path / "crosscoder" / name, hook_point_in="x", hook_point_out="x", model_name="m"
        )
        config = json.loads((folder / CONFIG_FILE).read_text())
        config = {k: v for k, v in config.items() if not k.startswith("hf_hook") and k != "n_layers"}
        config["width"] = 3 * WIDTH
        if hook is not None:
            config.update(hf_hook_point_in=hook, hf_hook_point_out=hook)
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        d = load_dictionary(folder, tiny5)
        assert d.sites_in == d.sites_out == SITES and d.coder.kind == "crosscoder", name
    config["layers"] = [0, 2]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(OpenscopeError, match="names 2 layers"):
        load_dictionary(folder)
    with pytest.raises(OpenscopeError, match="needs 3 increasing layers"):
        check_layers(Dictionary(cc, SITES[0], SITES[0], "cc", layers=(0, 4, 2)))
    with pytest.raises(OpenscopeError, match="its first layer is 2"):
        check_layers(Dictionary(cc, SITES[0], SITES[0], "cc", layers=(2, 3, 4)))


# ---- evaluation and dashboards ----------------------------------------------------------------------


def test_eval_splices_all_layers_and_reports_each(trained, store5, tiny5, tmp_path) -> None:
    cfg = EvalConfig(
        dictionaries=[trained / FOLDER],
        source=str(store5.parent / "docs.jsonl"),
        tokens=96,
        context_len=32,
        output=tmp_path / "e",
        device="cpu",
    )
    report = evaluate(cfg, tiny5, progress=False)
    (r,) = report.dictionaries
    assert r.kind == "crosscoder" and r.n_layers == 3 and r.width == 3 * WIDTH and len(r.layers) == 3
    # Per layer, by hand from the clean activations of the same contexts.
    docs = open_source(cfg.source).documents()
    contexts = list(itertools.islice(iter_contexts(docs, tiny5.tokenizer, cfg.context_len), 3))
    ids = to_batch(contexts, tiny5.tokenizer).input_ids
    flat = keep_mask(ids, tiny5.tokenizer).reshape(-1)
    with capture(tiny5, list(SITES), stop=False) as acts, torch.no_grad():
        tiny5.model(input_ids=ids, use_cache=False)
    x = torch.stack([acts[s].reshape(-1, D)[flat] for s in SITES])
    coder = load_dictionary(trained / FOLDER).coder
    with torch.no_grad():
        out = coder(x)
    for i, layer in enumerate(r.layers):
        fvu = float((x[i] - out.reconstruction[i]).pow(2).sum() / (x[i] - x[i].mean(0)).pow(2).sum())
        assert layer.fvu == pytest.approx(fvu, rel=1e-3)
        assert layer.l0 == pytest.approx(float((out.latents[i] != 0).sum(-1).float().mean()), rel=1e-5)
    row = json.loads((cfg.output / "report.json").read_text())["dictionaries"][0]
    assert [(x["layer"], x["site_out"]) for x in row["layers"]] == [(s.layer, s.name) for s in SITES]
    md = (cfg.output / "report.md").read_text()
    assert "| 0,2,4.resid_post |" in md and "| 2 | 2.resid_post->2.resid_post |" in md and "Crosscoder" in md
    assert (cfg.output / "depth.png").is_file()
    # All layers spliced at once: the same delta loss as a joint splice of it alone.
    assert r.lm.delta_loss == pytest.approx(r.lm.ce_spliced - r.lm.ce_clean) and r.lm.delta_loss != 0
    again = evaluate(
        dataclasses.replace(cfg, output=tmp_path / "e2", all_at_once=True), tiny5, progress=False
    )
    assert again.joint is not None and again.joint.ce_spliced == pytest.approx(r.lm.ce_spliced, rel=1e-6)


def test_features_number_latents_by_layer(trained, store5, tiny5, tmp_path) -> None:
    d = load_dictionary(trained / FOLDER, tiny5)
    cfg = FeaturesConfig(
        dictionaries=[trained / FOLDER],
        store=store5,
        output=tmp_path / "features.db",
        tokens=10**6,
        batch_tokens=128,
        top_k=3,
        logits=4,
        neighbours=3,
        device="cpu",
    )
    compute_features(cfg, tiny5, progress=False)
    store = ActivationStore(store5)
    parts = [store.read_shard(i, [s.name for s in SITES]) for i in range(len(store.shards))]
    with torch.no_grad():
        latents = [
            d.coder.encode_at(i, torch.cat([p[s.name] for p in parts]).float()) for i, s in enumerate(SITES)
        ]
    w_u = tiny5.model.lm_head.weight.detach().float()
    gain = 1 + tiny5.model.model.norm.weight.detach().float()
    with FeatureDB(cfg.output) as db:
        info = db.dictionary(FOLDER)
        assert info.width == 3 * WIDTH and info.kind == "crosscoder" and info.complete
        assert info.n_tokens == len(latents[0])
        for i, j in itertools.product(range(3), range(WIDTH)):
            f = db.feature(FOLDER, i * WIDTH + j)
            col = latents[i][:, j]
            assert f.n_fired == int((col > 0).sum()), (i, j)
            if f.n_fired:
                assert f.max_activation == pytest.approx(float(col.max()), rel=1e-5)
        for i, j in ((0, 1), (2, 5)):
            logits = (d.coder.decoder_vectors(i, i, torch.tensor([j]))[0].detach() * gain) @ w_u.t()
            f = db.feature(FOLDER, i * WIDTH + j)
            assert [t.token_id for t in f.top_logits] == logits.topk(4).indices.tolist()
