"""`openscope eval --catalogue DIR`: evaluate every finished dictionary of a suite on held-out text, draw
the Gemma Scope 2 report's figures, and write the held-out numbers into the suite's catalogue.

The text is, unless `--source` says otherwise, the held-out part of the plan's source: a plan trained
on `wiki[:9000]` is evaluated on `wiki[9000:]` (a source without an end is evaluated on itself, and the
report says so). The report folder (default `DIR/eval`) holds report.json, report.md and the figures
(`openscope.suite.figures`), and in `eval_dictionaries/` the full evaluation every `openscope eval`
writes (per dictionary: L0, FVU, dead and dense latents, delta LM loss, KL, loss recovered).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, NamedTuple

from openscope.coders.dictionary import is_dictionary_folder, load_dictionary
from openscope.config import save_json
from openscope.data.sources import split_slice
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate
from openscope.eval.results import DictionaryReport, EvalReport
from openscope.files import absolute, inside
from openscope.models.load import LoadedModel, load_model, resolve_device
from openscope.reports import (
    REPORT_JSON,
    REPORT_MD,
    check_report_output,
    finite_or_none,
    fmt,
    md_table,
    report_folder,
    write_json,
    write_markdown,
)
from openscope.suite.figures import draw_figures, panel
from openscope.suite.folder import CATALOGUE, EVAL_FOLDER, read_catalogue

log = logging.getLogger(__name__)

DICTIONARIES_REPORT = "eval_dictionaries"
"""The full evaluation report's folder inside the catalogue's report."""
_DEFAULTS = EvalConfig()


class CatalogueEval(NamedTuple):
    """What `evaluate_catalogue` did."""

    report: EvalReport
    """The evaluation of every finished item (named as the items)."""
    output: Path
    """The report folder."""
    catalogue: Path
    """The catalogue.json it updated."""
    figures: list[str]
    """The figures drawn (file names in `output`)."""
    source: str
    """The text evaluated on."""
    held_out: bool
    """Whether that text is held out from the plan's training text (False: the user's --source, or the
    plan's own source when it has no end)."""
    skipped: list[str]
    """Items not evaluated (not finished)."""
    entries: list[dict[str, Any]]
    """The catalogue entries evaluated, with their held-out numbers."""


def held_out(source: str) -> str | None:
    """The documents after a sliced source's end (`wiki[:9000]` -> `wiki[9000:]`); None without an end."""
    base, _, stop = split_slice(source)
    return f"{base}[{stop}:]" if stop is not None else None


def metrics_of(d: DictionaryReport) -> dict[str, Any]:
    """An item's held-out numbers for the catalogue (L0 per layer for a multi-layer coder, as its target)."""
    r, lm = d.recon, d.lm
    return finite_or_none(
        {
            "l0": r.l0 / d.n_layers,
            "fvu": r.fvu,
            "dead_fraction": r.dead / d.width if d.width else None,
            "dense": r.dense,
            "delta_loss": lm.delta_loss,
            "kl": lm.kl,
            "loss_recovered": lm.loss_recovered,
            "ce_clean": lm.ce_clean,
            "n_tokens": r.n_tokens,
        }
    )


def _text(cfg: EvalConfig, plan_source: str) -> tuple[str, bool]:
    """The text to evaluate on: --source if given, else the plan's held-out slice (or its source)."""
    if cfg.source != _DEFAULTS.source:
        return cfg.source, False
    rest = held_out(plan_source)
    if rest is None:
        log.warning(
            "the plan trains on %r, which has no end to hold out after: evaluating on it (pass --source, "
            "e.g. text the plan did not train on)",
            plan_source,
        )
        return plan_source, False
    return rest, True


def kind_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """Per site kind: dictionaries and their mean L0, FVU and delta loss, as table cells."""
    rows = []
    for name in dict.fromkeys(panel(e) for e in entries):
        mine = [e for e in entries if panel(e) == name]

        def mean(key: str, group: list[dict[str, Any]] = mine) -> float | None:
            values = [e[key] for e in group if isinstance(e.get(key), int | float)]
            return sum(values) / len(values) if values else None

        rows.append(
            [
                name,
                str(len(mine)),
                fmt(mean("l0"), ".1f"),
                fmt(mean("fvu"), ".4f"),
                fmt(mean("delta_loss"), ".4f"),
            ]
        )
    return rows


