"""The explorer's Suite page: the catalogue of an `openscope suite run` folder (`/api/suite`).

The folder is `ServeConfig.suite`, or the folder of the feature database when it holds a
catalogue.json (`openscope features --dictionaries DIR --output DIR/features.db`).

- `GET /api/suite`: the catalogue (model, data, counts, the evaluation) and its items, each with its
  metrics, its status and `dictionary`, the feature database's name for it when its dashboards are
  there (the page links it to `#/dict/<name>`); `family` and `status` filter the items;
- `GET /api/suite/figure?file=…`: one of the figures of `openscope eval --catalogue`'s report.

The catalogue is read again at every request (it changes while a suite runs). Only files inside the
suite folder are read: the report's folder and every figure are resolved and checked to lie inside
it, and a figure must be one the report lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from openscope.features.schema import RequestModel
from openscope.files import inside
from openscope.reports import REPORT_JSON
from openscope.serve.chat_reports import figure_path
from openscope.serve.state import NotFound, ServerState
from openscope.suite.folder import CATALOGUE, CATALOGUE_FORMAT, EVAL_FOLDER, STATUSES

Status = Literal["pending", "running", "done", "failed"]
assert set(STATUSES) == {"pending", "running", "done", "failed"}


class SuiteQuery(RequestModel):
    """Which items of the catalogue to list."""

    family: str | None = Field(
        None, max_length=200, description="Only this family (top folder), e.g. resid_post."
    )
    status: Status | None = Field(None, description="Only items with this status.")


class FigureQuery(RequestModel):
    """One figure of the catalogue's evaluation."""

    file: str = Field(max_length=200, description="One of SuiteInfo.figures, e.g. l0_vs_delta_loss.png.")


class SuiteEntry(BaseModel):
    """One dictionary of the suite."""

    name: str = Field(description="Its folder in the suite, in Gemma Scope 2's naming.")
    family: str = Field(description="Its top folder: resid_post, transcoder_all, clt, ...")
    kind: str = Field(description="sae, transcoder, skip_transcoder, clt, skip_clt or crosscoder.")
    sites: str = Field(description="The sites it reads (a site spec).")
    site_kind: str = Field(description="The kind of the sites it reads.")
    layers: list[int] = Field(description="The model layers it reads.")
    width: int = Field(description="Latents (a CLT or crosscoder: over all its layers).")
    target_l0: float = Field(description="Target L0 (a CLT or crosscoder: per layer).")
    tokens: int = Field(description="Training tokens planned.")
    status: str = Field(description="pending, running, done or failed.")
    reason: str | None = Field(None, description="Why it failed.")
    l0: float | None = Field(
        None, description="Measured L0 (held-out once evaluated, else at the end of training)."
    )
    fvu: float | None = Field(None, description="Fraction of variance unexplained.")
    dead_fraction: float | None = Field(None, description="Fraction of latents that never fired.")
    delta_loss: float | None = Field(None, description="Delta LM loss with it spliced in (once evaluated).")
    measured_on: str | None = Field(None, description="evaluation or training: where the numbers come from.")
    seconds: float | None = Field(None, description="Training wall time of its run.")
    dictionary: str | None = Field(
        None, description="Its name in the feature database, when it has dashboards."
    )


class SuiteInfo(BaseModel):
    """A suite's catalogue."""

    folder: str = Field(description="The suite folder.")
    model: str = Field(description="The model.")
    source: str = Field(description="The text it trained on.")
    preset: str = Field("", description="The preset the plan came from ('' if written by hand).")
    n_layers: int = Field(description="Layers of the model.")
    counts: dict[str, int] = Field(description="Items by status.")
    evaluation: dict[str, Any] | None = Field(None, description="The held-out evaluation, once run.")
    figures: list[str] = Field(default_factory=list, description="Figures of the evaluation's report.")
    items: list[SuiteEntry] = Field(description="The items (filtered as asked), in the plan's order.")


def suite_folder(db: Path, suite: Path | None) -> Path | None:
    """The suite folder to serve: `suite`, or the database's folder when it holds a catalogue."""
    if suite is not None:
        return suite
    return db.parent if (db.parent / CATALOGUE).is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{path.name} is not an object")
    return doc


