"""Data-parallel training under torchrun's environment (gloo, processes spawned here, tiny random model):
two replicas, each on half of every global batch, end where one process on the whole batches ends
(JumpReLU, TopK, BatchTopK, a CLT; parameters, Adam state, dead-latent counters, BatchTopK's saved
threshold); dictionary groups x replicas together; a rank killed mid-run resumes to the same end."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException, start_processes

from openscope.errors import OpenscopeError
from openscope.train import TrainConfig, train
from tests.conftest import small_store

STEPS = 20
BATCH = 64

KINDS: dict[str, dict[str, Any]] = {
    "jumprelu": dict(sites="1.resid_post"),
    "topk": dict(sites="1.resid_post", activation="topk", k=4),
    "batchtopk": dict(sites="1.resid_post", activation="batchtopk", k=4),
    "clt": dict(kind="clt", sites="0-1.mlp_in", width=16),
    # Wide and sparse: the sparse forward path (the ones above take the dense one).
    "jumprelu_sparse": dict(sites="1.resid_post", width=512, target_l0=4),
    "batchtopk_sparse": dict(sites="1.resid_post", width=512, activation="batchtopk", k=4),
    # The pre-activation loss on the latents dead for two steps (most of them at this width and L0).
    "jumprelu_preact": dict(sites="1.resid_post", width=512, target_l0=4, revive="preact", dead_tokens=128),
    "clt_preact": dict(kind="clt", sites="0-1.mlp_in", width=16, revive="preact", dead_tokens=128),
}


@pytest.fixture(scope="module")
def store_dir(tiny, tiny_model_dir, tmp_path_factory) -> Path:
    sites = "0.mlp_in,0.mlp_out,1.resid_post,1.mlp_in,1.mlp_out"
    return small_store(tiny, tiny_model_dir, tmp_path_factory.mktemp("store"), sites, "a cat sat on the mat.")


def _cfg(store: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        store=store,
        width=32,
        batch_size=BATCH,
        tokens=BATCH * STEPS,
        lr=3e-3,
        lr_warmup_steps=2,
        sparsity_warmup_steps=5,
        target_l0=6,
        output=out,
        checkpoint_every=5,
        device="cpu",
        log_every=1,
    )
    return TrainConfig(**(base | kw))


# ---- the spawned ranks -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, jobs: list[TrainConfig], kill_at: int | None) -> None:
    """One torchrun-like rank: the environment torchrun sets, then the training runs in order; with
    `kill_at`, the last rank dies abruptly in that step (after the checkpoint before it)."""
    os.environ |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
    }
    torch.set_num_threads(1)
    if kill_at is not None and rank == world - 1:
        import openscope.train.trainer as trainer  # where the trainer looks its step up

        real = trainer.train_step

        def dies(*args: Any, **kw: Any) -> Any:
            if args[5] == kill_at:
                os._exit(1)
            return real(*args, **kw)

        trainer.train_step = dies  # type: ignore[assignment]
    for cfg in jobs:
        train(cfg, progress=False)
    dist.destroy_process_group()


def _spawn(world: int, jobs: list[TrainConfig], kill_at: int | None = None) -> None:
    """Run `jobs` on `world` spawned ranks (each a fresh interpreter, as under torchrun)."""
    start_processes(_rank, args=(world, _free_port(), jobs, kill_at), nprocs=world, start_method="spawn")


# ---- comparing runs --------------------------------------------------------------------------------


def _params(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("params*.safetensors"))
    assert files, f"no dictionary in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _dictionaries(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: _params(p.parent) for p in sorted(run.glob("*/config.json"))}


def _checkpoints(run: Path) -> list[dict[str, Any]]:
    states = []
    for path in sorted(run.glob("checkpoint*.pt")):
        states += torch.load(path, weights_only=True)["dicts"]
    return states


def _assert_same_run(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Same dictionaries (saved parameters within atol), same Adam state and dead-latent counters."""
    da, db = _dictionaries(a), _dictionaries(b)
    assert da.keys() == db.keys() and da
    for name, params in da.items():
        for key, value in params.items():
            torch.testing.assert_close(db[name][key], value, rtol=0, atol=atol, msg=f"{name} {key}")
    for sa, sb in zip(_checkpoints(a), _checkpoints(b), strict=True):
        for key, value in sa["coder"].items():
            torch.testing.assert_close(sb["coder"][key], value, rtol=0, atol=atol, msg=key)
        for group_a, group_b in zip(
            sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True
        ):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(group_b[key], group_a[key], rtol=1e-4, atol=atol, msg=key)
        assert torch.equal(sa["tokens_since_fired"], sb["tokens_since_fired"])


