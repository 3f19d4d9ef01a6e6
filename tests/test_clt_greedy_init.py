"""Gemma Scope 2's greedy CLT initialisation from Matryoshka transcoders (App. B): later-layer latents that
re-read an earlier chosen latent's write are skipped, the CLT reproduces the chosen latents at step 0, and
the target L0 starts at the chosen latents' summed L0 and decays to the target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openscope.coders import CoderConfig, SparseCoder
from openscope.coders.clt_init import clt_from_greedy, greedy_latents, layer_l0
from openscope.errors import OpenscopeError
from openscope.train import TrainConfig, train
from openscope.train.steps import StepConfig, target_l0_now
from tests.conftest import small_store, tiny_train_config

D, F, WIDTH = 8, 6, 2


def _transcoder(seed: int) -> SparseCoder:
    t = SparseCoder(CoderConfig(d_in=D, d_out=D, width=F, kind="transcoder", seed=seed, init_threshold=0.05))
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        t.w_enc.mul_(0.01)  # unplanted encoder columns: small, so the planted ones win the dot products
        t.b_enc.uniform_(0.0, 0.2, generator=g)
        t.b_dec.normal_(0, 0.1, generator=g)
    return t


def _planted() -> list[SparseCoder]:
    """Layer 1's latent 0 reads what layer 0's latent 0 writes; layer 2's latent 1 what layer 0's latent 1
    writes (encoder column = that decoder row, scaled up)."""
    ts = [_transcoder(s) for s in range(3)]
    with torch.no_grad():
        ts[1].w_enc[:, 0] = 3 * ts[0].w_dec[0]
        ts[2].w_enc[:, 1] = 3 * ts[0].w_dec[1]
    return ts


def test_greedy_skips_the_later_latents_that_re_read_a_chosen_write():
    choice = greedy_latents(_planted(), WIDTH)
    assert choice.chosen[0].tolist() == [0, 1]
    assert bool(choice.used[1][0]) and bool(choice.used[2][1])
    assert 0 not in choice.chosen[1].tolist() and choice.chosen[1].tolist() == [1, 2]
    assert 1 not in choice.chosen[2].tolist() and len(choice.chosen[2]) == WIDTH
    assert not choice.used[0].any()  # nothing before layer 0 marks it


def test_the_clt_reproduces_the_chosen_latents_and_their_l0_at_step_0():
    ts = _planted()
    clt, choice = clt_from_greedy(ts, WIDTH)
    x = torch.randn(3, 200, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = clt(x).reconstruction
        for i, (t, idx) in enumerate(zip(ts, choice.chosen, strict=True)):
            f = t.encode(x[i])[:, idx]
            torch.testing.assert_close(y[i], f @ t.w_dec[idx] + t.b_dec, rtol=1e-5, atol=1e-5)
            assert not clt.w_dec[i][:, 1:].any()  # later-layer blocks start at zero
            summed = (t.encode(x[i])[:, idx] > 0).float().sum(1).mean()
            assert float(layer_l0(clt, x)[i]) == pytest.approx(float(summed))
    assert float(layer_l0(clt, x).sum()) > 0


def test_too_few_latents_left_is_a_one_line_error():
    with pytest.raises(OpenscopeError, match="fewer than the CLT's 6 per layer"):
        greedy_latents(_planted(), F)


def test_target_l0_starts_at_the_chosen_sum_and_ends_at_the_target():
    cfg = StepConfig(target_l0=6.0, target_l0_start=40.0, target_l0_decay_steps=5)
    assert target_l0_now(cfg, 0) == 40.0
    assert 6.0 < target_l0_now(cfg, 3) < 40.0  # type: ignore[operator]
    assert target_l0_now(cfg, 5) == 6.0 and target_l0_now(cfg, 50) == 6.0
    assert target_l0_now(StepConfig(target_l0=6.0), 0) == 6.0


@pytest.fixture(scope="module")
def store_dir(tiny, tiny_model_dir, tmp_path_factory) -> Path:
    return small_store(
        tiny,
        tiny_model_dir,
        tmp_path_factory.mktemp("store"),
        "*.mlp_in,*.mlp_out",
        "of Italy Rome, of Spain Madrid.",
    )


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    return tiny_train_config(
        store, out, **{"sites": "all", "kind": "clt", "width": 8, "tokens": 64 * 10, "target_l0": 4, **kw}
    )


def test_training_from_greedy_transcoders_resumes_with_its_target_schedule(store_dir, tmp_path):
    tdir = tmp_path / "t"
    train(
        _cfg(store_dir, tdir, kind="transcoder", width=32, matryoshka="8,16", tokens=64 * 4), progress=False
    )
    cfg = _cfg(store_dir, tmp_path / "clt", init_from=tdir, init_greedy=True)
    whole = _cfg(store_dir, tmp_path / "whole", init_from=tdir, init_greedy=True)
    train(cfg, progress=False, stop_after=3)
    start = torch.load(tmp_path / "clt" / "checkpoint.pt", weights_only=True)["dicts"][0]["l0_start"]
    assert start > 0
    resumed = train(TrainConfig(**{**cfg.__dict__, "resume": True}), progress=False)
    straight = train(whole, progress=False)
    for site, values in straight.final.items():
        assert resumed.final[site] == pytest.approx(values, rel=1e-4), site
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("loss" in r for r in rows if "step" in r)
    with pytest.raises(OpenscopeError, match="--init-greedy"):
        train(_cfg(store_dir, tmp_path / "x", init_greedy=True), progress=False)
