"""Token helpers every stage shares: which ids are special (BOS, EOS, pad), how a prompt becomes ids
(BOS, then the text's tokens), batches of unequal sequences, and the text piece of each token.

Nothing here knows about chat formats or packing (`openscope.data`): these are facts of the tokenizer
and of how openscope feeds a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from openscope.errors import OpenscopeError


def special_ids(tokenizer: Any) -> list[int]:
    """The ids never stored or measured: BOS, EOS, pad."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


def keep_mask(input_ids: Tensor, tokenizer: Any) -> Tensor:
    """True where a position holds a real text token (not BOS/EOS/pad)."""
    specials = torch.tensor(special_ids(tokenizer), dtype=input_ids.dtype, device=input_ids.device)
    return ~torch.isin(input_ids, specials)


def bos_and_pad(tokenizer: Any) -> tuple[int, int]:
    """The BOS id and the pad id (EOS when there is no pad) packing uses."""
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if bos is None or pad is None:
        raise ValueError("the tokenizer needs a BOS token and a pad (or EOS) token")
    return bos, pad


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text as openscope feeds it: BOS, then the text's tokens (no other special tokens)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def first_tokens(tokenizer: Any, words: Sequence[str], spaced: bool = False) -> list[int]:
    """The first token of each word as the start of an answer (spaced: also of " word", as inside a
    sentence), without repeats."""
    ids: list[int] = []
    for w in words:
        for form in (w, " " + w.lstrip()) if spaced else (w,):
            toks = tokenizer(form, add_special_tokens=False)["input_ids"]
            if toks and int(toks[0]) not in ids:
                ids.append(int(toks[0]))
    return ids


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded [B, T] ids, their attention mask, and the index of each row's last real token [B]."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise OpenscopeError("cannot batch an empty token sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask, torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)


def prompt_ids(tokenizer: Any, prompt: str) -> Tensor:
    """[1, n] token ids of a prompt: BOS, then its tokens (`encode` as a batch of one)."""
    return torch.tensor([encode(tokenizer, prompt)], dtype=torch.long)


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> dict[int, str]:
    """The text piece of each token id, as it reads inside a text (leading spaces kept)."""
    out: dict[int, str] = {}
    for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        try:
            out[int(i)] = tokenizer.convert_tokens_to_string([tok]) if tok is not None else ""
        except Exception:  # some tokenizers cannot render a lone byte piece; show the raw piece
            out[int(i)] = str(tok)
    return out