def _markdown(doc: dict[str, Any], entries: list[dict[str, Any]], figures: list[str]) -> list[str]:
    lines = [
        "# openscope suite evaluation",
        "",
        f"Model `{doc['model']}`, held-out text `{doc['source']}`"
        + ("" if doc["held_out"] else " (not held out from the training text)")
        + f": {doc['n_tokens']} tokens. Every finished dictionary of the suite, spliced into the model "
        "alone (a CLT or crosscoder: all its layers at once). L0 of a CLT or crosscoder is per layer. The "
        f"full report: `{DICTIONARIES_REPORT}/report.md`.",
        "",
        "## By site kind (means)",
        "",
        *md_table(["site kind", "dictionaries", "L0", "FVU", "delta loss"], kind_rows(entries)),
        "",
        "## Dictionaries",
        "",
    ]
    rows = [
        [
            e["name"],
            e["kind"],
            e["sites"],
            e["width"],
            f"{e['target_l0']:g}",
            fmt(e["l0"], ".1f"),
            fmt(e["fvu"], ".4f"),
            fmt(e["delta_loss"], ".4f"),
            fmt(e["dead_fraction"], ".1%"),
        ]
        for e in entries
    ]
    lines += md_table(
        ["name", "kind", "sites", "width", "target L0", "L0", "FVU", "delta loss", "dead"], rows
    )
    for name in figures:
        lines += ["", f"![{name}]({name})"]
    return lines


def evaluate_catalogue(
    cfg: EvalConfig, loaded: LoadedModel | None = None, progress: bool = True
) -> CatalogueEval:
    """Evaluate a suite's finished dictionaries (module docstring)."""
    if cfg.catalogue is None:
        raise OpenscopeError("evaluate_catalogue needs --catalogue DIR")
    root = absolute(cfg.catalogue)
    doc = read_catalogue(root)
    entries = [e for e in doc["items"] if isinstance(e, dict)]
    ready = [
        e
        for e in entries
        if e.get("status") == "done"
        and inside(root, root / str(e.get("folder")))
        and is_dictionary_folder(root / str(e["folder"]))
    ]
    if not ready:
        raise OpenscopeError(
            f"{root} has no finished dictionary to evaluate; run `openscope suite run` first"
        )
    source, is_held_out = _text(cfg, str(doc.get("source") or cfg.source))
    output = root / EVAL_FOLDER if cfg.output == _DEFAULTS.output else Path(cfg.output)
    folders = [root / e["folder"] for e in ready]
    check_report_output(output, cfg.overwrite, folders)  # a bad --output is refused before the work
    device = resolve_device(cfg.device)
    if loaded is None:
        loaded = load_model(cfg.model or str(doc["model"]), device=device, cache_dir=cfg.cache_dir)
    dicts = [load_dictionary(f, loaded)._replace(name=e["name"]) for f, e in zip(folders, ready, strict=True)]
    with report_folder(output, cfg.overwrite, folders) as folder:
        sub = dataclasses.replace(
            cfg,
            catalogue=None,
            dictionaries=folders,
            source=source,
            output=folder / DICTIONARIES_REPORT,
            overwrite=False,
        )
        report = evaluate(sub, loaded, dicts, progress)
        measured = {d.name: metrics_of(d) for d in report.dictionaries}
        evaluated = [{**e, **measured[e["name"]], "eval": measured[e["name"]]} for e in ready]
        figures = draw_figures(evaluated, folder, int(doc.get("n_layers") or loaded.n_layers))
        summary = {
            "kind": "suite-catalogue",
            "model": report.model,
            "source": source,
            "held_out": is_held_out,
            "n_tokens": report.n_tokens,
            "figures": figures,
            "report": f"{DICTIONARIES_REPORT}/{REPORT_JSON}",
            "items": [
                {k: e[k] for k in ("name", "kind", "sites", "width", "target_l0")} | e["eval"]
                for e in evaluated
            ],
        }
        write_json(folder / REPORT_JSON, summary)
        write_markdown(folder / REPORT_MD, _markdown(summary, evaluated, figures))
    _update_catalogue(root, doc, measured, source, is_held_out, report, output)
    skipped = [e["name"] for e in entries if e not in ready]
    return CatalogueEval(report, output, root / CATALOGUE, figures, source, is_held_out, skipped, evaluated)


def _update_catalogue(
    root: Path,
    doc: dict[str, Any],
    measured: dict[str, dict[str, Any]],
    source: str,
    is_held_out: bool,
    report: EvalReport,
    output: Path,
) -> None:
    """Write the held-out numbers into catalogue.json (each evaluated item's `eval`, and its `l0`, `fvu`,
    `dead_fraction`, `delta_loss` measured on held-out text)."""
    for e in doc["items"]:
        numbers = measured.get(str(e.get("name"))) if isinstance(e, dict) else None
        if numbers is None:
            continue
        e.update({k: numbers.get(k) for k in ("l0", "fvu", "dead_fraction", "delta_loss")})
        e.update(eval=numbers, measured_on="evaluation")
    doc["evaluation"] = {
        "source": source,
        "held_out": is_held_out,
        "n_tokens": report.n_tokens,
        "model": report.model,
        "report": str(output.relative_to(root)) if inside(root, output) else str(output),
    }
    save_json(root / CATALOGUE, finite_or_none(doc))
