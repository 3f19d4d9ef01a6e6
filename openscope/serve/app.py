"""The explorer's web app: a JSON API (documented at `/docs`) and the static front end at `/`.

Responses are the pydantic models of `openscope.features.schema`, the same documents `openscope
features --export` writes. Endpoints are plain `def` functions: FastAPI runs them in its thread pool,
so a slow model call (under `ServerState.lock`) never blocks the event loop and dashboard requests
keep being answered meanwhile.

Every error a user can cause is a 4xx with `{"detail": "<one line>"}`: `OpenscopeError`s carry their
status (`openscope.serve.state`), and request-validation errors (a strength that is not a number, a
missing field) become 422 with the same one-line `detail` plus the structured `errors` list.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from openscope.coders.dictionary import Dictionary
from openscope.errors import OpenscopeError
from openscope.features.db import FeatureDB
from openscope.features.schema import (
    SCHEMA_VERSION,
    DictionaryInfo,
    FeatureDetail,
    FeatureSummary,
    InspectResult,
    RequestModel,
    RoleTokens,
    SteerRequest,
    SteerResult,
)
from openscope.models.load import LoadedModel
from openscope.serve.autointerp import autointerp_router
from openscope.serve.chat_reports import DEFAULT_CHAT_REPORTS, chat_router
from openscope.serve.config import ServeConfig
from openscope.serve.graphs import graph_router
from openscope.serve.state import NotFound, ServerState, http_status, load_state
from openscope.serve.suite import suite_folder, suite_router

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
"""The front end: index.html, app.js, style.css (no build step)."""

Order = Literal["latent", "frequency", "max_activation", "mean_activation"]


# ---- request and response models of this API (the feature data itself uses the shared schema) ------


class InspectRequest(RequestModel):
    """Run one dictionary over a text."""

    text: str = Field(description="The text to inspect (BOS is added).")
    dictionary: str = Field(description="DictionaryInfo.name of a loaded dictionary.")
    k: int = Field(5, description="Latents to return per token (1..max_top_k).")


class TextSearchRequest(RequestModel):
    """Find the latents that fire on a text."""

    text: str = Field(description="The text to run through the model.")
    dictionary: str | None = Field(None, description="Search one dictionary; None: every loaded one.")
    limit: int = Field(20, ge=1, le=500, description="Most results.")


class ServerInfo(BaseModel):
    """What this server serves and its limits (the front end reads them)."""

    model: str | None = Field(description="Name of the loaded model, or None (dashboards only).")
    loaded: list[str] = Field(description="Dictionaries the inspector, text search and steering can run.")
    db: str = Field(description="Path of the feature database.")
    schema_version: int = Field(description="Version of the feature-data schema.")
    max_prompt_chars: int = Field(description="Longest prompt accepted.")
    max_new_tokens: int = Field(description="Most tokens one steering request may generate.")
    max_top_k: int = Field(description="Most latents per token the inspector returns.")


class ErrorResponse(BaseModel):
    """Every error: one line saying what was wrong."""

    detail: str = Field(description="What was wrong, in one line.")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad value (empty or over-long prompt, ...)"},
    404: {"model": ErrorResponse, "description": "Unknown dictionary or latent out of range"},
    409: {"model": ErrorResponse, "description": "Dictionary indexed but not loaded: no model for it"},
    422: {"model": ErrorResponse, "description": "Request does not match the schema"},
}


# ---- helpers --------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """Text safe to put in a JSON answer: what cannot be encoded (a lone surrogate a request carried)
    becomes U+FFFD, and line breaks become spaces, so a `detail` is always one line."""
    return " ".join(text.encode("utf-8", "replace").decode("utf-8").splitlines())


def validation_message(errors: list[Any]) -> str:
    """pydantic's error list as one readable line: `body.value: Input should be a valid number; ...`."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return printable("; ".join(parts) or "invalid request")


