"""End-to-end KL fine-tuning (`--finetune kl`, Gemma Scope 2 §2.4) on the tiny random Gemma 3: β = 0 is
plain training exactly; β > 0 lowers the spliced KL on the same data; the restarted spliced forward equals
the full one; a resumed run equals an uninterrupted one; runs without a live model are refused."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from openscope.coders import CoderConfig, SparseCoder
from openscope.errors import OpenscopeError
from openscope.train import TrainConfig, train
from openscope.train.finetune import KLFineTune, check_finetune, finetune_loss
from openscope.train.loop import step_config
from openscope.train.steps import make_optimizer, train_step
from tests.conftest import tiny_train_config

SITE = "1.resid_post"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ft") / "docs.jsonl"
    lines = [json.dumps({"text": f"Document {i} is about Rome, Paris and the sea."}) for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(model_dir: Path, source: Path, out: Path, **kw) -> TrainConfig:
    live = dict(model=str(model_dir), source=str(source), sites=SITE, context_len=32, block_tokens=1024)
    small = dict(batch_size=128, tokens=128 * 12, sparsity_warmup_steps=2)
    return tiny_train_config(None, out, **{**live, **small, **kw})


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plainly trained SAE of the tiny model (the dictionary fine-tuning starts from)."""
    out = tmp_path_factory.mktemp("base") / "dicts"
    torch.set_num_threads(1)
    train(_cfg(tiny_model_dir, source, out, tokens=128 * 20), progress=False)
    return out


def _coder(ft: KLFineTune) -> SparseCoder:
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=32, kind="sae", activation="jumprelu", seed=3))
    coder.set_scales(ft.data.scales[SITE], ft.data.scales[SITE])
    return coder


def test_loss_is_mse_at_beta_zero_and_balanced_by_alpha():
    mse, kl = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    loss, alpha = finetune_loss(mse, kl, 0.0)
    assert float(loss.detach()) == 2.0 and float(alpha) == pytest.approx(4.0)
    loss, _ = finetune_loss(mse, kl, 3.0)
    loss.backward()
    # α·KL equals the MSE's value, so the loss is its value whatever β; α is a constant: ∂/∂KL = αβ/(1+β)
    assert float(loss.detach()) == pytest.approx(2.0)
    assert mse.grad is not None and kl.grad is not None
    assert float(mse.grad) == pytest.approx(1 / 4) and float(kl.grad) == pytest.approx(4.0 * 3 / 4)


def test_beta_zero_equals_plain_training(tiny, tiny_model_dir, source, tmp_path, one_thread):
    cfg = _cfg(tiny_model_dir, source, tmp_path / "o", finetune="kl", beta=0.0, init_from=tmp_path)
    ft = KLFineTune(cfg, "cpu", tiny)
    plain = _coder(ft)
    tuned = copy.deepcopy(plain)
    opt_plain, opt_tuned = make_optimizer(plain, cfg.lr, 50.0), make_optimizer(tuned, cfg.lr, 50.0)
    step_cfg = step_config(cfg, 8)
    term = ft.term(SITE)
    for step, batch in zip(range(8), ft.batches([SITE], 0), strict=False):
        x = batch.acts[SITE]
        train_step(tuned, opt_tuned, x, None, step_cfg, step, loss_term=term)
        train_step(plain, opt_plain, x, None, step_cfg, step)
        assert term.last["kl"] > 0  # the KL was measured, and counted zero times
    for (name, a), b in zip(plain.named_parameters(), tuned.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(plain.w_enc, _coder(ft).w_enc)  # the steps did train


def test_restarted_spliced_forward_equals_full_forward(tiny, tiny_model_dir, source, tmp_path, one_thread):
    cfg = _cfg(tiny_model_dir, source, tmp_path / "o", finetune="kl", beta=2.0, init_from=tmp_path)
    results = []
    for restart in (True, False):
        ft = KLFineTune(cfg, "cpu", tiny)
        ft.restart = restart
        coder = _coder(ft)
        batch = next(ft.batches([SITE], 3))
        assert (ft.current is not None) and (ft.current.prefix is not None) == restart
        x = batch.acts[SITE]
        out = coder(x)
        loss = ft.term(SITE)(torch.tensor(0.3), out.reconstruction)
        loss.backward()
        assert coder.w_dec.grad is not None
        results.append((float(loss.detach()), coder.w_dec.grad.clone(), x))
    (la, ga, xa), (lb, gb, xb) = results
    assert torch.equal(xa, xb)
    assert la == pytest.approx(lb, rel=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


def test_kl_finetuning_lowers_the_kl(tiny, tiny_model_dir, source, tmp_path, one_thread):
    """The same start and the same 4 batches, 32 steps: the spliced KL on them ends lower with β > 0."""
    final = {}
    for beta in (0.0, 1.0):
        cfg = _cfg(tiny_model_dir, source, tmp_path / "o", finetune="kl", beta=beta, init_from=tmp_path)
        ft = KLFineTune(cfg, "cpu", tiny)
        data = [(b.acts[SITE], ft.current) for b in itertools.islice(ft.batches([SITE], 0), 4)]
        coder = _coder(ft)
        coder.init_decoder_bias_(data[0][0])
        coder.calibrate_threshold_(data[0][0], 8)
        optimizer, step_cfg, term = make_optimizer(coder, cfg.lr, 50.0), step_config(cfg, 32), ft.term(SITE)
        for step in range(32):
            x, ft.current = data[step % 4]
            stats = train_step(coder, optimizer, x, None, step_cfg, step, loss_term=term)
        kls = []
        with torch.no_grad():
            for x, ft.current in data:
                term(torch.tensor(1.0), coder(x).reconstruction)
                kls.append(term.last["kl"])
        final[beta] = (sum(kls) / 4, stats.l0)
    assert final[1.0][0] < 0.9 * final[0.0][0], final
    assert final[1.0][1] == pytest.approx(final[0.0][1], abs=1.5)  # at about the same L0


def test_resumed_finetuning_equals_uninterrupted(tiny_model_dir, source, base, tmp_path, one_thread):
    kw = dict(init_from=base, finetune="kl", beta=1.0, block_tokens=256)  # several blocks: resume skips some
    full = train(_cfg(tiny_model_dir, source, tmp_path / "full", **kw), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] > 0 and r["alpha"] > 0 for r in rows if "step" in r and "l0" in r)
    part = tmp_path / "part"
    train(_cfg(tiny_model_dir, source, part, **kw), progress=False, stop_after=5)
    resumed = train(_cfg(tiny_model_dir, source, part, resume=True, **kw), progress=False)
    a = load_file(str(full.folders[SITE] / "params.safetensors"))
    b = load_file(str(resumed.folders[SITE] / "params.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        (dict(store=Path("s"), init_from=Path("d")), "pass --model"),
        (dict(model="m"), "pass --init-from"),
        (dict(model="m", init_from=Path("d"), beta=-1.0), "--beta must be zero or more"),
        (dict(model="m", init_from=Path("d"), kind="clt"), "not --kind clt"),
    ],
)
def test_refused_without_a_live_model_and_trained_dictionaries(kw, says):
    with pytest.raises(OpenscopeError, match=says):
        check_finetune(TrainConfig(finetune="kl", **kw))  # type: ignore[arg-type]
    with pytest.raises(OpenscopeError, match="pass --finetune kl"):
        check_finetune(TrainConfig(beta=1.0))
