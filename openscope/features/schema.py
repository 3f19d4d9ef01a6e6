"""The feature-dashboard contract: pydantic models shared by the SQLite read API, the web app and
the exported (Neuronpedia-style) JSON.

One schema, three uses:
- `openscope.features.db.FeatureDB` (the read side of the feature index built by
  `openscope features`) returns these models;
- the web app (`openscope.serve`) returns them as its JSON responses unchanged
  (`model.model_dump(mode="json")`), and posts `SteerRequest` / reads `SteerResult`;
- `openscope features --export` writes `FeatureDetail.model_dump_json()` per feature, so an exported
  file and the app's `/feature` response are the same document. `FeatureDetail.neuronpedia()` gives the
  same data under Neuronpedia's own key names for tools that read those.

Python entry points that produce these models (stable names):
- `openscope.features.db.FeatureDB(path)` (read-only, thread-safe): `dictionaries() -> list[DictionaryInfo]`,
  `dictionary(name) -> DictionaryInfo`, `features(name, offset=0, limit=100, order="latent") ->
  list[FeatureSummary]` (order: latent | frequency | max_activation | mean_activation),
  `feature(name, latent) -> FeatureDetail`, `search_by_token(token, dictionary=None, limit=20)` and
  `search_by_logit(word, dictionary=None, limit=20) -> list[FeatureSummary]` (with `score`).
  Bad names / latents raise `OpenscopeError` with a one-line message (map it to HTTP 404/400).
- `openscope.interventions.steer.steer_request(loaded, dictionaries, request: SteerRequest) -> SteerResult`, where
  `dictionaries` maps DictionaryInfo.name to a loaded `Dictionary`.
- `openscope.interventions.steer.top_latents(loaded, dictionary, text, k=5) -> InspectResult` (alias `inspect_text`).
- `openscope.features.export.export_features(db_path, dictionary, latents=None, out=folder)` writes
  `<out>/<dictionary>/<latent>.json` (FeatureDetail JSON).

Conventions every model follows:
- A dictionary is named by `DictionaryInfo.name` (unique within one database; the folder name, or
  the path below the searched root when names would clash). A latent is its integer index
  0 ≤ latent < width.
- Activations are the coder's folded latent values (Gemma Scope convention: raw model units, decoder
  rows unit-norm). An activation of 0 means "does not fire".
- `Example.tokens` are the tokenizer's pieces decoded one by one (so "".join(tokens) is the text; a
  leading space is part of the token); `token_ids` are the ids; `activations[i]` is the latent's
  activation at `tokens[i]` (0 at positions the index never encodes, e.g. BOS).
- Positions are 0-based token positions inside the context the example came from.
- Frequencies are fractions of the tokens encoded (BOS/EOS/pad excluded).
- Everything here is JSON-safe (floats, ints, strings, lists); no tensors.

Names are stable: fields may be added (with defaults), never renamed or removed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
"""Version of this contract; written into exports and the database."""


class _Model(BaseModel):
    """Base: forbid unknown fields on input, so a typo in a request is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid")


MAX_POSITION = 1_000_000
"""Largest token position a request may name (far beyond any prompt a server accepts)."""
MAX_SEED = 2**63 - 1
"""Largest sampling seed (torch's generators take 64-bit seeds)."""
MIN_TEMPERATURE = 1e-3
"""Smallest sampling temperature above 0 (below it the logits overflow; use 0 for greedy)."""


def _check_text(value: Any, where: str) -> None:
    """Raise ValueError for a string that is not valid Unicode (a lone UTF-16 surrogate, which JSON
    can carry as an escape but no tokenizer or file can encode), looking inside lists and dicts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} is not valid Unicode (it holds a lone surrogate)") from None
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, f"{where} key")
            _check_text(item, f"{where}[{key!r}]")


class RequestModel(BaseModel):
    """Base of every model the web API reads: unknown fields, NaN or infinite numbers and text that
    is not valid Unicode are refused (HTTP 422), so no request value can reach the model unchecked."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="after")
    def _valid_text(self) -> RequestModel:
        for name in type(self).model_fields:
            _check_text(getattr(self, name), name)
        return self


