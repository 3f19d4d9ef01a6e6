"""SAEBench's metrics under its own names, and its JSON layout (one file per eval type).

Core metrics (SAEBench's `core` eval, from SAELens), measured on the same kept tokens as openscope's:
- `ce_loss_score` = (CE_zero − CE_dict) / (CE_zero − CE_clean) (openscope's loss recovered);
  `kl_div_score` = (KL_zero − KL_dict) / KL_zero, KL_zero with the output site zero-ablated.
- `explained_variance` = 1 − E‖x − x̂‖² / E‖x − x̄‖² (1 − FVU; SAEBench's intended formula: its code's
  total variance subtracts the squared mean of x², not ‖x̄‖², which this does not copy);
  `explained_variance_legacy`: the mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄_batch‖².
- `mse`: openscope's per-element MSE (SAEBench divides each token's squared error by the batch's token count).
- `cossim`: mean cosine of x and x̂; `l2_norm_in`/`l2_norm_out`: mean ‖x‖ and ‖x̂‖; `l2_ratio`: mean
  ‖x̂‖/‖x‖ (‖x‖ < 1e-4 divides by 1); `relative_reconstruction_bias` = E‖x̂‖² / E⟨x, x̂⟩ (over all tokens,
  where SAEBench averages per-batch ratios).
- `l0`, `l1`: mean count and sum of the latents per token.
- `frac_alive`, `freq_over_1_percent`, `freq_over_10_percent`: fractions of latents firing on > 0, > 1% and
  > 10% of tokens; `normalized_freq_over_*`: those latents' share of all firings.
- `average_max_decoder_cosine_sim` / `..._encoder_...`: mean over latents of the largest cosine between
  its decoder (encoder) vector and any other latent's (single-layer dictionaries; NaN for CLTs).
Per latent (the `core` file's details): density, firings per context it fires in (consistent activation
heuristic), encoder bias and norm, encoder–decoder cosine, max decoder/encoder cosines.
"""

from __future__ import annotations

import math
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import Tensor

from openscope.coders.dictionary import Dictionary
from openscope.eval.absorption import F1_JUMP, MAX_K, MIN_LETTERS, MIN_PROBE_F1, TEMPLATE, AbsorptionReport
from openscope.eval.metrics import ReconstructionMetrics
from openscope.eval.probing import ProbeScores, ProbingReport
from openscope.models.hookpoints import tl_hook_name

CORE = "core"
SPARSE_PROBING = "sparse_probing"
ABSORPTION = "absorption_first_letter"
"""SAEBench's eval type ids (also its folder names)."""


class CoreSums:
    """Streaming float64 sums of SAEBench's core metrics that openscope's own sums do not hold."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.cossim = self.norm_in = self.norm_out = self.ratio = 0.0
        self.out_sq = self.dot = self.l1 = self.ev_legacy = 0.0
        self.fired = torch.zeros(width, dtype=torch.float64)
        self.contexts = torch.zeros(width, dtype=torch.float64)

    def add(self, x: Tensor, x_hat: Tensor, latents: Tensor, context: Tensor) -> None:
        """Add a batch: targets x [N, d], reconstructions x̂ [N, d], latents [N, F] and the index of
        each row's context [N] (firings per context for the consistent activation heuristic)."""
        if len(x) == 0:
            return
        x, x_hat = x.double(), x_hat.double()
        n_in, n_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n += len(x)
        self.cossim += float((x * x_hat).sum(-1).div(n_in * n_out).nan_to_num(0.0).sum())
        self.norm_in += float(n_in.sum())
        self.norm_out += float(n_out.sum())
        self.ratio += float((n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)).sum())
        self.out_sq += float(n_out.pow(2).sum())
        self.dot += float((x * x_hat).sum())
        self.l1 += float(latents.double().sum())
        resid = (x - x_hat).pow(2).sum(-1)
        spread = (x - x.mean(0)).pow(2).sum(-1)
        self.ev_legacy += float((1 - resid / spread).nan_to_num(0.0, posinf=0.0, neginf=0.0).sum())
        on = (latents > 0).double().cpu()
        self.fired += on.sum(0)
        _, local = torch.unique(context.cpu(), return_inverse=True)
        per_context = torch.zeros(int(local.max()) + 1, on.shape[1], dtype=torch.float64)
        per_context.index_add_(0, local, on)
        self.contexts += (per_context > 0).double().sum(0)

    def mean(self, total: float) -> float:
        return total / self.n if self.n else math.nan


def _max_cosine(vectors: Tensor, chunk: int = 1024) -> Tensor:
    """[F] the largest cosine of each row of vectors [F, d] with any other row (chunked: no F×F matrix)."""
    # float32: a 16k-latent dictionary's all-pairs cosines are ~10^11 multiply-adds.
    unit = vectors.float() / vectors.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(len(unit), dtype=torch.float64)
    for start in range(0, len(unit), chunk):
        sims = unit[start : start + chunk] @ unit.t()
        rows = torch.arange(len(sims))
        sims[rows, rows + start] = -math.inf
        out[start : start + chunk] = sims.max(1).values if len(unit) > 1 else math.nan
    return out


