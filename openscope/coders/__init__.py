"""Sparse dictionaries: the SparseCoder (SAE / transcoder / skip-transcoder) and the cross-layer
transcoder, their activations and losses, file formats (Gemma Scope 1/2, SAELens, circuit-tracer) and
`Dictionary`, a coder bound to its sites. The training step lives in `openscope.train.steps`."""

from openscope.coders.activations import (
    BANDWIDTH,
    ThresholdEstimator,
    batchtopk,
    jumprelu,
    relu,
    step,
    threshold_for_l0,
    thresholds_for_rate,
    topk,
)
from openscope.coders.coder import (
    CoderConfig,
    CoderOutput,
    SparseCoder,
    SparseLatents,
    normalisation_scale,
    topk_to_jumprelu,
)
from openscope.coders.io import load_coder, read_coder_config, save_coder
from openscope.coders.losses import (
    aux_k_loss,
    frequency_penalty,
    fvu,
    l0_linear_loss,
    l0_quadratic_loss,
    l1_loss,
    lr_at,
    matryoshka_loss,
    reconstruction_loss,
    sparsity_coeff_at,
)
from openscope.coders.protocol import Coder, CoderKind, Reconstruction

__all__ = [
    "BANDWIDTH",
    "Coder",
    "CoderConfig",
    "CoderKind",
    "CoderOutput",
    "Reconstruction",
    "SparseCoder",
    "SparseLatents",
    "ThresholdEstimator",
    "aux_k_loss",
    "batchtopk",
    "frequency_penalty",
    "fvu",
    "jumprelu",
    "l0_linear_loss",
    "l0_quadratic_loss",
    "l1_loss",
    "load_coder",
    "lr_at",
    "matryoshka_loss",
    "normalisation_scale",
    "read_coder_config",
    "reconstruction_loss",
    "relu",
    "save_coder",
    "sparsity_coeff_at",
    "step",
    "threshold_for_l0",
    "thresholds_for_rate",
    "topk",
    "topk_to_jumprelu",
]
