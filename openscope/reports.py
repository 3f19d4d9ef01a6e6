"""Report folders: `report.json`, `report.md` and PNG plots, written the safe way.

Evaluation and every chat analysis write one folder each. The folder is staged
(`openscope.files.replacing`): it appears whole in one rename, an earlier report there is replaced
only with `--overwrite`, and a folder holding anything a report does not write is refused. The
pieces every report uses live here once: Markdown tables, matplotlib figures saved atomically, and
JSON without NaN (JSON has none: non-finite numbers become null).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from openscope.config import save_json
from openscope.files import Ownership, atomic_file, check_output, replacing, write_text

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def is_report(folder: Path) -> bool:
    """Whether a folder holds a report openscope wrote (its report.json is a JSON object)."""
    try:
        return isinstance(json.loads((folder / REPORT_JSON).read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _sub_report(folder: Path) -> bool:
    if folder.name == "saebench":  # `eval --format saebench`: <eval type>/<name>_eval_results.json only
        return all(
            t.is_dir()
            and not t.is_symlink()
            and all(f.is_file() and f.name.endswith("_eval_results.json") for f in t.iterdir())
            for t in folder.iterdir()
        )
    return is_report(folder) and not REPORT.foreign(folder)


REPORT = Ownership(
    "a report",
    files=(REPORT_JSON, REPORT_MD, "*.png", "*.safetensors", "*.tmp"),
    folders=("eval_*", "saebench"),
    folder_check=_sub_report,
    manifest=is_report,
)
"""What a report folder holds (a chat diff keeps its two evaluations in eval_a/ and eval_b/)."""


def check_report_output(output: Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse a bad report `--output` before the work starts (`openscope.files.check_output`)."""
    check_output(output, REPORT, overwrite=overwrite, inputs=inputs)


@contextmanager
def report_folder(output: Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """A folder to write a report into; it becomes `output` when the block ends without error."""
    with replacing(output, REPORT, overwrite=overwrite, inputs=inputs) as folder:
        yield folder
    log.info("wrote %s", Path(output) / REPORT_JSON)


def finite_or_none(obj: Any) -> Any:
    """JSON has no NaN or infinity: they become null (recursively)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: Path, doc: Any) -> None:
    """A report's JSON, non-finite numbers as null, written atomically."""
    save_json(path, finite_or_none(doc))


def write_markdown(path: Path, lines: Sequence[str]) -> None:
    """A Markdown file from its lines, written atomically."""
    write_text(path, "\n".join(lines) + "\n", sync=False)


@contextmanager
def figure(path: Path, *size: float) -> Iterator[Any]:
    """A matplotlib figure (Agg backend) saved to path as PNG when the block ends, then closed."""
    # matplotlib takes about a second to import: only a command that draws pays for it.
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt  # (after choosing the backend, as matplotlib requires)

    fig = plt.figure(figsize=size or (6.4, 4.0))
    try:
        yield fig
        fig.tight_layout()
        with atomic_file(path, sync=False) as fh:
            fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table (cells are str()-ed; pipes escaped)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return lines


def fmt(x: float | None, spec: str = ".3f") -> str:
    """A number for a Markdown table ('–' for missing or non-finite)."""
    return "–" if x is None or not math.isfinite(x) else format(x, spec)
