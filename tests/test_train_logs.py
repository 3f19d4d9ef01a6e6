"""Training logs: `--log wandb` (offline) and `--log tensorboard` carry exactly metrics.jsonl's rows,
read back with each library's own reader format; the held-out rows of `--eval-every` are never trained
on, their L0/FVU equal the saved dictionary's on them, and a resumed run logs what an uninterrupted one does."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from openscope.activations import ActivationStore
from openscope.coders import load_coder
from openscope.coders.dictionary import load_dictionary
from openscope.train import TrainConfig, train
from openscope.train.logs import heldout_cutoff, heldout_rows, row_scalars
from openscope.train.loop import from_store
from tests.conftest import small_store, tiny_train_config


@pytest.fixture(scope="module")
def store_dir(tiny, tiny_model_dir, tmp_path_factory) -> Path:
    return small_store(
        tiny,
        tiny_model_dir,
        tmp_path_factory.mktemp("store"),
        "1.resid_post,0.mlp_in,0.mlp_out,1.mlp_in,1.mlp_out",
        "the capital of France is Paris.",
    )


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def _cfg(store: Path, out: Path, **kw: Any) -> TrainConfig:
    return tiny_train_config(store, out, **{"eval_every": 5, "eval_tokens": 256, **kw})


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar the sinks must carry, from metrics.jsonl."""
    return {(tag, r["step"]): v for r in rows for tag, v in row_scalars(r).items()}


def _tensorboard(folder: Path) -> dict[tuple[str, int], float]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    got: dict[tuple[str, int], float] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag} logged a step twice"
        got |= {(tag, e.step): e.value for e in events}
    return got


def _wandb_records(path: Path) -> Iterator[Any]:
    """The records of a .wandb file (W&B's LevelDB-style log: 7-byte header, 32 KiB blocks of
    records with a crc32/length/type header; types 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()  # pyright: ignore[reportAttributeAccessIssue]
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _wandb(folder: Path) -> dict[tuple[str, int], float]:
    got: dict[tuple[str, int], float] = {}
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            step = int(items.pop("_step"))
            got |= {(k, step): float(v) for k, v in items.items() if not k.startswith("_")}
    return got


def _close(got: dict[tuple[str, int], float], want: dict[tuple[str, int], float]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_heldout_rows_are_never_trained_on(store_dir):
    cfg = _cfg(store_dir, Path("unused"))
    store = ActivationStore(store_dir)
    cutoff = heldout_cutoff(store, cfg)
    assert cutoff is not None
    held = heldout_rows(store, ["1.resid_post"], cutoff, "")["1.resid_post"]
    assert 256 <= len(held) < 0.2 * store.n_rows + 64
    data, _ = from_store(cfg)
    for _, batch in zip(range(100), data.batches(["1.resid_post"], 0), strict=False):  # several passes
        assert len(batch.context) == cfg.batch_size and bool((batch.context < cutoff).all())
    # Without --eval-every the stream is the store's own (nothing held out).
    whole, _ = from_store(_cfg(store_dir, Path("unused"), eval_every=0))
    contexts = torch.cat(
        [b.context for _, b in zip(range(60), whole.batches(["1.resid_post"], 0), strict=False)]
    )
    assert bool((contexts >= cutoff).any())


def test_sinks_carry_the_jsonl_rows_and_heldout_matches_the_saved_dictionary(store_dir, tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(store_dir, out, log="wandb,tensorboard"), progress=False)
    rows = _rows(out)
    held = [r for r in rows if "heldout_fvu" in r]
    assert [r["step"] for r in held] == [4, 9, 14, 19]
    assert held[-1]["heldout_fvu"] < held[0]["heldout_fvu"]  # it learns what it never saw

    # The last held-out row is the saved (folded, raw-unit) dictionary measured on the held-out rows.
    store = ActivationStore(store_dir)
    cutoff = heldout_cutoff(store, _cfg(store_dir, out))
    assert cutoff is not None
    x = heldout_rows(store, ["1.resid_post"], cutoff, "")["1.resid_post"].double()
    coder = load_coder(result.folders["1.resid_post"]).double()
    with torch.no_grad():
        f = coder.encode(x)
        x_hat = coder.decode(f)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((f != 0).sum(1).double().mean())
    assert held[-1]["heldout_fvu"] == pytest.approx(fvu, rel=1e-4)
    assert held[-1]["heldout_l0"] == pytest.approx(l0, rel=1e-6)

    want = _expected(rows)
    _close(_tensorboard(out / "logs" / "tensorboard"), want)
    _close(_wandb(out / "logs" / "wandb"), want)


def test_resumed_run_logs_what_an_uninterrupted_one_does(store_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(store_dir, full, log="tensorboard"), progress=False)
    train(_cfg(store_dir, part, log="tensorboard"), progress=False, stop_after=7)  # killed after step 7
    train(_cfg(store_dir, part, log="tensorboard", resume=True), progress=False)
    assert (part / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    a = load_file(str(full / "1_resid_post_sae_jumprelu_w32" / "params.safetensors"))
    b = load_file(str(part / "1_resid_post_sae_jumprelu_w32" / "params.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Steps 5-7 were logged twice; the resumed writer purges the first copies.
    _close(_tensorboard(part / "logs" / "tensorboard"), _expected(_rows(full)))


def test_clt_heldout_equals_the_saved_clt(store_dir, tmp_path):
    out = tmp_path / "clt"
    cfg = _cfg(store_dir, out, kind="clt", sites="0-1.mlp_in", width=16, log="tensorboard")
    train(cfg, progress=False)
    rows = _rows(out)
    last = [r for r in rows if "heldout_fvu" in r][-1]
    assert last["step"] == 19 and len(last["heldout_fvu_per_layer"]) == 2
    store = ActivationStore(store_dir)
    cutoff = heldout_cutoff(store, cfg)
    assert cutoff is not None
    sites = ["0.mlp_in", "1.mlp_in", "0.mlp_out", "1.mlp_out"]
    held = heldout_rows(store, sites, cutoff, "")
    clt = load_dictionary(next(p for p in out.iterdir() if p.name.startswith("0-1_clt"))).coder
    x = torch.stack([held["0.mlp_in"], held["1.mlp_in"]])
    y = torch.stack([held["0.mlp_out"], held["1.mlp_out"]]).double()
    with torch.no_grad():
        y_hat = clt(x).reconstruction.double()  # type: ignore[operator]
    fvu = ((y - y_hat).pow(2).sum((1, 2)) / (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2))).tolist()
    assert last["heldout_fvu_per_layer"] == pytest.approx(fvu, rel=1e-3)  # float32 here, as trained
    _close(_tensorboard(out / "logs" / "tensorboard"), _expected(rows))
