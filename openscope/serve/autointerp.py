"""The explorer's autointerp routes: a latent's explanation and scores (`openscope autointerp`), and
full-text search over the explanations. Both read the feature database the explorer serves; a database
without autointerp results answers null and no hits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from openscope.features.schema import FeatureSummary
from openscope.interp import Explanation, read_explanation, search_explanations
from openscope.serve.state import NotFound, ServerState


class AutointerpOut(BaseModel):
    """One latent's explanation and its scores."""

    status: str = Field(description="explained, unexplained or unscored (reason says why).")
    explanation: str = Field(description="The explainer's one line.")
    reason: str = Field(description="Why it is unexplained or unscored ('' when all went well).")
    detection: float | None = Field(description="Detection score: balanced accuracy, 0.5 is chance.")
    fuzzing: float | None = Field(description="Fuzzing score: balanced accuracy over tokens, 0.5 is chance.")
    n_detection: int = Field(description="Texts the detection score averages.")
    n_fuzzing: int = Field(description="Tokens the fuzzing score averages.")
    explainer: str = Field(description="The explainer model.")
    scorer: str = Field(description="The scorer model.")


def _out(e: Explanation) -> AutointerpOut:
    return AutointerpOut(**{k: getattr(e, k) for k in AutointerpOut.model_fields})


def _known(state: ServerState, dictionary: str) -> None:
    if dictionary not in {i.name for i in state.db.dictionaries()}:
        raise NotFound(f"no dictionary {dictionary!r} in {state.db.path}")


def autointerp_router(state: ServerState, errors: dict[int | str, dict[str, Any]]) -> APIRouter:
    """`/api/autointerp` and `/api/search/explanation`; `errors` documents the 4xx answers."""
    router = APIRouter(tags=["autointerp"])

    @router.get("/api/autointerp", response_model=AutointerpOut | None, responses=errors)
    def autointerp(
        dictionary: str = Query(description="DictionaryInfo.name."),
        latent: int = Query(ge=0, description="Latent index."),
    ) -> AutointerpOut | None:
        """A latent's explanation and scores, or null when it has none."""
        _known(state, dictionary)
        found = read_explanation(state.db.path, dictionary, latent)
        return None if found is None else _out(found)

    @router.get("/api/search/explanation", response_model=list[FeatureSummary], responses=errors)
    def search_explanation(
        q: str = Query(min_length=1, max_length=200, description="Words every explanation found contains."),
        dictionary: str | None = Query(None, description="Only this dictionary."),
        limit: int = Query(20, ge=1, le=500),
    ) -> list[FeatureSummary]:
        """Latents whose explanation matches every word (SQLite full-text search; score: detection)."""
        if dictionary is not None:
            _known(state, dictionary)
        hits = search_explanations(state.db.path, q, dictionary, limit)
        return [
            state.db.feature(h.dictionary, h.latent).summary().model_copy(update={"score": h.detection})
            for h in hits
        ]

    return router
