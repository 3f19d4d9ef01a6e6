"""The explorer's attribution graphs: list, serve, compute and intervene on graph files (`/api/graphs`).

Graphs are JSON files in one folder (`ServeConfig.graphs`, default `graphs/` next to the feature
database), one per graph, named `<slug>.json`, in the schema `openscope attribute` writes
(`openscope.attribution.schema.GraphFile`; circuit-tracer's graphs load too). The router:

- `GET /api/graphs`: a summary per file (a corrupt file is listed with its error) and whether this
  server can compute new graphs;
- `GET /api/graphs/{slug}`: the validated graph; feature nodes' `dictionary` names are those this
  explorer uses (matched by folder), so `metadata.openscope.feature_page` links open dashboards;
- `POST /api/graphs`: attribute a short prompt with the served model and the served transcoders (or
  cross-layer transcoder) and save it into the folder;
- `POST /api/graphs/{slug}/intervene`: zero or scale feature nodes and compare the next-token
  predictions (`openscope.attribution.intervene`).

Model calls take `ServerState.lock`, like every other model call of the explorer. A corrupt file
answers 422, an unknown slug 404, a server whose dictionaries cannot replace every MLP 400, a graph
whose dictionaries are not loaded here 409; always with a one-line `detail`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from openscope.attribution import intervene, load_graph
from openscope.attribution.commands import AttributeConfig, attribute_document
from openscope.attribution.foreign import display_prompt
from openscope.attribution.schema import (
    GraphFile,
    InterventionRequest,
    InterventionResult,
)
from openscope.coders.dictionary import Dictionary
from openscope.errors import OpenscopeError
from openscope.features.schema import RequestModel
from openscope.files import inside, write_new
from openscope.models.sites import Site
from openscope.models.tokens import prompt_ids
from openscope.serve.config import ServeConfig
from openscope.serve.state import BadInput, NotFound, ServerState, Unavailable, check_prompt

log = logging.getLogger(__name__)

SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A graph's slug: its file stem, safe in a URL and a file name (always matched whole: `fullmatch`)."""

BATCH_SIZE = 32
"""Attribution rows per backward pass for graphs computed by the server."""


class CorruptGraph(OpenscopeError):
    """A graph file that does not parse or does not match the schema (HTTP 422)."""

    status = 422


class Conflict(OpenscopeError):
    """A graph with that slug exists already (HTTP 409)."""

    status = 409


# ---- request and response models ----------------------------------------------------------------


class GraphSummary(BaseModel):
    """One graph file of the folder, as the list shows it."""

    slug: str = Field(description="File stem; the graph's page is #/graph/<slug>.")
    prompt: str = Field(default="", description="The prompt attributed.")
    model: str = Field(
        default="", description="The model (metadata.openscope.model; a circuit-tracer graph: its scan)."
    )
    n_nodes: int = Field(default=0, description="Nodes in the file (after pruning).")
    n_links: int = Field(default=0, description="Links in the file.")
    n_features: int = Field(default=0, description="Feature (latent) nodes in the file.")
    replacement_score: float | None = Field(
        default=None, description="metadata.openscope.metrics (None: not recorded)."
    )
    completeness_score: float | None = Field(
        default=None, description="metadata.openscope.metrics (None: not recorded)."
    )
    created_ms: float | None = Field(default=None, description="Creation time, ms since the epoch.")
    error: str | None = Field(
        default=None, description="Why the file cannot be read (None: it is a valid graph)."
    )


class GraphIndex(BaseModel):
    """The graph folder's files and whether this server can compute new graphs."""

    folder: str = Field(description="The graph folder.")
    graphs: list[GraphSummary] = Field(description="Its graphs, newest first.")
    can_run: bool = Field(
        description="Whether POST /api/graphs can run here (a model and transcoders for every layer)."
    )
    run_dictionaries: list[str] = Field(description="The dictionaries a new graph would use.")
    run_hint: str = Field(description="Why new graphs cannot run here ('' when they can).")
    max_tokens: int = Field(description="Longest prompt (tokens, BOS included) a new graph may have.")


