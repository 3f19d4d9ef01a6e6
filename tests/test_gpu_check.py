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
        "eval (splice, KL, loss recovered)",
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
