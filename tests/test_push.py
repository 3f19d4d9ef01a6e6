"""`openscope push`: the Hub-ready folder (dry run) and what would be uploaded (HfApi replaced at the
huggingface_hub boundary: no network). The folder's dictionaries load back equal to the originals, its
model card carries the recipe, the data and the evaluation of exactly these dictionaries, and the
token reaches HfApi alone: never a file, never a log line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, ClassVar

import huggingface_hub
import pytest
import torch
from conftest import small_store
from test_suite_run import TOKENS, make_plan, plan_file, suite_run

from openscope.cli import run
from openscope.coders.dictionary import find_dictionaries, load_dictionary
from openscope.eval import EvalConfig, evaluate
from openscope.models.load import LoadedModel
from openscope.suite.plan import SuiteItem
from openscope.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "hf_TESTtoken0123456789abcdefSECRET"
REPO = "someone/tiny-saes"


@pytest.fixture(scope="module")
def trained(tiny: LoadedModel, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training output (two widths) and, beside it in eval/, their evaluation report."""
    root = tmp_path_factory.mktemp("push")
    store = small_store(tiny, tiny_model_dir, root, "1.resid_post", "The capital of France is Paris.")
    train(
        TrainConfig(
            store=store,
            width="16,32",
            batch_size=128,
            tokens=512,
            target_l0=4,
            output=root / "run" / "dictionaries",
            device="cpu",
        ),
        progress=False,
    )
    evaluate(
        EvalConfig(
            dictionaries=[root / "run" / "dictionaries"],
            model=str(tiny_model_dir),
            source=str(root / "docs.jsonl"),
            tokens=256,
            context_len=32,
            output=root / "run" / "eval",
            loss_recovered=False,
            device="cpu",
        ),
        loaded=tiny,
        progress=False,
    )
    return root / "run" / "dictionaries"


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither HF_TOKEN nor a stored login."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records every call, and what the folder held at upload."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    uploaded: ClassVar[dict[str, bytes]] = {}

    def __init__(self, token: str | None = None) -> None:
        FakeHub.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kw: Any) -> str:
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, **kw: Any) -> None:
        FakeHub.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw: Any) -> Any:
        FakeHub.calls.append(("upload_folder", kw))
        folder = Path(kw["folder_path"])
        FakeHub.uploaded = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }

        class Commit:
            commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/abc"

        return Commit()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHub]:
    FakeHub.calls, FakeHub.uploaded = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


