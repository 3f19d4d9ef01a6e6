"""Activation stores at fsspec URLs: a harvest into memory://, file:// and a real S3 server (moto) holds
exactly the rows of a local store, resumes after a crash or kill -9, is read back (shuffled, prefetched) as
the local one is, and no credential in a URL reaches a manifest, a message or the log."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import cast

import fsspec
import pytest
import torch

from openscope.activations import ActivationStore, HarvestConfig, harvest
from openscope.activations.remote import redact, store_url
from openscope.errors import OpenscopeError

KEYS = ["token_ids", "context", "position", "contexts"]


def _cfg(model_dir: Path, source: Path, out: str | Path, **kw) -> HarvestConfig:
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


def _rows(store: ActivationStore) -> dict[tuple[int, int], tuple[int, list[float]]]:
    """(context, position) -> (token id, activations of every site) of every stored row."""
    out = {}
    for i in range(len(store.shards)):
        shard = store.read_shard(i, [*store.sites, *KEYS])
        for r, (c, p) in enumerate(zip(shard["context"].tolist(), shard["position"].tolist(), strict=True)):
            acts = torch.cat([shard[s][r] for s in store.sites]).tolist()
            out[c, p] = (int(shard["token_ids"][r]), acts)
    return out


def _same_store(a: ActivationStore, b: ActivationStore) -> None:
    """Two stores hold the same rows, shards, statistics and identity."""
    assert a.complete and b.complete
    assert a.manifest["identity"] == b.manifest["identity"]
    assert a.manifest["stats"] == b.manifest["stats"]
    strip = ("file",)
    assert [{k: v for k, v in s.items() if k not in strip} for s in a.shards] == [
        {k: v for k, v in s.items() if k not in strip} for s in b.shards
    ]
    assert _rows(a) == _rows(b)
    for site in a.sites:
        assert torch.equal(a.mean(site), b.mean(site))


@pytest.fixture(scope="module")
def local_store(tiny, tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(text source, a local store harvested from it): the reference every URL store must equal."""
    root = tmp_path_factory.mktemp("local")
    src = root / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"Document {i} talks about Paris and Rome."}) + "\n" for i in range(300))
    )
    out = root / "store"
    harvest(_cfg(tiny_model_dir, src, out), loaded=tiny, progress=False)
    return src, out


def test_url_parsing_and_redaction():
    assert store_url("s3://bucket/acts") == "s3://bucket/acts"
    assert store_url(Path("s3://bucket/acts")) == "s3://bucket/acts"  # what a command-line Path makes of it
    assert store_url(Path("file:///tmp/x")) == store_url("file:///tmp/x") == "file:///tmp/x"
    assert store_url("memory://x/y") == store_url(Path("memory://x/y")) == "memory://x/y"
    for local in ("acts", "/tmp/acts", "./s3:/x", "a:b/c", "notaprotocol://x", "C:/x"):
        assert store_url(local) is None, local
    assert redact("s3://AKIAKEY:s3cret@bucket/acts?X-Amz-Signature=abc") == "s3://***@bucket/acts?***"
    assert redact("gs://bucket/acts") == "gs://bucket/acts"


def test_memory_store_equals_local_and_resumes(tiny, tiny_model_dir, local_store, monkeypatch):
    src, local = local_store
    url = f"memory://stores/{uuid.uuid4().hex}"
    # A crash after two shards are uploaded: the manifest lists only whole shards, and a rerun resumes.
    targets = __import__("openscope.activations.targets", fromlist=["Target"])
    real_upload = targets.RemoteFolder.upload
    calls = {"n": 0}

    def crash_on_third(self, name, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_upload(self, name, path)

    monkeypatch.setattr(targets.RemoteFolder, "upload", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(tiny_model_dir, src, url), loaded=tiny, progress=False)
    monkeypatch.setattr(targets.RemoteFolder, "upload", real_upload)
    partial = ActivationStore(url)
    assert not partial.complete and len(partial.shards) == 2
    result = harvest(_cfg(tiny_model_dir, src, url), loaded=tiny, progress=False)
    assert result.resumed_shards == 2
    _same_store(ActivationStore(url), ActivationStore(local))
    # Complete: a rerun does nothing; another store there needs --overwrite, which replaces it.
    again = harvest(_cfg(tiny_model_dir, src, url), loaded=tiny, progress=False)
    assert again.n_shards == again.resumed_shards == len(ActivationStore(url).shards)
    with pytest.raises(OpenscopeError, match="holds a different store"):
        harvest(_cfg(tiny_model_dir, src, url, sites="0.attn_out"), loaded=tiny, progress=False)
    harvest(_cfg(tiny_model_dir, src, url, sites="0.attn_out", overwrite=True), loaded=tiny, progress=False)
    assert ActivationStore(url).sites == ["0.attn_out"]


def test_url_reader_serves_the_local_batches(tiny, tiny_model_dir, local_store):
    """Shuffled batches from a URL store, read ahead in a thread, are those of the local store, batch for
    batch; and the prefetching reader equals the unprefetched one."""
    src, local = local_store
    url = f"memory://stores/{uuid.uuid4().hex}"
    harvest(_cfg(tiny_model_dir, src, url), loaded=tiny, progress=False)
    a, b = ActivationStore(url), ActivationStore(local)
    for depth in (0, 1, 2):
        ours = list(
            a.batches(["1.resid_post", "2.mlp_out"], 37, seed=5, epochs=2, shards_in_memory=2, prefetch=depth)
        )
        theirs = list(b.batches(["1.resid_post", "2.mlp_out"], 37, seed=5, epochs=2, shards_in_memory=2))
        assert len(ours) == len(theirs)
        for x, y in zip(ours, theirs, strict=True):
            assert torch.equal(x.context, y.context) and torch.equal(x.position, y.position)
            for k in x.acts:
                assert torch.equal(x.acts[k], y.acts[k])
    # An endless stream stops cleanly when the consumer does (the read-ahead thread is not left running).
    stream = cast(Generator, a.batches(["1.resid_post"], 64, epochs=None, prefetch=2))
    for _ in range(3 * len(a.shards)):
        next(stream)
    stream.close()
    # A damaged remote shard is named.
    fs = fsspec.filesystem("memory")
    key = url.removeprefix("memory://") + "/" + a.shards[1]["file"]
    data = bytearray(fs.cat_file(key))
    data[-5] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with pytest.raises(OpenscopeError, match="corrupt"):
        ActivationStore(url).read_shard(1, ["1.resid_post"])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "openscope.cli", *args]


