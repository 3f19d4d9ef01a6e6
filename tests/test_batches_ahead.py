"""Batches assembled ahead in a background thread (`--batches-ahead`, on by default on CUDA): the same
items in the same order, failures where they happened, a thread that stops with its consumer, and a
training run that equals one without it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openscope.activations.batches import batches_ahead
from openscope.errors import OpenscopeError
from openscope.train import TrainConfig, train
from tests.conftest import small_store, tiny_train_config


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_items_in_the_same_order(depth: int):
    assert list(batches_ahead(iter(range(50)), depth)) == list(range(50))
    assert list(batches_ahead(iter(()), depth)) == []


@pytest.mark.parametrize("depth", [0, 2])
def test_a_failure_raises_in_the_consumer_after_the_items_before_it(depth: int):
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise OpenscopeError("shard 3 is corrupt")

    got = []
    with pytest.raises(OpenscopeError, match="shard 3 is corrupt"):
        for item in batches_ahead(items(), depth):
            got.append(item)
    assert got == [1, 2]


def _threads() -> int:
    return sum(t.name == "batches-ahead" for t in threading.enumerate())


def test_a_consumer_that_stops_early_stops_the_thread():
    drawn = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            drawn.append(i)
            yield i
            i += 1

    stream = batches_ahead(endless(), 2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    deadline = time.monotonic() + 5
    while _threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _threads() == 0
    assert len(drawn) <= 3 + 2 + 1  # never more than `depth` (and the one in hand) ahead


@pytest.fixture(scope="module")
def store_dir(tiny, tiny_model_dir, tmp_path_factory) -> Path:
    return small_store(
        tiny, tiny_model_dir, tmp_path_factory.mktemp("store"), "*.mlp_in,*.mlp_out,1.resid_post", "a b c d."
    )


@pytest.mark.parametrize("kind", ["sae", "clt"])
def test_training_with_batches_ahead_equals_training_without(store_dir: Path, tmp_path: Path, kind: str):
    extra = {"kind": "clt", "sites": "all", "target_l0": 6} if kind == "clt" else {}
    runs = {}
    for ahead in (0, 2):
        cfg = tiny_train_config(store_dir, tmp_path / f"a{ahead}", batches_ahead=ahead, **extra)
        runs[ahead] = train(cfg, progress=False)
    for key, folder in runs[0].folders.items():
        for name in (p.name for p in folder.glob("*.safetensors")):
            a, b = load_file(str(folder / name)), load_file(str(runs[2].folders[key] / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resuming_with_another_batches_ahead_is_allowed(store_dir: Path, tmp_path: Path):
    """How batches are read is not part of a run's identity: a checkpoint resumes with any setting."""
    train(tiny_train_config(store_dir, tmp_path / "r", batches_ahead=0), progress=False, stop_after=7)
    resumed = train(
        tiny_train_config(store_dir, tmp_path / "r", batches_ahead=2, resume=True), progress=False
    )
    assert resumed.steps == 20


def test_a_negative_count_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(OpenscopeError, match="--batches-ahead must be 0 or more, got -1"):
        TrainConfig(store=tmp_path, batches_ahead=-1)


def test_a_live_model_never_reads_ahead(tmp_path: Path):
    """A live model's forward stays in the step's thread: its hooks would otherwise meet the step's own."""
    from openscope.train.loop import ahead_count

    with pytest.raises(OpenscopeError, match="--batches-ahead reads a store ahead"):
        TrainConfig(model="gemma-3-270m", batches_ahead=2)
    assert ahead_count(TrainConfig(model="gemma-3-270m"), "cuda") == 0
    assert ahead_count(TrainConfig(store=tmp_path), "cuda") == 2
    assert ahead_count(TrainConfig(store=tmp_path), "cpu") == 0
    assert ahead_count(TrainConfig(store=tmp_path, batches_ahead=3), "cpu") == 3


def test_stopping_early_closes_the_source():
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.set()

    stream = batches_ahead(source(), 2)
    assert next(stream) == 0
    stream.close()
    assert closed.wait(5)


def _readers() -> list[str]:
    names = ("store-reader", "batches-ahead")
    deadline = time.monotonic() + 5
    while any(t.name.startswith(names) for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [t.name for t in threading.enumerate() if t.name.startswith(names)]


@pytest.mark.parametrize("ahead", [0, 2])
def test_a_failed_run_leaves_no_reader_thread(store_dir: Path, tmp_path: Path, ahead: int, monkeypatch):
    """The run closes its batches however its loop ends: the store's read-ahead and this thread stop then,
    even while a kept traceback (a notebook, a test) holds the run's frames alive."""
    import openscope.train.trainer as trainer

    real, calls = trainer.train_step, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("a step failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", failing)
    with pytest.raises(RuntimeError, match="a step failed") as kept:
        train(tiny_train_config(store_dir, tmp_path / "t", batches_ahead=ahead), progress=False)
    assert kept.traceback and _readers() == []
