"""Tests of reading dictionaries in every format (Gemma Scope 1 npz, Gemma Scope 2 single- and
multi-layer, our own), binding them to sites of the tiny Gemma 3, and the one-line errors for bad files.

Files are written here with the documented key names and shapes; loaded coders must give the documented
forward: pre = x @ W_enc + b_enc, f = (pre > θ)·relu(pre), x̂ = f @ W_dec + b_dec (+ x @ A), and for
cross-layer transcoders ŷ_m = Σ_{ℓ≤m} a_ℓ W_dec^{ℓ→m} + b_dec^m (+ x_m A_m).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, find_dictionaries, load_dictionary, sites_from_path
from openscope.coders.io import load_clt, save_clt, save_coder
from openscope.errors import OpenscopeError
from openscope.models.hookpoints import gemma_scope_hook_point, site_for_hook_point, tl_hook_name
from openscope.models.load import LoadedModel
from openscope.models.sites import SITE_KINDS, Site, locate

D = 64  # the tiny model's d_model and its attention width (4 heads x 16)
F = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def gs_weights(d_in: int = D, d_out: int = D, width: int = F, skip: bool = False, seed: int = 0) -> dict:
    """Gemma Scope style float32 arrays (lower-case names) with thresholds that let about half fire."""
    rng = np.random.default_rng(seed)
    w = {
        "w_enc": rng.normal(size=(d_in, width)) * 0.3,
        "b_enc": rng.normal(size=width) * 0.1,
        "threshold": np.abs(rng.normal(size=width)) * 0.5,
        "w_dec": rng.normal(size=(width, d_out)) * 0.3,
        "b_dec": rng.normal(size=d_out) * 0.1,
    }
    if skip:
        w["affine_skip_connection"] = rng.normal(size=(d_in, d_out)) * 0.1
    return {k: v.astype(np.float32) for k, v in w.items()}


def reference(w: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documented Gemma Scope forward: (latents, reconstruction)."""
    pre = x @ w["w_enc"] + w["b_enc"]
    f = (pre > w["threshold"]) * np.maximum(pre, 0)
    y = f @ w["w_dec"] + w["b_dec"]
    if "affine_skip_connection" in w:
        y = y + x @ w["affine_skip_connection"]
    return f, y


def single(d: Dictionary) -> SparseCoder:
    """The coder of a single-layer dictionary."""
    assert isinstance(d.coder, SparseCoder)
    return d.coder


