"""The explorer's chat page: the reports `openscope chat …` commands wrote (`/api/chat`).

Reports live under one folder (`ServeConfig.chat_reports`, default `openscope-out/chat`), one
subfolder each (any depth up to three) holding `report.json` (with a `kind`: contrast, ablate,
jailbreak, sweep, cot, or another chat analysis) and the PNG plots it lists under `figures`.

- `GET /api/chat/reports`: name (the folder below the root), kind, model and notes of every report;
- `GET /api/chat/report?name=…`: one report.json as written;
- `GET /api/chat/figure?name=…&file=…`: one of the report's listed figures.

Names are checked against the reports found under the root, and every file served is resolved and
checked to lie inside it, so no request reads outside the root.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from openscope.errors import OpenscopeError
from openscope.files import child, inside
from openscope.serve.state import NotFound

log = logging.getLogger(__name__)

DEFAULT_CHAT_REPORTS = Path("openscope-out/chat")
"""Where `openscope chat …` commands write by default."""
_MAX_DEPTH = 3


class ChatReportSummary(BaseModel):
    """One chat report folder."""

    name: str = Field(description="Its folder below the reports root (use it to fetch the report).")
    kind: str = Field(description="contrast, ablate, jailbreak, sweep, cot, or another chat analysis.")
    model: str | None = Field(default=None, description="The model it ran on.")
    figures: list[str] = Field(default_factory=list, description="Its PNG plots.")
    notes: list[str] = Field(default_factory=list, description="Caveats the report states.")
    error: str | None = Field(default=None, description="Why report.json could not be read, if it could not.")


def find_reports(root: Path) -> dict[str, Path]:
    """Report folders (holding report.json) at most three levels below root, by name (relative path).
    Only what really lies inside root counts: a link out of it (folder or report.json) is skipped."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for path in sorted(root.rglob("report.json")):
        rel = path.parent.relative_to(root)
        if len(rel.parts) <= _MAX_DEPTH and inside(root, path):
            found[rel.as_posix() if rel.parts else "."] = path.parent
    return found


def figure_path(root: Path, folder: Path, file: str, figures: list[str]) -> Path | None:
    """The file of a report's figure, if `file` is one the report lists, a PNG named by a plain file
    name, and really inside the reports root (no `..`, no absolute path, no link out)."""
    if file not in figures or not file.endswith(".png"):
        return None
    try:
        path = child(folder, file)
    except OpenscopeError:
        return None
    return path if path.is_file() and inside(root, path) else None


def _read(folder: Path) -> dict[str, Any]:
    doc = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("report.json is not an object")
    return doc


def summary(name: str, folder: Path) -> ChatReportSummary:
    """The listing entry of one report (a broken report is listed with its error)."""
    try:
        doc = _read(folder)
    except (OSError, ValueError) as exc:
        return ChatReportSummary(name=name, kind="?", error=str(exc).splitlines()[0])
    return ChatReportSummary(
        name=name,
        kind=str(doc.get("kind", "?")),
        model=doc.get("model"),
        figures=[str(f) for f in doc.get("figures", [])],
        notes=[str(n) for n in doc.get("notes", [])],
    )


def chat_router(root: Path) -> APIRouter:
    """The `/api/chat` routes (module docstring) over the reports under root."""
    router = APIRouter(prefix="/api/chat", tags=["chat"])

    def folder_of(name: str) -> Path:
        reports = find_reports(root)
        if name not in reports:
            raise NotFound(f"no chat report {name!r} under {root}")
        return reports[name]

    @router.get("/reports", response_model=list[ChatReportSummary])
    def reports() -> list[ChatReportSummary]:
        """Every chat report under the reports folder."""
        return [summary(name, folder) for name, folder in find_reports(root).items()]

    @router.get("/report")
    def report(name: str = Query(description="ChatReportSummary.name.")) -> JSONResponse:
        """One report.json, as the command wrote it."""
        try:
            return JSONResponse(_read(folder_of(name)))
        except (OSError, ValueError) as exc:
            raise NotFound(f"chat report {name!r} cannot be read: {str(exc).splitlines()[0]}") from None

    @router.get("/figure")
    def figure(
        name: str = Query(description="ChatReportSummary.name."),
        file: str = Query(description="One of the report's figures."),
    ) -> FileResponse:
        """One PNG plot of a report."""
        folder = folder_of(name)
        path = figure_path(root, folder, file, summary(name, folder).figures)
        if path is None:
            raise NotFound(f"chat report {name!r} has no figure {file!r}")
        return FileResponse(path, media_type="image/png")

    return router
