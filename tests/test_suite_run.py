"""`openscope suite run` and `openscope eval --catalogue` on the tiny random Gemma 3: a six-item suite (two
SAEs of one site, a transcoder and its affine-skip twin, a cross-layer transcoder and a crosscoder).

Meaning, not shapes: one pass of the model feeds every item; a run killed at any moment and run again
ends with the same dictionaries, byte for byte, and the same catalogue as an uninterrupted run, without
touching what was finished; a failing item (NaN, full disk) fails alone; the catalogue's held-out
numbers are those `openscope eval` measures on each dictionary.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import Gemma3ForCausalLM

from openscope.cli import run
from openscope.coders.dictionary import load_dictionary
from openscope.eval import EvalConfig, evaluate
from openscope.models.catalog import dims_of
from openscope.suite.folder import CATALOGUE, MANIFEST, TIMING_FIELDS, SuiteState
from openscope.suite.plan import DataSettings, SuiteItem, SuitePlan, check_plan, item_layer_width
from openscope.suite.planfile import write_plan
from openscope.suite.presets import build_plan
from openscope.suite.run import RunConfig, failure_reason, run_suite
from openscope.suite.schedule import model_passes, schedule

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS, BATCH, CONTEXT = 2048, 128, 32
ITEMS = [
    SuiteItem("resid_post/layer_1_width_32_l0_small", "sae", "1.resid_post", 32, 4, TOKENS),
    SuiteItem("resid_post/layer_1_width_64_l0_small", "sae", "1.resid_post", 64, 4, TOKENS),
    SuiteItem("transcoder/layer_1_width_32_l0_small", "transcoder", "1.mlp_in", 32, 4, TOKENS),
    SuiteItem("transcoder/layer_1_width_32_l0_small_affine", "skip_transcoder", "1.mlp_in", 32, 4, TOKENS),
    SuiteItem("clt/width_96_l0_small", "clt", "0-2.mlp_in", 96, 4, TOKENS),
    SuiteItem("crosscoder/layer_0_2_width_64_l0_small", "crosscoder", "0,2.resid_post", 64, 4, TOKENS),
]
THIRD = ITEMS[2].name
DEFAULTS = {"lr": 3e-3, "checkpoint_every": 4, "log_every": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 short documents: the plan trains on the first 150, `eval --catalogue` holds out the rest."""
    from conftest import CORPUS

    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"Document {i}: {CORPUS[i % 5]}"}) + "\n" for i in range(200))
    )
    return path


def make_plan(model: Path, text: Path, items: list[SuiteItem] = ITEMS, **data: Any) -> SuitePlan:
    settings = {"source": f"{text}[:150]", "context_len": CONTEXT, "batch_size": BATCH, "dtype": "float32"}
    return SuitePlan(str(model), list(items), DataSettings(**{**settings, **data}), defaults=dict(DEFAULTS))


