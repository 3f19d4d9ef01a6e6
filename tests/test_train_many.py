"""Many dictionaries per pass: `--width 16,32 --target-l0 4,8,12` trains the cross product from each batch,
and every dictionary ends bit for bit as it does when trained alone (same batches, same seed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from openscope.cli import run
from openscope.train import TrainConfig, train
from openscope.train.config import result_key, target_l0s, widths
from tests.conftest import small_store, tiny_train_config

WIDTHS, TARGETS = (16, 32), (4.0, 8.0, 12.0)
SITES = "1.resid_post,1.mlp_out"


@pytest.fixture(scope="module")
def store_dir(tiny, tiny_model_dir, tmp_path_factory) -> Path:
    return small_store(
        tiny,
        tiny_model_dir,
        tmp_path_factory.mktemp("store"),
        "1.resid_post,1.mlp_out",
        "the capital of France is Paris.",
    )


def _cfg(store: Path, out: Path, **kw: Any) -> TrainConfig:
    many = dict(sites=SITES, width=",".join(map(str, WIDTHS)), target_l0=",".join(f"{t:g}" for t in TARGETS))
    return tiny_train_config(store, out, **{**many, "tokens": 64 * 12, **kw})


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "params.safetensors"))


def _config(folder: Path) -> dict[str, Any]:
    """A saved dictionary's config.json without what names the run's folder or command line."""
    config = json.loads((folder / "config.json").read_text())
    del config["openscope"]["command_line"], config["openscope"]["train_config"]["output"]
    return config


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), f"{a.name} vs {b.name}: {key}"


def test_many_at_once_equals_each_alone(store_dir: Path, tmp_path: Path) -> None:
    together = train(_cfg(store_dir, tmp_path / "many"), progress=False)
    rows = _rows(tmp_path / "many")
    run_json = json.loads((tmp_path / "many" / "run.json").read_text())
    assert len(together.folders) == len(together.final) == 2 * len(WIDTHS) * len(TARGETS)
    assert set(run_json["final"]) == set(together.final)
    for w in WIDTHS:
        for t in TARGETS:
            alone = train(_cfg(store_dir, tmp_path / f"w{w}_t{t:g}", width=w, target_l0=t), progress=False)
            alone_rows = _rows(tmp_path / f"w{w}_t{t:g}")
            for site in SITES.split(","):
                key = f"{site}_w{w}_l0_{t:g}"
                # Alone: today's folder and key; together: the width and target are in both.
                assert alone.folders[site].name == f"{site.replace('.', '_')}_sae_jumprelu_w{w}"
                assert together.folders[key].name == f"{alone.folders[site].name}_l0_{t:g}"
                _assert_same_params(together.folders[key], alone.folders[site])
                # Measured L0, FVU, dead fraction; and the saved config, its settings those of the lone run.
                assert together.final[key] == alone.final[site]
                assert _config(together.folders[key]) == _config(alone.folders[site])
                mine = [
                    {k: v for k, v in r.items() if k not in ("width", "target_l0")}
                    for r in rows
                    if r["site"] == site and r["width"] == w and r["target_l0"] == t
                ]
                assert mine == [r for r in alone_rows if r["site"] == site]
                assert all("width" not in r for r in alone_rows)


def test_resume_of_many_equals_uninterrupted(store_dir: Path, tmp_path: Path) -> None:
    kw = dict(width="16,32", target_l0="4,12", sites="1.resid_post")
    whole = train(_cfg(store_dir, tmp_path / "whole", **kw), progress=False)
    part = tmp_path / "part"
    stopped = train(_cfg(store_dir, part, **kw), progress=False, stop_after=7)  # as if killed at step 7
    assert stopped.steps == 7 and not stopped.folders
    resumed = train(_cfg(store_dir, part, resume=True, **kw), progress=False)
    assert resumed.folders.keys() == whole.folders.keys() and len(whole.folders) == 4
    for key, folder in whole.folders.items():
        _assert_same_params(folder, resumed.folders[key])
    assert resumed.final == whole.final
    assert (part / "metrics.jsonl").read_bytes() == (tmp_path / "whole" / "metrics.jsonl").read_bytes()


def test_the_lists_parse_and_one_value_is_as_before() -> None:
    cfg = TrainConfig(width=" 4096, 16384", target_l0="10,50,150")
    assert widths(cfg) == (4096, 16384) and target_l0s(cfg) == (10.0, 50.0, 150.0)
    assert result_key("6.resid_post", 4096, 50.0, cfg) == "6.resid_post_w4096_l0_50"
    # From the command line one value is text; it is kept as the number it always was.
    one = TrainConfig(width="4096", target_l0="12.5")
    assert (
        one.width == 4096
        and one.target_l0 == 12.5
        and result_key("6.resid_post", 4096, 12.5, one) == ("6.resid_post")
    )


def test_the_command_line_shows_a_row_per_dictionary(store_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["train", "--store", str(store_dir), "--sites", "1.resid_post", "--batch-size", "64"]
    args += ["--tokens", "128", "--device", "cpu"]
    assert run([*args, "--width", "16,32", "--target-l0", "4,8", "--output", str(tmp_path / "m")]) == 0
    shown = capsys.readouterr().out
    for w in (16, 32):
        for t in (4, 8):
            assert f"1.resid_post_w{w}_l0_{t}" in shown
    # One width and one target from the command line: the same run.json settings as from Python.
    assert run([*args, "--width", "16", "--target-l0", "4", "--output", str(tmp_path / "one")]) == 0
    train(
        TrainConfig(
            store=store_dir,
            sites="1.resid_post",
            batch_size=64,
            tokens=128,
            device="cpu",
            width=16,
            target_l0=4.0,
            output=tmp_path / "py",
        ),
        progress=False,
    )
    cli_run, py_run = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "py"))
    del cli_run["config"]["output"], py_run["config"]["output"]
    assert cli_run == py_run and isinstance(cli_run["config"]["width"], int)


def test_torchrun_shares_out_the_longer_list(store_dir: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    kw = dict(sites="1.resid_post", width="16,32", target_l0="4", tokens=64 * 4, lr=3e-3)
    one = train(_cfg(store_dir, tmp_path / "one", **kw), progress=False)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "openscope.cli", "train", "--store", str(store_dir), "--sites", "1.resid_post"]
    cmd += ["--width", "16,32", "--target-l0", "4", "--batch-size", "64", "--tokens", str(64 * 4)]
    cmd += ["--lr", "3e-3", "--lr-warmup-steps", "2", "--sparsity-warmup-steps", "5"]
    cmd += ["--output", str(two), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Each rank has its own threads: the same within float rounding, as in tests/test_train.py.
    for key, folder in one.folders.items():
        a, b = _params(folder), _params(two / folder.name)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    assert set(json.loads((two / "run.json").read_text())["final"]) == set(one.final)
