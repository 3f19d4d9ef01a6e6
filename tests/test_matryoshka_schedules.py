"""Matryoshka training: the `--matryoshka` spec (fixed groups or `random:N`), the per-step random prefix
draw (a pure function of seed and step, small prefixes favoured, the full width always in), its loss
through the step, and a resumed random-prefix run equal to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openscope.coders import CoderConfig, SparseCoder
from openscope.coders import losses as L
from openscope.coders.matryoshka import (
    MatryoshkaSpec,
    check_width,
    log_uniform_lengths,
    parse_matryoshka,
    random_prefixes,
)
from openscope.errors import OpenscopeError
from openscope.train import TrainConfig, train
from openscope.train.steps import StepConfig, make_optimizer, step_prefixes, train_step
from tests.conftest import tiny_train_config


def test_specs_parse_and_bad_ones_are_refused():
    assert parse_matryoshka("") == MatryoshkaSpec() and not parse_matryoshka("").enabled
    assert parse_matryoshka("128, 512,2048") == MatryoshkaSpec(fixed=(128, 512, 2048))
    assert parse_matryoshka("random:8") == MatryoshkaSpec(random=8)
    for bad in ("random:0", "random:", "random:x", "512,128", "0,4", "4,4", "a,b"):
        with pytest.raises(OpenscopeError, match="--matryoshka"):
            parse_matryoshka(bad)
    with pytest.raises(OpenscopeError, match="larger than the width 256"):
        check_width(parse_matryoshka("128,512"), 256)
    check_width(parse_matryoshka("random:4"), 16)


def test_random_prefixes_are_seeded_per_step_and_favour_small_ones():
    a = random_prefixes(8, 4096, seed=3, step=17)
    assert a == random_prefixes(8, 4096, seed=3, step=17)
    assert a != random_prefixes(8, 4096, seed=3, step=18) and a != random_prefixes(8, 4096, seed=4, step=17)
    for step in range(50):
        sizes, weights = random_prefixes(8, 4096, 0, step)
        assert all(1 <= s < 4096 for s in sizes) and list(sizes) == sorted(set(sizes))
        assert len(weights) == len(sizes) + 1 and sum(weights) == pytest.approx(1.0)
    draws = [n for step in range(400) for n in log_uniform_lengths(8, 4096, 0, step)]
    assert all(1 <= n <= 4096 for n in draws)
    # Log-uniform: about half the draws are at most sqrt(width) = 64; a uniform draw would give 1.6%.
    assert 0.4 < sum(n <= 64 for n in draws) / len(draws) < 0.6


def test_step_prefixes_fixed_random_and_off():
    assert step_prefixes(StepConfig(sparsity="none"), 0, 64) == ((), None)
    fixed = StepConfig(sparsity="none", matryoshka_prefixes=(8, 64))
    assert step_prefixes(fixed, 5, 64) == ((8,), (0.5, 0.5))
    with pytest.raises(OpenscopeError, match="exceed the width 32"):
        step_prefixes(fixed, 0, 32)
    rnd = StepConfig(sparsity="none", matryoshka_random=4, matryoshka_seed=1)
    assert step_prefixes(rnd, 9, 64) == random_prefixes(4, 64, 1, 9)
    with pytest.raises(OpenscopeError, match="not both"):
        StepConfig(sparsity="none", matryoshka_prefixes=(8,), matryoshka_random=2)


def test_random_prefix_step_loss_is_the_weighted_prefix_losses():
    torch.manual_seed(0)
    coder = SparseCoder(CoderConfig(d_in=16, d_out=16, width=32, activation="relu"))
    x = torch.randn(64, 16)
    cfg = StepConfig(sparsity="none", matryoshka_random=3, matryoshka_seed=2, lr=1e-9, freq_coeff=0)
    sizes, weights = step_prefixes(cfg, 0, 32)
    assert weights is not None
    with torch.no_grad():
        out = coder(x, prefixes=sizes)
        want = L.matryoshka_loss(x, [*out.prefix_reconstructions, out.reconstruction], weights)
    stats = train_step(coder, make_optimizer(coder, 1e-9), x, None, cfg, 0)
    assert stats.reconstruction == pytest.approx(float(want), rel=1e-5)


def test_decaying_target():
    assert L.decaying_target(0, 120.0, 20.0, 10) == 120.0
    assert L.decaying_target(5, 120.0, 20.0, 10) == pytest.approx(70.0)
    assert L.decaying_target(10, 120.0, 20.0, 10) == 20.0 and L.decaying_target(99, 120.0, 20.0, 10) == 20.0
    assert L.decaying_target(0, 120.0, 20.0, 0) == 20.0


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    return tiny_train_config(store, out, **{"tokens": 64 * 12, "matryoshka": "random:4", **kw})


def test_random_prefix_resume_equals_uninterrupted_and_is_recorded(paris_resid_store, tmp_path):
    full = train(_cfg(paris_resid_store, tmp_path / "full"), progress=False).folders["1.resid_post"]
    train(_cfg(paris_resid_store, tmp_path / "part"), progress=False, stop_after=7)
    resumed = train(_cfg(paris_resid_store, tmp_path / "part", resume=True), progress=False).folders[
        "1.resid_post"
    ]
    a, b = load_file(full / "params.safetensors"), load_file(resumed / "params.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    config = json.loads((full / "config.json").read_text())
    assert config["openscope"]["train_config"]["matryoshka"] == "random:4"


def test_train_refuses_bad_specs_before_reading(tmp_path):
    for bad, match in (("random:0", "positive count"), ("8,4", "strictly increasing"), ("64", "larger")):
        with pytest.raises(OpenscopeError, match=match):
            train(_cfg(tmp_path / "none", tmp_path / "o", matryoshka=bad), progress=False)
