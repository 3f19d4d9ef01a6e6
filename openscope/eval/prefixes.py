"""The Matryoshka prefix-quality curve of `openscope eval --prefixes`.

A prefix p of a dictionary is the dictionary with only its first p latents (per layer for a CLT), every
later latent zeroed before decoding (`openscope.coders.matryoshka.prefix_coder`). Each prefix is
evaluated as one more dictionary on the same batches: its reconstruction metrics come from the clean
activations the main evaluation captures anyway, and its delta loss and KL from one more altered forward,
restarted from the same clean record (`openscope.eval.restart`), so a prefix costs one spliced forward
per batch. Which prefixes: `auto` reads the `--matryoshka` its training recorded in config.json
(`config["openscope"]["train_config"]["matryoshka"]`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from openscope.coders.dictionary import Dictionary
from openscope.coders.matryoshka import eval_prefixes, parse_matryoshka, prefix_coder
from openscope.errors import OpenscopeError
from openscope.eval import metrics as m
from openscope.eval.results import LMMetrics, PrefixMetrics


def recorded_matryoshka(d: Dictionary) -> str:
    """The `--matryoshka` a dictionary was trained with, from its config.json ('' when not recorded)."""
    provenance = (d.config or {}).get("openscope")
    train = provenance.get("train_config") if isinstance(provenance, dict) else None
    value = train.get("matryoshka", "") if isinstance(train, dict) else ""
    return value if isinstance(value, str) else ""


def prefix_sizes(d: Dictionary, option: str) -> tuple[int, ...]:
    """The prefixes to measure for a dictionary under `--prefixes option` (auto, none or sizes), each at
    most its width (per layer); a one-line error for a bad option."""
    width = d.coder.cfg.width
    text = option.strip()
    if text in ("", "none"):
        return ()
    if text == "auto":
        return eval_prefixes(parse_matryoshka(recorded_matryoshka(d)), width)
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise OpenscopeError(f"--prefixes {option!r} is not auto, none or sizes such as 128,512") from None
    if not sizes or any(s < 1 for s in sizes) or any(b <= a for a, b in itertools.pairwise(sizes)):
        raise OpenscopeError(f"--prefixes {option!r}: sizes must be positive and strictly increasing")
    if sizes[-1] > width:
        raise OpenscopeError(f"--prefixes {option!r}: {sizes[-1]} is larger than {d.name}'s width {width}")
    return sizes


def prefix_dictionaries(dicts: Sequence[Dictionary], option: str) -> dict[str, list[tuple[int, Dictionary]]]:
    """Per dictionary name, (p, the dictionary cut to its first p latents) for each prefix to measure."""
    out: dict[str, list[tuple[int, Dictionary]]] = {}
    for d in dicts:
        sizes = prefix_sizes(d, option)
        if sizes:
            out[d.name] = [
                (p, d._replace(coder=prefix_coder(d.coder, p), name=f"{d.name}[:{p}]")) for p in sizes
            ]
    return out


def prefix_point(size: int, recon: m.ReconstructionMetrics, lm: LMMetrics) -> PrefixMetrics:
    """One point of the curve from a prefix's reconstruction and next-token metrics."""
    return PrefixMetrics(size, recon.l0, recon.fvu, lm.delta_loss, lm.kl, lm.loss_recovered)


def prefix_curve(
    measured: Sequence[PrefixMetrics], width: int, recon: m.ReconstructionMetrics, lm: LMMetrics
) -> tuple[PrefixMetrics, ...]:
    """The measured prefixes, then the whole dictionary (its main metrics) unless measured already;
    empty when no prefix was measured. L0s count as the main metrics do (a CLT: over all its layers)."""
    if not measured:
        return ()
    if measured[-1].size == width:
        return tuple(measured)
    return (*measured, prefix_point(width, recon, lm))
