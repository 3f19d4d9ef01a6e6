"""What the explorer serves from: the feature database, the model and its dictionaries, and the lock
that serialises model calls.

The web layer (`openscope.serve.app`) stays thin: every check of user input and every call into
the features and steering code happens here, as plain functions and one small class, so it can be
tested without HTTP. Errors are `OpenscopeError` subclasses carrying the HTTP status they map to
(`status`): unknown names → 404, bad values → 400, something the server cannot do in its current
set-up (no model loaded for that dictionary) → 409.

Model calls (inspector, text search, steering) take `ServerState.lock`: a Hugging Face model and
the hooks openscope puts on it are not safe to run from two threads at once (hooks are registered
on shared modules). The web layer runs these calls in its thread pool, so the server keeps answering
dashboard requests (SQLite reads, no lock) while the model works.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from openscope.coders.dictionary import (
    Dictionary,
    dictionary_folders,
    load_dictionary,
    model_of,
    unique_names,
    validate_dictionary,
)
from openscope.errors import OpenscopeError
from openscope.features.db import FeatureDB
from openscope.features.schema import (
    DictionaryInfo,
    FeatureDetail,
    FeatureSummary,
    InspectResult,
    SteerRequest,
    SteerResult,
)
from openscope.interventions.steer import steer_request, top_latents
from openscope.models.load import LoadedModel, load_model, resolve_device
from openscope.serve.config import ServeConfig, check_serve_config

log = logging.getLogger(__name__)


class NotFound(OpenscopeError):
    """A dictionary or latent that does not exist (HTTP 404)."""

    status = 404


class BadInput(OpenscopeError):
    """A request value the server refuses: empty or over-long prompt, too many tokens, NaN (HTTP 400)."""

    status = 400


class Unavailable(OpenscopeError):
    """The request is valid but this server cannot run it, e.g. no model for that dictionary (HTTP 409)."""

    status = 409


def http_status(exc: OpenscopeError) -> int:
    """The HTTP status of an openscope error: its own `status`, else 400 (it is the user's input)."""
    return int(getattr(exc, "status", 400))


# ---- input checks (pure) -------------------------------------------------------------------------


def check_prompt(text: str, max_chars: int) -> str:
    """The prompt if it is non-blank and at most max_chars characters long; else BadInput."""
    if not text.strip():
        raise BadInput("the prompt is empty; type some text")
    if len(text) > max_chars:
        raise BadInput(f"the prompt has {len(text)} characters; this server accepts at most {max_chars}")
    return text


def check_latent(dictionary: str, latent: int, width: int) -> int:
    """The latent if 0 <= latent < width; else NotFound naming the valid range."""
    if not 0 <= latent < width:
        raise NotFound(f"latent {latent} is out of range for {dictionary} (width {width}: 0..{width - 1})")
    return latent


def check_steer(request: SteerRequest, max_new_tokens: int) -> None:
    """Limits the schema cannot know: the server's token cap, and finite numbers only."""
    if request.max_new_tokens > max_new_tokens:
        raise BadInput(
            f"max_new_tokens {request.max_new_tokens} is above this server's limit of {max_new_tokens}"
        )
    # JSON parsers accept NaN and Infinity; an infinite strength would only produce garbage text.
    numbers = {"temperature": request.temperature, "top_p": request.top_p}
    numbers.update({f"interventions[{i}].value": iv.value for i, iv in enumerate(request.interventions)})
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise BadInput(f"{name} must be a finite number, got {value}")


def latents_on_text(result: InspectResult) -> list[tuple[int, float]]:
    """Every latent that fired anywhere in an inspected text with its largest activation, largest first."""
    best: dict[int, float] = {}
    for token in result.tokens:
        for la in token.latents:
            if la.activation > best.get(la.latent, 0.0):
                best[la.latent] = la.activation
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))


