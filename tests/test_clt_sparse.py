"""The cross-layer transcoder's sparse training path equals its dense reference: the block decode kernel,
the training forward (values and the gradient of every parameter, fp32, to 1e-5) for plain and skip
CLTs and weakly causal crosscoders, and whole training runs (parameters after several steps)."""

from __future__ import annotations

import pytest
import torch

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.clt_decode import add_to_targets, decode_to_targets
from openscope.coders.sparse import make_entries
from openscope.train.steps import StepConfig, clt_train_step, make_optimizer

RTOL = ATOL = 1e-5


def assert_equal_fp32(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal to 1e-5 relative to the tensor's scale: both paths sum the same terms in different orders,
    so gradients of size ~100 differ by float32 rounding (~1e-7 of the largest term)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=name or None)


def perturbed(kind: str, skip: bool, activation: str = "jumprelu", seed: int = 0) -> CrossLayerCoder:
    """A 3-layer CLT/crosscoder with every parameter random (cross-layer blocks and skip included), and
    a wide STE window (bandwidth 0.3) so that many entries sit in it and θ gets real gradient."""
    d_out = 12 if kind == "crosscoder" else 10
    cfg = CLTConfig(
        n_layers=3,
        d_in=12,
        d_out=d_out,
        width=16,
        skip=skip,
        kind=kind,  # type: ignore[arg-type]
        activation=activation,  # type: ignore[arg-type]
        bandwidth=0.3,
        seed=seed,
    )
    clt = CrossLayerCoder(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        if clt.log_threshold is not None:
            clt.log_threshold.copy_(torch.rand(clt.log_threshold.shape, generator=gen).log() - 0.5)
    return clt


@pytest.mark.parametrize("chunk_rows", [None, 1, 4])
def test_decode_to_targets_equals_the_dense_cross_layer_decode_in_values_and_gradients(
    chunk_rows: int | None,
) -> None:
    """Per source layer ℓ, blocks into layers ℓ..L−1, summed over sources: ŷ_m = Σ_{ℓ≤m} a_ℓ W^{ℓ→m};
    the weight gradients summed in row chunks (1 and 4 rows; None: one chunk at this size) too."""
    gen = torch.Generator().manual_seed(1)
    n, b, f, d = 3, 9, 7, 5
    dense = [torch.randn(b, f, generator=gen) * (torch.rand(b, f, generator=gen) < 0.4) for _ in range(n)]
    dense[1][4] = 0  # a row with no entries
    ws = [torch.randn(f, n - src, d, generator=gen) for src in range(n)]
    g = torch.randn(n, b, d, generator=gen)

    values, w1 = [], [w.clone().requires_grad_(True) for w in ws]
    blocks = []
    for a, w in zip(dense, w1, strict=True):
        rows, cols = a.nonzero(as_tuple=True)
        v = a[rows, cols].clone().requires_grad_(True)
        values.append((v, rows, cols))
        blocks.append(decode_to_targets(v, w, make_entries(rows, cols, b, f, chunk_rows)))
    base = torch.randn(n, 1, d, generator=gen)  # a bias per layer, broadcast over the batch
    base1 = base.clone().requires_grad_(True)
    out = add_to_targets(blocks, base1)
    out.backward(g)

    a2 = [a.clone().requires_grad_(True) for a in dense]
    w2 = [w.clone().requires_grad_(True) for w in ws]
    base2 = base.clone().requires_grad_(True)
    ref = base2 + torch.stack(
        [torch.stack([a2[s] @ w2[s][:, m - s] for s in range(m + 1)]).sum(0) for m in range(n)]
    )
    ref.backward(g)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    assert base1.grad is not None and base2.grad is not None
    torch.testing.assert_close(base1.grad, base2.grad, rtol=RTOL, atol=ATOL)
    for (v, rows, cols), a, wa, wb in zip(values, a2, w1, w2, strict=True):
        assert v.grad is not None and a.grad is not None
        torch.testing.assert_close(v.grad, a.grad[rows, cols], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(wa.grad, wb.grad, rtol=RTOL, atol=ATOL)


CASES = [
    ("clt", False, "jumprelu"),
    ("clt", True, "jumprelu"),
    ("clt", True, "relu"),
    ("crosscoder", False, "jumprelu"),
]


@pytest.mark.parametrize(("kind", "skip", "activation"), CASES)
@pytest.mark.parametrize("prefixes", [(), (5, 11)])
def test_sparse_training_forward_equals_dense(
    kind: str, skip: bool, activation: str, prefixes: tuple
) -> None:
    clt = perturbed(kind, skip, activation)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 40, clt.cfg.d_in, generator=gen)
    y = torch.randn(3, 40, clt.cfg.d_out, generator=gen)
    results = {}
    for path in ("dense", "sparse"):
        clt.zero_grad()
        out = clt.train_forward(x, prefixes=prefixes, path=path)  # type: ignore[arg-type]
        loss = (
            (out.reconstruction - y).pow(2).sum()
            + sum(0.3 * (r - y).pow(2).sum() for r in out.prefix_reconstructions)
            + (out.l0 - 3).pow(2).sum()
            + out.fire_rate.pow(2).sum()
            + 0.1 * out.l1.sum()
        )
        loss.backward()
        results[path] = (out, {n: p.grad.clone() for n, p in clt.named_parameters() if p.grad is not None})
    (dense, g_dense), (sparse, g_sparse) = results["dense"], results["sparse"]
    assert 0 < float(dense.l0.detach().mean()) < clt.cfg.width  # some latents fire, not all
    torch.testing.assert_close(sparse.reconstruction, dense.reconstruction, rtol=RTOL, atol=ATOL)
    for a, b in zip(sparse.prefix_reconstructions, dense.prefix_reconstructions, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for field in ("l0", "fire_rate", "l1"):
        torch.testing.assert_close(getattr(sparse, field), getattr(dense, field), rtol=RTOL, atol=ATOL)
    # Every parameter gets a gradient on both paths, and the same one.
    assert set(g_sparse) == set(g_dense) == {n for n, _ in clt.named_parameters()}
    for name, grad in g_dense.items():
        assert grad.abs().max() > 0, name
        assert_equal_fp32(g_sparse[name], grad, name)


@pytest.mark.parametrize(("kind", "skip"), [("clt", True), ("crosscoder", False)])
def test_training_on_the_sparse_path_equals_training_on_the_dense_one(kind: str, skip: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    d_out = 12 if kind == "crosscoder" else 10
    batches = [
        (torch.randn(3, 32, 12, generator=gen), torch.randn(3, 32, d_out, generator=gen)) for _ in range(6)
    ]
    states = {}
    for path in ("dense", "sparse"):
        clt = perturbed(kind, skip)
        opt = make_optimizer(clt, 1e-3, threshold_lr_scale=10.0)
        cfg = StepConfig(lr=1e-3, lr_warmup_steps=2, target_l0=4.0, sparsity_coeff=0.1, path=path)  # type: ignore[arg-type]
        for step, (x, y) in enumerate(batches):
            clt_train_step(clt, opt, x if kind == "clt" else y, y, cfg, step)
        states[path] = clt.state_dict()
    start = perturbed(kind, skip).state_dict()
    for name, value in states["dense"].items():
        assert not torch.equal(value, start[name]), f"{name} did not train"
        assert_equal_fp32(states["sparse"][name], value, name)


def test_auto_path_goes_dense_above_the_device_limit(monkeypatch):
    """path="auto" takes the dense path above the device's fraction of touched latents (15% on the CPU,
    2% on CUDA, measured: `CLT_DENSE_ABOVE`), or above an explicit `sparse_max_density`."""
    from openscope.coders import sparse

    assert sparse.clt_dense_above(torch.device("cpu")) == 0.15
    assert sparse.clt_dense_above(torch.device("cuda", 0)) == 0.02
    assert sparse.clt_dense_above(torch.device("meta")) == 0.15  # others: the CPU's
    clt = CrossLayerCoder(CLTConfig(n_layers=3, d_in=12, d_out=10, width=64, seed=0))
    x = torch.randn(3, 200, 12, generator=torch.Generator().manual_seed(0))
    clt.calibrate_threshold_(x, 4.0)  # 4 of 64 latents fire: ~6% touched
    dense_calls = []
    original = CrossLayerCoder._train_forward_dense
    monkeypatch.setattr(
        CrossLayerCoder, "_train_forward_dense", lambda self, *a: dense_calls.append(1) or original(self, *a)
    )
    clt.train_forward(x)  # CPU limit 15%: sparse
    assert dense_calls == []
    monkeypatch.setitem(sparse.CLT_DENSE_ABOVE, "cpu", 0.02)  # as on CUDA
    clt.train_forward(x)
    assert dense_calls == [1]
    clt.train_forward(x, sparse_max_density=0.5)  # an explicit limit wins
    assert dense_calls == [1]
