"""Peers' folders in: SAELens, sparsify, circuit-tracer and dictionary_learning folders load into coders
whose latents and outputs equal the peer's own on the same inputs, bound to the right sites.

- SAELens: folders are written by SAELens itself (`SAE.save_model`) for every inference architecture it
  has (standard, jumprelu, topk with and without decoder-norm rescaling, gated, the four transcoders),
  with `apply_b_dec_to_input` both ways; SAELens's encode/forward outputs are the reference. It runs
  in-process when importable, else through $OPENSCOPE_SAELENS_PYTHON (`make saelens-venv`).
- sparsify and dictionary_learning: their folders are written here from their documented layouts (key
  names below, from EleutherAI/sparsify's `SparseCoder.save_to_disk` and saprmarks/dictionary_learning's
  `dictionary.py` state dicts) and the reference is their documented encode/decode, written out in this
  file, so these run without the libraries; tests/test_peer_libraries.py checks the same readers
  against the libraries themselves.
- circuit-tracer: our export's layouts read back (the layout itself is checked against circuit-tracer's
  formulas in tests/test_export.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import Tensor

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, find_dictionaries, in_memory, load_dictionary
from openscope.coders.export import export_circuit_tracer, export_folders
from openscope.errors import OpenscopeError
from openscope.models.sites import Site

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, K = 16, 24, 4

# ---- SAELens, through SAELens itself --------------------------------------------------------------------

SAELENS_CASES = [
    # (name, architecture, config extras, transcoder)
    ("standard", "standard", {"apply_b_dec_to_input": True}, False),
    ("standard_nobias", "standard", {"apply_b_dec_to_input": False}, False),
    ("standard_norm", "standard", {"normalize_activations": "expected_average_only_in"}, False),
    ("jumprelu", "jumprelu", {"apply_b_dec_to_input": True}, False),
    ("topk", "topk", {"k": K}, False),
    ("topk_rescaled", "topk", {"k": K, "rescale_acts_by_decoder_norm": True}, False),
    ("gated", "gated", {"apply_b_dec_to_input": True}, False),
    ("transcoder", "transcoder", {"apply_b_dec_to_input": False}, True),
    ("skip_transcoder", "skip_transcoder", {"apply_b_dec_to_input": False}, True),
    ("jumprelu_transcoder", "jumprelu_transcoder", {"apply_b_dec_to_input": False}, True),
    ("jumprelu_skip_transcoder", "jumprelu_skip_transcoder", {"apply_b_dec_to_input": False}, True),
]

_SAELENS_WRITER = f"""
import json, sys, torch
from safetensors.torch import save_file
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.registry import get_sae_class
out, cases = sys.argv[1], json.loads(sys.argv[2])
gen = torch.Generator().manual_seed(0)
x = torch.randn(40, {D}, generator=gen) * 3
save_file({{"x": x}}, f"{{out}}/x.safetensors")
for name, arch, extra, transcoder in cases:
    cls, cfg_cls = get_sae_class(arch)
    meta = dict(model_name="google/gemma-3-270m", hook_name="blocks.2.hook_resid_post")
    if transcoder:
        meta = dict(model_name="google/gemma-3-270m", hook_name="blocks.2.hook_mlp_in",
                    hf_hook_name="model.layers.2.pre_feedforward_layernorm.output",
                    hook_name_out="blocks.2.hook_mlp_out",
                    hf_hook_name_out="model.layers.2.post_feedforward_layernorm.output")
        extra = dict(extra, d_out={D})
    cfg = cfg_cls(d_in={D}, d_sae={F}, metadata=SAEMetadata(**meta), **extra)
    sae = cls(cfg)
    with torch.no_grad():
        for pname, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if pname == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5)
    sae.save_model(f"{{out}}/{{name}}")
    with torch.no_grad():
        f = sae.encode(x)
        save_file({{"f": f.contiguous(), "y": sae(x).contiguous()}}, f"{{out}}/{{name}}.out.safetensors")
    print(name, type(sae).__name__)
