"""benchmarks/gpu_check.py cannot rot: its quick mode runs on the CPU on the tiny model, every check passes
and every figure the issue asks for is in its JSON report; --device cuda without CUDA is one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
def test_quick_cpu_run_passes_every_check_and_reports_every_figure(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path, capsys
):
    out, scratch = tmp_path / "report.json", tmp_path / "scratch"
    scratch.mkdir()
    argv = ["--device", "cpu", "--quick", "--model", str(tiny_model_dir), "--source", str(text_file)]
    status = _script().main([*argv, "--output", str(out), "--workdir", str(scratch)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    doc = json.loads(out.read_text())
    checks = {c["check"]: c for c in doc["checks"]}
    assert set(checks) == {
        "capture equals hidden states",
        "splice of a perfect dictionary",
        "sparse path equals dense",
        "resume equals uninterrupted",
    }
    assert all(c["ok"] for c in checks.values()), checks
    figures = {f["figure"]: f for f in doc["figures"]}
    for name in (
        "harvest every resid_post",
        "train topk w128 float32",
        "train topk w128 bf16",
        "train jumprelu w128 float32",
        "train jumprelu w128 bf16",
        "eval (splice, KL, loss recovered, absorption)",
        "features (dashboards)",
        "steered generation (plain and steered)",
        "attribution of one prompt",
    ):
        assert figures[name]["value"] > 0, name
    assert figures["attribution of one prompt"]["active"] > 0
    assert "sparsify" in doc["meta"]  # compared, or said not to be installed
    assert "capture equals hidden states" in printed and "tokens/s" in printed
    assert not any(scratch.iterdir())  # the scratch folder is removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_cuda_without_cuda_is_one_line(tiny_model_dir: Path, tmp_path: Path, capsys):
    status = _script().main(
        ["--device", "cuda", "--quick", "--model", str(tiny_model_dir), "--output", str(tmp_path / "r.json")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "CUDA is not available" in err[0]
    assert not (tmp_path / "r.json").exists()


def _bundle() -> ModuleType:
    path = SCRIPT.with_name("device_bundle.py")
    spec = importlib.util.spec_from_file_location("device_bundle", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_rebuilds_the_architecture_and_tokenizer_with_random_weights(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path
):
    """pack keeps everything but the weights (and the text); unpack builds the same model shape, seeded."""
    from safetensors.torch import load_file

    from openscope.models import load_model

    bundle = _bundle()
    assert (
        bundle.main(
            [
                "pack",
                str(tmp_path / "b"),
                "--model",
                str(tiny_model_dir),
                "--source",
                str(text_file),
                "--docs",
                "3",
            ]
        )
        == 0
    )
    files = {p.name for p in (tmp_path / "b").iterdir()}
    assert (
        "config.json" in files
        and "text.jsonl" in files
        and not any(f.endswith(".safetensors") for f in files)
    )
    assert len((tmp_path / "b" / "text.jsonl").read_text().splitlines()) == 3
    for out in ("m1", "m2"):
        assert bundle.main(["unpack", str(tmp_path / "b"), str(tmp_path / out)]) == 0
    real, rebuilt = load_model(str(tiny_model_dir)), load_model(str(tmp_path / "m1"))
    assert rebuilt.n_layers == real.n_layers and rebuilt.d_model == real.d_model
    assert rebuilt.tokenizer("a test").input_ids == real.tokenizer("a test").input_ids
    a, b = (
        load_file(str(tmp_path / "m1" / "model.safetensors")),
        load_file(str(tmp_path / "m2" / "model.safetensors")),
    )
    original = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same twice
    assert any(not torch.equal(a[k], original[k]) for k in a if k in original)  # but not the real weights
    assert bundle.main(["unpack", str(tmp_path / "nowhere"), str(tmp_path / "m3")]) == 2


@pytest.mark.usefixtures("one_thread")
def test_a_failing_stage_is_a_failed_check_and_the_later_stages_still_run(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path, monkeypatch
):
    """--stages picks stages (a dictionary is trained for those that need one); a stage that raises is
    reported as `<stage> runs` failed, with its error, and does not stop the stages after it."""
    script = _script()

    def broken(*_args, **_kwargs):
        raise RuntimeError("indices should be either on cpu or on the same device")

    monkeypatch.setattr(script, "features_of", broken)
    out = tmp_path / "report.json"
    argv = ["--device", "cpu", "--quick", "--model", str(tiny_model_dir), "--source", str(text_file)]
    status = script.main([*argv, "--stages", "features,steer", "--output", str(out)])
    doc = json.loads(out.read_text())
    assert status == 1
    assert doc["checks"] == [
        {
            "check": "features runs",
            "ok": False,
            "error": "RuntimeError: indices should be either on cpu or on the same device",
            "seconds": doc["checks"][0]["seconds"],
        }
    ]
    figures = {f["figure"] for f in doc["figures"]}
    assert "steered generation (plain and steered)" in figures  # after the failed stage
    assert not figures & {"harvest every resid_post", "train topk w128 float32", "attribution of one prompt"}
    with pytest.raises(SystemExit):
        script.main([*argv, "--stages", "train,nonsense"])


@pytest.mark.usefixtures("one_thread")
def test_attribution_alone_harvests_nothing(tiny_model_dir: Path, text_file: Path, tmp_path: Path):
    out = tmp_path / "report.json"
    argv = ["--device", "cpu", "--quick", "--model", str(tiny_model_dir), "--source", str(text_file)]
    assert _script().main([*argv, "--stages", "attribution", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [f["figure"] for f in doc["figures"]] == ["attribution of one prompt"] and doc["checks"] == []