def name_dictionaries(
    dictionaries: Sequence[Dictionary], infos: Sequence[DictionaryInfo]
) -> dict[str, Dictionary]:
    """Name each loaded dictionary as the database does: a dictionary whose folder the database records
    keeps the database's name; the rest are named by `unique_names` (as `openscope features` would),
    clear of the names already taken."""
    by_folder = {Path(i.folder).resolve(): i.name for i in infos if i.folder}
    recorded: list[str | None] = []
    for d in dictionaries:
        name = by_folder.get(d.folder.resolve()) if d.folder is not None else None
        recorded.append(name if name not in recorded else None)  # a folder loaded twice: named once
    kept = [name for name in recorded if name is not None]
    rest = [d for d, name in zip(dictionaries, recorded, strict=True) if name is None]
    names = iter([d.name for d in unique_names(rest, kept)])
    pairs = zip(dictionaries, recorded, strict=True)
    return {name if name is not None else next(names): d for d, name in pairs}


def info_of(name: str, d: Dictionary, model: str) -> DictionaryInfo:
    """A DictionaryInfo for a loaded dictionary the database has no dashboards for."""
    return DictionaryInfo(
        name=name,
        site=d.site_in.name,
        site_out=d.site_out.name,
        width=d.coder.cfg.width,
        kind=d.coder.kind,
        model=model,
        folder=str(d.folder or ""),
        complete=False,
    )


# ---- the state ---------------------------------------------------------------------------------


@dataclass
class ServerState:
    """The database, the model and its named dictionaries, and the model lock."""

    config: ServeConfig
    """The server's settings (limits)."""
    db: FeatureDB
    """The feature index (read-only, thread-safe)."""
    loaded: LoadedModel | None
    """The model, or None when no dictionary could be loaded (dashboards only)."""
    dictionaries: dict[str, Dictionary]
    """Loaded dictionaries by the name the database uses (inspector, text search, steering)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held during every model call: forwards and their hooks must not interleave."""

    # -- dictionaries

    def infos(self) -> list[DictionaryInfo]:
        """The database's dictionaries, then loaded ones it does not index."""
        infos = self.db.dictionaries()
        indexed = {i.name for i in infos}
        model = self.loaded.name if self.loaded is not None else ""
        extra = [info_of(n, d, model) for n, d in self.dictionaries.items() if n not in indexed]
        return infos + extra

    def info(self, name: str) -> DictionaryInfo:
        """One dictionary by name (indexed or loaded); NotFound listing the names there are."""
        for info in self.infos():
            if info.name == name:
                return info
        known = ", ".join(i.name for i in self.infos()) or "none"
        raise NotFound(f"unknown dictionary {name!r}; this server has: {known}")

    def loaded_dictionary(self, name: str) -> Dictionary:
        """A dictionary the model can run; NotFound if unknown, Unavailable if only indexed."""
        if name in self.dictionaries:
            return self.dictionaries[name]
        info = self.info(name)
        raise Unavailable(
            f"dictionary {name} has dashboards but is not loaded, so it cannot run on text "
            f"(folder {info.folder or 'unknown'!r} not found); start the server with --dictionaries FOLDER"
        )

    def _model(self) -> LoadedModel:
        if self.loaded is None:
            raise Unavailable("no model is loaded: start the server with --dictionaries and --model")
        return self.loaded

    # -- dashboards (database only; no lock needed)

    def features(self, name: str, offset: int, limit: int, order: str) -> list[FeatureSummary]:
        """A page of a dictionary's feature table."""
        self.info(name)
        return self.db.features(name, offset=offset, limit=limit, order=order)

    def feature(self, name: str, latent: int) -> FeatureDetail:
        """One latent's dashboard."""
        info = self.info(name)
        check_latent(name, latent, info.width)
        if name not in {i.name for i in self.db.dictionaries()}:
            raise NotFound(f"dictionary {name} has no dashboards yet; run `openscope features` on it")
        return self.db.feature(name, latent)

    def search_token(self, token: str, dictionary: str | None, limit: int) -> list[FeatureSummary]:
        """Latents whose top examples peak on this token."""
        if dictionary is not None:
            self.info(dictionary)
        return self.db.search_by_token(token, dictionary, limit)

    def search_logit(self, word: str, dictionary: str | None, limit: int) -> list[FeatureSummary]:
        """Latents that promote this word among their top logits."""
        if dictionary is not None:
            self.info(dictionary)
        return self.db.search_by_logit(word, dictionary, limit)

    # -- model calls (under the lock)

    def inspect(self, name: str, text: str, k: int) -> InspectResult:
        """Per token of the text, the k most active latents of one dictionary."""
        check_prompt(text, self.config.max_prompt_chars)
        if not 1 <= k <= self.config.max_top_k:
            raise BadInput(f"k must be between 1 and {self.config.max_top_k}, got {k}")
        d = self.loaded_dictionary(name)
        loaded = self._model()
        with self.lock:
            result = top_latents(loaded, d, text, k=k)
        # The steering code names a dictionary by its own label; the explorer uses the database's name.
        return result.model_copy(update={"dictionary": name})

    def search_text(self, text: str, dictionary: str | None, limit: int) -> list[FeatureSummary]:
        """Latents that fire on this text (largest activation first), with their dashboards' numbers."""
        check_prompt(text, self.config.max_prompt_chars)
        names = [dictionary] if dictionary is not None else list(self.dictionaries)
        if not names:
            raise Unavailable(
                "no dictionary is loaded, so no text can be searched; start with --dictionaries"
            )
        indexed = {i.name for i in self.db.dictionaries()}
        hits: list[FeatureSummary] = []
        for name in names:
            result = self.inspect(name, text, self.config.max_top_k)
            for latent, activation in latents_on_text(result):
                hits.append(self._summary(name, latent, activation, name in indexed))
        hits.sort(key=lambda s: -(s.score or 0.0))
        return hits[:limit]

    def _summary(self, name: str, latent: int, score: float, indexed: bool) -> FeatureSummary:
        if indexed:
            try:
                return self.db.feature(name, latent).summary().model_copy(update={"score": score})
            except OpenscopeError:
                pass  # dashboards still being computed: report the live activation alone
        return FeatureSummary(
            dictionary=name,
            latent=latent,
            frequency=0.0,
            max_activation=score,
            mean_activation=score,
            score=score,
        )

    def steer(self, request: SteerRequest) -> SteerResult:
        """Generate with and without the request's interventions."""
        check_prompt(request.prompt, self.config.max_prompt_chars)
        check_steer(request, self.config.max_new_tokens)
        used: dict[str, Dictionary] = {}
        for iv in request.interventions:
            d = self.loaded_dictionary(iv.dictionary)
            check_latent(iv.dictionary, iv.latent, d.coder.cfg.width)
            used[iv.dictionary] = d
        loaded = self._model()
        with self.lock:
            return steer_request(loaded, used, request)