@torch.inference_mode()
def weight_metrics(d: Dictionary) -> dict[str, Tensor] | None:
    """Per-latent weight metrics of a single-layer dictionary (None for a CLT or crosscoder)."""
    if d.n_layers != 1:
        return None
    coder = d.coder
    latents = torch.arange(coder.cfg.width)
    enc = coder.encoder_vectors(0, latents).double().cpu()
    dec = coder.decoder_vectors(0, 0, latents).double().cpu()
    bias = getattr(coder, "b_enc", None)
    both = enc.shape[1] == dec.shape[1]
    return {
        "encoder_bias": bias.detach().double().cpu() if isinstance(bias, Tensor) else torch.zeros(len(enc)),
        "encoder_norm": enc.norm(dim=-1),
        "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(enc, dec, dim=-1)
        if both
        else torch.full((len(enc),), math.nan),
        "max_decoder_cosine_sim": _max_cosine(dec),
        "max_encoder_cosine_sim": _max_cosine(enc),
    }


def core_metrics(
    recon: ReconstructionMetrics,
    lm: Any,
    kl_zero: float | None,
    sums: CoreSums,
    weights: dict[str, Tensor] | None,
) -> dict[str, dict[str, float]]:
    """SAEBench's core metric categories, its field names (`lm`: openscope's `LMMetrics`)."""
    freqs = recon.frequencies.double().cpu()
    total = float(freqs.sum())

    def share(threshold: float) -> float:
        return float(freqs[freqs > threshold].sum()) / total if total > 0 else 0.0

    nan = math.nan
    kl_score = (kl_zero - lm.kl) / kl_zero if kl_zero else nan
    w = weights or {}
    return {
        "model_behavior_preservation": {
            "kl_div_score": kl_score,
            "kl_div_with_ablation": kl_zero if kl_zero is not None else nan,
            "kl_div_with_sae": lm.kl,
        },
        "model_performance_preservation": {
            "ce_loss_score": lm.loss_recovered if lm.loss_recovered is not None else nan,
            "ce_loss_with_ablation": lm.ce_zero if lm.ce_zero is not None else nan,
            "ce_loss_with_sae": lm.ce_spliced,
            "ce_loss_without_sae": lm.ce_clean,
        },
        "reconstruction_quality": {
            "explained_variance": 1 - recon.fvu,
            "explained_variance_legacy": sums.mean(sums.ev_legacy),
            "mse": recon.mse,
            "cossim": sums.mean(sums.cossim),
        },
        "shrinkage": {
            "l2_norm_in": sums.mean(sums.norm_in),
            "l2_norm_out": sums.mean(sums.norm_out),
            "l2_ratio": sums.mean(sums.ratio),
            "relative_reconstruction_bias": sums.out_sq / sums.dot if sums.dot else nan,
        },
        "sparsity": {"l0": recon.l0, "l1": sums.mean(sums.l1)},
        "token_stats": {
            "total_tokens_eval_reconstruction": recon.n_tokens,
            "total_tokens_eval_sparsity_variance": recon.n_tokens,
        },
        "misc_metrics": {
            "freq_over_1_percent": float((freqs > 0.01).double().mean()),
            "freq_over_10_percent": float((freqs > 0.1).double().mean()),
            "normalized_freq_over_1_percent": share(0.01),
            "normalized_freq_over_10_percent": share(0.1),
            "average_max_encoder_cosine_sim": float(w["max_encoder_cosine_sim"].nanmean()) if w else nan,
            "average_max_decoder_cosine_sim": float(w["max_decoder_cosine_sim"].nanmean()) if w else nan,
            "frac_alive": float((freqs > 0).double().mean()),
        },
    }


def core_details(
    recon: ReconstructionMetrics, sums: CoreSums, weights: dict[str, Tensor] | None, digits: int = 6
) -> list[dict[str, Any]]:
    """SAEBench's per-latent `CoreFeatureMetric` rows."""
    density = recon.frequencies.double().cpu()
    heuristic = sums.fired / sums.contexts
    nan = torch.full_like(density, math.nan)
    w = weights or {}
    cols = {
        "feature_density": density,
        "consistent_activation_heuristic": heuristic,
        **{
            k: w.get(k, nan)
            for k in (
                "encoder_bias",
                "encoder_norm",
                "encoder_decoder_cosine_sim",
                "max_decoder_cosine_sim",
                "max_encoder_cosine_sim",
            )
        },
    }
    lists = {k: v.tolist() for k, v in cols.items()}
    return [
        {"index": i, **{k: _rounded(v[i], digits) for k, v in lists.items()}} for i in range(len(density))
    ]


def _rounded(x: float, digits: int) -> float | None:
    return round(x, digits) if math.isfinite(x) else None