class Example(_Model):
    """One activating context (a window of tokens around the token where the latent fired most)."""

    tokens: list[str] = Field(description="The window's tokens as text pieces, in order.")
    token_ids: list[int] = Field(description="The window's token ids (same length as tokens).")
    activations: list[float] = Field(description="The latent's activation at each token of the window.")
    max_activation: float = Field(description="The activation at the example's chosen token (its maximum).")
    max_index: int = Field(description="Index into tokens/activations of the chosen (max) token.")
    context: int = Field(description="Id of the context (sequence) the window comes from.")
    position: int = Field(description="Position of the chosen token inside that context.")
    start: int = Field(default=0, description="Position inside the context of tokens[0].")


class QuantileGroup(_Model):
    """Examples whose activation falls in one quantile bucket of the latent's nonzero activations."""

    index: int = Field(description="Bucket index, 0 = lowest activations.")
    low: float = Field(description="Smallest activation of the bucket's examples.")
    high: float = Field(description="Largest activation of the bucket's examples.")
    label: str = Field(default="", description="Human label, e.g. 'quantile 3/4 (0.41 - 0.87)'.")
    examples: list[Example] = Field(default_factory=list, description="Examples, highest activation first.")


class Histogram(_Model):
    """Histogram of a latent's nonzero activations (counts of tokens where it fired)."""

    edges: list[float] = Field(description="Bin edges, len(counts) + 1, increasing (log-spaced).")
    counts: list[int] = Field(description="Tokens whose activation falls in each bin [edges[i], edges[i+1]).")
    log_x: bool = Field(
        default=True, description="Whether the edges are log-spaced (plot with a log x axis)."
    )


class TokenValue(_Model):
    """A vocabulary token and a value (a logit effect)."""

    token: str = Field(description="The token's text piece.")
    token_id: int = Field(description="The token id.")
    value: float = Field(
        description="The value, e.g. the direct logit effect of the latent's decoder direction."
    )


class Neighbour(_Model):
    """Another latent of the same dictionary, by decoder cosine similarity."""

    latent: int = Field(description="The other latent's index.")
    cosine: float = Field(description="Cosine similarity of the two decoder directions.")


class RoleStat(_Model):
    """How a latent fires on the tokens of one chat role (dictionaries indexed on chat data)."""

    role: str = Field(description="template, system, user or model.")
    n_tokens: int = Field(description="Indexed tokens of this role.")
    n_fired: int = Field(description="Of those, tokens where the latent fired.")
    frequency: float = Field(description="n_fired / n_tokens.")
    mean_activation: float = Field(description="Mean activation over the tokens of this role where it fired.")
    frequency_elsewhere: float = Field(description="Firing frequency on the tokens of every other role.")
    specificity: float = Field(
        description="frequency / (frequency + frequency_elsewhere): 1 = fires only in this role, "
        "0.5 = indifferent to it (openscope.analysis.roles)."
    )


class RoleTokens(_Model):
    """A chat role and how many of a dictionary's indexed tokens have it."""

    role: str = Field(description="template, system, user or model.")
    n_tokens: int = Field(description="Indexed tokens of this role.")


class FeatureSummary(_Model):
    """One latent in a list (search results, a dictionary's feature table)."""

    dictionary: str = Field(description="DictionaryInfo.name of the dictionary.")
    latent: int = Field(description="Latent index.")
    frequency: float = Field(description="Fraction of encoded tokens where the latent fired (> 0).")
    max_activation: float = Field(description="Largest activation seen.")
    mean_activation: float = Field(description="Mean activation over the tokens where it fired.")
    top_token: str = Field(
        default="", description="The token of the top example's chosen position ('' if dead)."
    )
    top_logit: str = Field(default="", description="The token with the largest positive logit effect.")
    score: float | None = Field(
        default=None,
        description="Search relevance (the matched activation or logit value); None outside searches.",
    )


