"""`openscope demo` end to end on the tiny random Gemma 3: every stage's outputs, the explorer on them,
and a rerun that skips every stage without loading the model or rewriting a file."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import free_port, running
from typer.testing import CliRunner

from openscope import demo as demo_module
from openscope.activations.store import ActivationStore
from openscope.cli import app
from openscope.coders.dictionary import load_dictionary
from openscope.demo import STATE, DemoConfig, explorer, run_demo, summary
from openscope.errors import OpenscopeError
from openscope.features.db import FeatureDB
from openscope.models.load import LoadedModel


def tiny_config(model_dir: Path, text: Path, output: Path, **over: Any) -> DemoConfig:
    """Budgets for the tiny model: a few contexts, a few steps, 64 latents."""
    cfg = DemoConfig(
        output=output,
        model=str(model_dir),
        source=f"{text}[:80]",
        eval_source=f"{text}[80:]",
        harvest_tokens=1024,
        train_tokens=2048,
        batch_size=256,
        width=64,
        target_l0=8,
        eval_tokens=512,
        feature_tokens=1024,
        port=free_port(),
        serve=False,
        device="cpu",
    )
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.usefixtures("one_thread")
def test_demo_end_to_end_then_rerun_skips(
    tiny_model_dir: Path, tiny: LoadedModel, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "demo"
    cfg = tiny_config(tiny_model_dir, text_file, root)
    lines: list[str] = []
    result = run_demo(cfg, progress=False, say=lines.append)

    # One header per stage, each run (nothing skipped on a fresh folder).
    assert [ln.split(":")[0] for ln in lines if ln.startswith("[")] == [
        "[1/5] harvest",
        "[2/5] train",
        "[3/5] eval",
        "[4/5] features",
    ]
    assert result.skipped == []
    assert set(result.seconds) == {"model", "harvest", "train", "eval", "features"}

    # harvest: a complete store of the middle layer (3 layers: 1.resid_post) with token ids.
    store = ActivationStore(result.store)
    assert store.complete and store.sites == ["1.resid_post"]
    assert store.manifest["identity"]["source"] == cfg.source

    # train: one JumpReLU SAE folder that loads and binds to the model.
    assert len(result.dictionaries) == 1
    d = load_dictionary(result.dictionaries[0], tiny)
    assert d.site_in.name == "1.resid_post" and d.coder.cfg.width == 64
    assert d.coder.cfg.activation == "jumprelu"
    assert set(result.train_final) == {"1.resid_post"}

    # eval: on the held-out slice, naming the dictionary folder.
    report = json.loads((result.eval_dir / "report.json").read_text())
    assert report == result.report
    assert report["source"] == cfg.eval_source
    [entry] = report["dictionaries"]
    assert Path(entry["folder"]) == result.dictionaries[0]
    assert entry["delta_loss"] is not None and entry["loss_recovered"] is not None
    assert (result.eval_dir / "report.md").is_file()

    # features: complete dashboards of every latent, from the store's tokens.
    name = result.dictionaries[0].name
    with FeatureDB(result.db) as db:
        [info] = db.dictionaries()
        assert info.name == name and info.complete and info.width == 64 and info.alive > 0
        assert info.n_tokens == store.n_rows
        alive = next(f.latent for f in db.features(name, limit=64) if f.frequency > 0)
        assert db.feature(name, alive).top_examples

    text = "\n".join(summary(cfg, result))
    assert "L0" in text and "FVU" in text and "delta loss" in text and str(result.db) in text

    # serve: the explorer on the demo's files answers the API; then shut it down.
    serving = tiny_config(tiny_model_dir, text_file, root, serve=True)
    server = explorer(serving, result, tiny)
    with running(server):
        base = f"http://127.0.0.1:{serving.port}"
        api = get_json(f"{base}/api/info")
        assert api["loaded"] == [name]
        feature = get_json(f"{base}/api/feature?dictionary={name}&latent={alive}")
        assert feature["latent"] == alive and feature["top_examples"]

    # Rerun (through the CLI): every stage skipped, the model never loaded, no file rewritten.
    before = snapshot(root)

    def no_load(*_args: Any, **_kwargs: Any) -> LoadedModel:
        raise AssertionError("a rerun of finished stages must not load the model")

    monkeypatch.setattr(demo_module, "load_model", no_load)
    args = ["demo", "--no-serve", "--output", str(root), "--model", cfg.model, "--source", cfg.source]
    args += ["--eval-source", cfg.eval_source, "--harvest-tokens", "1024", "--train-tokens", "2048"]
    args += ["--batch-size", "256", "--width", "64", "--target-l0", "8", "--eval-tokens", "512"]
    args += ["--feature-tokens", "1024", "--device", "cpu"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert out.output.count("skipped") >= 4 and "L0" in out.output
    assert snapshot(root) == before


def test_demo_refuses_other_settings_and_busy_port(
    tiny_model_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    cfg = tiny_config(tiny_model_dir, text_file, root)
    # A harvest that started with other settings (a record only: nothing else is needed to refuse).
    (root / STATE).write_text(json.dumps({"stages": {"harvest": {"settings": {"tokens": 5}, "done": False}}}))
    with pytest.raises(
        OpenscopeError, match="harvest stage ran with other settings .*choose another --output"
    ):
        run_demo(cfg, progress=False)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OpenscopeError, match=f"cannot listen on 127.0.0.1:{port}"):
            run_demo(tiny_config(tiny_model_dir, text_file, tmp_path / "other", serve=True, port=port))
    assert not (tmp_path / "other").exists()  # refused before any work

    with pytest.raises(OpenscopeError, match="--width must be positive"):
        run_demo(tiny_config(tiny_model_dir, text_file, tmp_path / "x", width=0))