def _same_coder(a: Path, b: Path) -> None:
    da, db = load_dictionary(a), load_dictionary(b)
    x = torch.randn(64, da.coder.cfg.d_in, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(db.coder(x), da.coder(x), rtol=0, atol=0)
    assert (da.site_in, da.site_out) == (db.site_in, db.site_out)


def test_a_dry_run_writes_the_hub_folder_without_a_token(
    trained: Path, tmp_path: Path, no_token, fake_hub
) -> None:
    out = tmp_path / "hub"
    assert run(["push", str(trained), "--repo", REPO, "--dry-run", "--out", str(out)]) == 0
    assert fake_hub.calls == []  # nothing left the machine
    sources = find_dictionaries(trained)
    assert len(sources) == 2
    for src in sources:
        folder = out / src.name
        assert {p.name for p in folder.iterdir()} == {"config.json", "params.safetensors"}
        _same_coder(src, folder)  # the published weights are the trained ones
    report = json.loads((trained.parent / "eval" / "report.json").read_text())
    assert json.loads((out / "eval" / "report.json").read_text()) == report
    plots = sorted(p.name for p in (trained.parent / "eval").glob("*.png"))
    assert plots and sorted(p.name for p in (out / "eval").glob("*.png")) == plots

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: openscope\n")
    for src in sources:
        assert f"hf://{REPO}/{src.name}" in card or f"`{src.name}`" in card
    for plot in plots:
        assert f"(eval/{plot})" in card  # the plots are shown
    # The evaluation table: each dictionary's row has the report's numbers.
    for entry in report["dictionaries"]:
        name = Path(entry["folder"]).name
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {entry['l0']:.1f} | {entry['fvu']:.4f} |" in row
        assert f"{entry['delta_loss']:.4f}" in row
    # The recipe: the shared settings once, the widths where they differ; and the data.
    recipe = json.loads((sources[0] / "config.json").read_text())["openscope"]
    assert "| `target_l0` | `4.0` |" in card or "| `target_l0` | `4` |" in card
    width_line = next(line for line in card.splitlines() if line.startswith("| folder |") and "width" in line)
    assert width_line and recipe["data"] in card
    assert str(recipe["tokens_seen"]) in card


def test_the_upload_hands_the_folder_to_huggingface_hub(
    trained: Path, tmp_path: Path, fake_hub, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "hub"
    with caplog.at_level(logging.DEBUG):
        status = run(
            ["push", str(trained), "--repo", REPO, "--out", str(out), "--private", "--revision", "v1"]
        )
    assert status == 0
    names = [c[0] for c in fake_hub.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    calls = dict(fake_hub.calls)
    assert calls["init"] == {"token": TOKEN}
    assert calls["create_repo"]["repo_id"] == REPO and calls["create_repo"]["private"] is True
    assert calls["create_branch"]["branch"] == "v1"
    up = calls["upload_folder"]
    assert (up["repo_id"], up["revision"], Path(up["folder_path"])) == (REPO, "v1", out)
    written = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert fake_hub.uploaded == written and "README.md" in written
    assert all(TOKEN.encode() not in data for data in written.values())
    assert TOKEN not in caplog.text and TOKEN not in "".join(capsys.readouterr())


def test_a_folder_that_would_carry_the_token_is_not_uploaded(
    trained: Path, tmp_path: Path, fake_hub, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    copy = tmp_path / "dicts"
    shutil.copytree(trained, copy)
    config = next(copy.rglob("config.json"))
    doc = json.loads(config.read_text())
    doc["openscope"]["command_line"] = f"openscope train --note {TOKEN}"
    config.write_text(json.dumps(doc))
    assert run(["push", str(copy), "--repo", REPO, "--out", str(tmp_path / "hub")]) == 2
    assert "would publish your Hub token" in capsys.readouterr().err
    assert [c[0] for c in fake_hub.calls] == [] and not (tmp_path / "hub").exists()


def test_a_suite_is_one_repository_with_its_catalogue(
    tiny_model_dir: Path, tmp_path: Path, no_token, fake_hub
) -> None:
    from conftest import CORPUS

    text = tmp_path / "docs.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"Document {i}: {CORPUS[i % 5]}"}) + "\n" for i in range(200))
    )
    items = [
        SuiteItem("resid_post/layer_1_width_32_l0_small", "sae", "1.resid_post", 32, 4, TOKENS),
        SuiteItem("transcoder/layer_1_width_32_l0_small", "transcoder", "1.mlp_in", 32, 4, TOKENS),
    ]
    suite = tmp_path / "suite"
    assert suite_run(plan_file(tmp_path / "plans", make_plan(tiny_model_dir, text, items)), suite) == 0
    out = tmp_path / "hub"
    assert run(["push", str(suite), "--repo", REPO, "--dry-run", "--out", str(out)]) == 0
    for item in items:  # Gemma Scope 2's folder names, so hf://REPO/resid_post/layer_1_... loads it
        _same_coder(suite / item.name, out / item.name)
    assert json.loads((out / "catalogue.json").read_text()) == json.loads(
        (suite / "catalogue.json").read_text()
    )
    card = (out / "README.md").read_text()
    assert "## Suite" in card and f"hf://{REPO}/{items[0].name}" in card
    assert not (out / "runs").exists() and not (out / "suite.json").exists()  # training state stays home


def test_overwrite_replaces_only_a_push_folder(trained: Path, tmp_path: Path, no_token, capsys) -> None:
    out = tmp_path / "hub"
    args = ["push", str(trained), "--repo", REPO, "--dry-run", "--out", str(out)]
    assert run(args) == 0
    assert run(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert run([*args, "--overwrite"]) == 0
