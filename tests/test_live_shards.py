"""Live training sharded over data-parallel replicas: each replica runs the model on its own share of
every block of contexts (disjoint, together the whole block), all replicas serve the same number of
batches per block, and a 2-process `--data-parallel 2` live run trains, and resumed after a rank was
killed ends where an uninterrupted one ends."""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException, start_processes

from openscope.activations.live import LiveActivations
from openscope.data.contexts import LabelledContext
from openscope.errors import OpenscopeError
from openscope.models import parse_sites
from openscope.train import TrainConfig, train

CONTEXT = 32
BLOCK_TOKENS = 512  # 16 contexts a block (forward batches of 4): 8 per replica
BATCH = 64


@pytest.fixture
def words(tmp_path: Path) -> Path:
    """A text source of seeded random words: no two stretches of text alike, so rows are told apart."""
    rng = random.Random(0)
    vocab = ["cat", "dog", "sat", "on", "the", "mat", "Paris", "Rome", "capital", "sparse", "feature", "day"]
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 40))) for _ in range(300)]
    path = tmp_path / "words.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _live(tiny: Any, source: Path, shard: tuple[int, int] = (0, 1), cls: type = LiveActivations) -> Any:
    sites = parse_sites("1.resid_post", tiny.n_layers)
    return cls(tiny, sites, str(source), CONTEXT, forward_batch=4, block_tokens=BLOCK_TOKENS, shard=shard)


def _rows(acts: dict[str, torch.Tensor] | Any) -> list[tuple[float, ...]]:
    """Each row as (token id, position, its activation rounded): activations tell contexts apart."""
    if isinstance(acts, dict):
        ids, pos, x = acts["token_ids"], acts["position"], acts["1.resid_post"]
    else:
        ids, pos, x = acts.token_ids, acts.position, acts.acts["1.resid_post"]
    return [
        (int(i), int(p), *x[r].round(decimals=4).tolist())
        for r, (i, p) in enumerate(zip(ids, pos, strict=True))
    ]


class _Forwards:
    """Counts the contexts the model's first layer runs on."""

    def __init__(self, tiny: Any) -> None:
        self.contexts = 0
        self.handle = tiny.arch.layers[0].register_forward_hook(self._seen)

    def _seen(self, _module: Any, args: Any, _out: Any) -> None:
        self.contexts += args[0].shape[0]


def test_replicas_forward_disjoint_shares_of_a_block(tiny, words, one_thread):
    whole = _live(tiny, words)
    chunk = list(itertools.islice(whole.contexts(), whole.block_contexts))
    assert len(chunk) == 16
    everything = Counter(_rows(whole.block(chunk)))
    # Rows are told apart (but for a few text starts alike): the comparisons below mean something.
    assert len(everything) > 0.9 * everything.total()

    shares, served = [], []
    for index in range(2):
        live = _live(tiny, words, (index, 2))
        per_block = min(live._rows_in(chunk[i::2]) for i in range(2)) // (BATCH // 2)
        forwards = _Forwards(tiny)
        try:
            batches = list(itertools.islice(live.batches(BATCH), per_block))  # the first block's batches
        finally:
            forwards.handle.remove()
        assert forwards.contexts == 8  # its own 8 contexts of the block, not all 16
        assert all(b.token_ids.shape[0] == BATCH // 2 for b in batches)
        shares.append(Counter(_rows(live.block(chunk[index::2]))))
        served.append(Counter(r for b in batches for r in _rows(b)))

    # Together the whole block, each row once: so the shares are disjoint (but for rows alike).
    assert shares[0] + shares[1] == everything
    once = {row for row, n in everything.items() if n == 1}
    assert not set(served[0]) & set(served[1]) & once
    for index in range(2):  # each serves its own rows, none twice
        assert served[index] <= shares[index] and served[index].total() == per_block * BATCH // 2


class _Uneven(LiveActivations):
    """Every odd context padded after its 16th token: replica 1's shares hold half replica 0's rows."""

    def contexts(self) -> Iterator[LabelledContext]:
        pad = self.loaded.tokenizer.pad_token_id
        for i, c in enumerate(super().contexts()):
            ids = c.input_ids if i % 2 == 0 else c.input_ids[:16] + [pad] * (len(c.input_ids) - 16)
            yield LabelledContext(ids, c.roles)


def test_replicas_serve_as_many_batches_per_block_with_uneven_shares(tiny, words, one_thread):
    counts: list[list[int]] = []
    for index in range(2):
        live = _live(tiny, words, (index, 2), cls=_Uneven)
        per_block: list[int] = []
        real = live.block

        def block(contexts: list[LabelledContext], real: Any = real, per_block: list[int] = per_block) -> Any:
            per_block.append(0)  # a new block: its batches are counted from here
            return real(contexts)

        live.block = block
        for _ in itertools.islice(live.batches(BATCH), 12):
            per_block[-1] += 1
        counts.append(per_block[:-1])  # whole blocks only
    assert counts[0] == counts[1] and len(counts[0]) >= 2
    chunk = list(itertools.islice(_live(tiny, words, cls=_Uneven).contexts(), 16))
    rows = [_live(tiny, words)._rows_in(chunk[i::2]) for i in range(2)]
    assert rows[0] // 32 > rows[1] // 32 > 0  # the shares differ: the smaller one sets the count
    assert counts[0][0] == rows[1] // 32

    # A resumed replica skips its finished blocks without a forward and goes on with the same batches.
    live = _live(tiny, words, (1, 2), cls=_Uneven)
    first = list(itertools.islice(live.batches(BATCH), 12))
    start, rest = counts[1][0] + 1, counts[1][1] - 1  # stopped after the second block's first batch
    forwards = _Forwards(tiny)
    try:
        again = list(itertools.islice(live.batches(BATCH, start_batch=start), rest))
    finally:
        forwards.handle.remove()
    assert forwards.contexts == 8  # the one block it stopped in
    assert rest > 0 and len(again) == rest
    for a, b in zip(first[start : start + rest], again, strict=True):
        assert torch.equal(a.acts["1.resid_post"], b.acts["1.resid_post"])


def test_a_shard_must_exist(tiny, words):
    with pytest.raises(OpenscopeError, match="shard 2 of 2"):
        _live(tiny, words, (2, 2))


# ---- two gloo processes ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, jobs: list[tuple[TrainConfig, int | None]]) -> None:
    """One torchrun-like rank running `jobs` in order; a job's kill step makes the last rank die
    abruptly in that step (after the checkpoint before it)."""
    os.environ |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
    }
    torch.set_num_threads(1)
    import openscope.train.trainer as trainer  # where the trainer looks its step up

    real = trainer.train_step
    for cfg, kill_at in jobs:

        def step(*args: Any, kill_at: int | None = kill_at, **kw: Any) -> Any:
            if kill_at is not None and rank == world - 1 and args[5] == kill_at:
                os._exit(1)
            return real(*args, **kw)

        trainer.train_step = step  # type: ignore[assignment]
        train(cfg, progress=False)
    dist.destroy_process_group()