def export_filename(dictionary: str, latent: int, fmt: str) -> str:
    """A safe download name for a feature's JSON (dictionary names may hold slashes)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dictionary).strip("_") or "dictionary"
    return f"{safe}-{latent}.{fmt}.json"


# ---- the app -----------------------------------------------------------------------------------------


def create_app(
    config: ServeConfig,
    loaded: LoadedModel | None = None,
    db: FeatureDB | None = None,
    dictionaries: list[Dictionary] | dict[str, Dictionary] | None = None,
) -> FastAPI:
    """The explorer app. Pass a model, database or dictionaries already in memory (tests, notebooks);
    what is not passed is loaded from `config`."""
    state = load_state(config, loaded, db, dictionaries)
    app = FastAPI(
        title="openscope explorer",
        version=str(SCHEMA_VERSION),
        description="Feature dashboards, search, prompt inspector and steering for sparse dictionaries. "
        "Feature data follows `openscope.features.schema`, the same documents `openscope features "
        "--export` writes.",
    )
    app.state.openscope = state
    app.add_middleware(HostCheck, allowed=allowed_hosts(config))
    _add_error_handlers(app)
    _add_routes(app, state)
    app.include_router(graph_router(state, ERRORS))  # attribution graphs: /api/graphs
    app.include_router(autointerp_router(state, ERRORS))  # `openscope autointerp` results and search
    app.include_router(chat_router(config.chat_reports or DEFAULT_CHAT_REPORTS))  # `openscope chat` reports
    app.include_router(
        suite_router(state, suite_folder(Path(config.db), config.suite))
    )  # `openscope suite run`
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Host names a local server always answers to."""


def allowed_hosts(config: ServeConfig) -> frozenset[str]:
    """The Host header names this server answers to: loopback, the address it listens on, and
    --allowed-hosts. Listening on every address (0.0.0.0, ::) adds this machine's own names."""
    names = {*LOOPBACK, config.host.lower(), *(h.lower() for h in config.allowed_hosts)}
    if config.host in ("0.0.0.0", "::"):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names)


def host_name(header: str) -> str:
    """The host part of a Host header (`[::1]:8000` -> `::1`, `Example.org:80` -> `example.org`)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: answer only requests whose Host header names this server (`allowed_hosts`).

    A web page the user visits can make the browser send requests to 127.0.0.1 under a name its
    attacker controls (DNS rebinding); such requests carry that name in Host and get 400 here. `*` in
    --allowed-hosts turns the check off.
    """

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"host", b"").decode("latin-1")
            if host_name(raw) not in self.allowed:
                detail = (
                    f"Host {printable(raw)!r} is not a name this server answers to; start it with "
                    "--allowed-hosts NAME to add one"
                )
                await JSONResponse(status_code=400, content={"detail": detail})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        # Input never lands here (it is a 4xx above); this is a bug, kept in the log with its traceback.
        log.error("internal error", exc_info=exc)
        return JSONResponse(
            status_code=500, content={"detail": printable(f"internal error: {type(exc).__name__}: {exc}")}
        )

    @app.exception_handler(OpenscopeError)
    async def _openscope_error(_request: Request, exc: OpenscopeError) -> JSONResponse:
        status = http_status(exc)
        log.info("%d: %s", status, printable(str(exc)))
        return JSONResponse(status_code=status, content={"detail": printable(str(exc))})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # `input` may hold values JSON cannot carry (bytes, NaN); the message and location suffice.
        slim = [
            {
                "loc": [printable(str(p)) if isinstance(p, str) else p for p in e.get("loc", ())],
                "msg": printable(str(e.get("msg", ""))),
                "type": e.get("type", ""),
            }
            for e in errors
        ]
        return JSONResponse(status_code=422, content={"detail": validation_message(errors), "errors": slim})


