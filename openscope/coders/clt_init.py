"""Gemma Scope 2's greedy CLT initialisation from Matryoshka single-layer transcoders (App. B).

`clt_from_transcoders` takes each layer's first `width` latents. The greedy choice (`greedy_latents`)
also avoids latents that would only re-read what an earlier layer's latent already writes forward:

    for ℓ = 0..L−1:
        take transcoder ℓ's latents in index (Matryoshka) order, skipping those marked used, until
        `width` are chosen; for each chosen latent i, among the unused latents of every later layer
        m > ℓ, mark used the one whose encoder column has the largest dot product with i's decoder row.

The transcoders are compared as saved (raw units: decoder rows unit-norm, encoder columns in the raw
input's units), so the dot product is what latent i's write would add to the later latent's
pre-activation. The chosen latents then give each CLT layer's encoder, threshold, b_enc and own-layer
decoder exactly as `clt_from_transcoders` does (`clt_from_greedy`). `layer_l0` measures the CLT's L0
per layer, which at the start is the chosen latents' summed firing frequencies (their encoders and
thresholds are the transcoders', scaled together): the start of the decaying target L0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.coders.clt import CrossLayerCoder, clt_from_transcoders
from openscope.coders.coder import SparseCoder
from openscope.coders.matryoshka import select_latents
from openscope.errors import OpenscopeError


class GreedyChoice(NamedTuple):
    """What the greedy initialisation chose."""

    chosen: list[Tensor]
    """Per layer, the int64 indices of the transcoder latents the CLT layer takes, in order."""
    used: list[Tensor]
    """Per layer, [F] bool: the transcoder's latents marked used by an earlier layer's choice."""


def _offsets(sizes: Sequence[int]) -> list[int]:
    """Start of each layer's latents in the concatenation of all layers' (and the total, last)."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


@torch.no_grad()
def greedy_latents(transcoders: Sequence[SparseCoder], width: int, block: int = 256) -> GreedyChoice:
    """The latents each CLT layer takes (see the module docstring); a one-line error when a layer has
    fewer than `width` unused latents. Scores are computed `block` candidate latents at a time."""
    folded = [t.fold() for t in transcoders]
    if not folded:
        raise OpenscopeError("no transcoders to build a CLT from")
    off = _offsets([t.cfg.width for t in folded])
    used = torch.zeros(off[-1], dtype=torch.bool, device=folded[0].w_enc.device)
    chosen: list[Tensor] = []
    for layer, t in enumerate(folded):
        later = folded[layer + 1 :]
        enc = torch.cat([u.w_enc.float() for u in later], 1) if later else None  # [d, Σ later F]
        candidates = (~used[off[layer] : off[layer + 1]]).nonzero().squeeze(1)
        if len(candidates) < width:
            raise OpenscopeError(
                f"transcoder {layer} has {len(candidates)} latents left after the greedy choice at "
                f"earlier layers, fewer than the CLT's {width} per layer"
            )
        picks: list[int] = []
        for start in range(0, width, block):
            rows = candidates[start : min(start + block, width)]
            scores = t.w_dec[rows].float() @ enc if enc is not None else None
            for r, i in enumerate(rows.tolist()):
                picks.append(i)
                if scores is None:
                    continue
                free = scores[r].masked_fill(used[off[layer + 1] :], -torch.inf)
                j = int(free.argmax())
                if free[j] > -torch.inf:
                    used[off[layer + 1] + j] = True
        chosen.append(torch.tensor(picks, dtype=torch.long))
    return GreedyChoice(chosen, [used[off[i] : off[i + 1]].cpu() for i in range(len(folded))])


def clt_from_greedy(
    transcoders: Sequence[SparseCoder], width: int | None = None, skip: bool | None = None
) -> tuple[CrossLayerCoder, GreedyChoice]:
    """A CLT (raw units) whose layer ℓ is made of the latents `greedy_latents` chose from transcoder ℓ
    (encoder, threshold, b_enc, own-layer decoder; later-layer blocks zero), and the choice."""
    if not transcoders:
        raise OpenscopeError("no transcoders to build a CLT from")
    width = width or min(t.cfg.width for t in transcoders)
    choice = greedy_latents(transcoders, width)
    chosen = [select_latents(t, idx) for t, idx in zip(transcoders, choice.chosen, strict=True)]
    return clt_from_transcoders(chosen, width, skip), choice


@torch.no_grad()
def layer_l0(clt: CrossLayerCoder, x: Tensor) -> Tensor:
    """[L] mean firing latents per token of each layer of the CLT on inputs x [L, B, d_in]."""
    return (clt.encode(x) > 0).float().sum(-1).mean(-1)