@pytest.fixture(scope="module")
def runs(store_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Every kind trained by 1 process and by 2 data-parallel replicas (one spawn for all of them)."""
    root = tmp_path_factory.mktemp("ddp")
    two = [_cfg(store_dir, root / f"{name}-2", **kw) for name, kw in KINDS.items()]
    _spawn(2, two)
    for name, kw in KINDS.items():
        train(_cfg(store_dir, root / f"{name}-1", **kw), progress=False)
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_replicas_equal_one_process(runs: dict[str, Path], kind: str) -> None:
    one, two = runs[f"{kind}-1"], runs[f"{kind}-2"]
    _assert_same_run(one, two)
    # The run trained for real: its dictionary is far from where it started.
    start = torch.load(one / "checkpoint.pt", weights_only=True)
    assert start["step"] == STEPS
    # A pure data-parallel run writes one checkpoint and one metrics file, as one process does.
    assert sorted(p.name for p in two.glob("*.pt")) == ["checkpoint.pt"]
    assert sorted(p.name for p in two.glob("*.jsonl")) == ["metrics.jsonl"]
    run = json.loads((two / "run.json").read_text())
    assert run["world_size"] == 2 and run["data_parallel"] == 2
    rows_a = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):  # the logged numbers are the whole batch's
        for key in ("loss", "l0", "fvu", "dead"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)


def test_batchtopk_saves_the_single_process_threshold(runs: dict[str, Path]) -> None:
    (folder,) = [p.parent for p in runs["batchtopk-2"].glob("*/config.json")]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "jump_relu" and config["openscope"]["trained_as"] == "batchtopk"


def test_the_trained_dictionaries_moved(runs: dict[str, Path], store_dir: Path, tmp_path: Path) -> None:
    """The comparison means something: 20 steps move the parameters far more than the tolerance."""
    train(_cfg(store_dir, tmp_path / "short", tokens=BATCH, **KINDS["jumprelu"]), progress=False)
    moved = _dictionaries(runs["jumprelu-1"])
    start = _dictionaries(tmp_path / "short")
    (name,) = moved
    delta = max(float((moved[name][k] - start[name][k]).abs().max()) for k in moved[name])
    assert delta > 1e-2


def test_groups_of_replicas_equal_one_process(store_dir: Path, tmp_path: Path) -> None:
    """4 processes = 2 dictionary groups x 2 replicas: two sites, each trained by a pair of replicas."""
    kw = dict(sites="1.resid_post,1.mlp_out", tokens=BATCH * 8)
    _spawn(4, [_cfg(store_dir, tmp_path / "four", data_parallel=2, **kw)])
    train(_cfg(store_dir, tmp_path / "one", **kw), progress=False)
    four = tmp_path / "four"
    assert sorted(p.name for p in four.glob("*.pt")) == ["checkpoint.rank0.pt", "checkpoint.rank1.pt"]
    assert json.loads((four / "run.json").read_text())["data_parallel"] == 2
    _assert_same_run(tmp_path / "one", four)


def test_a_killed_rank_resumes_to_the_uninterrupted_end(
    runs: dict[str, Path], store_dir: Path, tmp_path: Path
) -> None:
    killed = tmp_path / "killed"
    cfg = _cfg(store_dir, killed, **KINDS["batchtopk"])
    with pytest.raises((ProcessExitedException, ProcessRaisedException)):
        _spawn(2, [cfg], kill_at=STEPS - 3)  # the last tenth: BatchTopK's threshold statistics too
    state = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert state["step"] == 15 and not list(killed.glob("*/config.json"))
    _spawn(2, [dataclasses.replace(cfg, resume=True)])
    _assert_same_run(runs["batchtopk-2"], killed, atol=1e-6)
    whole = (runs["batchtopk-2"] / "metrics.jsonl").read_text().splitlines()
    again = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in again] == [json.loads(r)["step"] for r in whole]


def test_a_checkpoint_resumes_only_in_its_layout(runs: dict[str, Path], store_dir: Path) -> None:
    """A 2-replica checkpoint resumed by one process: a one-line error naming the layout to use."""
    cfg = _cfg(store_dir, runs["jumprelu-2"], resume=True, **KINDS["jumprelu"])
    with pytest.raises(OpenscopeError, match=r"2 processes .*torchrun --nproc-per-node 2 --data-parallel 2"):
        train(cfg, progress=False)


def test_bf16_products_train_like_float32(store_dir: Path, tmp_path: Path) -> None:
    """--precision bf16 (autocast; CPU here): float32 weights and the same training within bf16's
    rounding; its checkpoint resumes only in bf16."""
    kw = dict(sites="1.resid_post", tokens=BATCH * 10)
    exact = train(_cfg(store_dir, tmp_path / "f32", **kw), progress=False)
    cfg = _cfg(store_dir, tmp_path / "bf16", precision="bf16", **kw)
    half = train(cfg, progress=False)
    a, b = exact.final["1.resid_post"], half.final["1.resid_post"]
    assert abs(a["fvu"] - b["fvu"]) < 0.02 and abs(a["l0"] - b["l0"]) < 0.5
    params = _params(half.folders["1.resid_post"])
    assert all(v.dtype == torch.float32 for v in params.values())
    with pytest.raises(OpenscopeError, match="precision: 'bf16' there, None now"):
        train(dataclasses.replace(cfg, precision="float32", resume=True), progress=False)
