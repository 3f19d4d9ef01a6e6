"""Evaluation: splice dictionaries into the model, measure them (FVU, L0, dead/dense, delta LM loss,
KL, loss recovered, firing frequencies), and write reports and plots."""

from openscope.eval.evaluate import evaluate
from openscope.eval.metrics import Histogram, ReconstructionMetrics
from openscope.eval.results import DictionaryReport, EvalConfig, EvalReport, LMMetrics
from openscope.eval.splice import SpliceHandle, SpliceTerms, ablated, check_dictionaries, spliced

__all__ = [
    "DictionaryReport",
    "EvalConfig",
    "EvalReport",
    "Histogram",
    "LMMetrics",
    "ReconstructionMetrics",
    "SpliceHandle",
    "SpliceTerms",
    "ablated",
    "check_dictionaries",
    "evaluate",
    "spliced",
]