class GraphRequest(RequestModel):
    """Attribute a short prompt and save its graph."""

    prompt: str = Field(description="The prompt (BOS is added); the graph explains the next token after it.")
    slug: str | None = Field(
        None, description="File stem for the graph (letters, digits, . _ -). Default: from the prompt."
    )
    dictionaries: list[str] | None = Field(
        None,
        description="Loaded dictionaries to use (their names). Default: the served transcoders or CLT covering every layer.",
    )
    max_logits: int = Field(10, ge=1, le=50, description="Most logit nodes.")
    logit_probability: float = Field(
        0.95, gt=0.0, le=1.0, description="Probability the logit nodes should cover."
    )
    max_feature_nodes: int = Field(
        2048, ge=1, le=8192, description="Attribute at most this many active latents."
    )
    node_threshold: float = Field(
        0.8, ge=0.0, le=1.0, description="Pruning: fraction of the influence kept by nodes."
    )
    edge_threshold: float = Field(
        0.98, ge=0.0, le=1.0, description="Pruning: fraction of the edge influence kept."
    )


# ---- pure helpers ----------------------------------------------------------------------------------


def graphs_folder(config: ServeConfig) -> Path:
    """The graph folder: `config.graphs`, else `graphs/` next to the feature database."""
    return config.graphs if config.graphs is not None else config.db.parent / "graphs"


def check_slug(slug: str) -> str:
    """The slug if it is a safe file stem; else BadInput."""
    if not SLUG.fullmatch(slug):
        raise BadInput(f"bad graph name {slug!r}: use letters, digits, '.', '_' and '-' (at most 128)")
    return slug


def slug_for(prompt: str, taken: set[str]) -> str:
    """A slug made from the prompt's words, numbered when taken (`the-capital-of-france-is-2`)."""
    base = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-") or "graph"
    slug, n = base, 1
    while slug in taken:
        n += 1
        slug = f"{base}-{n}"
    return slug


def summary_of(slug: str, document: GraphFile) -> GraphSummary:
    """The list entry of a valid graph."""
    meta = document.metadata
    metrics = meta.openscope.metrics if meta.openscope is not None else None
    return GraphSummary(
        slug=slug,
        prompt=display_prompt(document),
        model=meta.openscope.model if meta.openscope is not None else meta.scan,
        n_nodes=len(document.nodes),
        n_links=len(document.links),
        n_features=sum(
            n.dictionary is not None or n.feature_type == "cross layer transcoder" for n in document.nodes
        ),
        replacement_score=metrics.replacement_score if metrics is not None else None,
        completeness_score=metrics.completeness_score if metrics is not None else None,
        created_ms=meta.info.create_time_ms if meta.info is not None else None,
    )


def replaces_mlp(d: Dictionary) -> bool:
    """Whether d maps each layer's mlp_in to its mlp_out (a transcoder, skip-transcoder or CLT): a part of
    a replacement model."""
    if d.coder.kind == "sae":
        return False
    return all(
        s_in.kind == "mlp_in" and s_out == Site(s_in.layer, "mlp_out")
        for s_in, s_out in zip(d.sites_in, d.sites_out, strict=True)
    )


