"""`openscope features --export DIR --neuronpedia`: Neuronpedia's dashboard import batches.

The files are those SAEDashboard's Neuronpedia runner writes for one dictionary, which Neuronpedia's
importer (and SAEDashboard's `neuronpedia_export`, which turns them into Neuronpedia's bulk-upload
layout) reads:

- `batch-<i>.json`: a `NeuronpediaDashboardBatch` — {model_id: str, layer: int, sae_set: str,
  sae_id_suffix: str | null, features: [...]} — with up to `batch_size` features each:
  {feature_index: int, neuron_alignment_indices/values/l1, correlated_neurons_indices/l1/pearson,
  correlated_features_indices/l1/pearson, neg_str, neg_values, pos_str, pos_values, frac_nonzero,
  freq_hist_data_bar_values, freq_hist_data_bar_heights, logits_hist_data_bar_heights,
  logits_hist_data_bar_values, n_prompts_total, n_tokens_in_prompt, dataset, decoder_weights_dist,
  activations: [{bin_min, bin_max, bin_contains, tokens, values, qualifying_token_index}], vector}.
- `skipped_indexes.json`: {model_id, layer (a string), sae_set, log_sparsity, skipped_indexes}: the
  latents left out of the batches (dead ones, which Neuronpedia shows as dead, and those outside
  `--export-latents`).

What each field holds here (values rounded to 5 decimals, as SAEDashboard does):
- `pos_str`/`pos_values`, `neg_str`/`neg_values`: the dashboard's top and bottom logit effects.
- `logits_hist_data_bar_values`/`_heights`: the histogram of the latent's logit effects over the whole
  vocabulary, W_U·(g ⊙ d) (`openscope.features.directions`), as SAEDashboard draws it: 40 equal-width
  bins from the vector's min to its max, bar values the bin centres, heights the token counts (all 40
  bars, empty ones included: not trimmed, so the heights sum to the vocabulary size). Empty lists for
  a dictionary that does not write the residual stream (no logit effects).
- `freq_hist_data_bar_values`/`_heights`: the activation histogram (log-spaced bins, centres as bar
  values, empty bins at either end trimmed).
- `activations`: the top examples (bin_min -1, bin_max the top activation, bin_contains -1, as
  SAEDashboard marks its top group) then each quantile group (bin_min/bin_max its activation range,
  bin_contains its share of the sampled firings).
- `neuron_alignment_*`: from the decoder when it is given: the 3 largest output coordinates of the
  latent's direction and their share of its L1 norm.
- `correlated_neurons_*`: the 3 coordinates ("neurons") of the dictionary's input activation whose
  Pearson correlation with the latent's activation, over every token `openscope features` encoded, is
  highest: `_pearson` that correlation, `_l1` the cosine similarity of the two uncentred activation
  vectors, Σax / sqrt(Σa² Σx²) (SAEDashboard's pair of Pearson correlation and cosine similarity).
  Empty lists for multi-layer coders (cross-layer transcoders, crosscoders).
- `correlated_features_*`: the same pair for the 3 other latents of the dictionary most correlated with
  this one, over a uniform sample of S tokens' codes, S = max(256, 2^25 // F) (at most the token
  budget; recorded as `correlation_sample` in the dictionary's settings). Latents that never fire in
  the sample have empty lists.
- `decoder_weights_dist`: for dictionaries writing `attn_out` (the o_proj input, heads concatenated),
  SAEDashboard's decoder weight distribution: per head, the L2 norm of the latent's direction restricted
  to that head's slice, normalised to sum 1. Empty for other sites.
(`openscope.features.correlations` computes the last three.) A database built before these existed
has none of them: those fields are then empty lists, the runner's own defaults.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from openscope.coders.coder import SparseCoder
from openscope.features.db import FeatureDB
from openscope.features.directions import output_directions
from openscope.features.schema import Correlate, DictionaryInfo, FeatureDetail, LatentExtras
from openscope.files import Ownership, absolute, child, replacing, safe_name, write_text

NEURONPEDIA_EXPORT = Ownership("a feature export", files=("*.json", "*.tmp"))
"""What `<export>/<dictionary>/` may hold to be replaced (as `openscope.features.export`'s: JSON files)."""
SKIPPED = "skipped_indexes.json"
ALIGNMENT_ROWS = 3
"""Neuron alignment rows per latent (SAEDashboard's feature tables show 3)."""
LOG_SPARSITY = 1
"""skipped_indexes.json's log_sparsity: the runner's default threshold (no latent skipped for sparsity;
only dead latents, which fire on no token, are left out)."""


def _r(values: Sequence[float]) -> list[float]:
    return [round(float(v), 5) for v in values]


def neuron_alignment(
    direction: Tensor, k: int = ALIGNMENT_ROWS
) -> tuple[list[int], list[float], list[float]]:
    """The k largest coordinates of a latent's output direction: (indices, values, |value| / L1 norm)."""
    top = direction.float().topk(min(k, direction.numel()))
    l1 = float(direction.float().abs().sum()) or 1.0
    return top.indices.tolist(), _r(top.values.tolist()), _r([abs(v) / l1 for v in top.values.tolist()])


def _histogram(detail: FeatureDetail) -> tuple[list[float], list[float]]:
    edges, counts = detail.histogram.edges, list(detail.histogram.counts)
    used = [i for i, c in enumerate(counts) if c]
    if not used or len(edges) != len(counts) + 1:
        return [], []
    lo, hi = used[0], used[-1] + 1
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(lo, hi)]
    return _r(centres), [float(c) for c in counts[lo:hi]]


