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

What each field holds here: the logit tables are the dashboard's top and bottom logit effects; the
activation histogram is the dashboard's (log-spaced bins, centres as bar values, empty bins at either
end trimmed); activations are the top examples (bin_min -1, bin_max the top activation, bin_contains
-1, as SAEDashboard marks its top group) then each quantile group (bin_min/bin_max its activation
range, bin_contains its share of the sampled firings); neuron alignment is computed from the decoder
(the 3 largest output coordinates of the latent's direction and their share of its L1 norm) when the
decoder is given. Correlated neurons and features (activation correlations over the data), the logit
histogram and decoder_weights_dist (attention heads) are not computed by `openscope features`: they
are written as empty lists, the runner's own defaults. Values are rounded to 5 decimals as SAEDashboard
does.
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
from openscope.features.schema import DictionaryInfo, FeatureDetail
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
) -> dict[str, Any]:
    """One latent as a NeuronpediaDashboardFeature (module docstring)."""
    indices, values, l1 = neuron_alignment(direction) if direction is not None else ([], [], [])
    bar_values, bar_heights = _histogram(detail)
    return {
        "feature_index": int(detail.latent),
        "neuron_alignment_indices": indices,
        "neuron_alignment_values": values,
        "neuron_alignment_l1": l1,
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        "neg_str": [t.token for t in detail.bottom_logits],
        "neg_values": _r([t.value for t in detail.bottom_logits]),
        "pos_str": [t.token for t in detail.top_logits],
        "pos_values": _r([t.value for t in detail.top_logits]),
        "frac_nonzero": float(detail.frequency),
        "freq_hist_data_bar_values": bar_values,
        "freq_hist_data_bar_heights": bar_heights,
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "n_prompts_total": int(n_contexts),
        "n_tokens_in_prompt": int(context_len),
        "dataset": info.source,
        "decoder_weights_dist": [],
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
    n_contexts = 0  # the index keeps tokens, not contexts: left 0 (the runner's "unknown")
    target = child(absolute(out), safe_name(dictionary, "dictionary"))
    batch = {"model_id": info.model, "layer": _layer(info), "sae_set": info.name, "sae_id_suffix": None}
    files: list[Path] = []
    with replacing(target, NEURONPEDIA_EXPORT, overwrite=overwrite, flag="--export") as folder:
        for i in range(0, len(alive), batch_size):
            features = [
                dashboard_feature(
                    d, info, directions[d.latent] if directions is not None else None, context_len, n_contexts
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