def replacement_set(
    named: Mapping[str, Dictionary], n_layers: int, wanted: Sequence[str] | None = None
) -> list[Dictionary]:
    """Loaded dictionaries (renamed to their explorer names) that replace each of the model's MLPs once.

    wanted: use these (attribution checks they cover every layer); default: a CLT covering every layer,
    else the first transcoder of each layer. BadInput when no such set exists.
    """
    if wanted:
        unknown = [n for n in wanted if n not in named]
        if unknown:
            known = ", ".join(named) or "none"
            raise NotFound(f"dictionary {unknown[0]!r} is not loaded on this server (loaded: {known})")
        return [named[n]._replace(name=n) for n in wanted]
    parts = {n: d for n, d in named.items() if replaces_mlp(d)}
    everything = set(range(n_layers))
    for name, d in parts.items():
        if d.is_multilayer and {s.layer for s in d.sites_out} == everything:
            return [d._replace(name=name)]
    by_layer: dict[int, Dictionary] = {}
    for name, d in parts.items():
        if not d.is_multilayer:
            by_layer.setdefault(d.site_out.layer, d._replace(name=name))
    missing = sorted(everything - set(by_layer))
    if missing:
        layers = ", ".join(map(str, missing))
        raise BadInput(
            f"the served dictionaries cannot form a replacement model: no transcoder (L.mlp_in -> L.mlp_out) "
            f"for layer{'s' if len(missing) > 1 else ''} {layers}; start the server with --dictionaries "
            "naming a transcoder for every layer or a cross-layer transcoder"
        )
    return [by_layer[layer] for layer in range(n_layers)]


def _same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    return bool(a) and bool(b) and Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def explorer_names(document: GraphFile, known: Sequence[tuple[str, str]]) -> dict[str, str]:
    """For each dictionary the graph names, the name this explorer knows it by.

    known: (name, folder) of the explorer's dictionaries. A graph dictionary maps to the one with its
    folder, else keeps its own name (graphs made by the server already use the explorer's names).
    """
    info = document.metadata.openscope
    if info is None:
        return {}
    names = {}
    for g in info.dictionaries:
        match = next((name for name, folder in known if _same_folder(folder, g.folder)), None)
        names[g.name] = match or g.name
    return names


def rename_dictionaries(document: GraphFile, names: Mapping[str, str]) -> GraphFile:
    """The graph with its dictionaries renamed (`names`: old -> new) in nodes and metadata."""
    if all(old == new for old, new in names.items()):
        return document
    data: dict[str, Any] = document.model_dump(mode="json")
    for node in data["nodes"]:
        if node.get("dictionary") in names:
            node["dictionary"] = names[node["dictionary"]]
    meta = data["metadata"]
    meta["transcoder_list"] = [names.get(n, n) for n in meta.get("transcoder_list", [])]
    for d in meta["openscope"]["dictionaries"]:
        d["name"] = names.get(d["name"], d["name"])
    return GraphFile.model_validate(data)


# ---- the folder ------------------------------------------------------------------------------------