def plan_file(folder: Path, plan: SuitePlan, name: str = "plan.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_plan(plan, folder / name, overwrite=True)


def suite_run(plan: Path, out: Path, *extra: str) -> int:
    return run(["suite", "run", str(plan), "--output", str(out), "--device", "cpu", *extra])


def dictionary_bytes(out: Path) -> dict[str, bytes]:
    """Every file of every item's folder, by path below the suite folder."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for item in ITEMS
        for p in sorted((out / item.name).rglob("*"))
        if p.is_file()
    }


def mtimes(out: Path, names: list[str]) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for name in names for p in (out / name).rglob("*")}


def catalogue(out: Path, timing: bool = False) -> dict[str, Any]:
    doc = json.loads((out / CATALOGUE).read_text())
    if not timing:
        for entry in doc["items"]:
            for key in TIMING_FIELDS:
                entry.pop(key)
    return doc


class Forwards:
    """Contexts run through the tiny model (every forward of harvest, live training and eval)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.contexts = 0
        real = Gemma3ForCausalLM.forward

        def counted(model: Any, input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
            self.contexts += int(input_ids.shape[0])
            return real(model, input_ids, *args, **kwargs)

        monkeypatch.setattr(Gemma3ForCausalLM, "forward", counted)


@pytest.fixture
def suite_plan(tiny_model_dir: Path, text: Path, tmp_path: Path) -> Path:
    return plan_file(tmp_path / "plans", make_plan(tiny_model_dir, text))


# ---- the schedule ----------------------------------------------------------------------------------------


def test_items_that_read_the_same_sites_share_a_run(tiny_model_dir: Path, text: Path) -> None:
    plan = make_plan(tiny_model_dir, text)
    sched = schedule(plan, dims_of(str(tiny_model_dir)))
    runs = [[item.name for item in g.items] for g in sched.groups]
    assert runs == [[i.name for i in ITEMS[:2]]] + [[i.name] for i in ITEMS[2:]]
    assert sched.store is not None and model_passes(sched) == 1
    every = {f"{layer}.{kind}" for layer in range(3) for kind in ("resid_post", "mlp_in", "mlp_out")}
    assert set(sched.store.sites) == every and sched.store.tokens == TOKENS
    live = schedule(make_plan(tiny_model_dir, text, activations="live"), dims_of(str(tiny_model_dir)))
    assert live.store is None and model_passes(live) == len(live.groups) == 5


def test_the_gemma_scope_2_catalogue_trains_in_full_cross_products() -> None:
    dims = dims_of("gemma-3-270m")
    plan = build_plan("gemma-3-270m", dims, "gemma-scope-2", scale=0.004, tokens=1_000_000)
    check_plan(plan, dims)
    sched = schedule(plan, dims)
    placed = Counter(item.name for g in sched.groups for item in g.items)
    assert set(placed) == {i.name for i in plan.items} and set(placed.values()) == {1}
    for g in sched.groups:
        if g.kind in ("clt", "skip_clt", "crosscoder"):
            assert len(g.items) == 1
            continue
        cross = {(s, w, t) for s in g.sites for w in g.widths for t in g.targets}
        mine = {(f"{i.sites}", item_layer_width(i, 18), float(i.target_l0)) for i in g.items}
        assert mine == cross and len(g.items) == len(cross)  # each dictionary once, nothing extra
    # Layer 5's three SAE sites at 16k and 262k: the sweep's targets and the all-layer set's ramped ones.
    first = sched.groups[0]
    assert first.sites == ("5.attn_out", "5.mlp_out", "5.resid_post") and len(first.items) == 3 * 2 * 5
    # The residual stream's 65k and 1m at the four sweep layers, one run of 24 dictionaries.
    sweep = next(
        g
        for g in sched.groups
        if g.sites == ("5.resid_post", "9.resid_post", "12.resid_post", "15.resid_post")
    )
    assert len(sweep.items) == 4 * 2 * 3 and sweep.stored
    assert model_passes(sched) == 1 and len(sched.groups) == 61 and len(plan.items) == 555


# ---- a whole run ---------------------------------------------------------------------------------------


def test_a_suite_trains_every_item_from_one_pass_of_the_model(
    suite_plan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forwards = Forwards(monkeypatch)
    out = tmp_path / "suite"
    assert suite_run(suite_plan, out) == 0
    store = json.loads((out / "activations" / "all" / "manifest.json").read_text())
    assert (
        forwards.contexts == store["n_contexts"] == math.ceil(TOKENS / CONTEXT)
    )  # one harvest, nothing else
    doc = catalogue(out)
    assert [e["name"] for e in doc["items"]] == [i.name for i in ITEMS]
    assert doc["counts"] == {"pending": 0, "running": 0, "done": 6, "failed": 0}
    for item, entry in zip(ITEMS, doc["items"], strict=True):
        d = load_dictionary(out / item.name)
        assert d.coder.kind == item.kind and d.coder.cfg.width == entry["layer_width"]
        assert (
            entry["status"] == "done"
            and entry["tokens_seen"] == TOKENS
            and entry["measured_on"] == "training"
        )
        assert 0 < entry["l0"] < 16 and 0 < entry["fvu"] < 1.5 and entry["delta_loss"] is None
    assert not list((out / "runs").rglob("checkpoint.pt"))  # finished runs keep metrics, not checkpoints
    before = mtimes(out, [i.name for i in ITEMS])
    assert suite_run(suite_plan, out) == 0  # everything finished: nothing runs, nothing is touched
    assert forwards.contexts == store["n_contexts"] and mtimes(out, [i.name for i in ITEMS]) == before


def test_a_live_suite_runs_the_model_once_per_group(
    tiny_model_dir: Path, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openscope.train.loop as loop

    made: list[int] = []
    real = loop.LiveActivations

    class Counted(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loop, "LiveActivations", Counted)
    plan = make_plan(tiny_model_dir, text, ITEMS[:3], activations="live")
    result = run_suite(RunConfig(plan=plan_file(tmp_path, plan), output=tmp_path / "suite", device="cpu"))
    assert sorted(result.done) == sorted(i.name for i in ITEMS[:3]) and not result.failed
    assert len(made) == result.passes == 2  # the two SAEs share one pass, the transcoder has its own
    assert not (tmp_path / "suite" / "activations").exists()


# ---- kill -9 at any moment ---------------------------------------------------------------------------------


def _kill_at_a_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    import openscope.train.trainer as trainer

    real = trainer.save_checkpoint

    def killed(path: Path, step: int, *args: Any, **kwargs: Any) -> None:
        if "001_transcoder" in str(path) and step == 8:  # the third item's run, after its first checkpoint
            raise KeyboardInterrupt
        real(path, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", killed)


def _kill_while_placing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = SuiteState.finish

    def killed(self: SuiteState, name: str) -> None:
        if name == THIRD:  # its folder is in place, the manifest does not say so yet
            raise KeyboardInterrupt
        real(self, name)

    monkeypatch.setattr(SuiteState, "finish", killed)


@pytest.mark.parametrize("kill", [_kill_at_a_checkpoint, _kill_while_placing], ids=["checkpoint", "placing"])
def test_a_killed_suite_resumes_to_what_an_uninterrupted_one_makes(
    suite_plan: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kill: Callable[[pytest.MonkeyPatch], None],
) -> None:
    out = tmp_path / "suite"  # the same folder both times: provenance records its paths
    assert suite_run(suite_plan, out) == 0
    whole, whole_catalogue = dictionary_bytes(out), catalogue(out)
    shutil.rmtree(out)
    with monkeypatch.context() as m:
        kill(m)
        assert suite_run(suite_plan, out) == 130
    first = [i.name for i in ITEMS[:2]]
    assert [e["status"] for e in catalogue(out)["items"]][:3] == ["done", "done", "running"]
    before = mtimes(out, first)
    assert suite_run(suite_plan, out) == 0
    assert mtimes(out, first) == before  # finished items untouched
    assert dictionary_bytes(out) == whole
    assert catalogue(out) == whole_catalogue


# ---- failures --------------------------------------------------------------------------------------------


def test_a_nan_fails_that_item_only(
    tiny_model_dir: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [*ITEMS[:2], SuiteItem(THIRD, "transcoder", "1.mlp_in", 32, 4, TOKENS, {"lr": 1e30})]
    plan = plan_file(tmp_path, make_plan(tiny_model_dir, text, items))
    out = tmp_path / "suite"
    assert suite_run(plan, out) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"1 of 3 items failed: {THIRD} (loss became" in err[0]
    doc = catalogue(out)
    assert [e["status"] for e in doc["items"]] == ["done", "done", "failed"]
    assert "lower --lr" in doc["items"][2]["reason"] and doc["counts"]["failed"] == 1
    assert not (out / THIRD).exists()


def test_a_nan_in_one_dictionary_of_a_shared_run_fails_that_item_only(
    tiny_model_dir: Path, text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two SAEs of one site train from one pass (one run); the 64-wide one's loss turns NaN at step 3:
    it fails with the reason, the 32-wide one is trained and placed as if alone, and a rerun retries
    only the failed item."""
    import openscope.train.trainer as trainer

    real = trainer.train_step

    def poisoned(coder: Any, optimizer: Any, x: Any, y: Any, cfg: Any, step: int, *rest: Any) -> Any:
        stats = real(coder, optimizer, x, y, cfg, step, *rest)
        return stats._replace(loss=math.nan) if coder.cfg.width == 64 and step >= 3 else stats

    plan = plan_file(tmp_path, make_plan(tiny_model_dir, text, ITEMS[:2]))
    out = tmp_path / "suite"
    with monkeypatch.context() as m:
        m.setattr(trainer, "train_step", poisoned)
        result = run_suite(RunConfig(plan=plan, output=out, device="cpu"))
    assert result.done == [ITEMS[0].name] and list(result.failed) == [ITEMS[1].name]
    assert "loss became nan at step 3" in str(result.failed[ITEMS[1].name])
    assert (out / ITEMS[0].name / "params.safetensors").is_file() and not (out / ITEMS[1].name).exists()
    alone = tmp_path / "alone"
    run_suite(
        RunConfig(
            plan=plan_file(tmp_path / "p2", make_plan(tiny_model_dir, text, ITEMS[:1])),
            output=alone,
            device="cpu",
        )
    )
    assert (out / ITEMS[0].name / "params.safetensors").read_bytes() == (
        alone / ITEMS[0].name / "params.safetensors"
    ).read_bytes()
    again = run_suite(
        RunConfig(plan=plan, output=out, device="cpu")
    )  # healthy now: the failed item is retried
    assert again.done == [ITEMS[1].name] and not again.failed


def test_a_full_disk_fails_the_item_and_keeps_what_is_finished(
    suite_plan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openscope.train.trainer as trainer

    out = tmp_path / "suite"
    real = trainer.save_checkpoint

    def full(path: Path, *args: Any, **kwargs: Any) -> None:
        if "001_transcoder" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(trainer, "save_checkpoint", full)
        result = run_suite(RunConfig(plan=suite_plan, output=out, device="cpu"))
    assert list(result.failed) == [THIRD] and str(result.failed[THIRD]).startswith("disk full (No space left")
    assert len(result.done) == 5
    finished = [i.name for i in ITEMS if i.name != THIRD]
    before = mtimes(out, finished)
    again = run_suite(RunConfig(plan=suite_plan, output=out, device="cpu"))  # space again: it is retried
    assert again.done == [THIRD] and sorted(again.skipped) == sorted(finished) and not again.failed
    assert mtimes(out, finished) == before


def test_failure_reasons_are_one_line() -> None:
    assert failure_reason(MemoryError()) == "out of memory (MemoryError)"
    assert failure_reason(RuntimeError("CUDA out of memory.\nTried to allocate")) == (
        "out of memory (CUDA out of memory. Tried to allocate)"
    )
    assert str(failure_reason(OSError(errno.EACCES, "Permission denied", "/x"))).startswith("PermissionError")
    assert failure_reason(ValueError("a bug")) is None


# ---- the output folder -------------------------------------------------------------------------------------


def test_an_output_holding_another_plan_is_replaced_only_with_overwrite(
    tiny_model_dir: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "suite"
    one = plan_file(tmp_path, make_plan(tiny_model_dir, text, ITEMS[:1]), "one.yaml")
    two = plan_file(tmp_path, make_plan(tiny_model_dir, text, ITEMS[2:3]), "two.yaml")
    assert suite_run(one, out) == 0
    before = mtimes(out, ["."])
    assert suite_run(two, out) == 2
    assert "holds the suite of another plan (1 items" in capsys.readouterr().err
    assert mtimes(out, ["."]) == before
    assert suite_run(two, out, "--overwrite") == 0
    assert [e["name"] for e in catalogue(out)["items"]] == [ITEMS[2].name] and not (
        out / ITEMS[0].name
    ).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.yaml",
        "suite",
        "two.yaml",
    ]  # nothing staged left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's notes")
    assert suite_run(two, tmp_path / "mine", "--overwrite") == 2
    assert "holds notes.txt" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").is_file()


# ---- eval --catalogue ---------------------------------------------------------------------------------------


def test_eval_catalogue_measures_every_item_on_held_out_text(
    suite_plan: Path, tiny_model_dir: Path, tmp_path: Path, tiny: Any
) -> None:
    out = tmp_path / "suite"
    assert suite_run(suite_plan, out) == 0
    flags = ["--tokens", "64", "--context-len", str(CONTEXT), "--batch-size", "2", "--device", "cpu"]
    assert run(["eval", "--catalogue", str(out), *flags]) == 0
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["source"].endswith("docs.jsonl[150:]") and report["held_out"]
    assert set(report["figures"]) == {
        "l0_vs_delta_loss.png",
        "l0_vs_fvu.png",
        "width_ladder.png",
        "skip_vs_no_skip.png",
    }
    assert all((out / "eval" / f).is_file() for f in report["figures"])
    doc = catalogue(out)
    assert doc["evaluation"]["source"] == report["source"] and doc["evaluation"]["report"] == "eval"
    # The held-out numbers are those `openscope eval` measures on the dictionary alone.
    item = ITEMS[3]
    alone = evaluate(
        EvalConfig(
            dictionaries=[out / item.name],
            source=report["source"],
            tokens=64,
            context_len=CONTEXT,
            batch_size=2,
            output=tmp_path / "alone",
            device="cpu",
        ),
        loaded=tiny,
        progress=False,
    ).dictionaries[0]
    entry = next(e for e in doc["items"] if e["name"] == item.name)
    assert entry["measured_on"] == "evaluation" and entry["eval"]["kl"] == pytest.approx(alone.lm.kl)
    assert entry["delta_loss"] == pytest.approx(alone.lm.delta_loss) and entry["fvu"] == pytest.approx(
        alone.recon.fvu
    )
    # A rerun of the finished suite keeps the held-out numbers in its catalogue.
    assert suite_run(suite_plan, out) == 0 and catalogue(out) == doc
    assert run(["eval", "--catalogue", str(out), *flags]) == 2  # the report is there: --overwrite replaces it


def test_the_manifest_records_the_plan(suite_plan: Path, tmp_path: Path) -> None:
    out = tmp_path / "suite"
    run_suite(RunConfig(plan=suite_plan, output=out, device="cpu"))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "openscope-suite" and len(manifest["plan"]["items"]) == len(ITEMS)
    assert (out / "plan.yaml").read_text() == suite_plan.read_text()
