"""Pieces every chat analysis shares: the run settings, loading the model and dictionaries, the
batched last-prompt-token forward, and writing a report (report.json, report.md, PNG plots).

A report folder holds `report.json` with a `kind` (contrast, ablate, jailbreak, sweep, cot), the
config it ran with, its results and `notes` (plain-language caveats, e.g. that a result on a base
model is weak), plus `report.md` and the plots it lists under `figures`. The explorer's chat page
reads these folders.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from openscope.coders.dictionary import Dictionary, find_dictionaries, load_dictionary
from openscope.config import to_jsonable
from openscope.errors import OpenscopeError
from openscope.models.hooks import run_with_readers
from openscope.models.load import DEFAULT_MODEL, LoadedModel, load_model, resolve_device
from openscope.models.sites import Site
from openscope.models.tokens import pad_batch
from openscope.reports import (
    REPORT_JSON,
    REPORT_MD,
    write_json,
    write_markdown,
)

log = logging.getLogger(__name__)


@dataclass
class ChatRunConfig:
    """Settings every `openscope chat` analysis has."""

    model: str = DEFAULT_MODEL
    """Model: a known name, a local Hugging Face directory or a hub id (base or chat checkpoint)."""
    chat_template: bool = True
    """Render prompts as a user turn plus the start of the model's turn (the tokenizer's chat template, else Gemma's); off: the raw text."""
    batch_size: int = 8
    """Prompts per forward."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    dtype: str = "float32"
    """Compute dtype (float32 on CPU: bfloat16 is very slow there)."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""
    seed: int = 0
    """Seed of every random choice (splits, samples)."""
    overwrite: bool = False
    """Replace the report already in --output (only a report openscope wrote is ever replaced)."""


def load_for(cfg: ChatRunConfig, loaded: LoadedModel | None = None) -> LoadedModel:
    """The model a config names (or the one passed in, for tests and notebooks)."""
    if loaded is not None:
        return loaded
    return load_model(cfg.model, dtype=cfg.dtype, device=resolve_device(cfg.device), cache_dir=cfg.cache_dir)


def load_dictionaries(paths: Sequence[Path], loaded: LoadedModel) -> list[Dictionary]:
    """Every single-layer dictionary at or below the given folders, bound to the model's sites."""
    out = []
    for path in paths:
        for folder in find_dictionaries(path):
            d = load_dictionary(folder, loaded, device=str(loaded.device))
            if d.is_multilayer:
                log.warning("skipping %s: the chat analyses use single-layer dictionaries", folder)
                continue
            out.append(d)
    if paths and not out:
        raise OpenscopeError(f"no single-layer dictionary under {', '.join(map(str, paths))}")
    return out


# ---- the last prompt token --------------------------------------------------------------------------


def length_order(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Indices sorted by sequence length, so batches hold similar lengths (little padding)."""
    return sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))


def last_token_activations(
    loaded: LoadedModel, seqs: Sequence[Sequence[int]], sites: Sequence[Site], batch_size: int = 8
) -> dict[Site, Tensor]:
    """Activations [n, width] (float32, CPU) at each site at the last token of each sequence.

    Sequences are batched by length and right-padded (a causal model's real tokens never see the
    padding after them); one forward per batch, stopped after the last site it needs. Each reader
    copies out only the rows of the last tokens, so the layer's memory is reused at once.
    """
    if not seqs:
        raise OpenscopeError("no prompts to run")
    if not sites:
        raise OpenscopeError("no sites to read")
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    order = length_order(seqs)
    out: dict[Site, list[Tensor]] = {s: [] for s in sites}
    for start in range(0, len(order), max(1, batch_size)):
        rows = order[start : start + batch_size]
        ids, mask, last = pad_batch([seqs[i] for i in rows], pad)
        pick = torch.arange(len(rows))

        def reader(site: Site, pick: Tensor = pick, last: Tensor = last) -> Callable[[Tensor], None]:
            return lambda x: out[site].append(x[pick, last.to(x.device)].float().cpu())

        run_with_readers(loaded, ids.to(loaded.device), {s: reader(s) for s in sites}, mask.to(loaded.device))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {s: torch.cat(chunks)[inverse] for s, chunks in out.items()}


@torch.inference_mode()
def next_token_logits(loaded: LoadedModel, seq: Sequence[int]) -> Tensor:
    """[vocab] float32 logits after a sequence (one forward; only the last row of the LM head runs)."""
    extra = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(loaded.model.forward).parameters
        else {}
    )
    ids = torch.tensor([list(seq)], dtype=torch.long, device=loaded.device)
    return loaded.model(input_ids=ids, use_cache=False, **extra).logits[0, -1].float().cpu()


# ---- reports ------------------------------------------------------------------------------------------


def write_report(
    output: Path,
    kind: str,
    config: Any,
    model: str,
    results: Mapping[str, Any],
    markdown: Sequence[str],
    figures: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write report.json and report.md into output (figures are already there); returns report.json."""
    doc = {
        "kind": kind,
        "model": model,
        "config": to_jsonable(config),
        "figures": list(figures),
        "notes": list(notes),
        **to_jsonable(dict(results)),
    }
    write_json(output / REPORT_JSON, doc)
    md = list(markdown)
    if notes:
        md += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    if figures:
        md += ["", *[f"![{f}]({f})" for f in figures]]
    write_markdown(output / REPORT_MD, md)
    return output / REPORT_JSON
