"""What the explainer and the scorer are shown and how their answers are read: the prompts of
autointerp and their parsers, as pure functions of text windows.

The explainer sees a latent's dashboard as text: its top and quantile examples, the tokens where the
latent fires wrapped in << >>, and writes one line. The scorer sees that line and one held-out text at a
time: for detection it answers yes or no (does the latent fire anywhere in it?); for fuzzing it lists the
words where the latent fires. Parsers never raise: an answer they cannot read is `None` (detection) or
marks nothing (fuzzing), and the run counts it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from openscope.interp.backends import Message

OPEN, CLOSE = "<<", ">>"
"""How the explainer's examples mark the tokens where the latent fires."""
MAX_EXPLANATION = 200
"""Characters kept of an explanation (the first line of the answer)."""

EXPLAIN_SYSTEM = (
    "You study a neuron of a language model. You are shown texts where it is active; the tokens where it "
    f"is active are marked {OPEN}like this{CLOSE}. Say in one short line what the marked tokens have in "
    "common. Answer with the description only."
)
DETECT_SYSTEM = (
    "You predict where a neuron of a language model is active from a description of it. Answer only yes "
    "or no."
)
FUZZ_SYSTEM = (
    "You predict where a neuron of a language model is active from a description of it. List the words "
    "of the text where it is active, separated by commas, or answer none."
)


class Window(NamedTuple):
    """A piece of text with one latent's activation at each token."""

    tokens: tuple[str, ...]
    """The tokens' text ("".join(tokens) is the text)."""
    activations: tuple[float, ...]
    """The latent's activation at each token (0: it does not fire there)."""
    context: int
    """The context it was cut from (-1: not from the index)."""
    start: int
    """Position of its first token in that context."""

    @property
    def fires(self) -> bool:
        return any(a > 0 for a in self.activations)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def overlaps(self, other: Window) -> bool:
        """Whether the two share a token of the same context."""
        return (
            self.context == other.context
            and self.context >= 0
            and self.start < other.start + len(other.tokens)
            and other.start < self.start + len(self.tokens)
        )


def trim(window: Window, side: int) -> Window:
    """At most `side` tokens either side of the window's strongest token (the whole window if side < 0)."""
    if side < 0 or len(window.tokens) <= 2 * side + 1:
        return window
    peak = max(range(len(window.activations)), key=window.activations.__getitem__)
    lo = min(max(peak - side, 0), len(window.tokens) - (2 * side + 1))
    hi = lo + 2 * side + 1
    return Window(window.tokens[lo:hi], window.activations[lo:hi], window.context, window.start + lo)


def clean(text: str) -> str:
    """One line of printable text (newlines and tabs of code become visible marks, not prompt breaks)."""
    return text.replace("\r", "").replace("\n", "⏎").replace("\t", " ")


def marked(window: Window) -> str:
    """The window's text with each run of firing tokens wrapped in << >>."""
    out: list[str] = []
    inside = False
    for token, act in zip(window.tokens, window.activations, strict=True):
        fires = act > 0
        if fires and not inside:
            out.append(OPEN)
        elif not fires and inside:
            out.append(CLOSE)
        inside = fires
        out.append(clean(token))
    if inside:
        out.append(CLOSE)
    return "".join(out).strip()


def top_tokens(windows: Sequence[Window], n: int = 5) -> list[str]:
    """The distinct tokens with the largest activations across the windows, strongest first."""
    best: dict[str, float] = {}
    for w in windows:
        for token, act in zip(w.tokens, w.activations, strict=True):
            key = clean(token).strip()
            if act > 0 and key:
                best[key] = max(best.get(key, 0.0), act)
    return sorted(best, key=lambda t: -best[t])[:n]


def explainer_messages(windows: Sequence[Window]) -> list[Message]:
    """The explainer's prompt: the dashboard's examples, marked, and the strongest tokens."""
    lines = [f"Example {i + 1}: {marked(w)}" for i, w in enumerate(windows)]
    tokens = ", ".join(repr(t) for t in top_tokens(windows))
    user = "\n".join(lines) + f"\nStrongest tokens: {tokens}\nWhat do the marked tokens have in common?"
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(answer: str) -> str | None:
    """The explanation in an answer: its first non-empty line, without a label or quotes; None if empty.

    A first line that only announces a list ("The marked tokens have the following characteristics:",
    as small models often write) is joined with the list's items, markers dropped, by "; "."""
    lines = [_explanation_line(line) for line in answer.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        items = [re.sub(r"^([-*•]|\d+[.)])\s*", "", line) for line in lines[1:]]
        first = f"{first} {'; '.join(item for item in items if item)}"
    return first[:MAX_EXPLANATION]


def _explanation_line(line: str) -> str:
    """One line of an answer without a leading label, the marks, or quotes around the whole line."""
    line = re.sub(r"^\s*(explanation|description|answer)\s*:\s*", "", line, flags=re.I).strip()
    line = line.replace(OPEN, "").replace(CLOSE, "").strip()
    if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'`":  # the whole line quoted
        line = line[1:-1].strip()
    return line


def detection_messages(explanation: str, window: Window) -> list[Message]:
    """Does the latent fire anywhere in this text? (yes / no)"""
    user = (
        f"Neuron: {explanation}\nText: {clean(window.text).strip()}\n"
        "Is the neuron active anywhere in this text? Answer yes or no."
    )
    return [{"role": "system", "content": DETECT_SYSTEM}, {"role": "user", "content": user}]


def parse_yes_no(answer: str) -> bool | None:
    """True for an answer that starts with yes, False for no; None for anything else."""
    word = re.match(r"\W*(\w+)", answer)
    first = word.group(1).lower() if word else ""
    return True if first in ("yes", "true") else False if first in ("no", "false") else None


def fuzzing_messages(explanation: str, window: Window) -> list[Message]:
    """Which words of this text does the latent fire on? (a comma list, or none)"""
    user = (
        f"Neuron: {explanation}\nText: {clean(window.text).strip()}\n"
        "Which words of the text is the neuron active on?"
    )
    return [{"role": "system", "content": FUZZ_SYSTEM}, {"role": "user", "content": user}]


def _key(text: str) -> str:
    return re.sub(r"\W+", "", text.lower())


def parse_marks(answer: str, window: Window) -> list[bool]:
    """Which tokens of the window the answer names: a token is marked when its text (lower case,
    punctuation and spaces ignored) equals one of the answer's comma-separated items. "none" marks none."""
    items = {_key(item) for item in re.split(r"[,\n|;]", answer)} - {"", "none"}
    return [bool(_key(t)) and _key(t) in items for t in window.tokens]