def _spawn(jobs: list[tuple[TrainConfig, int | None]]) -> None:
    start_processes(_rank, args=(2, _free_port(), jobs), nprocs=2, start_method="spawn")


def _cfg(model: Path, source: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        model=str(model),
        source=str(source),
        context_len=CONTEXT,
        block_tokens=BLOCK_TOKENS,
        sites="1.resid_post",
        width=32,
        batch_size=BATCH,
        tokens=BATCH * 12,
        lr=3e-3,
        lr_warmup_steps=2,
        sparsity_warmup_steps=4,
        target_l0=6,
        output=out,
        checkpoint_every=4,
        device="cpu",
        log_every=1,
        data_parallel=2,
    )
    return TrainConfig(**(base | kw))


def test_two_live_replicas_train_and_a_killed_run_resumes_to_the_same_end(tiny_model_dir, tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"Live document {i} about Rome and Paris."}) + "\n" for i in range(200))
    )
    full, killed, clt = tmp_path / "full", tmp_path / "killed", tmp_path / "clt"
    clt_cfg = _cfg(tiny_model_dir, src, clt, kind="clt", sites="0-1.mlp_in", width=16, tokens=BATCH * 4)
    # 7 batches per block (8 contexts of ~30 rows a replica, 32-row halves): the kill comes in the second
    # block, after the checkpoint at step 8, so the resumed run skips a whole block and part of another.
    with pytest.raises((ProcessExitedException, ProcessRaisedException)):
        _spawn(
            [
                (_cfg(tiny_model_dir, src, full), None),
                (clt_cfg, None),
                (_cfg(tiny_model_dir, src, killed), 10),
            ]
        )
    assert json.loads((full / "run.json").read_text())["data_parallel"] == 2
    assert json.loads((clt / "run.json").read_text())["steps"] == 4
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 8
    _spawn([(_cfg(tiny_model_dir, src, killed, resume=True), None)])

    (folder,) = [p.parent for p in full.glob("*/config.json")]
    a = load_file(str(folder / "params.safetensors"))
    b = load_file(str(killed / folder.name / "params.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    rows = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(r) for r in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [r["step"] for r in rows] == list(range(12))
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    assert rows[-1]["fvu"] < rows[0]["fvu"]  # it trained
    config = json.loads((folder / "config.json").read_text())
    assert config["openscope"]["data"].startswith("live")
