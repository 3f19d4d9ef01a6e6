"""The chat renderer: a conversation in, token ids and a role label per token out.

A conversation is a list of `Message`s (role `system`, `user` or `model`). `render` turns it into the
text the model sees and labels every token with who wrote it: `template` (turn markers, role names,
separators: the chat format itself), `system`, `user` or `model`. Roles are small ints (`ROLES[i]`
is the name of role i), so a store can keep one byte per token. With `generation_prompt` the text
ends with the opening of the model's turn (what a chat model reads before it answers; labelled
`template`); `chat_text` gives that text alone, which is how the chat analyses render a prompt.

Two ways to the text, one way to the labels:
- the tokenizer has a chat template: it is rendered with `apply_chat_template` (model turns are
  passed as `assistant`), once with the real contents and once with a unique placeholder per
  message; the placeholders show where each message sits, everything around them is `template`;
- it has none (the real Gemma 3 270M base has none): Gemma's own format, written by hand:
  `<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n…<end_of_turn>\\n`, and
  `<start_of_turn>model\\n` as the generation prompt. Gemma has no system role: like its official
  template, the system prompt is folded into the first user turn,
  `<start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n`; those tokens are labelled `system`.

The whole text is then tokenised in one call (so the ids are exactly those the model sees in a chat)
and each token takes the role of its first character, found through the tokenizer's offset mapping.
A slow tokenizer without offsets tokenises piece by piece instead. BOS is not part of the text: the
packer (`openscope.data.contexts`) and `openscope.models.tokens.encode` put it in front, as they do
for documents.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from openscope.errors import OpenscopeError

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("template", "system", "user", "model")
"""Role names; a token's role id is its index here."""
TEMPLATE, SYSTEM, USER, MODEL = range(4)

GEMMA_START = "<start_of_turn>"
GEMMA_END = "<end_of_turn>"
GEMMA_GENERATION_PROMPT = f"{GEMMA_START}model\n"
"""The opening of the model's turn in Gemma's format (what follows a prompt the model answers)."""

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "model": "model",
    "assistant": "model",
    "gpt": "model",
    "chatgpt": "model",
    "bing": "model",
    "bard": "model",
}


class Message(NamedTuple):
    """One turn of a conversation."""

    role: str
    """system, user or model."""
    content: str
    """What was said."""


class Rendered(NamedTuple):
    """A conversation as the model sees it, with a role per token."""

    text: str
    """The rendered text (without BOS)."""
    input_ids: list[int]
    """Token ids of the text (no BOS)."""
    roles: list[int]
    """Role id of each token (index into ROLES)."""


Piece = tuple[str, int]
"""A stretch of rendered text and the role of all its characters."""


def role_name(name: str) -> str:
    """The canonical role (system, user, model) of a role name used by some chat format, or OpenscopeError."""
    canonical = _ROLE_ALIASES.get(str(name).strip().lower())
    if canonical is None:
        raise OpenscopeError(
            f"unknown chat role {name!r}; use system, user (or human) and model (or assistant, gpt)"
        )
    return canonical


def role_ids(spec: str) -> list[int]:
    """Role ids named by a comma list such as `model,user` ('' → [], every role)."""
    out = []
    for part in filter(None, (p.strip().lower() for p in spec.split(","))):
        if part not in ROLES:
            raise OpenscopeError(f"unknown role {part!r} in {spec!r}; roles are {', '.join(ROLES)}")
        out.append(ROLES.index(part))
    return sorted(set(out))


def normalise(messages: Sequence[Message]) -> list[Message] | None:
    """The conversation in the shape chat templates accept, or None if it has none.

    Empty messages are dropped, and so are model turns before the first user turn (ShareGPT splits long
    conversations and its later parts start with the model). What is left must be an optional
    system prompt followed by user and model turns alternating from a user turn.
    """
    kept = [m for m in messages if m.content.strip()]
    system = kept[:1] if kept and kept[0].role == "system" else []
    turns = kept[len(system) :]
    while turns and turns[0].role == "model":
        turns = turns[1:]
    if not turns:
        return None
    for i, m in enumerate(turns):
        if m.role != ("user" if i % 2 == 0 else "model"):
            return None
    return system + turns


def gemma_pieces(messages: Sequence[Message], generation_prompt: bool = False) -> list[Piece]:
    """Gemma's chat format written by hand (its official template, text contents only).

    Message contents are trimmed, as the template does; a leading system prompt is kept as is and
    folded into the first user turn, followed by a blank line. `generation_prompt` appends the
    opening of the model's turn.
    """
    msgs = list(messages)
    pieces: list[Piece] = []
    system: str | None = None
    if msgs and msgs[0].role == "system":
        system = msgs.pop(0).content
    for i, m in enumerate(msgs):
        if m.role == "system":
            raise OpenscopeError("Gemma's chat format takes a system prompt only as the first message")
        pieces.append((f"{GEMMA_START}{'model' if m.role == 'model' else 'user'}\n", TEMPLATE))
        if i == 0 and system is not None:
            pieces += [(system, SYSTEM), ("\n\n", TEMPLATE)]
        pieces += [(m.content.strip(), ROLES.index(m.role)), (f"{GEMMA_END}\n", TEMPLATE)]
    if generation_prompt:
        pieces.append((GEMMA_GENERATION_PROMPT, TEMPLATE))
    return [p for p in pieces if p[0]]