def check_forward(coder: SparseCoder, w: dict, seed: int = 1) -> None:
    x = np.random.default_rng(seed).normal(size=(20, w["w_enc"].shape[0])).astype(np.float32) * 2
    f_ref, y_ref = reference(w, x)
    assert 0 < (f_ref > 0).mean() < 1  # the test must exercise both sides of the threshold
    xt = torch.from_numpy(x)
    with torch.no_grad():
        f = coder.encode(xt)
        torch.testing.assert_close(f, torch.from_numpy(f_ref), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(coder.decode(f, xt), torch.from_numpy(y_ref), rtol=1e-5, atol=1e-5)


def write_gs2(folder: Path, w: dict, config: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(w, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def gs2_config(hook_in: str, hook_out: str | None = None, **extra) -> dict:
    """The keys of a real Gemma Scope 2 config.json."""
    config = {"hf_hook_point_in": hook_in, "model_name": "google/gemma-3-270m-pt", "l0": 20, "width": F}
    config["architecture"] = "jump_relu"
    if hook_out is not None:
        config["hf_hook_point_out"] = hook_out
    return {**config, **extra}


def write_npz(folder: Path, w: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
    np.savez(folder / "params.npz", **{names[k]: v for k, v in w.items()})
    return folder


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(OpenscopeError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


# ---- Gemma Scope 2 single-layer folders ---------------------------------------------------------

GS2_CASES = {
    "sae": ("model.layers.1.output", None, {}, Site(1, "resid_post"), Site(1, "resid_post")),
    "attn": ("model.layers.2.self_attn.o_proj.input", None, {}, Site(2, "attn_out"), Site(2, "attn_out")),
    "mlp": (
        "model.layers.0.post_feedforward_layernorm.output",
        None,
        {},
        Site(0, "mlp_out"),
        Site(0, "mlp_out"),
    ),
    "transcoder": (
        "model.layers.1.pre_feedforward_layernorm.output",
        "model.layers.1.post_feedforward_layernorm.output",
        {"affine_connection": False},
        Site(1, "mlp_in"),
        Site(1, "mlp_out"),
    ),
    "skip_transcoder": (
        "model.layers.2.pre_feedforward_layernorm.output",
        "model.layers.2.post_feedforward_layernorm.output",
        {"affine_connection": True},
        Site(2, "mlp_in"),
        Site(2, "mlp_out"),
    ),
}


@pytest.mark.parametrize("case", list(GS2_CASES))
def test_gemma_scope_2_single_layer_folder(tmp_path: Path, tiny: LoadedModel, case: str) -> None:
    hook_in, hook_out, extra, site_in, site_out = GS2_CASES[case]
    w = gs_weights(skip=case == "skip_transcoder")
    folder = write_gs2(tmp_path / case, w, gs2_config(hook_in, hook_out, **extra))
    for loaded in (tiny, None):
        d = load_dictionary(folder, loaded)
        assert (d.site_in, d.site_out, d.name, d.folder) == (site_in, site_out, case, folder)
        assert isinstance(d.coder, SparseCoder) and not d.is_multilayer
        assert d.sites_in == (site_in,) and d.config is not None and d.config["l0"] == 20
        # Gemma Scope 2 configs leave `type` out: a transcoder is known by its two hook points.
        expected_kind = {"transcoder": "transcoder", "skip_transcoder": "skip_transcoder"}.get(case, "sae")
        assert single(d).cfg.kind == expected_kind
        check_forward(single(d), w)


def test_gemma_scope_2_folder_without_config_uses_its_path(tmp_path: Path, tiny: LoadedModel) -> None:
    w = gs_weights()
    d = load_dictionary(write_gs2(tmp_path / "resid_post_all" / "layer_2_width_16k_l0_small", w, None), tiny)
    assert (d.site_in, d.site_out) == (Site(2, "resid_post"), Site(2, "resid_post"))
    check_forward(single(d), w)
    w = gs_weights(skip=True)
    d = load_dictionary(write_gs2(tmp_path / "transcoder_all" / "layer_1_width_16k_l0_big_affine", w, None))
    assert (d.site_in, d.site_out, single(d).cfg.kind) == (
        Site(1, "mlp_in"),
        Site(1, "mlp_out"),
        "skip_transcoder",
    )
    check_forward(single(d), w)


def test_our_own_folder_loads_with_provenance(tmp_path: Path, tiny: LoadedModel) -> None:
    coder = SparseCoder(CoderConfig(d_in=D, d_out=D, width=F, kind="transcoder"))
    point_in = locate(tiny.arch.layers, tiny.arch.layers_path, Site(1, "mlp_in"))
    point_out = locate(tiny.arch.layers, tiny.arch.layers_path, Site(1, "mlp_out"))
    folder = save_coder(
        coder,
        tmp_path / "ours",
        hook_point_in=point_in.hook_point,
        hook_point_out=point_out.hook_point,
        model_name="tiny",
        provenance={"openscope": {"site_in": "1.mlp_in", "site_out": "1.mlp_out"}},
    )
    d = load_dictionary(folder, tiny)
    assert (d.site_in, d.site_out) == (Site(1, "mlp_in"), Site(1, "mlp_out"))
    # A hook point no table knows falls back to our provenance.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hf_hook_point_in": "custom.hook"}))
    assert load_dictionary(folder).site_in == Site(1, "mlp_in")


# ---- Gemma Scope 1 npz folders ------------------------------------------------------------------

GS1_CASES = {
    "gemma-scope-2b-pt-res": (Site(1, "resid_post"), Site(1, "resid_post"), "google/gemma-2-2b"),
    "gemma-scope-9b-it-mlp": (Site(1, "mlp_out"), Site(1, "mlp_out"), "google/gemma-2-9b-it"),
    "gemma-scope-2b-pt-att": (Site(1, "attn_out"), Site(1, "attn_out"), "google/gemma-2-2b"),
    "gemma-scope-2b-pt-transcoders": (Site(1, "mlp_in"), Site(1, "mlp_out"), "google/gemma-2-2b"),
}


@pytest.mark.parametrize("release", list(GS1_CASES))
def test_gemma_scope_1_npz_folder(tmp_path: Path, tiny: LoadedModel, release: str) -> None:
    site_in, site_out, model_name = GS1_CASES[release]
    w = gs_weights(seed=3)
    folder = write_npz(tmp_path / release / "layer_1" / "width_16k" / "average_l0_71", w)
    d = load_dictionary(folder, tiny)
    assert (d.site_in, d.site_out) == (site_in, site_out)
    assert d.name == "layer_1/width_16k/average_l0_71"
    assert d.config is not None and d.config["model_name"] == model_name
    assert d.config["type"] == ("sae" if site_in == site_out else "transcoder")
    assert site_for_hook_point(d.config["hf_hook_point_in"], tiny) == site_in
    check_forward(single(d), w)


def test_gemma_scope_1_site_override(tmp_path: Path) -> None:
    w = gs_weights()
    folder = write_npz(tmp_path / "my_saes" / "a", w)
    one_line_error("cannot tell which site", load_dictionary, folder)
    d = load_dictionary(folder, site_in="2.resid_post")
    assert (d.site_in, d.site_out) == (Site(2, "resid_post"), Site(2, "resid_post"))
    d = load_dictionary(folder, site_in=Site(0, "mlp_in"), site_out="0.mlp_out")
    assert single(d).cfg.kind == "transcoder"
    check_forward(single(d), w)
    # An override also beats what the path says.
    folder = write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_2" / "width_16k" / "x", w)
    assert load_dictionary(folder, site_in="0.resid_post").site_in == Site(0, "resid_post")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("gemma-scope-2b-pt-res/layer_9/width_16k/average_l0_71", ("9.resid_post", "9.resid_post")),
        (
            "/data/gemma-scope-2b-pt-res-canonical/layer_3/width_1m/canonical",
            ("3.resid_post", "3.resid_post"),
        ),
        ("gemma-scope-9b-pt-mlp/layer_20/width_131k/average_l0_10", ("20.mlp_out", "20.mlp_out")),
        ("gemma-scope-27b-pt-att/layer_0/width_16k/average_l0_8", ("0.attn_out", "0.attn_out")),
        ("gemma-scope-2b-pt-transcoders/layer_4/width_16k/average_l0_88", ("4.mlp_in", "4.mlp_out")),
        (
            "hub/models--google--gemma-scope-9b-it-res/snapshots/abc123/layer_20/width_131k/average_l0_81",
            ("20.resid_post", "20.resid_post"),
        ),
        ("gemma-scope-2-270m-pt/resid_post/layer_12_width_16k_l0_small", ("12.resid_post", "12.resid_post")),
        ("gemma-scope-2-1b-it/attn_out_all/layer_3_width_16k_l0_big", ("3.attn_out", "3.attn_out")),
        ("gemma-scope-2-1b-it/mlp_out_all/layer_5_width_65k_l0_small", ("5.mlp_out", "5.mlp_out")),
        ("gemma-scope-2-4b-pt/transcoder_all/layer_0_width_16k_l0_big_affine", ("0.mlp_in", "0.mlp_out")),
        ("gemma-scope-2-270m-pt/clt/width_262k_l0_medium", ("0.mlp_in", "0.mlp_out")),
        ("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6", None),
        ("my_saes/layer_3/width_16k", None),
    ],
)
def test_sites_from_gemma_scope_paths(path: str, expected: tuple[str, str] | None) -> None:
    sites = sites_from_path(Path(path))
    assert (sites and (sites[0].name, sites[1].name)) == expected


# ---- Gemma Scope 2 multi-layer folders: cross-layer transcoders ---------------------------------


def clt_weights(n: int, full_decoder: bool, skip: bool, seed: int = 5) -> list[dict]:
    """Per input layer i: w_enc [D, F], b_enc, threshold, w_dec [F, n or n-i, D], b_dec [D] (+ skip)."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n):
        w = gs_weights(skip=skip, seed=seed + i)
        targets = n if full_decoder else n - i
        w["w_dec"] = (rng.normal(size=(F, targets, D)) * 0.3).astype(np.float32)
        if full_decoder:
            # A latent never writes backwards: whatever the file holds for targets m < i is ignored.
            w["w_dec"][:, :i] = 1e3
        layers.append(w)
    return layers


def clt_reference(layers: list[dict], xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a_ℓ by the single-layer formula; ŷ_m = Σ_{ℓ≤m} a_ℓ W_dec^{ℓ→m} + b_dec^m (+ x_m A_m), looped."""
    n = len(layers)
    a = np.stack([reference({**w, "w_dec": w["w_dec"][:, 0]}, xs[i])[0] for i, w in enumerate(layers)])
    y = np.zeros((n, xs.shape[1], D), dtype=np.float32)
    for m in range(n):
        y[m] = layers[m]["b_dec"]
        for src in range(m + 1):
            w_dec = layers[src]["w_dec"]
            target = m if w_dec.shape[1] == n else m - src
            y[m] += a[src] @ w_dec[:, target]
        if "affine_skip_connection" in layers[m]:
            y[m] += xs[m] @ layers[m]["affine_skip_connection"]
    return a, y


def write_clt(folder: Path, layers: list[dict], config: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, w in enumerate(layers):
        safetensors.numpy.save_file(w, str(folder / f"params_layer_{i}.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("full_decoder", "skip"), [(True, False), (False, False), (True, True)])
def test_multilayer_folder_is_a_cross_layer_transcoder(
    tmp_path: Path, tiny: LoadedModel, full_decoder: bool, skip: bool
) -> None:
    layers = clt_weights(tiny.n_layers, full_decoder, skip)
    config = gs2_config(
        "model.layers.0.pre_feedforward_layernorm.output",
        "model.layers.0.post_feedforward_layernorm.output",
        affine_connection=skip,
        type="clt",
    )
    d = load_dictionary(write_clt(tmp_path / "clt", layers, config), tiny)
    assert d.is_multilayer and isinstance(d.coder, CrossLayerCoder) and d.n_layers == 3
    assert d.sites_in == tuple(Site(i, "mlp_in") for i in range(3))
    assert d.sites_out == tuple(Site(i, "mlp_out") for i in range(3))
    xs = np.random.default_rng(2).normal(size=(3, 16, D)).astype(np.float32) * 2
    a_ref, y_ref = clt_reference(layers, xs)
    assert 0 < (a_ref > 0).mean() < 1
    x = torch.from_numpy(xs)
    with torch.no_grad():
        a = d.coder.encode(x)
        torch.testing.assert_close(a, torch.from_numpy(a_ref), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d.coder.decode(a, x), torch.from_numpy(y_ref), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d.coder(x).reconstruction, torch.from_numpy(y_ref), rtol=1e-4, atol=1e-4)


def test_multilayer_folder_without_config_is_a_gemma_clt(tmp_path: Path) -> None:
    d = load_dictionary(write_clt(tmp_path / "clt" / "width_16k_l0_small", clt_weights(2, True, False), None))
    assert d.sites_in == (Site(0, "mlp_in"), Site(1, "mlp_in"))
    assert d.sites_out == (Site(0, "mlp_out"), Site(1, "mlp_out"))


def test_clt_save_load_roundtrip(tmp_path: Path) -> None:
    clt = CrossLayerCoder(CLTConfig(n_layers=3, d_in=D, d_out=D, width=F, skip=True, seed=4))
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    folder = save_clt(
        clt,
        tmp_path / "c",
        hook_point_in="model.layers.0.pre_feedforward_layernorm.output",
        hook_point_out="model.layers.0.post_feedforward_layernorm.output",
        model_name="tiny",
    )
    files = safetensors.numpy.load_file(str(folder / "params_layer_1.safetensors"))
    assert files["w_dec"].shape == (F, 3, D) and not files["w_dec"][:, 0].any()  # Gemma Scope 2 layout
    assert files["w_enc"].shape == (D, F) and files["affine_skip_connection"].shape == (D, D)
    back = load_clt(folder)
    x = torch.randn(3, 10, D)
    with torch.no_grad():
        torch.testing.assert_close(back(x).reconstruction, clt(x).reconstruction, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.decoder(0, 2), clt.decoder(0, 2))
    d = load_dictionary(folder)
    assert d.sites_in[2] == Site(2, "mlp_in")


def test_clt_decode_matches_a_loop_over_pairs() -> None:
    clt = CrossLayerCoder(CLTConfig(n_layers=4, d_in=8, d_out=6, width=5, activation="relu", seed=1))
    a = torch.rand(4, 3, 5)
    with torch.no_grad():
        expected = torch.stack(
            [clt.b_dec[m] + sum(a[src] @ clt.decoder(src, m) for src in range(m + 1)) for m in range(4)]
        )
        torch.testing.assert_close(clt.decode(a), expected)


# ---- hook points ↔ sites ------------------------------------------------------------------------


def test_every_site_of_the_tiny_model_maps_from_its_hook_points(tiny: LoadedModel) -> None:
    for layer in range(tiny.n_layers):
        for kind in SITE_KINDS:
            site = Site(layer, kind)
            point = locate(tiny.arch.layers, tiny.arch.layers_path, site)
            spellings = {
                point.hook_point,  # ours
                f"{point.path}.{point.io}",  # Gemma Scope 2 config.json
                gemma_scope_hook_point(site),  # model-free Gemma spelling
                gemma_scope_hook_point(site, tiny),
                tl_hook_name(site),  # TransformerLens / SAELens
                point.hook_point.replace("model.layers", "model.language_model.layers"),  # 4B+ wrappers
            }
            for hook_point in spellings:
                assert site_for_hook_point(hook_point, tiny) == site, hook_point
                assert site_for_hook_point(hook_point) == site, hook_point
    assert site_for_hook_point("blocks.2.ln2.hook_normalized") == Site(2, "mlp_in")
    assert site_for_hook_point("blocks.2.attn.hook_z") == Site(2, "attn_out")


@pytest.mark.parametrize(
    ("hook_point", "match"),
    [
        ("model.layers.7.output", "layer 7 is out of range"),
        ("model.layers.1.mlp.down_proj.output", "has no hook point"),
        ("blocks.1.hook_attn_out", "not a site"),
        ("encoder.layers.1.output", "known layer container"),
        ("model.norm", "names no layer"),
    ],
)
def test_hook_points_the_model_does_not_have(tiny: LoadedModel, hook_point: str, match: str) -> None:
    message = one_line_error(match, site_for_hook_point, hook_point, tiny)
    assert hook_point in message


# ---- bad input ----------------------------------------------------------------------------------


def test_width_that_does_not_match_the_site(tmp_path: Path, tiny: LoadedModel) -> None:
    folder = write_gs2(
        tmp_path / "narrow", gs_weights(d_in=32, d_out=32), gs2_config("model.layers.1.output")
    )
    message = one_line_error("width 64 but the coder's d_in is 32", load_dictionary, folder, tiny)
    assert "1.resid_post" in message
    load_dictionary(folder)  # without a model there is nothing to check against
    layers = clt_weights(2, True, False)
    for w in layers:
        w["b_dec"] = np.zeros(48, dtype=np.float32)
        w["w_dec"] = np.zeros((F, 2, 48), dtype=np.float32)
    one_line_error("d_out is 48", load_dictionary, write_clt(tmp_path / "clt", layers, None), tiny)


def test_a_clt_longer_than_the_model(tmp_path: Path, tiny: LoadedModel) -> None:
    folder = write_clt(tmp_path / "clt", clt_weights(4, True, False), None)
    one_line_error("uses site 3.mlp_in: layer 3 is out of range", load_dictionary, folder, tiny)


def test_hook_point_the_model_does_not_have_in_a_config(tmp_path: Path, tiny: LoadedModel) -> None:
    folder = write_gs2(tmp_path / "sae", gs_weights(), gs2_config("model.layers.7.output"))
    one_line_error("layer 7 is out of range", load_dictionary, folder, tiny)


def write_damaged(tmp_path: Path, fmt: str, damage) -> tuple[Path, Path]:
    """A folder in format fmt whose weights (a CLT's last layer) went through damage; (folder, its file)."""
    if fmt == "clt":
        layers = clt_weights(2, True, False)
        damage(layers[1])
        folder = write_clt(tmp_path / "clt", layers, None)
        return folder, folder / "params_layer_1.safetensors"
    w = gs_weights()
    damage(w)
    if fmt == "gs2":
        folder = write_gs2(tmp_path / "a", w, gs2_config("model.layers.1.output"))
        return folder, folder / "params.safetensors"
    folder = write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "a", w)
    return folder, folder / "params.npz"


@pytest.mark.parametrize("fmt", ["gs2", "npz", "clt"])
def test_missing_keys(tmp_path: Path, fmt: str) -> None:
    folder, _ = write_damaged(tmp_path, fmt, lambda w: w.pop("w_dec"))
    one_line_error("is missing w_dec", load_dictionary, folder)


@pytest.mark.parametrize("fmt", ["gs2", "npz", "clt"])
def test_nan_weights(tmp_path: Path, fmt: str) -> None:
    folder, _ = write_damaged(tmp_path, fmt, lambda w: w["w_enc"].__setitem__((3, 5), np.nan))
    one_line_error("w_enc .* NaN/inf", load_dictionary, folder)


@pytest.mark.parametrize("fmt", ["gs2", "npz", "clt"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    folder, path = write_damaged(tmp_path, fmt, lambda w: None)
    path.write_bytes(path.read_bytes()[:-200])
    one_line_error("truncated or corrupt", load_dictionary, folder)


class _Booby:
    """Unpickling this runs os.mkdir(marker): proof, if the folder appears, that something unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_npz_with_an_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "evil"
    folder.mkdir(parents=True)
    w = gs_weights()
    arrays = {"W_enc": w["w_enc"], "W_dec": w["w_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
    arrays["threshold"] = np.array([_Booby(str(marker))], dtype=object)
    np.savez(folder / "params.npz", **arrays)  # np.savez pickles object arrays
    one_line_error("object array", load_dictionary, folder)
    assert not marker.exists()


def test_folder_with_no_dictionary(tmp_path: Path) -> None:
    one_line_error("no dictionary folder", load_dictionary, tmp_path / "absent")
    one_line_error("holds no dictionary", load_dictionary, tmp_path)
    layers = clt_weights(3, True, False)
    folder = write_clt(tmp_path / "gap", layers, None)
    (folder / "params_layer_1.safetensors").unlink()
    one_line_error("without gaps", load_dictionary, folder)


# ---- finding dictionaries -----------------------------------------------------------------------


def test_find_dictionaries_finds_every_format(tmp_path: Path) -> None:
    a = write_gs2(tmp_path / "gs2" / "resid_post" / "layer_1_width_16k_l0_small", gs_weights(), None)
    b = write_npz(tmp_path / "gemma-scope-2b-pt-mlp" / "layer_0" / "width_16k" / "average_l0_5", gs_weights())
    c = write_clt(tmp_path / "gs2" / "clt" / "width_16k", clt_weights(2, True, False), None)
    (c / "nested").mkdir()  # never searched: c is a dictionary
    write_gs2(c / "nested", gs_weights(), None)
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    assert find_dictionaries(tmp_path) == sorted([a, b, c])
    assert find_dictionaries(a) == [a]
    one_line_error("no folder", find_dictionaries, tmp_path / "absent")
    sites = {load_dictionary(p).site_in for p in find_dictionaries(tmp_path)}
    assert sites == {Site(1, "resid_post"), Site(0, "mlp_out"), Site(0, "mlp_in")}