def test_file_url_killed_then_resumed_equals_local(tiny, tiny_model_dir, tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"Document {i} talks about Paris and Rome."}) + "\n" for i in range(3000))
    )
    kw = dict(sites="*.*", tokens=30000, batch_size=1)
    local = tmp_path / "local"
    harvest(_cfg(tiny_model_dir, src, local, **kw), loaded=tiny, progress=False)
    url = f"file://{tmp_path / 'remote'}"
    args = [
        "harvest",
        "--model",
        str(tiny_model_dir),
        "--sites",
        "*.*",
        "--source",
        str(src),
        "--tokens",
        "30000",
    ]
    args += [
        "--context-len",
        "32",
        "--batch-size",
        "1",
        "--shard-mb",
        "1",
        "--device",
        "cpu",
        "--output",
        url,
    ]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "remote" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(manifest.read_text() or "{}").get("shards", [])) >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(json.loads(manifest.read_text())["shards"])
    rerun = subprocess.run(_cli(*args), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    after = ActivationStore(url)
    assert 2 <= done_before < len(after.shards), "the kill came after the end"
    _same_store(after, ActivationStore(local))
    # `openscope show` reads the URL store.
    shown = subprocess.run(_cli("show", url), capture_output=True, text=True)
    assert shown.returncode == 0 and "complete" in shown.stdout and "resid_post" in shown.stdout, shown.stderr


def test_credentials_in_a_url_are_never_written_or_shown(tiny, tiny_model_dir, local_store, caplog, tmp_path):
    src, _ = local_store
    secret = "s3cretKEY123"
    url = f"memory://user:{secret}@bucket/{uuid.uuid4().hex}"
    # openscope's own log at every level, every library's from INFO (fsspec's DEBUG lines echo raw paths).
    with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="openscope"):
        harvest(_cfg(tiny_model_dir, src, url, extra={"note": "x"}), loaded=tiny, progress=False)
        store = ActivationStore(url)
    assert secret not in json.dumps(store.manifest) and secret not in str(store.root)
    assert "***@bucket" in str(store.root)
    assert secret not in caplog.text
    with pytest.raises(OpenscopeError) as err:
        ActivationStore(f"memory://user:{secret}@bucket/nothing-here")
    assert secret not in str(err.value) and "***@bucket" in str(err.value)
    shown = subprocess.run(_cli("show", url), capture_output=True, text=True)  # another process: no store
    assert secret not in shown.stdout + shown.stderr


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 server (moto in server mode) on a free local port, reached through s3fs and the usual
    AWS environment (endpoint and keys), as a user's would be."""
    pytest.importorskip("s3fs", reason="s3fs (openscope[s3]) is not installed")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] (dev extra) is not installed")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3").mkdir("openscope-test")
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fsspec.filesystem("s3").clear_instance_cache()
    server.stop()


def test_s3_store_on_a_real_server(tiny, tiny_model_dir, local_store, s3_server):
    src, local = local_store
    url = "s3://openscope-test/acts"
    harvest(_cfg(tiny_model_dir, src, url), loaded=tiny, progress=False)
    store = ActivationStore(url)
    _same_store(store, ActivationStore(local))
    first = next(store.batches(["1.resid_post"], 50, seed=1))
    ref = next(ActivationStore(local).batches(["1.resid_post"], 50, seed=1))
    assert torch.equal(first.acts["1.resid_post"], ref.acts["1.resid_post"])
    # A missing bucket is a one-line error naming the URL.
    with pytest.raises(OpenscopeError, match="s3://no-such-bucket/x"):
        ActivationStore("s3://no-such-bucket/x")