def _placeholder(i: int) -> str:
    # Private-use characters: no template trims, escapes or reorders them.
    return f"\ue000{i}\ue001"


def _apply(tokenizer: Any, messages: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
    hf = [{"role": "assistant" if r == "model" else r, "content": c} for r, c in messages]
    try:
        text = tokenizer.apply_chat_template(hf, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own error types (e.g. roles that do not alternate)
        raise OpenscopeError(f"the tokenizer's chat template refused the conversation ({exc})") from None
    bos = getattr(tokenizer, "bos_token", None)
    # The packer adds BOS as a token id; a template that writes it as text would add a second one.
    return text[len(bos) :] if bos and text.startswith(bos) else text


def template_pieces(
    tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False
) -> list[Piece]:
    """Pieces of the tokenizer's own chat template: where each message's content sits is found by
    rendering placeholders in its place; the rest of the text (the generation prompt too) is `template`."""
    real = _apply(tokenizer, [(m.role, m.content) for m in messages], generation_prompt)
    marked = _apply(tokenizer, [(m.role, _placeholder(i)) for i, m in enumerate(messages)], generation_prompt)
    pieces: list[Piece] = []
    pos = 0  # in `real`
    cursor = 0  # in `marked`
    while cursor < len(marked):
        start = marked.find("\ue000", cursor)
        frame = marked[cursor:] if start < 0 else marked[cursor:start]
        if not real.startswith(frame, pos):
            raise OpenscopeError("cannot label roles: the chat template changes text around the messages")
        pieces.append((frame, TEMPLATE))
        pos += len(frame)
        if start < 0:
            break
        end = marked.index("\ue001", start)
        m = messages[int(marked[start + 1 : end])]
        cursor = end + 1
        after = marked[cursor:].split("\ue000", 1)[0]
        # Templates show a content as is or trimmed; the text that follows it tells which.
        for content in (m.content, m.content.strip()):
            if real.startswith(content + after, pos):
                pieces.append((content, ROLES.index(m.role)))
                pos += len(content)
                break
        else:
            raise OpenscopeError(f"cannot label roles: the chat template rewrites a {m.role} message's text")
    if pos != len(real):
        raise OpenscopeError("cannot label roles: the chat template adds text that depends on the contents")
    return [p for p in pieces if p[0]]


def has_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def pieces_of(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False) -> list[Piece]:
    """The labelled text pieces of a conversation: the tokenizer's template if it has one, else Gemma's."""
    if has_template(tokenizer):
        return template_pieces(tokenizer, messages, generation_prompt)
    return gemma_pieces(messages, generation_prompt)


def chat_text(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False) -> str:
    """The text `render` tokenises (no BOS), without the role labels: the tokenizer's template if it has
    one, else Gemma's; `generation_prompt` ends it with the opening of the model's turn.

    Equal to `render(...).text`; it renders the template once and never refuses a template that
    rewrites the contents (labelling roles needs the contents verbatim, the text alone does not).
    """
    if has_template(tokenizer):
        return _apply(tokenizer, [(m.role, m.content) for m in messages], generation_prompt)
    return "".join(text for text, _ in gemma_pieces(messages, generation_prompt))


def char_roles(pieces: Sequence[Piece]) -> np.ndarray:
    """The role of every character of the joined pieces [len(text)] (uint8)."""
    return np.concatenate([np.full(len(t), r, dtype=np.uint8) for t, r in pieces] or [np.zeros(0, np.uint8)])


def token_roles(offsets: Sequence[tuple[int, int]], roles_of_chars: np.ndarray) -> list[int]:
    """Each token's role: that of its first character (a token past the text, or of no text, is template)."""
    if not len(offsets):
        return []
    starts = np.asarray([s for s, _ in offsets], dtype=np.int64)
    inside = (starts >= 0) & (starts < len(roles_of_chars))
    out = np.full(len(starts), TEMPLATE, dtype=np.int64)
    out[inside] = roles_of_chars[starts[inside]]
    return out.tolist()


def render_many(
    tokenizer: Any, conversations: Sequence[Sequence[Message]], generation_prompt: bool = False
) -> list[Rendered]:
    """Render and tokenise conversations (one tokenizer call for all of them when it gives offsets)."""
    if not conversations:
        return []  # (fast tokenizers fail on an empty batch)
    all_pieces = [pieces_of(tokenizer, c, generation_prompt) for c in conversations]
    texts = ["".join(t for t, _ in p) for p in all_pieces]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            Rendered(text, list(ids), token_roles(offsets, char_roles(pieces)))
            for text, pieces, ids, offsets in zip(
                texts, all_pieces, enc["input_ids"], enc["offset_mapping"], strict=True
            )
        ]
    out = []
    for text, pieces in zip(texts, all_pieces, strict=True):
        ids: list[int] = []
        roles: list[int] = []
        for piece, role in pieces:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            roles += [role] * len(piece_ids)
        out.append(Rendered(text, ids, roles))
    return out


def render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False) -> Rendered:
    """One conversation as the model sees it, with a role per token (see the module docstring)."""
    return render_many(tokenizer, [messages], generation_prompt)[0]
