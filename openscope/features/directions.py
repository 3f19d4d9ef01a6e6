"""Decoder directions of a dictionary and what they do: their logit effects and their nearest neighbours.

- **logit effects**: the decoder direction d mapped to the residual stream and read out by the
  unembedding through the final norm's gain, W_U·(g ⊙ d). A direction is not a hidden state, so
  the norm's 1/rms(x) scale (which depends on the rest of x) is left out and only its gain g is
  applied; Gemma's RMSNorm multiplies by (1 + w), other models' by w (`norm_gain`). Rankings are
  what the dashboard shows; values are in logit units per unit of direction. In the same pass over
  the vocabulary, the histogram of the whole vector W_U·(g ⊙ d): `LOGIT_BINS` equal-width bins from
  its min to its max (SAEDashboard's logit histogram; `row_histograms`);
- **neighbours**: the latents with the most similar decoder directions (cosine).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import Dictionary
from openscope.models.load import LoadedModel
from openscope.models.sites import Site, locate

log = logging.getLogger(__name__)

LOGIT_BINS = 40
"""Bins of the logit histogram (SAEDashboard's)."""


class LogitHist(NamedTuple):
    """A histogram of one latent's logit effects over the whole vocabulary."""

    lo: float
    """The smallest effect (the first bin's left edge)."""
    hi: float
    """The largest effect (the last bin's right edge)."""
    counts: list[int]
    """Tokens in each of the equal-width bins between lo and hi (they sum to the vocabulary size)."""


def norm_gain(norm: nn.Module | None, width: int) -> Tensor:
    """The per-dimension gain g of a final norm, applied to a direction (see the module docstring).

    Gemma's RMSNorm multiplies by (1 + weight); other RMSNorm/LayerNorm modules by weight; no norm
    (or no weight) is a gain of 1.
    """
    weight = getattr(norm, "weight", None) if norm is not None else None
    if not isinstance(weight, Tensor):
        return torch.ones(width)
    g = weight.detach().float().cpu()
    return 1.0 + g if "gemma" in type(norm).__name__.lower() else g


def row_histograms(values: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of values [R, V], `bins` equal-width bins from the row's min to its max (the max in the
    last bin, as torch.histc): (lo [R], hi [R], counts [R, bins]); a constant row counts in bin 0."""
    lo, hi = values.min(1).values, values.max(1).values
    span = (hi - lo).clamp_min(torch.finfo(values.dtype).tiny)
    index = ((values - lo[:, None]) / span[:, None] * bins).floor_().clamp_(0, bins - 1).long()
    index += torch.arange(len(values), device=values.device)[:, None] * bins
    counts = torch.bincount(index.view(-1), minlength=len(values) * bins).view(len(values), bins)
    return lo, hi, counts


class LogitEffects(NamedTuple):
    """`logit_effects` of F directions."""

    top_values: Tensor
    """[F, k] the largest effects, largest first."""
    top_ids: Tensor
    """[F, k] their token ids."""
    bottom_values: Tensor
    """[F, k] the most negative effects, most negative first."""
    bottom_ids: Tensor
    """[F, k] their token ids."""
    hist_lo: Tensor
    """[F] the smallest effect over the vocabulary."""
    hist_hi: Tensor
    """[F] the largest."""
    hist_counts: Tensor
    """[F, bins] the histogram of all the vocabulary's effects (`row_histograms`)."""


def logit_effects(
    directions: Tensor, gain: Tensor, w_u: Tensor, k: int, chunk: int = 128, bins: int = LOGIT_BINS
) -> LogitEffects:
    """Top and bottom k of W_U·(g ⊙ d) for each direction d (rows of [F, d]), and the histogram of the
    whole vector in `bins` bins, in one pass. Chunked over latents so memory stays [chunk, vocab]."""
    k = min(k, w_u.shape[0])
    parts: list[list[Tensor]] = [[] for _ in LogitEffects._fields]
    scaled = directions.float() * gain.float()
    w_t = w_u.float().t()
    for i in range(0, max(len(scaled), 1), chunk):  # (an empty [0, vocab] chunk when there is no direction)
        logits = scaled[i : i + chunk] @ w_t
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
        hist = row_histograms(logits, bins)
        for part, t in zip(parts, (*top, *bottom, *hist), strict=True):
            part.append(t)
    return LogitEffects(*(torch.cat(p) for p in parts))


def decoder_neighbours(w_dec: Tensor, k: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Per latent, the k other latents with the highest decoder cosine: (cosines [F, k], ids [F, k])."""
    f = w_dec.shape[0]
    k = min(k, f - 1)
    unit = torch.nn.functional.normalize(w_dec.float(), dim=1)
    cos_out, id_out = [], []
    for i in range(0, f, chunk):
        cos = unit[i : i + chunk] @ unit.t()
        rows = torch.arange(i, min(i + chunk, f))
        cos[rows - i, rows] = -math.inf  # a latent is not its own neighbour
        v, j = cos.topk(k, dim=1)
        cos_out.append(v)
        id_out.append(j)
    return torch.cat(cos_out), torch.cat(id_out)


def output_directions(coder: SparseCoder) -> Tensor:
    """[F, d_out] what one unit of each latent adds to the output (W_dec rows × C_out; W_dec if folded)."""
    return coder.w_dec.detach().float() * coder.scale_out.float()


def residual_directions(loaded: LoadedModel, site: Site, directions: Tensor) -> Tensor | None:
    """Directions written at `site`, as directions in the residual stream (None if not linear there).

    resid_pre/resid_post/mlp_out (Gemma: after post_feedforward_layernorm) already live in the
    residual stream; attn_out (the o_proj input) goes through o_proj and, in Gemma, the gain of
    post_attention_layernorm; mlp_in is a normed copy of the residual, not something added to it.
    """
    if site.kind in ("resid_pre", "resid_post", "mlp_out"):
        return directions
    if site.kind == "attn_out":
        point = locate(loaded.arch.layers, loaded.arch.layers_path, site)
        weight = getattr(point.module, "weight", None)
        if not isinstance(weight, Tensor):
            return None
        out = directions @ weight.detach().float().cpu().t()
        post = getattr(loaded.arch.layers[site.layer], "post_attention_layernorm", None)
        return out * norm_gain(post, out.shape[1]) if post is not None else out
    return None


class LogitRows(NamedTuple):
    """The logit effects of a dictionary's latents, as database rows."""

    rows: list[tuple[int, int, int, int, float]]
    """(latent, sign, rank, token_id, value): sign +1 for the top k, -1 for the bottom k."""
    top_id: list[int]
    """Per latent, the token id with the largest effect (-1 without logit effects)."""
    hist: list[LogitHist | None]
    """Per latent, the histogram of its effects over the vocabulary (None without logit effects)."""


def logit_rows(loaded: LoadedModel, d: Dictionary, directions: Tensor, k: int) -> LogitRows:
    """Top and bottom k logit effects of each output direction [F, d_out] of `d` (none where the
    dictionary does not write the residual stream, the model has no unembedding, or k is 0)."""
    f = len(directions)
    rows: list[tuple[int, int, int, int, float]] = []
    top_id = [-1] * f
    hist: list[LogitHist | None] = [None] * f
    resid = residual_directions(loaded, d.site_out, directions)
    lm_head = loaded.arch.lm_head
    w_u = getattr(lm_head, "weight", None) if lm_head is not None else None
    if resid is not None and isinstance(w_u, Tensor) and k > 0:
        gain = norm_gain(loaded.arch.final_norm, resid.shape[1])
        tv, ti, bv, bi, lo, hi, counts = logit_effects(resid, gain, w_u.detach().cpu(), k)
        for latent, row in enumerate(zip(lo.tolist(), hi.tolist(), counts.tolist(), strict=True)):
            hist[latent] = LogitHist(*row)
        for latent in range(f):
            for rank, (i, v) in enumerate(zip(ti[latent].tolist(), tv[latent].tolist(), strict=True)):
                rows.append((latent, 1, rank, i, v))
            for rank, (i, v) in enumerate(zip(bi[latent].tolist(), bv[latent].tolist(), strict=True)):
                rows.append((latent, -1, rank, i, v))
            top_id[latent] = int(ti[latent, 0])
    else:
        log.info("%s writes %s, which is not the residual stream: no logit effects", d.name, d.site_out.name)
    return LogitRows(rows, top_id, hist)


def neighbour_lists(directions: Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per latent, its k nearest latents by decoder cosine as (latent, cosine), highest first ([] if k
    is 0 or there is a single latent)."""
    f = len(directions)
    if k > 0 and f > 1:
        n_cos, n_ids = decoder_neighbours(directions, k)
        return [list(zip(n_ids[i].tolist(), n_cos[i].tolist(), strict=True)) for i in range(f)]
    return [[] for _ in range(f)]