class FeatureDetail(FeatureSummary):
    """Everything the dashboard of one latent shows; also the exported JSON of a feature."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="Version of this contract.")
    model: str = Field(default="", description="Name of the model the dictionary reads.")
    site: str = Field(description="Site the dictionary encodes, e.g. '6.resid_post'.")
    site_out: str = Field(
        default="", description="Site the dictionary writes (differs from site for transcoders)."
    )
    n_tokens: int = Field(default=0, description="Tokens encoded to build this dashboard.")
    n_fired: int = Field(default=0, description="Tokens where the latent fired.")
    histogram: Histogram = Field(description="Activation histogram over the firing tokens.")
    top_examples: list[Example] = Field(default_factory=list, description="Top-k contexts, highest first.")
    quantiles: list[QuantileGroup] = Field(
        default_factory=list, description="Examples sampled uniformly among firings, grouped by quantile."
    )
    top_logits: list[TokenValue] = Field(
        default_factory=list, description="Tokens the decoder direction promotes most, largest first."
    )
    bottom_logits: list[TokenValue] = Field(
        default_factory=list, description="Tokens it suppresses most, most negative first."
    )
    neighbours: list[Neighbour] = Field(
        default_factory=list, description="Nearest latents by decoder cosine, highest first."
    )
    roles: list[RoleStat] = Field(
        default_factory=list,
        description="Chat data: firing frequency, mean activation and specificity per role (empty for plain text).",
    )

    def summary(self) -> FeatureSummary:
        """The FeatureSummary part of this detail."""
        return FeatureSummary(**{k: getattr(self, k) for k in FeatureSummary.model_fields})

    def neuronpedia(self) -> dict[str, Any]:
        """The same data under Neuronpedia's feature-JSON key names (activations, pos_str, ...)."""
        examples = [*self.top_examples, *(e for g in self.quantiles for e in g.examples)]
        return {
            "modelId": self.model,
            "layer": self.site,
            "index": str(self.latent),
            "source_set": self.dictionary,
            "frac_nonzero": self.frequency,
            "maxActApprox": self.max_activation,
            "pos_str": [t.token for t in self.top_logits],
            "pos_values": [t.value for t in self.top_logits],
            "neg_str": [t.token for t in self.bottom_logits],
            "neg_values": [t.value for t in self.bottom_logits],
            "freq_hist_data_bar_values": [
                (a + b) / 2 for a, b in zip(self.histogram.edges, self.histogram.edges[1:], strict=False)
            ],
            "freq_hist_data_bar_heights": list(self.histogram.counts),
            "topkCosSimIndices": [n.latent for n in self.neighbours],
            "topkCosSimValues": [n.cosine for n in self.neighbours],
            "activations": [
                {
                    "tokens": e.tokens,
                    "values": e.activations,
                    "maxValue": e.max_activation,
                    "maxValueTokenIndex": e.max_index,
                }
                for e in examples
            ],
        }


class Correlate(_Model):
    """A neuron (input coordinate) or another latent whose activations correlate with a latent's."""

    index: int = Field(description="The neuron's coordinate or the other latent's index.")
    pearson: float = Field(description="Pearson correlation of the two activations over the tokens.")
    cosine: float = Field(description="Cosine similarity of the two uncentred activation vectors.")


class LogitHistogram(_Model):
    """Histogram of a latent's logit effects over the whole vocabulary (equal-width bins)."""

    lo: float = Field(description="The smallest effect: the first bin's left edge.")
    hi: float = Field(description="The largest effect: the last bin's right edge.")
    counts: list[int] = Field(description="Tokens per bin, from lo to hi (they sum to the vocabulary size).")


class LatentExtras(_Model):
    """What SAEDashboard's dashboards add (the Neuronpedia export): empty when not computed, e.g. in a
    database made before they were."""

    logit_histogram: LogitHistogram | None = Field(
        default=None, description="None when the dictionary does not write the residual stream."
    )
    correlated_neurons: list[Correlate] = Field(
        default_factory=list, description="Input coordinates most correlated with the latent, highest first."
    )
    correlated_features: list[Correlate] = Field(
        default_factory=list,
        description="Latents most correlated with it over a token sample, highest first.",
    )
    head_distribution: list[float] = Field(
        default_factory=list,
        description="attn_out dictionaries: each head's share of the decoder direction's norm (sums to 1).",
    )