def _add_routes(app: FastAPI, state: ServerState) -> None:
    cfg = state.config

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info", response_model=ServerInfo, tags=["server"])
    def info() -> ServerInfo:
        """The loaded model and dictionaries, and the server's limits."""
        return ServerInfo(
            model=state.loaded.name if state.loaded is not None else None,
            loaded=list(state.dictionaries),
            db=str(state.db.path),
            schema_version=SCHEMA_VERSION,
            max_prompt_chars=cfg.max_prompt_chars,
            max_new_tokens=cfg.max_new_tokens,
            max_top_k=cfg.max_top_k,
        )

    @app.get("/api/dictionaries", response_model=list[DictionaryInfo], tags=["features"])
    def dictionaries() -> list[DictionaryInfo]:
        """Every dictionary: those with dashboards in the database, then loaded ones without."""
        return state.infos()

    @app.get("/api/features", response_model=list[FeatureSummary], responses=ERRORS, tags=["features"])
    def features(
        dictionary: str = Query(description="DictionaryInfo.name."),
        offset: int = Query(0, ge=0, le=2**31, description="Rows to skip."),
        limit: int = Query(50, ge=1, le=1000, description="Rows to return."),
        order: Order = Query("frequency", description="Sort key (all but latent descending)."),
    ) -> list[FeatureSummary]:
        """A page of one dictionary's feature table."""
        return state.features(dictionary, offset, limit, order)

    @app.get("/api/feature", response_model=FeatureDetail, responses=ERRORS, tags=["features"])
    def feature(
        dictionary: str = Query(description="DictionaryInfo.name."),
        latent: int = Query(description="Latent index, 0 <= latent < width."),
    ) -> FeatureDetail:
        """One latent's dashboard: examples, quantiles, histogram, logits, neighbours."""
        return state.feature(dictionary, latent)

    @app.get("/api/feature/export", responses=ERRORS, tags=["features"])
    def export(
        dictionary: str = Query(description="DictionaryInfo.name."),
        latent: int = Query(description="Latent index."),
        format: Literal["neuronpedia", "openscope"] = Query(
            "neuronpedia",
            description="neuronpedia: Neuronpedia's key names; openscope: the FeatureDetail schema.",
        ),
    ) -> JSONResponse:
        """One feature as a JSON file to download."""
        detail = state.feature(dictionary, latent)
        body = detail.neuronpedia() if format == "neuronpedia" else detail.model_dump(mode="json")
        name = export_filename(dictionary, latent, format)
        return JSONResponse(body, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/api/search/token", response_model=list[FeatureSummary], responses=ERRORS, tags=["search"])
    def search_token(
        q: str = Query(min_length=1, max_length=200, description="A token, e.g. ' Paris' or 'Paris'."),
        dictionary: str | None = Query(None, description="Only this dictionary."),
        limit: int = Query(20, ge=1, le=500),
    ) -> list[FeatureSummary]:
        """Latents whose top examples peak on this token (score: that activation)."""
        return state.search_token(q, dictionary, limit)

    @app.get("/api/search/logit", response_model=list[FeatureSummary], responses=ERRORS, tags=["search"])
    def search_logit(
        q: str = Query(min_length=1, max_length=200, description="A word among the latents' top logits."),
        dictionary: str | None = Query(None, description="Only this dictionary."),
        limit: int = Query(20, ge=1, le=500),
    ) -> list[FeatureSummary]:
        """Latents whose decoder direction promotes this word (score: the logit effect)."""
        return state.search_logit(q, dictionary, limit)

    @app.post("/api/search/text", response_model=list[FeatureSummary], responses=ERRORS, tags=["search"])
    def search_text(request: TextSearchRequest) -> list[FeatureSummary]:
        """Latents that fire on this text, largest activation first (score: that activation)."""
        return state.search_text(request.text, request.dictionary, request.limit)

    @app.post("/api/inspect", response_model=InspectResult, responses=ERRORS, tags=["model"])
    def inspect(request: InspectRequest) -> InspectResult:
        """Every token of a text with its top latents in one dictionary."""
        return state.inspect(request.dictionary, request.text, request.k)

    @app.post("/api/steer", response_model=SteerResult, responses=ERRORS, tags=["model"])
    def steer(request: SteerRequest) -> SteerResult:
        """Generate from a prompt with and without latents added or clamped; both texts side by side."""
        return state.steer(request)

    @app.get("/api/roles", response_model=list[RoleTokens], responses=ERRORS, tags=["chat"])
    def roles(dictionary: str = Query(description="DictionaryInfo.name.")) -> list[RoleTokens]:
        """The chat roles of a dictionary's indexed tokens and their counts ([] unless indexed on chat data)."""
        state.info(dictionary)
        return state.db.roles(dictionary) if _indexed(dictionary) else []

    @app.get("/api/roles/specific", response_model=list[FeatureSummary], responses=ERRORS, tags=["chat"])
    def role_specific(
        dictionary: str = Query(description="DictionaryInfo.name."),
        role: str = Query(description="template, system, user or model."),
        limit: int = Query(30, ge=1, le=500, description="Rows to return."),
        min_fired: int = Query(
            5, ge=1, description="Only latents that fired at least this often in the role."
        ),
    ) -> list[FeatureSummary]:
        """The latents most specific to one chat role (score: specificity, 1 = fires only in that role)."""
        state.info(dictionary)
        if not _indexed(dictionary):
            raise NotFound(f"dictionary {dictionary} has no dashboards yet; run `openscope features` on it")
        return state.db.role_specific(dictionary, role, limit, min_fired)

    def _indexed(name: str) -> bool:
        return name in {i.name for i in state.db.dictionaries()}