"""


def _run_saelens(script: str, *args: str) -> str:
    """Run a script with SAELens: in-process when importable, else in $OPENSCOPE_SAELENS_PYTHON."""
    try:
        import sae_lens  # noqa: F401  # type: ignore[import-not-found]
    except ImportError:
        python = os.environ.get("OPENSCOPE_SAELENS_PYTHON")
        if not python:
            pytest.skip("SAELens is not importable and OPENSCOPE_SAELENS_PYTHON is not set")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [python, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout
    argv, printed = sys.argv, io.StringIO()
    try:
        sys.argv = ["saelens", *args]
        with contextlib.redirect_stdout(printed):
            exec(compile(script, "saelens_writer", "exec"), {})
    finally:
        sys.argv = argv
    return printed.getvalue()


@pytest.fixture(scope="module")
def saelens_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("saelens")
    stdout = _run_saelens(_SAELENS_WRITER, str(out), json.dumps(SAELENS_CASES))
    assert len(stdout.splitlines()) == len(SAELENS_CASES)
    return out


@pytest.mark.parametrize("case", SAELENS_CASES, ids=[c[0] for c in SAELENS_CASES])
def test_saelens_folder_equals_saelens(saelens_folders: Path, case: tuple) -> None:
    name, arch, _, transcoder = case
    d = load_dictionary(saelens_folders / name)
    x = safetensors.torch.load_file(str(saelens_folders / "x.safetensors"))["x"]
    ref = safetensors.torch.load_file(str(saelens_folders / f"{name}.out.safetensors"))
    assert isinstance(d.coder, SparseCoder)
    with torch.no_grad():
        f = d.coder.encode(x)
        y = d.coder.decode(f, x)
    torch.testing.assert_close(f, ref["f"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref["y"], rtol=1e-5, atol=1e-5)
    assert bool((ref["f"] != 0).any()) and bool((ref["f"] == 0).any())  # the cases are not degenerate
    expected = (Site(2, "mlp_in"), Site(2, "mlp_out")) if transcoder else (Site(2, "resid_post"),) * 2
    assert (d.site_in, d.site_out) == expected
    assert d.config is not None and d.config["model_name"] == "google/gemma-3-270m"
    assert d.coder.cfg.kind == (
        "skip_transcoder" if "skip" in arch else "transcoder" if transcoder else "sae"
    )


def test_saelens_folder_exports_to_gemma_scope(saelens_folders: Path, tmp_path: Path) -> None:
    out, written = export_folders(
        [saelens_folders / "jumprelu"], "gemma-scope", tmp_path / "gs", source="saelens"
    )
    back = load_dictionary(out)
    x = torch.randn(20, D) * 3
    assert isinstance(back.coder, SparseCoder) and isinstance(written[0].coder, SparseCoder)
    with torch.no_grad():
        torch.testing.assert_close(back.coder.encode(x), written[0].coder.encode(x))
    assert back.site_in == Site(2, "resid_post")
    config = json.loads((out / "config.json").read_text())
    assert config["hf_hook_point_in"] == "model.layers.2.output" and config["openscope"]["from"] == "saelens"
    with pytest.raises(OpenscopeError, match="--from sparsify, but these are not"):
        export_folders([saelens_folders / "jumprelu"], "gemma-scope", tmp_path / "x", source="sparsify")


def test_saelens_refusals(saelens_folders: Path, tmp_path: Path) -> None:
    def variant(name: str, edit_cfg=None, edit_w=None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        cfg = json.loads((saelens_folders / "jumprelu" / "cfg.json").read_text())
        w = safetensors.torch.load_file(str(saelens_folders / "jumprelu" / "sae_weights.safetensors"))
        cfg = edit_cfg(cfg) if edit_cfg else cfg
        w = edit_w(w) if edit_w else w
        (folder / "cfg.json").write_text(json.dumps(cfg))
        safetensors.torch.save_file(w, str(folder / "sae_weights.safetensors"))
        return folder

    cases = [
        (
            variant("missing", edit_w=lambda w: {k: v for k, v in w.items() if k != "W_dec"}),
            "is missing W_dec",
        ),
        (
            variant("shape", edit_cfg=lambda c: c | {"d_sae": F + 1}),
            r"W_enc .* has shape \[16, 24\], but cfg.json .*says \[16, 25\]",
        ),
        (
            variant("norm", edit_cfg=lambda c: c | {"normalize_activations": "layer_norm"}),
            "rescales every token",
        ),
        (variant("abstopk", edit_cfg=lambda c: c | {"architecture": "abstopk"}), "cannot read it"),
        (
            variant("head", edit_cfg=lambda c: c | {"metadata": c["metadata"] | {"hook_head_index": 1}}),
            "single attention head",
        ),
    ]
    for folder, message in cases:
        with pytest.raises(OpenscopeError, match=message):
            load_dictionary(folder)


# ---- sparsify: written from its documented layout ----------------------------------------------------


def write_sparsify(folder: Path, *, transcode: bool, skip: bool, seed: int) -> dict[str, Tensor]:
    """A sparsify folder: cfg.json (SparseCoderConfig + d_in) and sae.safetensors with `encoder.weight`
    [F, d_in], `encoder.bias` [F], `W_dec` [F, d_out], `b_dec` [d_out], `W_skip` [d_out, d_in]."""
    gen = torch.Generator().manual_seed(seed)
    w = {
        "encoder.weight": torch.randn(F, D, generator=gen) * 0.3,
        "encoder.bias": torch.randn(F, generator=gen) * 0.1,
        "W_dec": torch.randn(F, D, generator=gen) * 0.3,
        "b_dec": torch.randn(D, generator=gen) * 0.3,
    }
    if skip:
        w["W_skip"] = torch.randn(D, D, generator=gen) * 0.1
    folder.mkdir(parents=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": F,
        "k": K,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file(w, str(folder / "sae.safetensors"))
    return w


def sparsify_reference(w: dict[str, Tensor], x: Tensor, transcode: bool) -> tuple[Tensor, Tensor]:
    """sparsify's encode/decode: TopK of ReLU(x̃ Wᵀ + b), x̃ = x − b_dec unless transcoding; Σ f W_dec +
    b_dec (+ x W_skipᵀ)."""
    pre = torch.relu(
        torch.nn.functional.linear(x if transcode else x - w["b_dec"], w["encoder.weight"], w["encoder.bias"])
    )
    values, indices = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, indices, values)
    y = f @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if "W_skip" in w else 0)
    return f, y


@pytest.mark.parametrize(
    ("hookpoint", "transcode", "skip", "sites"),
    [
        ("layers.3", False, False, ("3.resid_post", "3.resid_post")),
        ("layers.2.mlp", True, False, ("2.mlp_in", "2.mlp_out")),
        ("layers.2.mlp", True, True, ("2.mlp_in", "2.mlp_out")),
    ],
)
def test_sparsify_folder(tmp_path: Path, hookpoint: str, transcode: bool, skip: bool, sites: tuple) -> None:
    w = write_sparsify(tmp_path / "run" / hookpoint, transcode=transcode, skip=skip, seed=1)
    [folder] = find_dictionaries(tmp_path / "run")
    d = load_dictionary(folder)
    x = torch.randn(30, D) * 3
    f_ref, y_ref = sparsify_reference(w, x, transcode)
    assert isinstance(d.coder, SparseCoder)
    with torch.no_grad():
        f = d.coder.encode(x)
        torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d.coder.decode(f, x), y_ref, rtol=1e-5, atol=1e-5)
    assert (d.site_in.name, d.site_out.name) == sites


def test_sparsify_refusals(tmp_path: Path) -> None:
    write_sparsify(tmp_path / "a" / "layers.1", transcode=False, skip=False, seed=0)
    cfg_path = tmp_path / "a" / "layers.1" / "cfg.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"num_latents": F * 2}))
    with pytest.raises(OpenscopeError, match=r"encoder.weight .* but cfg.json .*says \[48, 16\]"):
        load_dictionary(tmp_path / "a" / "layers.1")
    cfg_path.write_text(
        json.dumps(json.loads(cfg_path.read_text()) | {"num_latents": F, "activation": "groupmax"})
    )
    with pytest.raises(OpenscopeError, match="groupmax"):
        load_dictionary(tmp_path / "a" / "layers.1")


# ---- dictionary_learning: written from its documented state dicts ------------------------------------


def _dl_state(cls: str, gen: torch.Generator) -> dict[str, Tensor]:
    """A state dict of dictionary_learning class `cls` with its documented keys and shapes."""
    r = lambda *s: torch.randn(*s, generator=gen) * 0.3  # noqa: E731
    if cls == "AutoEncoder":
        return {"bias": r(D), "encoder.weight": r(F, D), "encoder.bias": r(F), "decoder.weight": r(D, F)}
    if cls == "GatedAutoEncoder":
        return {
            "decoder_bias": r(D),
            "encoder.weight": r(F, D),
            "r_mag": r(F),
            "gate_bias": r(F),
            "mag_bias": r(F),
            "decoder.weight": r(D, F),
        }
    if cls == "JumpReluAutoEncoder":
        return {
            "W_enc": r(D, F),
            "b_enc": r(F),
            "W_dec": r(F, D),
            "b_dec": r(D),
            "threshold": torch.rand(F, generator=gen) * 0.5,
        }
    common = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.2)}
    if cls == "MatryoshkaBatchTopKSAE":
        return {
            "W_enc": r(D, F),
            "b_enc": r(F),
            "W_dec": r(F, D),
            "b_dec": r(D),
            "group_sizes": torch.tensor([8, 16]),
            **common,
        }
    return {
        "encoder.weight": r(F, D),
        "encoder.bias": r(F),
        "decoder.weight": r(D, F),
        "b_dec": r(D),
        **common,
    }


def dl_reference(cls: str, s: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """dictionary_learning's default encode/decode of each class (AutoEncoder after from_pretrained's
    decoder normalisation)."""
    relu = torch.relu
    if cls == "AutoEncoder":
        norms = s["decoder.weight"].norm(dim=0)
        f = relu(
            torch.nn.functional.linear(
                x - s["bias"], s["encoder.weight"] * norms[:, None], s["encoder.bias"] * norms
            )
        )
        return f, f @ (s["decoder.weight"] / norms).T + s["bias"]
    if cls == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        f = (x_enc + s["gate_bias"] > 0).float() * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, f @ s["decoder.weight"].T + s["decoder_bias"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    post = relu(torch.nn.functional.linear(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
    if cls == "AutoEncoderTopK":
        values, indices = post.topk(K, dim=-1)
        f = torch.zeros_like(post).scatter_(-1, indices, values)
    else:  # BatchTopKSAE with its threshold
        f = post * (post > s["threshold"])
    return f, f @ s["decoder.weight"].T + s["b_dec"]


DL_CLASSES = [
    "AutoEncoder",
    "GatedAutoEncoder",
    "JumpReluAutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
]


@pytest.mark.parametrize("cls", DL_CLASSES)
def test_dictionary_learning_folder(tmp_path: Path, cls: str) -> None:
    state = _dl_state(cls, torch.Generator().manual_seed(3))
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    torch.save(state, folder / "ae.pt")  # how dictionary_learning saves: t.save(ae.state_dict(), ...)
    trainer = {
        "dict_class": cls,
        "activation_dim": D,
        "dict_size": F,
        "layer": 4,
        "lm_name": "google/gemma-3-270m",
        "submodule_name": "resid_post_layer_4",
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))
    d = load_dictionary(folder)
    x = torch.randn(30, D) * 3
    f_ref, y_ref = dl_reference(cls, state, x)
    assert isinstance(d.coder, SparseCoder)
    with torch.no_grad():
        f = d.coder.encode(x)
        torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d.coder.decode(f, x), y_ref, rtol=1e-5, atol=1e-5)
    assert (
        d.site_in == Site(4, "resid_post")
        and d.config is not None
        and d.config["model_name"] == "google/gemma-3-270m"
    )


class _Evil:
    """Unpickling this would run code (write a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_pickles_are_refused_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "ae.pt").write_bytes(pickle.dumps({"encoder.weight": _Evil(marker)}))
    with pytest.raises(OpenscopeError, match="refusing to unpickle"):
        load_dictionary(evil)
    only = tmp_path / "only_pickles"
    only.mkdir()
    (only / "sae_weights.pt").write_bytes(pickle.dumps(_Evil(marker)))
    (only / "cfg.json").write_text("{}")
    with pytest.raises(OpenscopeError, match="never unpickles"):
        load_dictionary(only)
    assert not marker.exists()
    # TopK and BatchTopK share their keys: without config.json the class cannot be told.
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save(_dl_state("AutoEncoderTopK", torch.Generator().manual_seed(0)), plain / "ae.pt")
    with pytest.raises(OpenscopeError, match="AutoEncoderTopK, BatchTopKSAE"):
        load_dictionary(plain, site_in="1.resid_post")