def read_suite(root: Path) -> dict[str, Any]:
    """The catalogue under root (NotFound with the reason when it cannot be read)."""
    path = root / CATALOGUE
    if not inside(root, path):
        raise NotFound(f"the suite's {CATALOGUE} lies outside {root}")
    try:
        doc = _read_json(path)
    except (OSError, ValueError) as exc:
        raise NotFound(f"no readable suite catalogue in {root}: {str(exc).splitlines()[0]}") from None
    if doc.get("format") != CATALOGUE_FORMAT or not isinstance(doc.get("items"), list):
        raise NotFound(f"{path} is not a suite catalogue")
    return doc


def report_folder_of(root: Path, doc: dict[str, Any]) -> Path | None:
    """The evaluation's report folder, when it lies inside the suite folder."""
    evaluation = doc.get("evaluation")
    where = evaluation.get("report") if isinstance(evaluation, dict) else None
    folder = root / (where if isinstance(where, str) and where else EVAL_FOLDER)
    return folder if inside(root, folder) and (folder / REPORT_JSON).is_file() else None


def figures_of(root: Path, doc: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """The report folder and the figures its report.json lists."""
    folder = report_folder_of(root, doc)
    if folder is None or not inside(root, folder / REPORT_JSON):
        return None, []
    try:
        figures = _read_json(folder / REPORT_JSON).get("figures", [])
    except (OSError, ValueError):
        return folder, []
    return folder, [str(f) for f in figures if isinstance(f, str)] if isinstance(figures, list) else []


def _entry(root: Path, raw: dict[str, Any], names: dict[Path, str]) -> SuiteEntry | None:
    try:
        entry = SuiteEntry.model_validate(raw)
    except ValueError:
        return None  # a hand-edited entry the page cannot show
    folder = root / entry.name
    if inside(root, folder):
        entry.dictionary = names.get(folder.resolve())
    return entry


def suite_router(state: ServerState, root: Path | None) -> APIRouter:
    """The `/api/suite` routes (module docstring) over the suite folder `root` (None: no suite)."""
    router = APIRouter(prefix="/api/suite", tags=["suite"])

    def folder() -> Path:
        if root is None:
            raise NotFound(
                "this server has no suite: start it with --suite DIR (an `openscope suite run` folder)"
            )
        return root

    @router.get("", response_model=SuiteInfo)
    def suite(query: Annotated[SuiteQuery, Query()]) -> SuiteInfo:
        """The suite's catalogue, each item with its dashboards' name when the database has them."""
        here = folder()
        doc = read_suite(here)
        names: dict[Path, str] = {}
        for info in state.db.dictionaries():
            if info.folder:
                try:
                    names[Path(info.folder).resolve()] = info.name
                except (OSError, RuntimeError):
                    continue
        items = [e for raw in doc["items"] if isinstance(raw, dict) and (e := _entry(here, raw, names))]
        items = [
            e
            for e in items
            if (query.family is None or e.family == query.family)
            and (query.status is None or e.status == query.status)
        ]
        counts: dict[str, Any] = doc["counts"] if isinstance(doc.get("counts"), dict) else {}
        try:
            return SuiteInfo(
                folder=str(here),
                model=str(doc.get("model", "")),
                source=str(doc.get("source", "")),
                preset=str(doc.get("preset") or ""),
                n_layers=int(doc.get("n_layers") or 0),
                counts={str(k): int(v) for k, v in counts.items() if isinstance(v, int)},
                evaluation=doc.get("evaluation") if isinstance(doc.get("evaluation"), dict) else None,
                figures=figures_of(here, doc)[1],
                items=items,
            )
        except (ValueError, TypeError) as exc:
            raise NotFound(
                f"the suite catalogue in {here} cannot be read: {str(exc).splitlines()[0]}"
            ) from None

    @router.get("/figure")
    def figure(query: Annotated[FigureQuery, Query()]) -> FileResponse:
        """One PNG figure of the catalogue's evaluation."""
        here = folder()
        report, figures = figures_of(here, read_suite(here))
        path = figure_path(here, report, query.file, figures) if report is not None else None
        if path is None:
            raise NotFound(f"the suite's evaluation has no figure {query.file!r}")
        return FileResponse(path, media_type="image/png")

    return router
