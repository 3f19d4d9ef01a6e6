"""The report of an autointerp run: report.json, report.md, and detection and fuzzing scores against
latent frequency (the figure Gemma Scope 2 reports), written through `openscope.reports`."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, NamedTuple

from openscope.interp.store import Explanation
from openscope.reports import (
    REPORT_JSON,
    REPORT_MD,
    check_report_output,
    figure,
    finite_or_none,
    fmt,
    md_table,
    report_folder,
    write_json,
    write_markdown,
)

FIGURE = "score_vs_frequency.png"


class AutointerpResult(NamedTuple):
    """What a run did."""

    results: list[Explanation]
    """One per latent done, by latent."""
    frequencies: dict[int, float]
    """Firing frequency of each latent."""
    skipped: int
    """Latents left undone because the token budget ran out."""
    tokens: int
    """Prompt and answer tokens used (cached answers not counted)."""
    seconds: float
    """Wall time of the run."""
    report: Path | None
    """The report folder written."""


def check_report(output: Path, overwrite: bool, db: Path) -> None:
    """Refuse a report folder that cannot be written, before any call is made."""
    check_report_output(output, overwrite, inputs=[db])


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summary(result: AutointerpResult) -> dict[str, Any]:
    """The run in a few numbers: how many latents were explained, mean scores, time per latent."""
    rows = result.results
    det = [r.detection for r in rows if r.detection is not None and math.isfinite(r.detection)]
    fuzz = [r.fuzzing for r in rows if r.fuzzing is not None and math.isfinite(r.fuzzing)]
    return {
        "latents": len(rows),
        "explained": sum(r.status == "explained" for r in rows),
        "unexplained": sum(r.status == "unexplained" for r in rows),
        "unscored": sum(r.status == "unscored" for r in rows),
        "skipped_for_budget": result.skipped,
        "detection_mean": _mean(det),
        "detection_median": statistics.median(det) if det else None,
        "fuzzing_mean": _mean(fuzz),
        "fuzzing_median": statistics.median(fuzz) if fuzz else None,
        "calls": sum(r.calls for r in rows),
        "tokens": result.tokens,
        "seconds": result.seconds,
        "seconds_per_latent": result.seconds / len(rows) if rows else None,
    }


def draw(path: Path, result: AutointerpResult) -> None:
    """Detection and fuzzing score of each scored latent against its firing frequency (log scale)."""
    with figure(path, 7.0, 4.0) as fig:
        ax = fig.add_subplot(1, 1, 1)
        for attr, marker, label in (("detection", "o", "detection"), ("fuzzing", "^", "fuzzing")):
            pts = [
                (result.frequencies.get(r.latent, math.nan), getattr(r, attr))
                for r in result.results
                if getattr(r, attr) is not None
            ]
            pts = [(f, s) for f, s in pts if f > 0 and math.isfinite(s)]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, alpha=0.7, label=label)
        ax.axhline(0.5, color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("latent frequency (fraction of tokens)")
        ax.set_ylabel("score (balanced accuracy)")
        ax.set_title("autointerp scores against latent frequency")
        ax.legend(loc="lower right")


def write_report(
    output: Path, overwrite: bool, db: Path, settings: dict[str, Any], result: AutointerpResult
) -> None:
    doc = {
        "settings": settings,
        "summary": summary(result),
        "latents": [{**r._asdict(), "frequency": result.frequencies.get(r.latent)} for r in result.results],
    }
    s = doc["summary"]
    rows = [
        [
            r.latent,
            fmt(result.frequencies.get(r.latent), ".2e"),
            r.status,
            fmt(r.detection, ".2f"),
            fmt(r.fuzzing, ".2f"),
            r.explanation or r.reason,
        ]
        for r in result.results
    ]
    lines = [
        f"# autointerp of {settings['dictionary']}",
        "",
        f"Explainer {result.results[0].explainer if result.results else '-'}, scorer "
        f"{result.results[0].scorer if result.results else '-'}; {s['latents']} latents, "
        f"{s['explained']} explained; detection mean {fmt(s['detection_mean'], '.3f')}, fuzzing mean "
        f"{fmt(s['fuzzing_mean'], '.3f')} (0.5 is chance); {fmt(s['seconds_per_latent'], '.1f')} s per latent.",
        "",
        f"![scores against frequency]({FIGURE})",
        "",
        *md_table(["latent", "frequency", "status", "detection", "fuzzing", "explanation"], rows),
    ]
    with report_folder(output, overwrite, inputs=[db]) as folder:
        write_json(folder / REPORT_JSON, finite_or_none(doc))
        write_markdown(folder / REPORT_MD, lines)
        draw(folder / FIGURE, result)
