"""`Coder`: what every coder offers for running inside a model, one layer at a time.

A coder reads `n_layers` input sites and writes as many output sites. Layer i's latents are read from
input i and write to every output m ≥ i. A `SparseCoder` (SAE, transcoder, skip-transcoder) has one
layer, so i = m = 0 (any other index is refused with a clear error); a `CrossLayerCoder` has L: a CLT's
are consecutive model layers, a crosscoder's any chosen ones (layer i = the i-th of them), which reads
and writes the same sites.
Every method takes and returns raw activations (a coder trained on normalised ones applies its scales
inside), with N rows (tokens) in a batch.

Splicing, steering, attribution and evaluation talk to coders through this interface only, so they
treat both kinds alike: in a spliced forward the input of layer m+1 depends on the spliced output of
layer m, so they encode (`encode_at`) and decode (`decode_into`) layer by layer as the forward reaches
each site; on clean activations `reconstruct` does every layer at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

CoderKind = Literal["sae", "transcoder", "skip_transcoder", "clt", "crosscoder"]


class Reconstruction(NamedTuple):
    """Every layer of a coder on clean inputs (`Coder.reconstruct`)."""

    reconstruction: Tensor
    """[L, N, d_out] ŷ_m for every layer m."""
    latents: Tensor
    """[L, N, F] the latents of every layer (dense)."""


@runtime_checkable
class Coder(Protocol):
    """A coder bound to no site: the layer-indexed operations splicing, steering and attribution use."""

    @property
    def n_layers(self) -> int:
        """Layers the coder reads and writes (1 for a SparseCoder)."""
        ...

    @property
    def kind(self) -> CoderKind:
        """sae, transcoder, skip_transcoder, clt or crosscoder."""
        ...

    def pre_activations_at(self, i: int, x: Tensor) -> Tensor:
        """Layer i's encoder pre-activations z [N, F] from its raw inputs x [N, d_in]."""
        ...

    def encode_at(self, i: int, x: Tensor) -> Tensor:
        """Layer i's latents [N, F] from its raw inputs x [N, d_in]."""
        ...

    def decode_into(self, m: int, latents: Sequence[Tensor], x: Tensor) -> Tensor:
        """ŷ_m [N, d_out] from the latents of layers 0..m (each [N, F]) and layer m's raw input x."""
        ...

    def encoder_vectors(self, i: int, latents: Tensor) -> Tensor:
        """[n, d_in] ∂z_j/∂x for each latent j of layer i: what it reads from its raw input."""
        ...

    def decoder_vectors(self, i: int, m: int, latents: Tensor) -> Tensor:
        """[n, d_out] what one unit of each latent j of layer i adds to layer m's output (raw units)."""
        ...

    def skip_at(self, m: int, x: Tensor) -> Tensor | None:
        """Layer m's linear skip term [N, d_out] from its raw input x (None without a skip connection)."""
        ...

    def reconstruct(self, xs: Sequence[Tensor]) -> Reconstruction:
        """Latents and ŷ of every layer from the clean inputs of every layer (each [N, d_in])."""
        ...