class DictionaryInfo(_Model):
    """One dictionary in the feature index."""

    name: str = Field(description="Unique name in this database (used in every other call).")
    site: str = Field(description="Site it encodes, e.g. '6.resid_post' or '3.mlp_in'.")
    site_out: str = Field(description="Site it writes.")
    width: int = Field(description="Number of latents.")
    kind: str = Field(default="sae", description="sae, transcoder or skip_transcoder.")
    model: str = Field(default="", description="Name of the model.")
    folder: str = Field(default="", description="Folder the dictionary was loaded from ('' if in memory).")
    source: str = Field(
        default="", description="Where the tokens came from (a store path or a text source spec)."
    )
    n_tokens: int = Field(default=0, description="Tokens encoded.")
    complete: bool = Field(
        default=False, description="Whether its dashboards are finished (else partial or missing)."
    )
    alive: int = Field(default=0, description="Latents that fired at least once.")


class LatentActivation(_Model):
    """A latent and its activation at one token."""

    latent: int = Field(description="Latent index.")
    activation: float = Field(description="Its activation.")


class InspectToken(_Model):
    """One token of an inspected text and its most active latents."""

    token: str = Field(description="The token's text piece.")
    token_id: int = Field(description="The token id.")
    position: int = Field(description="Position in the tokenised text (BOS included).")
    latents: list[LatentActivation] = Field(
        default_factory=list, description="Most active latents at this token, largest first (only > 0)."
    )


class InspectResult(_Model):
    """The inspector: every token of a text with its top latents in one dictionary."""

    dictionary: str = Field(description="DictionaryInfo.name.")
    text: str = Field(description="The inspected text.")
    tokens: list[InspectToken] = Field(default_factory=list, description="Per token, in order.")


class SteerIntervention(RequestModel):
    """One edit of one latent during generation."""

    dictionary: str = Field(description="DictionaryInfo.name of the dictionary holding the latent.")
    latent: int = Field(description="Latent index.")
    mode: Literal["add", "clamp", "multiply"] = Field(
        "add",
        description="add: add strength × decoder direction at the output site; clamp: set the latent's "
        "activation to value (the reconstruction error is kept, so only that latent changes); multiply: "
        "scale the latent's activation by value (0 removes it).",
    )
    value: float = Field(
        description="Strength (add), the activation to clamp to (clamp) or the factor (multiply)."
    )
    positions: list[Annotated[int, Field(ge=0, le=MAX_POSITION)]] | None = Field(
        default=None, description="Token positions to edit (prompt positions, BOS = 0); None: every position."
    )


class SteerRequest(RequestModel):
    """A request to generate with and without interventions."""

    prompt: str = Field(description="The prompt text (BOS is added).")
    interventions: list[SteerIntervention] = Field(
        default_factory=list, description="Edits, applied together."
    )
    max_new_tokens: int = Field(default=32, ge=1, le=1024, description="Tokens to generate.")
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description=f"0: greedy; otherwise sampling at this temperature ({MIN_TEMPERATURE:g} to 100).",
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (with temperature > 0)."
    )
    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="Sampling seed (the same seed for both runs)."
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value


class SteerResult(_Model):
    """Unsteered and steered continuations of the same prompt."""

    prompt: str = Field(description="The prompt.")
    unsteered: str = Field(description="Continuation without interventions (generated text only).")
    steered: str = Field(description="Continuation with the interventions.")
    interventions: list[SteerIntervention] = Field(default_factory=list, description="The edits applied.")
    unsteered_ids: list[int] = Field(default_factory=list, description="Generated token ids, unsteered.")
    steered_ids: list[int] = Field(default_factory=list, description="Generated token ids, steered.")