def logit_bars(extras: LatentExtras) -> tuple[list[float], list[float]]:
    """The logit histogram as (bar centres, bar heights), every bin kept ([], [] without one)."""
    hist = extras.logit_histogram
    if hist is None or not hist.counts:
        return [], []
    width = (hist.hi - hist.lo) / len(hist.counts)
    centres = [hist.lo + (i + 0.5) * width for i in range(len(hist.counts))]
    return _r(centres), [float(c) for c in hist.counts]


def _table(rows: list[Correlate]) -> tuple[list[int], list[float], list[float]]:
    """(indices, cosine as `_l1`, pearson) of a correlated neurons/features table."""
    return [r.index for r in rows], _r([r.cosine for r in rows]), _r([r.pearson for r in rows])


def _activations(detail: FeatureDetail) -> list[dict[str, Any]]:
    def one(e: Any, bin_min: float, bin_max: float, contains: float) -> dict[str, Any]:
        return {
            "bin_min": bin_min,
            "bin_max": bin_max,
            "bin_contains": contains,
            "tokens": list(e.tokens),
            "values": _r(e.activations),
            "qualifying_token_index": int(e.max_index),
        }

    top_max = round(float(detail.max_activation), 5)
    out = [one(e, -1.0, top_max, -1.0) for e in detail.top_examples]
    sampled = sum(len(g.examples) for g in detail.quantiles) or 1
    for g in detail.quantiles:
        share = round(len(g.examples) / sampled, 5)
        out += [one(e, round(g.low, 5), round(g.high, 5), share) for e in g.examples]
    return out


def dashboard_feature(
    detail: FeatureDetail,
    info: DictionaryInfo,
    direction: Tensor | None = None,
    context_len: int = 0,
    n_contexts: int = 0,
    extras: LatentExtras | None = None,
) -> dict[str, Any]:
    """One latent as a NeuronpediaDashboardFeature (module docstring); `extras` (`FeatureDB.extras`)
    gives the logit histogram, correlations and decoder weight distribution (None: empty lists)."""
    extras = extras or LatentExtras()
    indices, values, l1 = neuron_alignment(direction) if direction is not None else ([], [], [])
    bar_values, bar_heights = _histogram(detail)
    logit_values, logit_heights = logit_bars(extras)
    neurons, features = _table(extras.correlated_neurons), _table(extras.correlated_features)
    return {
        "feature_index": int(detail.latent),
        "neuron_alignment_indices": indices,
        "neuron_alignment_values": values,
        "neuron_alignment_l1": l1,
        "correlated_neurons_indices": neurons[0],
        "correlated_neurons_l1": neurons[1],
        "correlated_neurons_pearson": neurons[2],
        "correlated_features_indices": features[0],
        "correlated_features_l1": features[1],
        "correlated_features_pearson": features[2],
        "neg_str": [t.token for t in detail.bottom_logits],
        "neg_values": _r([t.value for t in detail.bottom_logits]),
        "pos_str": [t.token for t in detail.top_logits],
        "pos_values": _r([t.value for t in detail.top_logits]),
        "frac_nonzero": float(detail.frequency),
        "freq_hist_data_bar_values": bar_values,
        "freq_hist_data_bar_heights": bar_heights,
        "logits_hist_data_bar_heights": logit_heights,
        "logits_hist_data_bar_values": logit_values,
        "n_prompts_total": int(n_contexts),
        "n_tokens_in_prompt": int(context_len),
        "dataset": info.source,
        "decoder_weights_dist": _r(extras.head_distribution),
        "activations": _activations(detail),
        "vector": [],
    }


def _layer(info: DictionaryInfo) -> int:
    return int(info.site.split(".")[0])


def export_neuronpedia(
    db_path: str | Path,
    dictionary: str,
    out: str | Path,
    latents: Sequence[int],
    *,
    directions: Tensor | None = None,
    batch_size: int = 128,
    context_len: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write `<out>/<dictionary>/batch-<i>.json` and `skipped_indexes.json` (module docstring) for the
    chosen latents; `directions` [F, d_out] gives the neuron alignment. Returns the files written."""
    with FeatureDB(db_path) as db:
        info = db.dictionary(dictionary)
        details = [db.feature(dictionary, latent) for latent in latents]
        alive = [d for d in details if d.n_fired > 0]
        extras = {d.latent: db.extras(dictionary, d.latent) for d in alive}
    n_contexts = 0  # the index keeps tokens, not contexts: left 0 (the runner's "unknown")
    target = child(absolute(out), safe_name(dictionary, "dictionary"))
    batch = {"model_id": info.model, "layer": _layer(info), "sae_set": info.name, "sae_id_suffix": None}
    files: list[Path] = []
    with replacing(target, NEURONPEDIA_EXPORT, overwrite=overwrite, flag="--export") as folder:
        for i in range(0, len(alive), batch_size):
            features = [
                dashboard_feature(
                    d,
                    info,
                    directions[d.latent] if directions is not None else None,
                    context_len,
                    n_contexts,
                    extras[d.latent],
                )
                for d in alive[i : i + batch_size]
            ]
            name = f"batch-{i // batch_size}.json"
            write_text(folder / name, json.dumps({**batch, "features": features}), sync=False)
            files.append(target / name)
        chosen = {d.latent for d in alive}
        skipped = {
            "model_id": info.model,
            "layer": str(_layer(info)),
            "sae_set": info.name,
            "log_sparsity": LOG_SPARSITY,
            "skipped_indexes": [i for i in range(info.width) if i not in chosen],
        }
        write_text(folder / SKIPPED, json.dumps(skipped), sync=False)
    return [*files, target / SKIPPED]


def decoder_directions(coder: torch.nn.Module) -> Tensor | None:
    """[F, d_out] each latent's output direction of a single-layer coder (None for other coders)."""
    return output_directions(coder).cpu() if isinstance(coder, SparseCoder) else None
