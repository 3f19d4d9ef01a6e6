"""The trainer: dictionaries from a store, saved in the Gemma Scope 2 layout; resume equals uninterrupted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openscope.activations import ActivationStore
from openscope.activations.store import CHECKSUM, write_tensors
from openscope.coders import load_coder
from openscope.config import save_json
from openscope.errors import OpenscopeError
from openscope.train import train
from tests.conftest import small_store, tiny_train_config


@pytest.fixture(scope="module")
def store_dir(tiny, tiny_model_dir, tmp_path_factory) -> Path:
    return small_store(
        tiny,
        tiny_model_dir,
        tmp_path_factory.mktemp("store"),
        "1.resid_post,1.mlp_in,1.mlp_out",
        "the capital of France is Paris.",
    )


def test_train_saves_gemma_scope_2_folders_that_reload(store_dir, tmp_path):
    result = train(tiny_train_config(store_dir, tmp_path / "d"), progress=False)
    folder = result.folders["1.resid_post"]
    config = json.loads((folder / "config.json").read_text())
    for key in (
        "hf_hook_point_in",
        "hf_hook_point_out",
        "width",
        "model_name",
        "architecture",
        "l0",
        "affine_connection",
        "type",
    ):
        assert key in config
    assert (
        config["hf_hook_point_in"] == "model.layers.1" and config["type"] == "sae" and config["width"] == 32
    )
    assert config["openscope"]["tokens_seen"] == 64 * 20 and config["openscope"]["site_in"] == "1.resid_post"
    params = load_file(str(folder / "params.safetensors"))
    assert (
        params["w_enc"].shape == (64, 32)
        and params["w_dec"].shape == (32, 64)
        and params["threshold"].shape == (32,)
    )
    # The reloaded folder takes raw activations: encode/decode them like the formula says.
    x = next(ActivationStore(store_dir).batches(["1.resid_post"], batch_size=100)).acts["1.resid_post"]
    coder = load_coder(folder)
    pre = x @ params["w_enc"] + params["b_enc"]
    f = torch.where(pre > params["threshold"], pre, torch.zeros_like(pre))
    torch.testing.assert_close(
        coder.decode(coder.encode(x)), (f @ params["w_dec"] + params["b_dec"]), rtol=1e-4, atol=1e-3
    )
    lines = (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20 and {"l0", "fvu", "dead", "loss"} <= set(json.loads(lines[-1]))
    assert result.final["1.resid_post"]["fvu"] < 1.0


def test_resume_equals_uninterrupted(store_dir, tmp_path):
    full = train(tiny_train_config(store_dir, tmp_path / "full"), progress=False)
    part = tmp_path / "part"
    # As if killed after step 7:
    stopped = train(tiny_train_config(store_dir, part), progress=False, stop_after=7)
    assert stopped.steps == 7 and not stopped.folders
    with pytest.raises(OpenscopeError, match="already holds a run's checkpoint: pass --resume"):
        train(tiny_train_config(store_dir, part), progress=False)
    resumed = train(tiny_train_config(store_dir, part, resume=True), progress=False)
    a = load_file(str(full.folders["1.resid_post"] / "params.safetensors"))
    b = load_file(str(resumed.folders["1.resid_post"] / "params.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(
        OpenscopeError, match=r"checkpoint .* is from another run \(width: 32 there, 16 now\)"
    ):
        train(tiny_train_config(store_dir, part, resume=True, width=16), progress=False)


def test_transcoders_and_many_dictionaries_at_once(store_dir, tmp_path):
    result = train(
        tiny_train_config(
            store_dir, tmp_path / "t", kind="skip_transcoder", sites="all", activation="topk", k=4
        ),
        progress=False,
    )
    (folder,) = result.folders.values()
    config = json.loads((folder / "config.json").read_text())
    assert config["type"] == "transcoder" and config["affine_connection"] is True
    assert config["hf_hook_point_in"].endswith("pre_feedforward_layernorm")
    assert config["hf_hook_point_out"].endswith("post_feedforward_layernorm")
    assert "affine_skip_connection" in load_file(str(folder / "params.safetensors"))
    both = train(
        tiny_train_config(store_dir, tmp_path / "two", sites="1.resid_post,1.mlp_out", tokens=64 * 3),
        progress=False,
    )
    assert set(both.folders) == {"1.resid_post", "1.mlp_out"}


def test_bad_training_input(store_dir, tmp_path):
    with pytest.raises(OpenscopeError, match="--target-l0 must be positive"):
        train(tiny_train_config(store_dir, tmp_path / "a", target_l0=0), progress=False)
    with pytest.raises(OpenscopeError, match="--width must be positive"):
        train(tiny_train_config(store_dir, tmp_path / "b", width=0), progress=False)
    with pytest.raises(OpenscopeError, match="holds no site '5.resid_post'"):
        train(tiny_train_config(store_dir, tmp_path / "c", sites="5.resid_post"), progress=False)


def test_nan_activations_stop_with_step_and_site(store_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(store_dir, bad)
    store = ActivationStore(bad)
    shard = store.read_shard(0, list(store.read_shard_keys(0)))
    shard["1.resid_post"][100, 5] = float("nan")  # a row the seeded order reads at step 5, not the first
    store.manifest["shards"][0][CHECKSUM] = write_tensors(bad / store.shards[0]["file"], shard)
    save_json(bad / "manifest.json", store.manifest)
    out = tmp_path / "d"
    with pytest.raises(OpenscopeError, match=r"non-finite activations at step \d+, site 1.resid_post") as err:
        train(tiny_train_config(bad, out, checkpoint_every=1), progress=False)
    # No dictionary is saved from bad data, and the checkpoint of the steps before it is kept.
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))  # type: ignore[union-attr]
    assert not any(out.glob("*/params.safetensors"))
    assert (out / "checkpoint.pt").is_file() == (step > 0)


def test_live_mode_resume_equals_uninterrupted(tiny, tiny_model_dir, tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"Live document {i} about Rome and Paris."}) + "\n" for i in range(200))
    )
    live = dict(
        model=str(tiny_model_dir),
        source=str(src),
        context_len=32,
        block_tokens=1024,
        sites="1.resid_post",
        tokens=64 * 12,
    )
    full = train(tiny_train_config(tmp_path, tmp_path / "full", **live), progress=False)
    part = tmp_path / "part"
    train(tiny_train_config(tmp_path, part, **live), progress=False, stop_after=5)  # stops inside a block
    resumed = train(tiny_train_config(tmp_path, part, resume=True, **live), progress=False)
    a = load_file(str(full.folders["1.resid_post"] / "params.safetensors"))
    b = load_file(str(resumed.folders["1.resid_post"] / "params.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert (
        "live" in json.loads((full.folders["1.resid_post"] / "config.json").read_text())["openscope"]["data"]
    )


def test_live_mode_costs_one_forward_per_batch_for_all_layers(tiny, text_file):
    from openscope.activations.live import LiveActivations
    from openscope.models import parse_sites

    def forwards(spec: str) -> int:
        calls = []
        handle = tiny.arch.layers[0].register_forward_hook(lambda *_a: calls.append(1))
        try:
            live = LiveActivations(
                tiny, parse_sites(spec, tiny.n_layers), str(text_file), 32, forward_batch=4, block_tokens=512
            )
            for _ in zip(range(6), live.batches(64), strict=False):
                pass
        finally:
            handle.remove()
        return len(calls)

    one, every = forwards("2.resid_post"), forwards("*.resid_post")
    assert one == every > 0  # three layers' SAEs, the same forwards as one


def test_torchrun_two_ranks_equal_one(store_dir, tmp_path):
    import subprocess
    import sys

    cfg = tiny_train_config(store_dir, tmp_path / "one", sites="1.resid_post,1.mlp_out", tokens=64 * 6)
    one = train(cfg, progress=False)
    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "openscope.cli",
        "train",
        "--store",
        str(store_dir),
        "--sites",
        "1.resid_post,1.mlp_out",
        "--width",
        "32",
        "--batch-size",
        "64",
        "--tokens",
        str(64 * 6),
        "--lr",
        "3e-3",
        "--lr-warmup-steps",
        "2",
        "--sparsity-warmup-steps",
        "5",
        "--target-l0",
        "8",
        "--output",
        str(two),
        "--device",
        "cpu",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (two / "checkpoint.rank0.pt").is_file() and (two / "checkpoint.rank1.pt").is_file()
    for site, folder in one.folders.items():
        a = load_file(str(folder / "params.safetensors"))
        b = load_file(str(two / folder.name / "params.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{site} {key}")
    assert set(json.loads((two / "run.json").read_text())["final"]) == {"1.resid_post", "1.mlp_out"}


def test_batchtopk_is_saved_as_jumprelu_with_its_cutoff(store_dir, tmp_path):
    cfg = tiny_train_config(store_dir, tmp_path / "b", activation="batchtopk", k=4, tokens=64 * 20)
    folder = train(cfg, progress=False).folders["1.resid_post"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "jump_relu" and "k" not in config
    assert config["openscope"]["trained_as"] == "batchtopk"
    coder = load_coder(folder)
    x = next(ActivationStore(store_dir).batches(["1.resid_post"], 512, seed=1)).acts["1.resid_post"]
    l0 = float((coder.encode(x) > 0).sum(1).float().mean())
    # One global threshold at the batches' mean cut-off keeps about k latents per token.
    assert 2 <= l0 <= 8


def test_batchtopk_resume_equals_uninterrupted(store_dir, tmp_path):
    kw = dict(activation="batchtopk", k=4, tokens=64 * 20, checkpoint_every=19)
    whole = train(tiny_train_config(store_dir, tmp_path / "w", **kw), progress=False).folders["1.resid_post"]
    train(tiny_train_config(store_dir, tmp_path / "r", **kw), progress=False, stop_after=19)
    resumed = train(tiny_train_config(store_dir, tmp_path / "r", resume=True, **kw), progress=False).folders[
        "1.resid_post"
    ]
    a, b = load_file(whole / "params.safetensors"), load_file(resumed / "params.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_store_sites_take_patterns(store_dir):
    """`--sites` patterns pick the store's sites in store mode, as `--help` says (names as given)."""
    from openscope.activations.store import ActivationStore
    from openscope.train.loop import store_site_names

    store = ActivationStore(store_dir)
    assert store_site_names(store, "*.mlp_in") == ["1.mlp_in"]
    assert set(store_site_names(store, "1.*")) == {"1.resid_post", "1.mlp_in", "1.mlp_out"}
    assert store_site_names(store, "1.mlp_out, *.mlp_in") == ["1.mlp_out", "1.mlp_in"]
    assert store_site_names(store, "all") == store.sites
