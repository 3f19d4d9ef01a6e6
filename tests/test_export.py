"""Tests of `openscope export`: SAELens and circuit-tracer files read back with their documented key
names and shapes give our encode/decode exactly; SAELens itself loads them (where it can be run);
exports never lose data and refuse what the target tool cannot represent.

SAELens runs in-process when importable, else through the Python named by $OPENSCOPE_SAELENS_PYTHON
(a separate environment: `make saelens-venv` builds .venv-peers/saelens, and `make test` points this
variable at it), else its test is skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from typer.testing import CliRunner

from openscope.cli import app
from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory, load_dictionary
from openscope.coders.export import export_circuit_tracer, export_folders, export_saelens
from openscope.coders.export.target import staged_folder
from openscope.coders.io import save_clt, save_coder
from openscope.errors import OpenscopeError
from openscope.models.sites import Site

D, F = 64, 24
HOOK_NAMES = {
    "resid_post": "blocks.1.hook_resid_post",
    "attn_out": "blocks.1.attn.hook_z",
    "mlp_in": "blocks.1.hook_mlp_in",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def random_coder(
    kind: str = "sae", activation: str = "jumprelu", seed: int = 0, width: int = F
) -> SparseCoder:
    """A coder with random weights, thresholds and normalisation scales (so export must fold)."""
    k = 5 if activation in ("topk", "batchtopk") else None
    coder = SparseCoder(CoderConfig(d_in=D, d_out=D, width=width, kind=kind, activation=activation, k=k))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if coder.log_threshold is not None:
            coder.log_threshold.copy_(torch.randn(width, generator=gen) * 0.3 - 1.5)
    coder.set_scales(2.0, 3.0)
    return coder


def dictionary(
    kind: str = "sae", activation: str = "jumprelu", site: str = "resid_post", seed: int = 0
) -> Dictionary:
    coder = random_coder(kind, activation, seed)
    site_in = Site(1, "mlp_in" if kind != "sae" else site)
    site_out = Site(1, "mlp_out") if kind != "sae" else site_in
    d = in_memory(coder, site_in, site_out, name=f"{kind}_{activation}_{site}")
    return d._replace(config={"model_name": "google/gemma-3-270m"})


def ours(d: Dictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (folded) latents and reconstruction."""
    assert isinstance(d.coder, SparseCoder)
    folded = d.coder.fold()
    with torch.no_grad():
        f = folded.encode(x)
        return f, folded.decode(f, x)


SAELENS_CASES = [
    ("sae", "jumprelu", "resid_post"),
    ("sae", "relu", "resid_post"),
    ("sae", "topk", "resid_post"),
    ("sae", "jumprelu", "attn_out"),
    ("transcoder", "jumprelu", "resid_post"),
    ("skip_transcoder", "jumprelu", "resid_post"),
]


