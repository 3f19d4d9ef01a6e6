"""The settings of `openscope autointerp`: which latents, which chat models, how many examples."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from openscope.errors import OpenscopeError
from openscope.features.index import DEFAULT_DB

KEY_ENV = "OPENAI_API_KEY"
"""Where the API key is read from when --api-key is not given."""
URL_ENV = "OPENSCOPE_AUTOINTERP_URL"
"""Where the endpoint's base URL is read from when --base-url is not given."""
BACKENDS = ("openai", "transformers")


@dataclass
class AutointerpConfig:
    """Explain latents with a chat model and score the explanations (detection and fuzzing); results go into the feature database and a report folder."""

    db: Path = DEFAULT_DB
    """The feature database (built by `openscope features`)."""
    dictionary: str = ""
    """The dictionary's name in the database (as `openscope features` named it; the explorer lists them)."""
    backend: str = "openai"
    """openai (any OpenAI-compatible chat endpoint: vLLM, llama.cpp's server, Ollama, hosted APIs) or transformers (a local chat model)."""
    base_url: str = ""
    """The endpoint's base URL, e.g. http://127.0.0.1:8080/v1 (default: $OPENSCOPE_AUTOINTERP_URL)."""
    model: str = ""
    """Explainer model: its name at the endpoint, or for transformers smollm2-135m, a .gguf file or a model folder."""
    scorer_model: str = ""
    """Scorer model (default: the explainer model)."""
    api_key: str = field(default="", repr=False)
    """API key (default: $OPENAI_API_KEY; a server on this machine needs none). Never written anywhere."""
    latents: str = ""
    """Latents to explain, e.g. `0-99,512` (default: a random sample of alive latents, see --max-latents)."""
    max_latents: int = 100
    """At most this many latents (a seeded random sample of those that fired, without --latents)."""
    seed: int = 0
    """Seed of the latent sample, the negative texts and the shuffled order."""
    explain_examples: int = 10
    """Examples shown to the explainer (top examples and quantile samples, activating tokens marked)."""
    score_examples: int = 5
    """Held-out firing texts scored per latent, and as many texts where it does not fire."""
    window: int = 8
    """Tokens either side of the strongest token in the texts shown (the dashboard's windows are cut)."""
    explain_tokens: int = 40
    """Longest explanation, in tokens."""
    fuzz_tokens: int = 24
    """Longest fuzzing answer (the listed words), in tokens."""
    token_budget: int = 0
    """Stop starting new latents once this many prompt and answer tokens were used (0: no limit)."""
    concurrency: int = 1
    """Latents explained at the same time (several calls in flight to the endpoint)."""
    retries: int = 3
    """Retries of a failed call (connection error, 429, 5xx), with exponential backoff."""
    backoff: float = 1.0
    """Seconds before the first retry (doubling each time)."""
    timeout: float = 120.0
    """Seconds to wait for one answer."""
    dry_run: bool = False
    """Print the prompts of the first latent and the number of calls, and call nothing."""
    output: Path | None = None
    """Report folder (report.json, report.md, the score-vs-frequency figure). Default: autointerp-<dictionary> beside the database."""
    overwrite: bool = False
    """Replace an earlier report folder, and results of this dictionary from other models or settings."""
    device: str = "cpu"
    """Device of a transformers model."""


def check_config(cfg: AutointerpConfig, endpoint: bool = True) -> None:
    """One-line errors for settings that cannot work, before anything is read or called (the endpoint's
    URL too, when the run will call the backend the settings name)."""
    if not cfg.dictionary:
        raise OpenscopeError("name the dictionary to explain with --dictionary (its name in the database)")
    if cfg.backend not in BACKENDS:
        raise OpenscopeError(f"unknown --backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")
    for name in ("max_latents", "explain_examples", "score_examples", "explain_tokens", "fuzz_tokens"):
        if getattr(cfg, name) < 1:
            raise OpenscopeError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.concurrency < 1 or cfg.retries < 0 or cfg.token_budget < 0 or cfg.window < 1:
        raise OpenscopeError("--concurrency and --window must be at least 1; --retries, --token-budget >= 0")
    if cfg.timeout <= 0 or cfg.backoff < 0:
        raise OpenscopeError("--timeout must be positive and --backoff not negative")
    if cfg.backend == "openai" and endpoint:
        base_url(cfg)
    if cfg.backend == "transformers" and not cfg.model:
        raise OpenscopeError("--backend transformers needs --model (smollm2-135m, a .gguf file or a folder)")


def base_url(cfg: AutointerpConfig) -> str:
    url = cfg.base_url or os.environ.get(URL_ENV, "")
    if not url:
        raise OpenscopeError(
            f"--backend openai needs --base-url (or ${URL_ENV}), e.g. http://127.0.0.1:8080/v1"
        )
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise OpenscopeError(f"--base-url must be an http(s) URL, got {url!r}")
    return url


def api_key(cfg: AutointerpConfig, url: str, loopback: bool) -> str:
    """The key from --api-key or the environment; a remote endpoint without one is refused up front."""
    key = cfg.api_key or os.environ.get(KEY_ENV, "")
    if not key and not loopback:
        raise OpenscopeError(
            f"no API key for {url}: pass --api-key or set ${KEY_ENV} (a server on this machine needs none)"
        )
    return key
