"""Autointerp's scores: detection and fuzzing, as balanced accuracies of the scorer's predictions.

Detection: the scorer reads the explanation and one held-out text at a time, a shuffled mix of texts
where the latent fires and texts where it does not, and says whether it fires. Fuzzing: the scorer
lists the words where the latent fires in held-out firing texts; every token is a prediction.

Both are balanced accuracies (the mean of the true-positive and true-negative rates), so a scorer that
learns nothing from the explanation (always yes, always no, or coin flips) scores 0.5 whatever the mix,
and one that applies the latent's true rule scores 1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import NamedTuple

from openscope.interp.backends import ChatBackend
from openscope.interp.prompts import (
    Window,
    detection_messages,
    fuzzing_messages,
    parse_marks,
    parse_yes_no,
)


def balanced_accuracy(truth: Sequence[bool], predicted: Sequence[bool]) -> float:
    """Mean of the recall of each class present in truth (NaN when truth is empty)."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} labels but {len(predicted)} predictions")
    recalls = []
    for cls in (True, False):
        hits = [p == cls for t, p in zip(truth, predicted, strict=True) if t == cls]
        if hits:
            recalls.append(sum(hits) / len(hits))
    return sum(recalls) / len(recalls) if recalls else math.nan


class Score(NamedTuple):
    """One score of one latent."""

    value: float
    """Balanced accuracy in [0, 1] (NaN: nothing to score)."""
    n: int
    """Predictions it averages (texts for detection, tokens for fuzzing)."""
    unparsed: int
    """Answers the parser could not read (counted as "does not fire")."""
    calls: int
    """Calls made to the scorer (not counting cached answers)."""
    tokens: int
    """Prompt and answer tokens of those calls."""


def detection_score(
    scorer: ChatBackend,
    explanation: str,
    positives: Sequence[Window],
    negatives: Sequence[Window],
    *,
    max_tokens: int = 4,
    seed: int = 0,
) -> Score:
    """Ask, text by text in a shuffled order, whether the latent fires; score the answers."""
    texts = [(w, True) for w in positives] + [(w, False) for w in negatives]
    random.Random(seed).shuffle(texts)
    truth, predicted = [], []
    unparsed = calls = tokens = 0
    for window, fires in texts:
        reply = scorer.chat(detection_messages(explanation, window), max_tokens)
        calls += not reply.cached
        tokens += reply.prompt_tokens + reply.completion_tokens
        said = parse_yes_no(reply.text)
        unparsed += said is None
        truth.append(fires)
        predicted.append(bool(said))
    return Score(balanced_accuracy(truth, predicted), len(truth), unparsed, calls, tokens)


def fuzzing_score(
    scorer: ChatBackend, explanation: str, positives: Sequence[Window], *, max_tokens: int = 24
) -> Score:
    """Ask which words of each held-out firing text the latent fires on; score every token."""
    truth: list[bool] = []
    predicted: list[bool] = []
    calls = tokens = 0
    for window in positives:
        reply = scorer.chat(fuzzing_messages(explanation, window), max_tokens)
        calls += not reply.cached
        tokens += reply.prompt_tokens + reply.completion_tokens
        truth += [a > 0 for a in window.activations]
        predicted += parse_marks(reply.text, window)
    return Score(balanced_accuracy(truth, predicted), len(truth), 0, calls, tokens)