def documented_saelens_forward(
    cfg: dict, w: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's documented inference math for the exported architectures (no b_dec on the input)."""
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    pre = x @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        values, idx = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    else:
        f = pre.relu() * (pre > w["threshold"])
    y = f @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        y = y + x @ w["W_skip"].T
    return f, y


@pytest.mark.parametrize(("kind", "activation", "site"), SAELENS_CASES)
def test_saelens_export_reads_back_with_documented_keys(
    tmp_path: Path, kind: str, activation: str, site: str
) -> None:
    d = dictionary(kind, activation, site)
    folder = export_saelens(d, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    w = safetensors.torch.load_file(str(folder / "sae_weights.safetensors"))
    architecture = {
        ("sae", "topk"): "topk",
        ("transcoder", "jumprelu"): "jumprelu_transcoder",
        ("skip_transcoder", "jumprelu"): "jumprelu_skip_transcoder",
    }.get((kind, activation), "jumprelu")
    assert cfg["architecture"] == architecture and (cfg["d_in"], cfg["d_sae"]) == (D, F)
    assert cfg["reshape_activations"] == ("hook_z" if site == "attn_out" else "none")
    meta = cfg["metadata"]
    assert meta["model_name"] == "google/gemma-3-270m" and meta["sae_lens_version"] == "6.0.0"
    assert meta["hook_name"] == HOOK_NAMES[d.site_in.kind]
    assert meta["openscope"]["site_in"] == d.site_in.name and meta["openscope"]["site_out"] == d.site_out.name
    if kind != "sae":
        assert cfg["d_out"] == D and meta["hook_name_out"] == "blocks.1.hook_mlp_out"
        assert meta["hf_hook_name"] == "model.layers.1.pre_feedforward_layernorm.output"
    assert w["W_enc"].shape == (D, F) and w["W_dec"].shape == (F, D)
    assert w["b_enc"].shape == (F,) and w["b_dec"].shape == (D,)
    assert ("threshold" in w) == (activation != "topk") and ("W_skip" in w) == (kind == "skip_transcoder")
    x = torch.randn(30, D) * 4
    f_ref, y_ref = ours(d, x)
    assert 0 < (f_ref > 0).float().mean() < 1
    f, y = documented_saelens_forward(cfg, w, x)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


# ---- SAELens itself -----------------------------------------------------------------------------

_SAELENS_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
for folder, x_file, out_file in zip(*[iter(sys.argv[1:])] * 3):
    sae = SAE.load_from_disk(folder)
    x = load_file(x_file)["x"]
    with torch.no_grad():
        f = sae.encode(x)
        out = {"f": f, "decode": sae.decode(f), "forward": sae(x)}
    save_file({k: v.contiguous() for k, v in out.items()}, out_file)
    print(folder, type(sae).__name__)
"""


def _run_saelens(jobs: list[tuple[Path, Path, Path]]) -> str:
    """Run the SAELens script on (folder, x file, out file) jobs: in-process or in $OPENSCOPE_SAELENS_PYTHON."""
    args = [str(p) for job in jobs for p in job]
    try:
        import sae_lens  # noqa: F401  # type: ignore[import-not-found]
    except ImportError:
        python = os.environ.get("OPENSCOPE_SAELENS_PYTHON")
        if not python:
            pytest.skip("SAELens is not importable and OPENSCOPE_SAELENS_PYTHON is not set")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [python, "-c", _SAELENS_SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout
    argv, printed = sys.argv, io.StringIO()
    try:
        sys.argv = ["saelens", *args]
        with contextlib.redirect_stdout(printed):
            exec(compile(_SAELENS_SCRIPT, "saelens_check", "exec"), {})
    finally:
        sys.argv = argv
    return printed.getvalue()


def test_saelens_loads_our_export_and_agrees(tmp_path: Path) -> None:
    jobs, expected = [], []
    for i, (kind, activation, site) in enumerate(SAELENS_CASES):
        d = dictionary(kind, activation, site, seed=i)
        folder = export_saelens(d, tmp_path / f"sae_{i}")
        x = torch.randn(30, D) * 4
        shaped = x.reshape(30, 4, 16) if site == "attn_out" else x  # attn.hook_z is [.., heads, d_head]
        safetensors.torch.save_file({"x": shaped.contiguous()}, str(tmp_path / f"x_{i}.safetensors"))
        jobs.append((folder, tmp_path / f"x_{i}.safetensors", tmp_path / f"out_{i}.safetensors"))
        expected.append((d, x))
    stdout = _run_saelens(jobs)
    for (d, x), (_, _, out_file) in zip(expected, jobs, strict=True):
        got = safetensors.torch.load_file(str(out_file))
        f_ref, y_ref = ours(d, x)
        torch.testing.assert_close(got["f"].reshape(30, -1), f_ref, rtol=1e-5, atol=1e-5)
        # SAELens adds a skip connection in forward, not in decode.
        torch.testing.assert_close(got["forward"].reshape(30, -1), y_ref, rtol=1e-5, atol=1e-5)
        assert isinstance(d.coder, SparseCoder)
        if d.coder.cfg.kind != "skip_transcoder":
            torch.testing.assert_close(got["decode"].reshape(30, -1), y_ref, rtol=1e-5, atol=1e-5)
    # SAELens loaded each folder as the class its cfg.json names (one printed line per folder, in job
    # order; a ReLU coder is exported as JumpReLU with θ = 0).
    classes = {"sae": "SAE", "transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder"}
    expected_classes = [
        ("TopK" if activation == "topk" else "JumpReLU") + classes[kind]
        for kind, activation, _ in SAELENS_CASES
    ]
    assert [line.split()[-1] for line in stdout.splitlines()] == expected_classes


# ---- circuit-tracer -----------------------------------------------------------------------------


def transcoder_set(skip: bool, activation: str = "jumprelu", n: int = 3) -> list[Dictionary]:
    kind = "skip_transcoder" if skip else "transcoder"
    return [
        in_memory(
            random_coder(kind, activation, seed=layer), Site(layer, "mlp_in"), Site(layer, "mlp_out")
        )._replace(config={"model_name": "google/gemma-3-270m"})
        for layer in range(n)
    ]


@pytest.mark.parametrize(("skip", "activation"), [(False, "jumprelu"), (True, "jumprelu"), (False, "relu")])
def test_circuit_tracer_transcoder_set(tmp_path: Path, skip: bool, activation: str) -> None:
    dictionaries = transcoder_set(skip, activation)
    folder = export_circuit_tracer(dictionaries[::-1], tmp_path / "ct")  # any order
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "google/gemma-3-270m"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    assert "transcoders" not in config  # circuit-tracer then finds layer_{i}.safetensors itself
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml",
        *(f"layer_{i}.safetensors" for i in range(3)),
    ]
    for layer, d in enumerate(dictionaries):
        w = safetensors.torch.load_file(str(folder / f"layer_{layer}.safetensors"))
        assert w["W_enc"].shape == (F, D) and w["W_dec"].shape == (F, D)
        assert ("activation_function.threshold" in w) == (activation == "jumprelu")
        assert ("W_skip" in w) == skip
        x = torch.randn(30, D) * 4
        # circuit-tracer: F.linear(x, W_enc, b_enc); JumpReLU x·(x > θ) or ReLU; acts @ W_dec + b_dec (+ x @ W_skip.T)
        pre = torch.nn.functional.linear(x, w["W_enc"], w["b_enc"])
        acts = pre * (pre > w["activation_function.threshold"]) if activation == "jumprelu" else pre.relu()
        y = acts @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if skip else 0)
        f_ref, y_ref = ours(d, x)
        torch.testing.assert_close(acts, f_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_circuit_tracer_clt(tmp_path: Path) -> None:
    clt = CrossLayerCoder(CLTConfig(n_layers=3, d_in=D, d_out=D, width=F, seed=2))
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
        assert clt.log_threshold is not None
        clt.log_threshold.copy_(torch.randn(3, F) * 0.3 - 1)
    source = save_clt(
        clt,
        tmp_path / "clt",
        hook_point_in="model.layers.0.pre_feedforward_layernorm.output",
        hook_point_out="model.layers.0.post_feedforward_layernorm.output",
        model_name="google/gemma-3-270m",
    )
    folder = export_circuit_tracer(load_dictionary(source), tmp_path / "ct")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    xs = torch.randn(3, 20, D) * 3
    recon = torch.zeros(3, 20, D)
    acts = []
    for i in range(3):
        enc = safetensors.torch.load_file(str(folder / f"W_enc_{i}.safetensors"))
        dec = safetensors.torch.load_file(str(folder / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
        assert enc[f"W_enc_{i}"].shape == (F, D) and dec.shape == (F, 3 - i, D)
        pre = xs[i] @ enc[f"W_enc_{i}"].T + enc[f"b_enc_{i}"]
        a = pre * (pre > enc[f"threshold_{i}"])
        acts.append(a)
        recon[i] += enc[f"b_dec_{i}"]
        for m in range(i, 3):
            recon[m] += a @ dec[:, m - i]
    with torch.no_grad():
        out = clt(xs)
    torch.testing.assert_close(torch.stack(acts), out.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, out.reconstruction, rtol=1e-4, atol=1e-4)


# ---- exports from folders, and the CLI ----------------------------------------------------------


def test_export_folders_from_a_gemma_scope_tree(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for layer in (0, 1):
        folder = tmp_path / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_16k" / "average_l0_50"
        folder.mkdir(parents=True)
        arrays = {
            "W_enc": rng.normal(size=(D, F)),
            "W_dec": rng.normal(size=(F, D)),
            "b_enc": rng.normal(size=F),
            "b_dec": rng.normal(size=D),
            "threshold": np.abs(rng.normal(size=F)),
        }
        np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
    target, written = export_folders([tmp_path / "gemma-scope-2b-pt-res"], "saelens", tmp_path / "out")
    assert [d.site_in.name for d in written] == ["0.resid_post", "1.resid_post"]
    subfolders = sorted(p.name for p in target.iterdir())
    assert subfolders == ["layer_0_width_16k_average_l0_50", "layer_1_width_16k_average_l0_50"]
    cfg = json.loads((target / subfolders[1] / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "google/gemma-2-2b"
    # Gemma Scope 2 trees repeat leaf names across families: subfolders keep the family apart.
    for family in ("resid_post_all", "attn_out_all"):
        folder = tmp_path / "gs2" / family / "layer_0_width_16k_l0_small"
        folder.mkdir(parents=True)
        tensors = {k.lower(): torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
        safetensors.torch.save_file(tensors, str(folder / "params.safetensors"))
    target, written = export_folders([tmp_path / "gs2"], "saelens", tmp_path / "out2", model_name="m")
    assert sorted(p.name for p in target.iterdir()) == [
        "attn_out_all_layer_0_width_16k_l0_small",
        "resid_post_all_layer_0_width_16k_l0_small",
    ]
    assert {d.site_in.name for d in written} == {"0.attn_out", "0.resid_post"}


def test_cli_export(tmp_path: Path) -> None:
    d = dictionary("transcoder")
    assert isinstance(d.coder, SparseCoder)
    save_coder(
        d.coder,
        tmp_path / "dicts" / "tc",
        hook_point_in="model.layers.1.pre_feedforward_layernorm",
        hook_point_out="model.layers.1.post_feedforward_layernorm",
        model_name="tiny-gemma",
    )
    runner = CliRunner()
    args = ["export", str(tmp_path / "dicts"), "--to", "saelens", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1.mlp_in -> 1.mlp_out" in result.output
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "tiny-gemma" and cfg["architecture"] == "jumprelu_transcoder"
    # Our hook-point spelling leaves the output side implicit; SAELens gets Gemma Scope 2's.
    assert cfg["metadata"]["hf_hook_name"] == "model.layers.1.pre_feedforward_layernorm.output"
    again = runner.invoke(app, args)
    assert isinstance(again.exception, OpenscopeError) and "--overwrite" in str(again.exception)
    assert runner.invoke(app, [*args, "--overwrite", "--model-name", "m2"]).exit_code == 0
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]["model_name"] == "m2"


# ---- never lose data; refuse what the tool cannot hold ------------------------------------------


def test_existing_target_is_refused_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    # Not an export of ours: refused with or without --overwrite, and nothing is touched.
    for overwrite in (False, True):
        with pytest.raises(OpenscopeError, match="holds precious.txt, which openscope did not write") as err:
            export_saelens(dictionary(), target, overwrite=overwrite)
        assert "\n" not in str(err.value)
        assert [p.name for p in target.iterdir()] == ["precious.txt"]
        assert (target / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OpenscopeError, match="exists and is not a folder"):
        export_circuit_tracer(transcoder_set(False), tmp_path / "file")
    ours = tmp_path / "ours"
    export_saelens(dictionary(), ours)
    with pytest.raises(OpenscopeError, match="holds an openscope export already; pass --overwrite"):
        export_saelens(dictionary(), ours)
    export_circuit_tracer(transcoder_set(False), ours, overwrite=True)  # an earlier export is replaced
    assert (ours / "config.yaml").is_file() and not (ours / "cfg.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ours", "out"]  # no temporary folders left
    empty = tmp_path / "empty"
    empty.mkdir()
    export_saelens(dictionary(), empty)  # an empty folder is fine without overwrite


def test_failure_midway_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "out"
    export_saelens(dictionary(), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(RuntimeError), staged_folder(target, overwrite=True) as tmp:
        (tmp / "half.bin").write_bytes(b"12")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


@pytest.mark.parametrize(
    ("make", "fmt", "match"),
    [
        (lambda: [dictionary("sae", "batchtopk")], "saelens", "BatchTopK"),
        (lambda: [dictionary("transcoder", "topk")], "saelens", "no TopK transcoder"),
        (lambda: [dictionary()._replace(config={})], "saelens", "no model_name; pass --model-name"),
        (lambda: [dictionary()], "circuit-tracer", "circuit-tracer replaces MLPs"),
        (
            lambda: transcoder_set(False)[1:],
            "circuit-tracer",
            r"one transcoder per layer 0..N-1; got layers \[1, 2\]",
        ),
        (lambda: transcoder_set(False, "topk"), "circuit-tracer", "convert it with topk_to_jumprelu"),
        (
            lambda: [transcoder_set(False)[0], transcoder_set(True)[1]],
            "circuit-tracer",
            "one width and one kind",
        ),
    ],
)
def test_exports_refuse_what_the_tool_cannot_hold(tmp_path: Path, make, fmt: str, match: str) -> None:
    write = export_saelens if fmt == "saelens" else export_circuit_tracer
    with pytest.raises(OpenscopeError, match=match) as err:
        write(make(), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_clt_exports_refused_where_unsupported(tmp_path: Path) -> None:
    clt = CrossLayerCoder(CLTConfig(n_layers=2, d_in=D, d_out=D, width=F, skip=True))
    d = Dictionary(clt, Site(0, "mlp_in"), Site(0, "mlp_out"), "clt", None, {"model_name": "m"})
    with pytest.raises(OpenscopeError, match="SAELens has none"):
        export_saelens(d, tmp_path / "a")
    with pytest.raises(OpenscopeError, match="no skip connection"):
        export_circuit_tracer(d, tmp_path / "b")
    with pytest.raises(OpenscopeError, match="start at layer 0"):
        export_circuit_tracer(
            d._replace(site_in=Site(1, "mlp_in"), site_out=Site(1, "mlp_out")), tmp_path / "c"
        )
    with pytest.raises(OpenscopeError, match="unknown export format"):
        export_folders([tmp_path], "neuronpedia", tmp_path / "d")