# ---- building the state ----------------------------------------------------------------------------


def _folders_from_db(infos: Sequence[DictionaryInfo]) -> list[Path]:
    """The dictionary folders the database records that still exist here (others: dashboards only)."""
    folders = []
    for info in infos:
        if not info.folder:
            continue
        folder = Path(info.folder)
        if folder.is_dir():
            folders.append(folder)
        else:
            log.warning(
                "dictionary %s: folder %s not found; its dashboards are served, not the model",
                info.name,
                folder,
            )
    return folders


def load_state(
    config: ServeConfig,
    loaded: LoadedModel | None = None,
    db: FeatureDB | None = None,
    dictionaries: Sequence[Dictionary] | Mapping[str, Dictionary] | None = None,
) -> ServerState:
    """Open the database, load the dictionaries and the model they need (or use those given)."""
    check_serve_config(config)
    device = resolve_device(config.device)  # before the database is opened: a bad device touches no file
    db = db or FeatureDB(config.db)
    infos = db.dictionaries()
    if dictionaries is None:
        folders = dictionary_folders(config.dictionaries) if config.dictionaries else _folders_from_db(infos)
        dictionaries = [load_dictionary(f, loaded, device=device) for f in folders]
    named = (
        dict(dictionaries)
        if isinstance(dictionaries, Mapping)
        else name_dictionaries(list(dictionaries), infos)
    )
    if named and loaded is None:
        model = config.model or model_of(list(named.values()))
        loaded = load_model(model, device=device, cache_dir=config.cache_dir)
    if loaded is not None:
        for d in named.values():
            validate_dictionary(d, loaded)
            d.coder.to(loaded.device).eval()
    if not named:
        log.warning("no dictionary loaded: serving dashboards only (no inspector, text search or steering)")
    log.info(
        "serving %d indexed dictionaries, %d loaded, model %s", len(infos), len(named), loaded and loaded.name
    )
    return ServerState(config=config, db=db, loaded=loaded, dictionaries=named)
