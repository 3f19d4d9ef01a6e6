"""Sparse dictionaries: the SparseCoder (SAE / transcoder / skip-transcoder), its activations,
losses, training step and Gemma Scope 2 file format."""

from openscope.coders.activations import (
    BANDWIDTH,
    ThresholdEstimator,
    batchtopk,
    jumprelu,
    relu,
    step,
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
from openscope.coders.train import DeadLatentTracker, StepConfig, StepStats, make_optimizer, train_step

__all__ = [
    "BANDWIDTH",
    "CoderConfig",
    "CoderOutput",
    "DeadLatentTracker",
    "SparseCoder",
    "SparseLatents",
    "StepConfig",
    "StepStats",
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
    "make_optimizer",
    "matryoshka_loss",
    "normalisation_scale",
    "read_coder_config",
    "reconstruction_loss",
    "relu",
    "save_coder",
    "sparsity_coeff_at",
    "step",
    "topk",
    "topk_to_jumprelu",
    "train_step",
]
