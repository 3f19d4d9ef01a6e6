"""Distributed harvest: 2 gloo processes (started as torchrun starts them) write one store whose rows are
exactly those of a 1-process store; killed, each rank resumes; the wrong number of ranks is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openscope.activations import ActivationStore, HarvestConfig, harvest
from openscope.errors import OpenscopeError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model_dir: Path, source: Path, out: str | Path, tokens: int) -> list[str]:
    cli = [sys.executable, "-m", "openscope.cli", "harvest", "--model", str(model_dir)]
    data = ["--sites", "*.resid_post,1.mlp_out", "--source", str(source), "--tokens", str(tokens)]
    shape = ["--context-len", "32", "--batch-size", "2", "--shard-mb", "1", "--device", "cpu"]
    return [*cli, *data, *shape, "--output", str(out)]


def _ranks(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """`world` processes with the environment torchrun gives its workers (gloo on CPU)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


def _rows(store: ActivationStore) -> set[tuple]:
    """Every stored row: (context, position, token id, the bytes of each site's activations)."""
    rows = set()
    for i in range(len(store.shards)):
        shard = store.read_shard(i, [*store.sites, "token_ids", "context", "position"])
        for r in range(len(shard["token_ids"])):
            acts = tuple(shard[s][r].numpy().tobytes() for s in store.sites)
            rows.add((int(shard["context"][r]), int(shard["position"][r]), int(shard["token_ids"][r]), *acts))
    return rows


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"Document {i} talks about Paris and Rome."}) + "\n" for i in range(2000))
    )
    return path


def _one_process(tiny, model_dir: Path, source: Path, out: Path, tokens: int) -> ActivationStore:
    cfg = HarvestConfig(
        model=str(model_dir),
        sites="*.resid_post,1.mlp_out",
        source=str(source),
        tokens=tokens,
        context_len=32,
        batch_size=2,
        output=out,
        shard_mb=1,
        device="cpu",
    )
    harvest(cfg, loaded=tiny, progress=False)
    return ActivationStore(out)


def test_two_ranks_store_the_rows_of_one(tiny, tiny_model_dir, source, tmp_path):
    single = _one_process(tiny, tiny_model_dir, source, tmp_path / "one", 6000)
    out = tmp_path / "two"
    _wait(_ranks(_args(tiny_model_dir, source, out, 6000)))
    two = ActivationStore(out)
    assert two.complete and two.manifest["ranks"] == 2 and len(two.shards) == len(single.shards) >= 4
    assert {s["file"].split(".")[1] for s in two.shards} == {"rank0", "rank1"}  # shards named by rank
    assert sorted(p.name for p in out.glob("manifest*.json")) == ["manifest.json"]  # one manifest
    assert _rows(two) == _rows(single)
    assert two.manifest["stats"] == single.manifest["stats"] and two.n_rows == single.n_rows
    for site in two.sites:
        torch.testing.assert_close(two.mean(site), single.mean(site), rtol=0, atol=0)
    # Into a file:// URL too (shards uploaded whole, the manifest last).
    url = f"file://{tmp_path / 'two-url'}"
    _wait(_ranks(_args(tiny_model_dir, source, url, 6000)))
    assert _rows(ActivationStore(url)) == _rows(single)


def test_killed_ranks_resume_and_the_rank_count_is_kept(tiny, tiny_model_dir, source, tmp_path):
    tokens = 12000  # 12 shards: 6 a rank, so the kill lands mid-run
    single = _one_process(tiny, tiny_model_dir, source, tmp_path / "one", tokens)
    out = tmp_path / "two"
    args = _args(tiny_model_dir, source, out, tokens)
    procs = _ranks(args)
    deadline = time.time() + 180
    while time.time() < deadline and all(p.poll() is None for p in procs):
        try:
            if all(
                len(json.loads((out / f"manifest.rank{r}.json").read_text())["shards"]) >= 1 for r in (0, 1)
            ):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (out / "manifest.json").exists(), "the kill came after the end"
    done = [len(json.loads((out / f"manifest.rank{r}.json").read_text())["shards"]) for r in (0, 1)]
    assert min(done) >= 1
    # One process cannot resume a store 2 ranks are harvesting (nor can 3).
    with pytest.raises(OpenscopeError, match="harvested by 2 process.*this run has 1.*--nproc-per-node 2"):
        _one_process(tiny, tiny_model_dir, source, out, tokens)
    three = _ranks(args, world=3)
    errors = [p.communicate(timeout=300)[1] for p in three]
    assert all(p.returncode == 2 for p in three) and "this run has 3" in errors[0], errors
    _wait(_ranks(args))
    two = ActivationStore(out)
    assert two.complete and _rows(two) == _rows(single)
