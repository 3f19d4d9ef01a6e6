"""Tests of openscope.coders: STE gradients, TopK selection, sparse == dense, folding, file format,
input errors, and recovery of known sparse features on synthetic data."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from openscope.coders import (
    CoderConfig,
    SparseCoder,
    ThresholdEstimator,
    batchtopk,
    jumprelu,
    l0_quadratic_loss,
    load_coder,
    normalisation_scale,
    read_coder_config,
    save_coder,
    sparse,
    step,
    threshold_for_l0,
    thresholds_for_rate,
    topk,
    topk_to_jumprelu,
)
from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.errors import OpenscopeError
from openscope.train.steps import DeadLatentTracker, StepConfig, make_optimizer, train_step
from tests.coder_checks import check_coder_interface


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors on a shared 2-core machine: one thread avoids costly thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- straight-through estimators --------------------------------------------------------------

Z = [[1.0002, 2.0003, 0.3], [0.9998, 1.5, 0.1]]
THETA = [1.0, 2.0, 0.2]
G = [[1.0, 5.0, 7.0], [3.0, 4.0, 11.0]]


def test_jumprelu_pseudo_gradient_matches_design_formula() -> None:
    z = torch.tensor(Z, requires_grad=True)
    theta = torch.tensor(THETA, requires_grad=True)
    f = jumprelu(z, theta, 0.001)
    assert torch.allclose(f, torch.tensor([[1.0002, 2.0003, 0.3], [0.0, 0.0, 0.0]]))
    f.backward(torch.tensor(G))
    # No gradient through H into z: grad·H(z − θ).
    assert z.grad is not None and theta.grad is not None
    assert torch.equal(z.grad, torch.tensor([[1.0, 5.0, 7.0], [0.0, 0.0, 0.0]]))
    # −(θ/ε)·Σ_b K((z−θ)/ε)·g: latent 0 has both rows in the window, latent 1 only row 0,
    # latent 2 none (0.3 and 0.1 are far from 0.2 at ε = 0.001).
    expected = torch.tensor([-(1.0 / 0.001) * (1 + 3), -(2.0 / 0.001) * 5, 0.0])
    assert torch.allclose(theta.grad, expected, rtol=1e-5)


def test_step_pseudo_gradient_matches_design_formula() -> None:
    z = torch.tensor(Z, requires_grad=True)
    theta = torch.tensor(THETA, requires_grad=True)
    h = step(z, theta, 0.001)
    assert torch.equal(h, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    h.backward(torch.tensor(G))
    assert theta.grad is not None
    assert z.grad is None or torch.count_nonzero(z.grad) == 0
    expected = torch.tensor([-(1 / 0.001) * (1 + 3), -(1 / 0.001) * 5, 0.0])
    assert torch.allclose(theta.grad, expected, rtol=1e-5)


def test_jumprelu_threshold_gradient_through_log_parametrisation() -> None:
    log_t = torch.tensor([0.0], requires_grad=True)  # θ = 1
    f = jumprelu(torch.tensor([[1.0001]]), log_t.exp(), 0.001)
    f.sum().backward()
    assert log_t.grad is not None
    assert math.isclose(float(log_t.grad), -(1.0 / 0.001) * 1.0, rel_tol=1e-5)  # dθ/dlogθ = θ = 1


# ---- TopK / BatchTopK ---------------------------------------------------------------------------


def test_topk_keeps_each_rows_largest_after_relu() -> None:
    z = torch.tensor([[0.5, -1.0, 3.0, 2.0], [-0.5, -0.2, -3.0, 0.1]])
    out = topk(z, 2)
    # Row 2's second largest (−0.2) is kept but ReLU makes it 0.
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.1]]))


def test_batchtopk_keeps_the_batchs_k_times_b_largest() -> None:
    z = torch.tensor([[5.0, 4.0, 3.0, -1.0], [0.1, 2.0, -2.0, 0.0]])
    out = batchtopk(z, 2)  # keep the 4 largest of the batch: 5, 4, 3, 2
    assert torch.equal(out, torch.tensor([[5.0, 4.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0]]))


def test_calibrated_threshold_gives_the_target_l0_on_its_batch() -> None:
    coder = SparseCoder(CoderConfig(d_in=16, d_out=16, width=64, seed=3))
    x = torch.randn(200, 16) * 30.0
    theta = coder.calibrate_threshold_(x, target_l0=5)
    assert torch.allclose(coder.threshold(), torch.full((64,), theta))
    l0 = (coder.encode(x) > 0).sum(1).float().mean()
    # The 1000th largest of 200·64 pre-activations: everything above it fires (ties aside).
    assert l0 == pytest.approx(5, abs=0.01)
    assert threshold_for_l0(torch.tensor([[3.0, -1.0], [2.0, 1.0]]), 1.0) == 1.5


def test_per_latent_thresholds_make_every_latent_fire_equally_often() -> None:
    """The per-latent start: on its batch every latent fires on exactly target_l0/F of the rows (none
    dead, none dense), so the mean L0 is the target; a shared θ leaves latents with small
    pre-activations silent on the same batch. The CLT does the same per layer."""
    coder = SparseCoder(CoderConfig(d_in=16, d_out=16, width=64, seed=3))
    x = torch.randn(256, 16) * 30.0
    # Latent j's pre-activations scale with j: a shared θ silences the small ones.
    with torch.no_grad():
        coder.w_enc.mul_(torch.linspace(0.05, 1.0, 64))
    coder.calibrate_threshold_(x, target_l0=4)
    assert ((coder.encode(x) > 0).sum(0) == 0).sum() > 10
    median = coder.calibrate_threshold_(x, target_l0=4, per_latent=True)
    fires = (coder.encode(x) > 0).sum(0)
    assert torch.equal(fires, torch.full((64,), 16))  # 4/64 of 256 rows each
    assert median == pytest.approx(float(coder.threshold().median()), rel=1e-5)
    z = torch.tensor([[3.0, -1.0], [2.0, 5.0], [1.0, 4.0], [0.0, 0.5]])
    assert torch.equal(thresholds_for_rate(z, 1.0), torch.tensor([1.5, 2.25]))  # 2 of 4 rows each

    clt = CrossLayerCoder(CLTConfig(n_layers=3, d_in=16, d_out=16, width=32, seed=1))
    xs = torch.randn(3, 128, 16)
    clt.calibrate_threshold_(xs, target_l0=4, per_latent=True)
    a = clt.encode(xs)
    assert torch.equal((a > 0).sum(1), torch.full((3, 32), 16))


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_encoder_scale_fit_keeps_the_active_set_and_lowers_the_error(activation: str) -> None:
    coder = SparseCoder(CoderConfig(d_in=16, d_out=16, width=64, activation=activation, k=4, seed=1))  # type: ignore[arg-type]
    x = torch.randn(300, 16) * 5.0 + 2.0
    coder.init_decoder_bias_(x)
    if activation == "jumprelu":
        coder.calibrate_threshold_(x, target_l0=4)
    before = coder.encode(x)
    err_before = (coder.decode(before) - x).pow(2).sum()
    s = coder.fit_encoder_scale_(x, x)
    after = coder.encode(x)
    assert s != 1.0
    assert torch.equal(before > 0, after > 0)
    torch.testing.assert_close(after, before * s, rtol=1e-4, atol=1e-6)
    # s is the least-squares optimum along the latents' direction: the error can only drop.
    assert (coder.decode(after) - x).pow(2).sum() <= err_before


def test_aligned_transcoder_decoder_starts_below_the_mean_predictor() -> None:
    """A random transcoder's rows point either way; after the sign alignment every latent's
    contribution leans towards the target, the active set is unchanged, and the scaled start beats
    predicting the mean (FVU < 1), which the unaligned start need not."""
    torch.manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=16, d_out=12, width=64, kind="transcoder", seed=2))
    x = torch.randn(400, 16) * 3.0
    y = x @ torch.randn(16, 12) + 1.0
    coder.init_decoder_bias_(y)
    coder.calibrate_threshold_(x, target_l0=6)
    active = coder.encode(x) > 0
    flipped = coder.align_decoder_signs_(x, y)
    assert 0 < flipped < 64
    assert torch.equal(coder.encode(x) > 0, active)
    lean = ((coder.encode(x).t() @ (y - coder.b_dec)) * coder.w_dec).sum(1)
    assert (lean >= 0).all()
    assert coder.align_decoder_signs_(x, y) == 0  # idempotent
    coder.fit_encoder_scale_(x, y)
    fvu = (coder.decode(coder.encode(x)) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert fvu < 1


def test_threshold_estimator_and_conversion() -> None:
    est = ThresholdEstimator(4)
    est.update(torch.tensor([[5.0, 4.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0]]), per_row=False)
    est.update(torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]), per_row=False)
    assert torch.allclose(est.threshold(), torch.full((4,), 1.5))  # mean of batch minima 2 and 1
    # Per latent: latent 0 min 5 then 4, latent 1 min 2, latent 2 min 3 then 1, latent 3 never: global.
    assert torch.allclose(est.threshold(per_latent=True), torch.tensor([4.5, 2.0, 2.0, 1.5]))
    coder = SparseCoder(CoderConfig(d_in=3, d_out=3, width=4, activation="batchtopk", k=1))
    jr = topk_to_jumprelu(coder, est.threshold(per_latent=True))
    assert jr.cfg.activation == "jumprelu"
    assert torch.allclose(jr.threshold(), torch.tensor([4.5, 2.0, 2.0, 1.5]))
    assert torch.equal(jr.w_enc, coder.w_enc)


# ---- helpers ------------------------------------------------------------------------------------


def randomised(cfg: CoderConfig, seed: int = 0) -> SparseCoder:
    """A coder with every parameter random (non-zero biases, skip, varied thresholds) and scales ≠ 1."""
    coder = SparseCoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        coder.w_enc.normal_(0, 0.5, generator=g)
        coder.b_enc.normal_(0, 0.1, generator=g)
        coder.b_dec.normal_(0, 0.3, generator=g)
        if coder.w_skip is not None:
            coder.w_skip.normal_(0, 0.2, generator=g)
        if coder.log_threshold is not None:
            coder.log_threshold.uniform_(math.log(0.2), math.log(0.8), generator=g)
    coder.set_scales(2.0, 0.5)
    return coder


def cfg_for(kind: str, activation: str, **kw: object) -> CoderConfig:
    d_out = 12 if kind == "sae" else 10
    k = 5 if activation in ("topk", "batchtopk") else None
    return CoderConfig(d_in=12, d_out=d_out, width=48, kind=kind, activation=activation, k=k, **kw)  # type: ignore[arg-type]


KINDS = ["sae", "transcoder", "skip_transcoder"]
ACTS = ["jumprelu", "topk", "batchtopk", "relu"]


# ---- sparse fast path == dense reference --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("chunk_rows", [512, 7])
def test_sparse_path_matches_dense_reference(
    kind: str, activation: str, chunk_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wide kernel (ε = 0.2) so plenty of entries sit in the threshold window and θ gets gradient.
    # chunk_rows 7: the weight gradients are summed over 6 row chunks (the last one shorter).
    monkeypatch.setattr(sparse, "CPU_CHUNK_ROWS", chunk_rows)
    cfg = cfg_for(kind, activation, bandwidth=0.2)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(1)) * 2.0
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    weights = torch.randn(40, cfg.d_out, generator=torch.Generator().manual_seed(2))
    results = {}
    for path in ("dense", "sparse"):
        coder = randomised(cfg)
        xx = x.clone().requires_grad_(True)
        out = coder(xx, prefixes=(7, 30), dead=dead, aux_k=4, path=path)
        assert out.aux_reconstruction is not None
        loss = (
            (out.reconstruction * weights).sum()
            + sum((r * weights).sum() * (i + 2) for i, r in enumerate(out.prefix_reconstructions))
            + (out.aux_reconstruction * weights).sum() * 0.5
            + out.l0 * 0.3
            + (out.fire_rate * torch.arange(48)).sum()
            + out.l1
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}
        assert xx.grad is not None
        grads["x"] = xx.grad.clone()
        results[path] = (out, grads)
    (d_out_, d_grads), (s_out, s_grads) = results["dense"], results["sparse"]
    if activation == "jumprelu":
        assert float(d_grads["log_threshold"].abs().sum()) > 0  # the window test is not vacuous
    torch.testing.assert_close(s_out.reconstruction, d_out_.reconstruction, rtol=1e-5, atol=1e-5)
    for a, b in zip(s_out.prefix_reconstructions, d_out_.prefix_reconstructions, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert s_out.aux_reconstruction is not None and d_out_.aux_reconstruction is not None
    torch.testing.assert_close(s_out.aux_reconstruction, d_out_.aux_reconstruction, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_out.l0, d_out_.l0)
    torch.testing.assert_close(s_out.fire_rate, d_out_.fire_rate)
    torch.testing.assert_close(s_out.l1, d_out_.l1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        s_out.latents.to_dense(40, 48).detach(),
        d_out_.latents.to_dense(40, 48).detach(),
        rtol=1e-5,
        atol=1e-5,
    )
    assert s_grads.keys() == d_grads.keys()
    for name in d_grads:
        torch.testing.assert_close(s_grads[name], d_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def test_sparse_path_with_no_active_latent() -> None:
    coder = SparseCoder(CoderConfig(d_in=6, d_out=6, width=10, init_threshold=100.0))
    out = coder(torch.randn(3, 6), path="sparse")
    assert out.latents.values.numel() == 0
    torch.testing.assert_close(out.reconstruction, coder.b_dec.expand(3, 6).detach())
    out.reconstruction.sum().backward()


# ---- running inside a model (the Coder interface) -----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
def test_a_sparse_coder_is_the_one_layer_case_of_the_interface(kind: str, activation: str) -> None:
    coder = randomised(cfg_for(kind, activation))  # unfolded: C_in = 2, C_out = 0.5 must be honoured
    assert coder.n_layers == 1 and coder.kind == kind
    check_coder_interface(coder, [torch.randn(30, 12, generator=torch.Generator().manual_seed(3)) * 3])
    # The per-layer methods are the dense API's, exactly (splicing and eval keep their numbers).
    x = torch.randn(30, 12) * 3
    with torch.no_grad():
        f = coder.encode(x)
        assert torch.equal(coder.encode_at(0, x), f)
        assert torch.equal(coder.decode_into(0, [f], x), coder.decode(f, x))
        assert torch.equal(coder.reconstruct([x]).reconstruction[0], coder.decode(f, x))


# ---- folding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_fold_keeps_outputs_on_raw_activations(kind: str, activation: str) -> None:
    coder = randomised(cfg_for(kind, activation))
    folded = coder.fold()
    assert float(folded.scale_in) == 1.0 and float(folded.scale_out) == 1.0
    assert not folded.cfg.pre_encoder_bias
    x = torch.randn(30, 12) * 3
    with torch.no_grad():
        torch.testing.assert_close(folded(x).reconstruction, coder(x).reconstruction, rtol=1e-5, atol=1e-5)
        # Folded latents are C_out times the training latents (decoder rows stay unit-norm).
        torch.testing.assert_close(folded.encode(x), coder.encode(x) * 0.5, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.decode(folded.encode(x), x), coder.decode(coder.encode(x), x))


# ---- file format --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
def test_save_load_roundtrip(tmp_path: Path, kind: str, activation: str) -> None:
    coder = randomised(cfg_for(kind, activation))
    save_coder(
        coder,
        tmp_path / "c",
        hook_point_in="blocks.3.in",
        hook_point_out="blocks.3.out",
        model_name="gemma-3-270m",
        l0=12.5,
        provenance={"openscope_version": "0.1.0"},
    )
    cfg = read_coder_config(tmp_path / "c")
    assert cfg["architecture"] == ("topk" if activation == "topk" else "jump_relu")
    assert cfg["type"] == ("sae" if kind == "sae" else "transcoder")
    assert cfg["affine_connection"] == (kind == "skip_transcoder")
    assert (cfg["width"], cfg["l0"], cfg["model_name"]) == (48, 12.5, "gemma-3-270m")
    assert cfg["hf_hook_point_in"] == "blocks.3.in" and cfg["openscope_version"] == "0.1.0"
    params = safetensors.torch.load_file(str(tmp_path / "c" / "params.safetensors"))
    assert params["w_enc"].shape == (12, 48) and params["w_dec"].shape == (48, cfg_for(kind, "relu").d_out)
    assert ("affine_skip_connection" in params) == (kind == "skip_transcoder")
    loaded = load_coder(tmp_path / "c")
    x = torch.randn(25, 12) * 3
    with torch.no_grad():
        f = loaded.encode(x)
        torch.testing.assert_close(f, coder.fold().encode(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            loaded.decode(f, x), coder.decode(coder.encode(x), x), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(loaded(x).reconstruction, coder(x).reconstruction, rtol=1e-5, atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width must be a positive integer"),
        ({"kind": "crosscoder"}, "unknown coder kind"),
        ({"activation": "gelu"}, "unknown activation"),
        ({"activation": "topk", "k": 0}, "topk needs k >= 1"),
        ({"activation": "batchtopk"}, "batchtopk needs k >= 1"),
        ({"d_out": 5}, "SAE reconstructs its input"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    base: dict = {"d_in": 4, "d_out": 4, "width": 8}
    with pytest.raises(OpenscopeError, match=match):
        CoderConfig(**{**base, **kwargs})


def test_target_l0_must_be_positive() -> None:
    with pytest.raises(OpenscopeError, match="target_l0"):
        StepConfig(sparsity="quadratic_l0", target_l0=0)
    with pytest.raises(OpenscopeError, match="target_l0"):
        StepConfig(sparsity="quadratic_l0", target_l0=None)
    with pytest.raises(OpenscopeError, match="target L0 must be positive"):
        l0_quadratic_loss(torch.tensor(3.0), -1.0, 1.0)


def test_l0_quadratic_value() -> None:
    assert float(l0_quadratic_loss(torch.tensor(30.0), 20.0, 0.5)) == pytest.approx(0.5 * (2 / 20) * 100)


def _saved(tmp_path: Path) -> Path:
    coder = randomised(cfg_for("sae", "jumprelu"))
    return save_coder(coder, tmp_path / "c", hook_point_in="h", model_name="m")


def test_load_errors_missing(tmp_path: Path) -> None:
    with pytest.raises(OpenscopeError, match="no coder folder"):
        load_coder(tmp_path / "nothing")
    folder = _saved(tmp_path)
    (folder / "params.safetensors").unlink()
    with pytest.raises(OpenscopeError, match="missing params.safetensors"):
        load_coder(folder)


def test_load_error_missing_key(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    params = safetensors.torch.load_file(str(folder / "params.safetensors"))
    del params["w_dec"]
    safetensors.torch.save_file(params, str(folder / "params.safetensors"))
    with pytest.raises(OpenscopeError, match="missing w_dec"):
        load_coder(folder)


def test_load_error_shape_mismatch(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    params = safetensors.torch.load_file(str(folder / "params.safetensors"))
    params["b_enc"] = torch.zeros(47)
    safetensors.torch.save_file(params, str(folder / "params.safetensors"))
    with pytest.raises(OpenscopeError, match=r"b_enc .* has shape \[47\], expected \[48\]"):
        load_coder(folder)


def test_load_error_nan_weights(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    params = safetensors.torch.load_file(str(folder / "params.safetensors"))
    params["w_enc"][3, 5] = float("nan")
    safetensors.torch.save_file(params, str(folder / "params.safetensors"))
    with pytest.raises(OpenscopeError, match="w_enc .* NaN/inf"):
        load_coder(folder)


def test_load_error_truncated_file(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    path = folder / "params.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(OpenscopeError, match="truncated or corrupt") as err:
        load_coder(folder)
    assert "\n" not in str(err.value)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(OpenscopeError, match="truncated or corrupt"):
        load_coder(folder)


def test_load_error_bad_config(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(OpenscopeError, match="not valid JSON"):
        load_coder(folder)
    (folder / "config.json").write_text(json.dumps({"width": 48, "architecture": "gated"}))
    with pytest.raises(OpenscopeError, match="unsupported architecture"):
        load_coder(folder)


# ---- training: constraints and recovery of known features ---------------------------------------


def test_train_step_keeps_decoder_unit_norm_and_reports() -> None:
    coder = randomised(cfg_for("sae", "jumprelu"))
    opt = make_optimizer(coder, lr=1e-3)
    assert opt.param_groups[0]["betas"] == (0.0, 0.999)
    stats = train_step(coder, opt, torch.randn(64, 12), None, StepConfig(target_l0=5, lr=1e-3), 0)
    torch.testing.assert_close(coder.w_dec.norm(dim=1), torch.ones(48))
    assert stats.l0 > 0 and stats.fvu > 0 and stats.lr == pytest.approx(1e-3 / 1000)


def test_remove_parallel_grad() -> None:
    coder = SparseCoder(CoderConfig(d_in=4, d_out=4, width=6))
    coder.w_dec.grad = torch.randn(6, 4)
    coder.remove_parallel_grad_()
    dots = (coder.w_dec.grad * coder.w_dec).sum(1)
    torch.testing.assert_close(dots, torch.zeros(6), atol=1e-6, rtol=0)


class Synthetic:
    """Samples made of known sparse features: 256 unit directions in d = 64, ~4 active per sample."""

    def __init__(self, seed: int = 1, n_features: int = 256, d: int = 64, per_sample: float = 4.0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        feats = torch.randn(n_features, d, generator=self.gen)
        self.features = feats / feats.norm(dim=1, keepdim=True)
        self.p = per_sample / n_features

    def batch(self, n: int) -> torch.Tensor:
        active = torch.rand(n, self.features.shape[0], generator=self.gen) < self.p
        mags = torch.rand(n, self.features.shape[0], generator=self.gen) * 1.5 + 0.5
        return (active * mags) @ self.features

    def mean_max_cosine(self, coder: SparseCoder) -> float:
        """Mean over true features of the best cosine with any decoder row."""
        w = coder.w_dec.detach()
        w = w / w.norm(dim=1, keepdim=True)
        return float((self.features @ w.T).max(dim=1).values.mean())


def _train(coder: SparseCoder, data: Synthetic, cfg: StepConfig, steps: int, batch: int = 512) -> float:
    x0 = data.batch(4096)
    coder.set_scales(normalisation_scale(x0), normalisation_scale(x0))
    opt = make_optimizer(coder, cfg.lr)
    tracker = DeadLatentTracker(coder.cfg.width, dead_after_tokens=20 * batch)
    for i in range(steps):
        train_step(coder, opt, data.batch(batch), None, cfg, i, tracker)
    return data.mean_max_cosine(coder)


def test_topk_sae_recovers_known_features() -> None:
    data = Synthetic()
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=512, activation="topk", k=4))
    cfg = StepConfig(lr=3e-3, lr_warmup_steps=50, sparsity="none", aux_k=32)
    assert _train(coder, data, cfg, steps=500) >= 0.9


def test_matryoshka_topk_sae_recovers_known_features() -> None:
    data = Synthetic(seed=2)
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=512, activation="topk", k=4))
    cfg = StepConfig(lr=3e-3, lr_warmup_steps=50, sparsity="none", aux_k=32, matryoshka_prefixes=(128,))
    assert _train(coder, data, cfg, steps=500) >= 0.9


def test_jumprelu_sae_recovers_known_features() -> None:
    data = Synthetic(seed=3)
    # Small-scale settings: a larger initial θ and lr than Gemma Scope's (which are tuned for d = 2304
    # and millions of steps); no frequency penalty (at init half the latents fire on half the tokens).
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=512, activation="jumprelu", init_threshold=0.1))
    cfg = StepConfig(
        lr=1e-2,
        lr_warmup_steps=50,
        sparsity="quadratic_l0",
        target_l0=4,
        sparsity_coeff=3e-2,
        sparsity_warmup_steps=200,
        freq_coeff=0.0,
    )
    assert _train(coder, data, cfg, steps=1500) >= 0.9
