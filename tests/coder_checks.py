"""What the `Coder` interface promises, checked for any coder (shared by test_coders.py and test_clt.py):
all layers at once equal layer by layer, and the encoder and decoder vectors are the derivatives of what
the coder computes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from openscope.coders.protocol import Coder
from openscope.errors import OpenscopeError


def check_coder_interface(coder: Coder, xs: list[Tensor]) -> None:
    """Check every method of the interface on raw inputs xs (one [N, d_in] per layer of the coder)."""
    n = coder.n_layers
    assert isinstance(coder, Coder) and len(xs) == n
    with torch.no_grad():
        recon, latents = coder.reconstruct(xs)
        layers = [coder.encode_at(i, x) for i, x in enumerate(xs)]
        assert bool(torch.stack(layers).gt(0).any()), "no latent fires: the checks would be vacuous"
        for m in range(n):
            torch.testing.assert_close(latents[m], layers[m])
            torch.testing.assert_close(recon[m], coder.decode_into(m, layers[: m + 1], xs[m]))
        picked = torch.tensor([0, 3, 5])
        for i in range(n):
            for m in range(i, n):
                # One more unit of latent j at layer i adds decoder_vectors(i, m)[j] to ŷ_m (ŷ is linear in it).
                rows = coder.decoder_vectors(i, m, picked)
                for row, j in zip(rows, picked.tolist(), strict=True):
                    bumped = [a.clone() for a in layers[: m + 1]]
                    bumped[i][:, j] += 1
                    change = coder.decode_into(m, bumped, xs[m]) - coder.decode_into(
                        m, layers[: m + 1], xs[m]
                    )
                    torch.testing.assert_close(change, row.expand_as(change), rtol=1e-4, atol=1e-5)
            # The skip term is the part of ŷ_m that moves with x_m when no latent fires.
            zeros = [torch.zeros_like(a) for a in layers[: i + 1]]
            moved = coder.decode_into(i, zeros, xs[i]) - coder.decode_into(i, zeros, torch.zeros_like(xs[i]))
            skip = coder.skip_at(i, xs[i])
            torch.testing.assert_close(moved, torch.zeros_like(moved) if skip is None else skip)
    for i in range(n):
        # encoder_vectors(i)[j] = ∂z_j/∂x for layer i's pre-activations.
        x = xs[i][:1].clone().requires_grad_(True)
        z = coder.pre_activations_at(i, x)
        for row, j in zip(coder.encoder_vectors(i, picked), picked.tolist(), strict=True):
            (grad,) = torch.autograd.grad(z[0, j], x, retain_graph=True)
            torch.testing.assert_close(row.detach(), grad[0])
    for bad in (-1, n):
        with pytest.raises(OpenscopeError, match="layer"):
            coder.encode_at(bad, xs[0])
        with pytest.raises(OpenscopeError, match="layer"):
            coder.decoder_vectors(0, bad, picked)
