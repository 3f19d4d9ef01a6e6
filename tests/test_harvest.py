"""Harvest and the activation store: stored rows are the model's activations; resume is exact; bad input is named."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openscope.activations import ActivationStore, HarvestConfig, harvest
from openscope.activations.store import sha256_file
from openscope.errors import OpenscopeError
from openscope.models import Site, run_to_sites
from openscope.models.tokens import keep_mask

# The package exports the function `harvest`, which hides the module of the same name.
harvest_module = importlib.import_module("openscope.activations.harvest")


def _cfg(model_dir: Path, source: Path, out: Path, **kw) -> HarvestConfig:
    base = dict(
        model=str(model_dir),
        sites="*.resid_post,*.mlp_out",
        source=str(source),
        tokens=2000,
        context_len=32,
        batch_size=4,
        output=out,
        shard_mb=1,
        device="cpu",
    )
    base.update(kw)
    return HarvestConfig(**base)  # type: ignore[arg-type]


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_store_holds_the_model_activations(tiny, tiny_model_dir, text_file, tmp_path):
    result = harvest(_cfg(tiny_model_dir, text_file, tmp_path / "s"), loaded=tiny, progress=False)
    store = ActivationStore(result.output)
    assert store.complete and result.n_shards == len(store.shards) >= 3
    assert store.sites == [f"{i}.{k}" for i in range(3) for k in ("mlp_out", "resid_post")]
    assert store.manifest["sites"]["1.mlp_out"]["hook_point"] == "model.layers.1.post_feedforward_layernorm"
    total_rows = 0
    for i, shard_meta in enumerate(store.shards):
        shard = store.read_shard(i, [*store.sites, "token_ids", "context", "position", "contexts"])
        ctx = shard["contexts"].long()
        keep = keep_mask(ctx, tiny.tokenizer)
        assert shard_meta["n_rows"] == int(keep.sum()) == len(shard["token_ids"])
        local = shard["context"] - shard_meta["context_start"]
        assert torch.equal(ctx[local, shard["position"].long()], shard["token_ids"].long())
        sites = [Site.from_name(s) for s in store.sites]
        for b in range(0, len(ctx), 4):
            acts = run_to_sites(tiny, ctx[b : b + 4], sites, (ctx[b : b + 4] != 0).long())
            rows = (local >= b) & (local < b + 4)
            for s in sites:
                torch.testing.assert_close(shard[s.name][rows], acts[s][keep[b : b + 4]], rtol=0, atol=0)
        total_rows += shard_meta["n_rows"]
    assert total_rows == result.n_rows == store.n_rows
    # Normalisation statistics: C**2 = E|x|^2 over all stored rows.
    x = torch.cat([store.read_shard(i, ["2.resid_post"])["2.resid_post"] for i in range(len(store.shards))])
    stats = store.stats("2.resid_post")
    # float32 sums per batch, accumulated in float64: agrees with an all-float64 sum to ~1e-7.
    assert stats.mean_sq_norm == pytest.approx(float(x.double().pow(2).sum(1).mean()), rel=1e-6)
    assert stats.norm_scale**2 == pytest.approx(stats.mean_sq_norm)
    torch.testing.assert_close(store.mean("2.resid_post"), x.mean(0), rtol=1e-5, atol=1e-6)


def test_interrupted_then_resumed_equals_uninterrupted(
    tiny, tiny_model_dir, text_file, tmp_path, monkeypatch
):
    clean = tmp_path / "clean"
    harvest(_cfg(tiny_model_dir, text_file, clean), loaded=tiny, progress=False)

    broken = tmp_path / "broken"
    calls = {"n": 0}
    real_save = harvest_module.save_manifest

    def crash_on_third(root, manifest):
        calls["n"] += 1
        if calls["n"] == 3:  # the shard file is written, its manifest entry is not: the worst moment
            raise KeyboardInterrupt
        real_save(root, manifest)

    monkeypatch.setattr(harvest_module, "save_manifest", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(tiny_model_dir, text_file, broken), loaded=tiny, progress=False)
    monkeypatch.setattr(harvest_module, "save_manifest", real_save)
    assert len(json.loads((broken / "manifest.json").read_text())["shards"]) == 1
    (broken / "shard_00002.safetensors.tmp").write_bytes(b"half a shard")  # a crash mid-write leaves this
    result = harvest(_cfg(tiny_model_dir, text_file, broken), loaded=tiny, progress=False)
    assert result.resumed_shards == 1
    assert _files(broken) == _files(clean)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "openscope.cli", *args]


def test_kill_9_then_rerun_equals_uninterrupted(tiny, tiny_model_dir, tmp_path):
    source = tmp_path / "big.jsonl"
    source.write_text(
        "".join(json.dumps({"text": f"Document {i} talks about Paris and Rome."}) + "\n" for i in range(3000))
    )
    args = [
        "harvest",
        "--model",
        str(tiny_model_dir),
        "--sites",
        "*.*",
        "--source",
        str(source),
        "--tokens",
        "40000",
        "--context-len",
        "32",
        "--batch-size",
        "1",
        "--shard-mb",
        "1",
        "--device",
        "cpu",
    ]
    clean = tmp_path / "clean"
    harvest(
        _cfg(tiny_model_dir, source, clean, sites="*.*", tokens=40000, batch_size=1),
        loaded=tiny,
        progress=False,
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*args, "--output", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    manifest = killed / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and len(json.loads(manifest.read_text() or "{}").get("shards", [])) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(json.loads(manifest.read_text())["shards"])
    assert subprocess.run(_cli(*args, "--output", str(killed)), capture_output=True).returncode == 0
    for tmp in killed.glob("*.tmp"):
        tmp.unlink()
    assert _files(killed) == _files(clean)
    assert 2 <= done_before < len(json.loads(manifest.read_text())["shards"]), "the kill came after the end"


def test_refuses_to_mix_stores(tiny, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "s"
    harvest(_cfg(tiny_model_dir, text_file, out), loaded=tiny, progress=False)
    with pytest.raises(OpenscopeError, match=r"holds a different store \(sites: .*--overwrite"):
        harvest(_cfg(tiny_model_dir, text_file, out, sites="0.attn_out"), loaded=tiny, progress=False)
    with pytest.raises(OpenscopeError, match=r"holds a different store \(context_len: 32 there, 16 now\)"):
        harvest(_cfg(tiny_model_dir, text_file, out, context_len=16), loaded=tiny, progress=False)
    harvest(
        _cfg(tiny_model_dir, text_file, out, sites="0.attn_out", overwrite=True), loaded=tiny, progress=False
    )
    assert ActivationStore(out).sites == ["0.attn_out"]
    # Same settings but the text changed: the finished shards no longer match the data.
    text_file.write_text(text_file.read_text().replace("Paris", "Lyon"))
    with pytest.raises(OpenscopeError, match="the data changed"):
        harvest(_cfg(tiny_model_dir, text_file, out, sites="0.attn_out"), loaded=tiny, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OpenscopeError, match="holds notes.txt, which openscope did not write"):
        harvest(_cfg(tiny_model_dir, text_file, other), loaded=tiny, progress=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_corrupt_shard_is_named(tiny, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "s"
    harvest(_cfg(tiny_model_dir, text_file, out), loaded=tiny, progress=False)
    path = out / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        OpenscopeError, match=r"shard_00001.safetensors of .* is corrupt \(checksum mismatch\)"
    ):
        ActivationStore(out).read_shard(1, ["0.mlp_out"])
    with pytest.raises(OpenscopeError, match="shard_00001.safetensors .* missing or corrupt"):
        harvest(_cfg(tiny_model_dir, text_file, out), loaded=tiny, progress=False)
    with pytest.raises(OpenscopeError, match="holds no site '9.resid_post'; it has 0.mlp_out"):
        ActivationStore(out).stats("9.resid_post")


def test_stores_with_sha256_checksums_still_verify(tiny, tiny_model_dir, text_file, tmp_path):
    """Stores written before the switch to crc32 carry sha256 checksums; they read and resume."""
    out = tmp_path / "s"
    harvest(_cfg(tiny_model_dir, text_file, out), loaded=tiny, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        assert len(shard.pop("crc32")) == 8
        shard["sha256"] = sha256_file(out / shard["file"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    ActivationStore(out).read_shard(1, ["0.mlp_out"])
    harvest(_cfg(tiny_model_dir, text_file, out), loaded=tiny, progress=False)  # complete: verifies
    manifest["shards"][1]["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OpenscopeError, match="corrupt"):
        ActivationStore(out).read_shard(1, ["0.mlp_out"])


def test_empty_source_and_bad_sites(tiny, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(OpenscopeError, match="is empty"):
        harvest(_cfg(tiny_model_dir, empty, tmp_path / "s"), loaded=tiny, progress=False)
    with pytest.raises(OpenscopeError, match="layer 7 is out of range: the model has 3 layers"):
        harvest(
            _cfg(tiny_model_dir, empty, tmp_path / "s", sites="7.resid_post"), loaded=tiny, progress=False
        )


def test_reader_shuffles_deterministically_without_losing_rows(tiny, tiny_model_dir, text_file, tmp_path):
    store = ActivationStore(
        harvest(_cfg(tiny_model_dir, text_file, tmp_path / "s"), loaded=tiny, progress=False).output
    )

    def epoch(seed: int) -> list[tuple[int, int]]:
        keys = []
        for batch in store.batches(["1.resid_post"], batch_size=50, seed=seed, shards_in_memory=2):
            assert batch.acts["1.resid_post"].dtype == torch.float32
            keys += list(zip(batch.context.tolist(), batch.position.tolist(), strict=True))
        return keys

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert a == b and a != c
    assert len(a) == len(set(a)) == store.n_rows  # every row exactly once
    # A served row is the stored row for that (context, position).
    first = next(iter(store.batches(["1.resid_post"], batch_size=7, seed=3)))
    full = {i: store.read_shard(i, ["1.resid_post", "context", "position"]) for i in range(len(store.shards))}
    for row, (ctx, pos) in enumerate(zip(first.context.tolist(), first.position.tolist(), strict=True)):
        shard = next(s for s in full.values() if ctx in s["context"].tolist())
        hit = (shard["context"] == ctx) & (shard["position"] == pos)
        torch.testing.assert_close(first.acts["1.resid_post"][row], shard["1.resid_post"][hit][0])


def test_cli_bad_input_is_one_line(tmp_path):
    result = subprocess.run(
        _cli("harvest", "--model", "no-such-model", "--output", str(tmp_path / "x")),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'no-such-model'"), result.stderr


def test_float16_overflow_is_named_and_nothing_is_lost(tiny, tiny_model_dir, text_file, tmp_path):
    import copy

    huge = copy.deepcopy(tiny)
    with torch.no_grad():
        huge.model.get_input_embeddings().weight.mul_(1e7)  # residuals far beyond float16's 65504
    out = tmp_path / "s"
    with pytest.raises(
        OpenscopeError, match=r"site 0.resid_post has NaN or inf .* use --dtype bfloat16 or float32"
    ):
        harvest(
            _cfg(tiny_model_dir, text_file, out, sites="0.resid_post", dtype="float16"),
            loaded=huge,
            progress=False,
        )
    assert ActivationStore(out).shards == []  # the store is still valid, just empty
    result = harvest(
        _cfg(tiny_model_dir, text_file, out, sites="0.resid_post", dtype="bfloat16", overwrite=True),
        loaded=huge,
        progress=False,
    )
    assert result.n_rows > 0
