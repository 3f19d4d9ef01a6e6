"""Reviving dead latents (`StepConfig.revive`, `openscope.train.revive`): on a synthetic problem with known
features, resampling revives planted dead latents and the dictionary then finds the features they were
missing; on a dictionary with none dead, revival changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openscope.cli import run
from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.losses import fvu
from openscope.train.steps import (
    DeadLatentTracker,
    Revive,
    StepConfig,
    clt_train_step,
    make_optimizer,
    resample_due,
    train_step,
)

D, K, WIDTH, DEAD = 16, 16, 16, (0, 1, 2, 3)


def batch(gen: torch.Generator, n: int = 128) -> torch.Tensor:
    """Tokens made of K = D known features (the standard basis), each present with p = 0.15 at a size in
    [1, 2], plus a constant offset (a residual stream's mean)."""
    on = torch.rand(n, K, generator=gen) < 0.15
    return (on * (1 + torch.rand(n, K, generator=gen))) + 0.5


def planted(seed: int = 0) -> SparseCoder:
    """A JumpReLU SAE whose latents DEAD can never fire (b_enc = −100)."""
    coder = SparseCoder(CoderConfig(d_in=D, d_out=D, width=WIDTH, seed=seed, init_threshold=0.3))
    with torch.no_grad():
        coder.b_enc[list(DEAD)] = -100.0
    return coder


def train(
    coder: SparseCoder, revive: Revive, steps: int, dead_after: int, seed: int = 1
) -> DeadLatentTracker:
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(coder, 3e-3, threshold_lr_scale=3.0)
    cfg = StepConfig(
        lr=3e-3, lr_warmup_steps=1, sparsity="l0", sparsity_coeff=0.01, revive=revive, resample_every=25
    )
    tracker = DeadLatentTracker(WIDTH, dead_after)
    for step in range(steps):
        train_step(coder, opt, batch(gen), None, cfg, step, tracker)
    return tracker


def recovered(coder: SparseCoder) -> torch.Tensor:
    """[K] the best cosine between each true feature and a decoder row."""
    return coder.w_dec.detach().max(0).values  # rows are unit norm; the features are the basis vectors


def test_resampling_revives_planted_dead_latents_and_finds_the_missing_features() -> None:
    held_out = batch(torch.Generator().manual_seed(99), 2048)
    results = {}
    for revive in ("none", "resample"):
        coder = planted()
        train(coder, revive, steps=1500, dead_after=640)
        fires = (coder.encode(held_out) > 0).float().mean(0)
        results[revive] = (
            fires,
            float(fvu(held_out, coder(held_out).reconstruction.detach())),
            recovered(coder),
        )
    (fires_off, fvu_off, found_off), (fires_on, fvu_on, found_on) = results["none"], results["resample"]
    assert bool((fires_off[list(DEAD)] == 0).all())  # without revival they stay dead
    assert bool((fires_on[list(DEAD)] > 0.01).all())  # with it every planted latent fires again
    assert fvu_on < 0.1 * fvu_off  # measured: 0.003 against 0.284
    assert int((found_off > 0.9).sum()) <= K - len(DEAD) < int((found_on > 0.9).sum()) == K


@pytest.mark.parametrize("revive", ["resample", "aux"])
def test_revival_does_not_change_a_dictionary_with_none_dead(revive: Revive) -> None:
    a, b = (
        SparseCoder(CoderConfig(d_in=D, d_out=D, width=WIDTH)),
        SparseCoder(CoderConfig(d_in=D, d_out=D, width=WIDTH)),
    )
    train(a, "none", steps=60, dead_after=10**9)
    train(b, revive, steps=60, dead_after=10**9)
    for name, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], value), name


def test_clt_resampling_revives_planted_dead_latents_and_leaves_the_others() -> None:
    gen = torch.Generator().manual_seed(0)
    clt = CrossLayerCoder(CLTConfig(n_layers=3, d_in=D, d_out=D, width=8, skip=True, init_threshold=0.3))
    with torch.no_grad():
        for i in range(3):
            clt.b_enc[i, :2] = -100.0  # latents 0, 1 of every layer can never fire
    opt = make_optimizer(clt, 1e-3)
    cfg = StepConfig(lr=1e-3, lr_warmup_steps=1, target_l0=2.0, revive="resample", resample_every=4)
    tracker = DeadLatentTracker(3 * 8, 3 * 128)
    for step in range(3):
        x = torch.stack([batch(gen) for _ in range(3)])
        clt_train_step(clt, opt, x, x.flip(-1), cfg, step, tracker)
    before = {k: v.clone() for k, v in clt.state_dict().items()}
    dead = tracker.dead_mask().view(3, 8)
    assert bool(dead[:, :2].all())
    x = torch.stack([batch(gen) for _ in range(3)])
    clt_train_step(clt, opt, x, x.flip(-1), cfg, 3, tracker)  # step 3 ends with a resampling
    assert not bool(tracker.dead_mask().any())
    fires = (clt.encode(x) > 0).float().mean(1)  # [L, F]
    assert bool((fires[:, :2] > 0).all())
    for src in range(3):
        norms = clt.w_dec[src].reshape(8, -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(8))
    # Latents that were alive changed only by the ordinary Adam step: not reset to a token's direction.
    live = ~dead
    moved = (clt.w_enc.detach() - before["w_enc"]).abs().amax(1)  # [L, F]
    assert float(moved[:, :2].min()) > 10 * float(moved[live].max())


def test_train_revives_through_the_command_line(paris_resid_store: Path, tmp_path: Path) -> None:
    """`openscope train --revive resample`: with a short dead window and a dictionary too sparse for all
    its latents, a run with revival ends with fewer dead latents than the same run without."""
    args = [
        "train",
        "--store",
        str(paris_resid_store),
        "--sites",
        "1.resid_post",
        "--width",
        "64",
        "--target-l0",
        "2",
    ]
    args += ["--batch-size", "64", "--tokens", str(64 * 40), "--lr", "3e-3", "--dead-tokens", "256"]
    args += [
        "--device",
        "cpu",
        "--init-threshold",
        "5",
    ]  # θ far above the activations: most latents start dead
    dead = {}
    for revive in ("none", "resample"):
        out = tmp_path / revive
        assert run([*args, "--revive", revive, "--resample-every", "5", "--output", str(out)]) == 0
        dead[revive] = json.loads((out / "run.json").read_text())["final"]["1.resid_post"]["dead_fraction"]
    assert dead["resample"] < dead["none"]


def test_revive_typo_is_one_line_error(
    paris_resid_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        ["train", "--store", str(paris_resid_store), "--revive", "resampel", "--output", str(tmp_path / "o")]
    )
    assert code != 0
    assert "--revive 'resampel' is not one of none, aux, resample" in capsys.readouterr().err


def test_no_resampling_in_the_last_stretch_of_a_run() -> None:
    """Resamplings stop when the learning-rate decay starts (or one period before the end): a latent
    restarted at the last step would ship unsettled."""
    cfg = StepConfig(target_l0=2.0, revive="resample", resample_every=10, total_steps=100, lr_decay_steps=20)
    due = [s for s in range(100) if resample_due(cfg, s, None)]
    assert due == [9, 19, 29, 39, 49, 59, 69, 79]
    short_decay = StepConfig(target_l0=2.0, revive="resample", resample_every=10, total_steps=100)
    assert [s for s in range(100) if resample_due(short_decay, s, None)][-1] == 89
    unknown_length = StepConfig(target_l0=2.0, revive="resample", resample_every=10)
    assert resample_due(unknown_length, 99, None)