def sae_cfg(d: Dictionary, model: str) -> dict[str, Any]:
    """The SAELens-style config SAEBench records beside each result."""
    cfg = d.coder.cfg
    return {
        "model_name": model,
        "d_in": cfg.d_in,
        "d_sae": cfg.width * d.n_layers,
        "hook_name": tl_hook_name(d.site_in),
        "hook_layer": d.site_in.layer,
        "architecture": cfg.activation,
        "kind": cfg.kind,
        "openscope_name": d.name,
    }


def eval_output(
    eval_type: str,
    eval_config: dict[str, Any],
    metrics: dict[str, dict[str, Any]],
    details: list[dict[str, Any]],
    d: Dictionary,
    model: str,
    unstructured: Any = None,
) -> dict[str, Any]:
    """One result in SAEBench's `BaseEvalOutput` layout."""
    try:
        ours = version("openscope")
    except PackageNotFoundError:
        ours = "unknown"
    return {
        "eval_type_id": eval_type,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": f"openscope-{ours}",
        "sae_lens_id": d.name,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg(d, model),
        "eval_result_unstructured": unstructured,
    }


def result_path(eval_type: str, name: str) -> str:
    """Where SAEBench keeps a result, relative to the output folder: `saebench/<type>/<name>_eval_results.json`."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"saebench/{eval_type}/{safe}_eval_results.json"


def _probe_fields(scores: ProbeScores) -> dict[str, dict[str, float | None]]:
    llm: dict[str, float | None] = {"llm_test_accuracy": scores.llm_test_accuracy}
    llm |= {f"llm_top_{k}_test_accuracy": v for k, v in scores.llm_top_k.items()}
    sae: dict[str, float | None] = {"sae_test_accuracy": None}
    sae |= {f"sae_top_{k}_test_accuracy": v for k, v in scores.sae_top_k.items()}
    return {"llm": llm, "sae": sae}


def _flat(scores: ProbeScores) -> dict[str, float | None]:
    return {k: v for group in _probe_fields(scores).values() for k, v in group.items()}


def probing_parts(r: ProbingReport) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(metrics by category, one detail per task, per-class results) in SAEBench's sparse_probing names."""
    details = [{"dataset_name": t.task, **_flat(t.scores)} for t in r.tasks]
    per_class = {f"{t.task}_results": {c: _flat(s) for c, s in t.per_class.items()} for t in r.tasks}
    return _probe_fields(r.scores), details, per_class


def probing_output(r: ProbingReport, d: Dictionary, model: str) -> dict[str, Any]:
    """A sparse probing result in SAEBench's `sparse_probing` layout (per task in the details, per class
    in the unstructured part; `sae_test_accuracy`, a probe on every latent, is not measured: None)."""
    config = {
        "random_seed": r.seed,
        "dataset_names": [t.task for t in r.tasks],
        "probe_train_set_size": sum(t.n_train for t in r.tasks),
        "probe_test_set_size": sum(t.n_test for t in r.tasks),
        "context_length": r.context_len,
        "k_values": list(r.ks),
        "model_name": model,
        "train_fraction": r.train_fraction,
        "texts_per_class": r.per_class,
    }
    metrics, details, per_class = probing_parts(r)
    return eval_output(SPARSE_PROBING, config, metrics, details, d, model, per_class)


def absorption_parts(r: AbsorptionReport) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(metrics by category, one detail per letter, what else was found) in SAEBench's absorption names."""
    keys = (
        "mean_absorption_fraction_score",
        "mean_full_absorption_score",
        "mean_num_split_features",
        "std_dev_absorption_fraction_score",
        "std_dev_full_absorption_score",
        "std_dev_num_split_features",
    )
    details = [
        {
            "first_letter": x.first_letter,
            "mean_absorption_fraction": x.mean_absorption_fraction,
            "full_absorption_rate": x.full_absorption_rate,
            "num_full_absorption": x.num_full_absorption,
            "num_probe_true_positives": x.num_probe_true_positives,
            "num_split_features": x.num_split_features,
        }
        for x in r.letters
    ]
    unstructured = {
        "enough_letters": r.enough_letters,
        "main_latents": {x.first_letter: x.main_latents for x in r.letters},
        "probe_f1": {x.first_letter: x.probe_f1 for x in r.letters},
    }
    return {"mean": {k: getattr(r, k) for k in keys}}, details, unstructured


def absorption_output(r: AbsorptionReport, d: Dictionary, model: str) -> dict[str, Any]:
    """An absorption result in SAEBench's `absorption_first_letter` layout."""
    config = {
        "model_name": model,
        "random_seed": r.seed,
        "f1_jump_threshold": F1_JUMP,
        "max_k_value": MAX_K,
        "prompt_template": TEMPLATE,
        "prompt_token_pos": None,
        "min_GT_probe_f1": MIN_PROBE_F1,
        "min_feats_for_eval": MIN_LETTERS,
        "n_train_words": r.n_train_words,
        "n_test_words": r.n_test_words,
    }
    metrics, details, unstructured = absorption_parts(r)
    return eval_output(ABSORPTION, config, metrics, details, d, model, unstructured)