class GraphStore:
    """The graph files of one folder; summaries are cached by file size and modification time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._summaries: dict[Path, tuple[tuple[int, int], GraphSummary]] = {}
        self._lock = threading.Lock()

    def path(self, slug: str) -> Path:
        return self.folder / f"{slug}.json"

    def slugs(self) -> list[str]:
        """Slugs of the folder's graph files, newest first (files whose names are no slug are ignored)."""
        if not self.folder.is_dir():
            return []
        files = [
            p
            for p in self.folder.glob("*.json")
            if p.is_file() and SLUG.fullmatch(p.stem) and inside(self.folder, p)
        ]
        files.sort(key=lambda p: (-p.stat().st_mtime, p.stem))
        return [p.stem for p in files]

    def load(self, slug: str) -> GraphFile:
        """The validated graph; NotFound for an unknown slug, CorruptGraph for a bad file."""
        path = self.path(slug)
        if not SLUG.fullmatch(slug) or not path.is_file() or not inside(self.folder, path):
            there = ", ".join(self.slugs()[:20]) or "none"
            raise NotFound(f"no graph {slug!r} in {self.folder} (graphs there: {there})")
        try:
            return load_graph(path)
        except OpenscopeError as exc:
            raise CorruptGraph(str(exc)) from None

    def summaries(self) -> list[GraphSummary]:
        """A summary per graph file, newest first; a corrupt file is listed with its error."""
        out = []
        for slug in self.slugs():
            path = self.path(slug)
            try:
                stat = path.stat()
            except OSError:
                continue  # removed meanwhile
            key = (stat.st_mtime_ns, stat.st_size)
            with self._lock:
                cached = self._summaries.get(path)
            if cached is None or cached[0] != key:
                try:
                    summary = summary_of(slug, self.load(slug))
                except OpenscopeError as exc:
                    summary = GraphSummary(slug=slug, error=str(exc))
                with self._lock:
                    self._summaries[path] = (key, summary)
                cached = (key, summary)
            out.append(cached[1])
        return out

    def save_new(self, document: GraphFile) -> bool:
        """Save a graph under its slug unless a file of that name exists (atomic: of two requests
        saving the same name, exactly one succeeds); whether it was saved."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return write_new(self.path(document.metadata.slug), document.model_dump_json().encode())


# ---- what the routes do -------------------------------------------------------------------------------


class GraphService:
    """The graph routes' work: the folder plus the server's model, dictionaries and lock."""

    def __init__(self, state: ServerState) -> None:
        if state.config.max_graph_tokens < 2:
            raise OpenscopeError("max_graph_tokens must be at least 2 (BOS and one token)")
        self.state = state
        self.store = GraphStore(graphs_folder(state.config))

    def _known(self) -> list[tuple[str, str]]:
        known = [(name, str(d.folder)) for name, d in self.state.dictionaries.items() if d.folder is not None]
        return known + [(i.name, i.folder) for i in self.state.infos() if i.folder]

    def index(self) -> GraphIndex:
        can_run, names, hint = True, [], ""
        try:
            names = [d.name for d in self._replacement(None)]
        except OpenscopeError as exc:
            can_run, hint = False, str(exc)
        return GraphIndex(
            folder=str(self.store.folder),
            graphs=self.store.summaries(),
            can_run=can_run,
            run_dictionaries=names,
            run_hint=hint,
            max_tokens=self.state.config.max_graph_tokens,
        )

    def graph(self, slug: str) -> GraphFile:
        document = self.store.load(slug)
        return rename_dictionaries(document, explorer_names(document, self._known()))

    def _replacement(self, wanted: Sequence[str] | None) -> list[Dictionary]:
        if self.state.loaded is None:
            raise BadInput(
                "no model is loaded, so no graph can be computed: start the server with --dictionaries "
                "naming transcoders for every layer (or a cross-layer transcoder)"
            )
        return replacement_set(self.state.dictionaries, self.state.loaded.n_layers, wanted)

    def run(self, request: GraphRequest) -> GraphSummary:
        """Attribute the prompt, prune, save; the new graph's summary."""
        cfg = self.state.config
        check_prompt(request.prompt, cfg.max_prompt_chars)
        dictionaries = self._replacement(request.dictionaries)
        loaded = self.state.loaded
        assert loaded is not None  # _replacement checked
        n_tokens = prompt_ids(loaded.tokenizer, request.prompt).shape[1]
        if n_tokens > cfg.max_graph_tokens:
            raise BadInput(
                f"the prompt is {n_tokens} tokens (with BOS); this server computes graphs for at most "
                f"{cfg.max_graph_tokens} (the graph grows with the square of its nodes): shorten it"
            )
        taken = set(self.store.slugs())
        if request.slug is not None:
            slug = check_slug(request.slug)
            if slug in taken:
                raise Conflict(
                    f"a graph named {slug!r} exists already in {self.store.folder}; choose another name"
                )
        else:
            slug = slug_for(request.prompt, taken)
        settings = AttributeConfig(
            prompt=request.prompt,
            max_logits=request.max_logits,
            logit_probability=request.logit_probability,
            batch_size=BATCH_SIZE,
            max_feature_nodes=request.max_feature_nodes,
            node_threshold=request.node_threshold,
            edge_threshold=request.edge_threshold,
            max_tokens=cfg.max_graph_tokens,
            slug=slug,
        )
        with self.state.lock:
            graph, document = attribute_document(settings, loaded, dictionaries, loaded.name, progress=False)
        while not self.store.save_new(document):
            # Another request saved a graph of that name meanwhile: a name asked for is a conflict, a
            # name made from the prompt takes the next number. No graph is ever silently replaced.
            if request.slug is not None:
                raise Conflict(
                    f"a graph named {slug!r} exists already in {self.store.folder}; choose another name"
                )
            slug = slug_for(request.prompt, set(self.store.slugs()))
            document = document.model_copy(
                update={"metadata": document.metadata.model_copy(update={"slug": slug})}
            )
        log.info(
            "graph %s: %d nodes, %d links in %.1f s",
            slug,
            len(document.nodes),
            len(document.links),
            graph.seconds,
        )
        return summary_of(slug, document)

    def dictionaries_for(self, slug: str, document: GraphFile) -> dict[str, Dictionary]:
        """The loaded dictionaries of a graph, by the names its nodes use; Unavailable when one is not loaded."""
        info = document.metadata.openscope
        if info is None:
            raise Unavailable(
                f"graph {slug} was not written by openscope (no metadata.openscope): its nodes name no dictionaries to edit"
            )
        names = explorer_names(document, self._known())
        out = {}
        for g in info.dictionaries:
            d = self.state.dictionaries.get(names[g.name])
            if d is None:
                raise Unavailable(
                    f"graph {slug} uses dictionary {g.name} ({g.folder or 'in memory'}), which this server has "
                    f"not loaded; start it with --dictionaries {g.folder or 'FOLDER'}"
                )
            if d.coder.cfg.width != g.width:
                raise Unavailable(
                    f"graph {slug}: dictionary {g.name} has {g.width} latents per layer, the loaded one "
                    f"{d.coder.cfg.width}: they are not the same dictionary"
                )
            out[g.name] = d
        return out

    def intervene(self, slug: str, request: InterventionRequest) -> InterventionResult:
        document = self.store.load(slug)
        dictionaries = self.dictionaries_for(slug, document)
        loaded = self.state.loaded
        if loaded is None:
            raise Unavailable("no model is loaded: start the server with --dictionaries and --model")
        info = document.metadata.openscope
        if info is not None and max(info.prompt_token_ids, default=0) >= len(loaded.tokenizer):
            raise Unavailable(
                f"graph {slug} was made with {info.model}, whose tokens this server's model {loaded.name} lacks"
            )
        with self.state.lock:
            return intervene(loaded, document, dictionaries, request.edits, request.top_k)


