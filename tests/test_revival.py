"""Reviving dead latents (`StepConfig.revive`, `openscope.train.revive`): on a synthetic problem with known
features, resampling revives planted dead latents and the dictionary then finds the features they were
missing; on a dictionary with none dead, revival changes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from openscope.cli import run
from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.losses import fvu, pre_activation_loss
from openscope.errors import OpenscopeError
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


class Outcome(NamedTuple):
    """A planted dictionary after training."""

    fires: torch.Tensor
    """[F] fire rate of each latent on held-out tokens."""
    fvu: float
    """FVU on held-out tokens."""
    found: torch.Tensor
    """[K] the best cosine between each true feature and a decoder row."""


def trained_planted(revive: Revive, dead_bias: float) -> Outcome:
    """A planted dictionary (its DEAD latents' b_enc at dead_bias) after 1500 steps with `revive`."""
    held_out = batch(torch.Generator().manual_seed(99), 2048)
    coder = planted()
    with torch.no_grad():
        coder.b_enc[list(DEAD)] = dead_bias
    train(coder, revive, steps=1500, dead_after=640)
    fires = (coder.encode(held_out) > 0).float().mean(0)
    return Outcome(fires, float(fvu(held_out, coder(held_out).reconstruction.detach())), recovered(coder))


def test_resampling_revives_planted_dead_latents_and_finds_the_missing_features() -> None:
    off, on = trained_planted("none", -100.0), trained_planted("resample", -100.0)
    assert bool((off.fires[list(DEAD)] == 0).all())  # without revival they stay dead
    assert bool((on.fires[list(DEAD)] > 0.01).all())  # with it every planted latent fires again
    assert on.fvu < 0.1 * off.fvu  # measured: 0.003 against 0.284
    assert int((off.found > 0.9).sum()) <= K - len(DEAD) < int((on.found > 0.9).sum()) == K


def test_preact_loss_revives_planted_dead_latents_and_finds_the_missing_features() -> None:
    """The pre-activation loss moves latents that never fire (b_enc = −6: below θ on every token, but
    within reach of Adam's steps, as training's dead latents are) until they fire, and the dictionary
    then finds the features they were missing; without it they stay dead."""
    off, on = trained_planted("none", -6.0), trained_planted("preact", -6.0)
    assert bool((off.fires[list(DEAD)] == 0).all())
    assert bool((on.fires[list(DEAD)] > 0.01).all())
    assert on.fvu < 0.5 * off.fvu  # measured: 0.055 against 0.284 (14 of 16 features found, against 10)
    assert int((off.found > 0.9).sum()) <= K - len(DEAD) < int((on.found > 0.9).sum())


def test_preact_loss_pulls_only_latents_below_their_threshold() -> None:
    """λ_p·mean_b Σ_j max(0, θ_j − z_bj): its gradient is −λ_p/B on each z under θ, 0 above; θ gets
    +λ_p·(rows under θ)/B."""
    z = torch.tensor([[0.0, 2.0], [0.5, 3.0]], requires_grad=True)
    theta = torch.tensor([1.0, 2.5], requires_grad=True)
    loss = pre_activation_loss(z, theta, 0.1)
    loss.backward()
    torch.testing.assert_close(loss.detach(), torch.tensor(0.1 * (1.0 + 0.5 + 0.5) / 2))
    assert z.grad is not None and theta.grad is not None
    torch.testing.assert_close(z.grad, torch.tensor([[-0.05, -0.05], [-0.05, 0.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([0.1, 0.05]))


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_pre_activations_of_some_latents_equal_those_columns(kind: str) -> None:
    coder = SparseCoder(CoderConfig(d_in=D, d_out=D, width=WIDTH, kind=kind, seed=3))  # type: ignore[arg-type]
    with torch.no_grad():
        coder.b_dec.normal_()  # an SAE's pre-encoder bias subtracts it from the input
        coder.b_enc.normal_()
    x = batch(torch.Generator().manual_seed(5))
    idx = torch.tensor([7, 2, 11])
    torch.testing.assert_close(coder.pre_activations(x, idx), coder.pre_activations(x)[:, idx])


@pytest.mark.parametrize("revive", ["resample", "aux", "preact"])
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


def test_clt_preact_loss_revives_planted_dead_latents() -> None:
    """A CLT's planted dead latents (b_enc = −6, every layer) fire again under the pre-activation loss
    (measured: first at steps 72-92 of 400), never without it."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.stack([batch(gen) for _ in range(3)]) for _ in range(400)]
    ever_fired = {}
    for revive in ("none", "preact"):
        clt = CrossLayerCoder(CLTConfig(n_layers=3, d_in=D, d_out=D, width=8, init_threshold=0.3))
        with torch.no_grad():
            clt.b_enc[:, :2] = -6.0  # latents 0, 1 of every layer never fire
        opt = make_optimizer(clt, 3e-3, threshold_lr_scale=3.0)
        cfg = StepConfig(lr=3e-3, lr_warmup_steps=1, target_l0=2.0, revive=revive)  # type: ignore[arg-type]
        tracker = DeadLatentTracker(3 * 8, 3 * 128)
        fired = torch.zeros(3, 8, dtype=torch.bool)
        for step, x in enumerate(xs):
            clt_train_step(clt, opt, x, x.flip(-1), cfg, step, tracker)
            fired |= tracker.tokens_since_fired.view(3, 8) == 0
        ever_fired[revive] = fired[:, :2]
    assert not bool(ever_fired["none"].any())
    assert bool(ever_fired["preact"].all())


@pytest.mark.parametrize("revive", ["resample", "preact"])
def test_train_revives_through_the_command_line(paris_resid_store: Path, tmp_path: Path, revive: str) -> None:
    """`openscope train --revive resample|preact`: with a short dead window and a dictionary too sparse for all
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
    for how in ("none", revive):
        out = tmp_path / how
        assert run([*args, "--revive", how, "--resample-every", "5", "--output", str(out)]) == 0
        dead[how] = json.loads((out / "run.json").read_text())["final"]["1.resid_post"]["dead_fraction"]
    assert dead[revive] < dead["none"]


def test_revive_typo_is_one_line_error(
    paris_resid_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        ["train", "--store", str(paris_resid_store), "--revive", "resampel", "--output", str(tmp_path / "o")]
    )
    assert code != 0
    assert "--revive 'resampel' is not one of none, aux, resample, preact" in capsys.readouterr().err


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


def test_preact_on_a_coder_without_threshold_is_one_line_error() -> None:
    coder = SparseCoder(CoderConfig(d_in=D, d_out=D, width=WIDTH, activation="topk", k=2))
    opt = make_optimizer(coder, 1e-3)
    cfg = StepConfig(sparsity="none", revive="preact")
    with pytest.raises(OpenscopeError, match="revive preact needs a jumprelu coder"):
        train_step(
            coder, opt, batch(torch.Generator().manual_seed(0)), None, cfg, 0, DeadLatentTracker(WIDTH)
        )