# ---- circuit-tracer: its native layouts -------------------------------------------------------------


def test_circuit_tracer_transcoder_set_and_clt(tmp_path: Path) -> None:
    coders = []
    for layer in range(3):
        c = SparseCoder(CoderConfig(d_in=D, d_out=D, width=F, kind="skip_transcoder", seed=layer))
        with torch.no_grad():
            for p in c.parameters():
                p.add_(torch.randn(p.shape) * 0.2)
        coders.append(
            in_memory(c, Site(layer, "mlp_in"), Site(layer, "mlp_out"))._replace(config={"model_name": "m"})
        )
    folder = export_circuit_tracer(coders, tmp_path / "set")
    entries = find_dictionaries(folder)
    assert [p.name for p in entries] == ["layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors"]
    x = torch.randn(10, D)
    for entry, d in zip(entries, coders, strict=True):
        back = load_dictionary(entry)
        assert (back.site_in, back.site_out) == (d.site_in, d.site_out)
        assert isinstance(back.coder, SparseCoder) and isinstance(d.coder, SparseCoder)
        with torch.no_grad():
            torch.testing.assert_close(
                back.coder.decode(back.coder.encode(x), x), d.coder.decode(d.coder.encode(x), x)
            )
    with pytest.raises(OpenscopeError, match="set of 3 transcoders"):
        load_dictionary(folder)

    clt = CrossLayerCoder(CLTConfig(n_layers=3, d_in=D, d_out=D, width=F, seed=1))
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    d = Dictionary(clt, Site(0, "mlp_in"), Site(0, "mlp_out"), "clt", None, {"model_name": "m"})
    back = load_dictionary(export_circuit_tracer(d, tmp_path / "clt"))
    xs = torch.randn(3, 10, D)
    assert isinstance(back.coder, CrossLayerCoder) and back.sites_in == d.sites_in
    with torch.no_grad():
        torch.testing.assert_close(
            back.coder.reconstruct(list(xs)).reconstruction, clt.reconstruct(list(xs)).reconstruction
        )
    (tmp_path / "clt" / "W_dec_1.safetensors").unlink()
    with pytest.raises(OpenscopeError, match="no W_dec_1.safetensors"):
        load_dictionary(tmp_path / "clt")