def graph_router(state: ServerState, errors: dict[int | str, dict[str, Any]]) -> APIRouter:
    """The `/api/graphs` routes (module docstring); `errors` documents the 4xx answers."""
    service = GraphService(state)
    router = APIRouter(prefix="/api/graphs", tags=["graphs"])
    graph_errors = {
        **errors,
        422: {**errors.get(422, {}), "description": "Corrupt graph file, or a request off the schema"},
    }

    @router.get("", response_model=GraphIndex)
    def graph_index() -> GraphIndex:
        """The saved graphs (slug, prompt, model, sizes, scores) and whether new ones can run here."""
        return service.index()

    @router.get("/{slug}", response_model=GraphFile, responses=graph_errors)
    def graph(slug: str) -> Response:
        """One graph (circuit-tracer / Neuronpedia schema plus metadata.openscope), dictionaries named as here."""
        # Serialised once here: re-validating a graph of thousands of links as a response model is slow.
        return Response(service.graph(slug).model_dump_json(), media_type="application/json")

    @router.post("", response_model=GraphSummary, status_code=201, responses=errors)
    def run_graph(request: GraphRequest) -> GraphSummary:
        """Attribute a short prompt with the served model and transcoders, and save the graph."""
        return service.run(request)

    @router.post("/{slug}/intervene", response_model=InterventionResult, responses=graph_errors)
    def intervene_graph(slug: str, request: InterventionRequest) -> InterventionResult:
        """Zero or scale feature nodes of a graph; the top next tokens before and after (real model, live)."""
        return service.intervene(slug, request)

    return router
