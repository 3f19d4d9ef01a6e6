"""Restarted forwards: rerun a model from block L on a recorded residual stream, and unembed only the
positions that count.

Hooks that act only at layers ≥ L (splicing a dictionary, zero-ablating a site) leave blocks 0..L−1
untouched, so a forward with them can start at block L from the clean forward's residual stream.
`record_forward` runs the Hugging Face model once and keeps, for every block from `start` on, its input
and the exact other arguments the model's own forward passed it: the attention masks (sliding-window
and global layers each get their own), the rotary position embeddings, the position ids, whatever the
architecture builds before its block loop. It also keeps the final norm's input, then stops the forward
there, so the full-vocabulary unembedding never runs on every position. `run_from` calls the model's
blocks L.. with those recorded arguments on the recorded input of block L; every hook registered on them
fires as in a full forward. Nothing of the model is re-implemented: the call the model's forward loop
makes per block is repeated, and `Unembedding` applies the model's own final norm and head (plus the
logit soft-cap from its config, as the causal-LM wrapper does).

A restart is exact only when the model's forward is a plain chain of its blocks (each block's output is
the next block's input, the last one's goes to the final norm); `record_forward` checks that on the very
forward it records and refuses otherwise (`RestartUnsupported`), so callers fall back to full forwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from openscope.errors import OpenscopeError
from openscope.models.hooks import StopForward
from openscope.models.load import LoadedModel, text_config


class RestartUnsupported(OpenscopeError):
    """This model's forward cannot be restarted at a block (callers run full forwards instead)."""


class Prefix:
    """What `record_forward` kept of one forward: each block's input and call arguments from `start` on,
    and the final norm's input."""

    def __init__(self, start: int) -> None:
        self.start = start
        """The first block recorded."""
        self.inputs: dict[int, Tensor] = {}
        """Per block, its input residual stream [batch, seq, d_model]."""
        self.calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        """Per block, the other positional and keyword arguments the model called it with."""
        self.outputs: dict[int, Tensor] = {}
        """Per block, its output residual stream (to check the forward is a plain chain)."""
        self.final: Tensor | None = None
        """The final norm's input [batch, seq, d_model]: the clean forward's last residual stream."""


def _block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _recording(loaded: LoadedModel, prefix: Prefix) -> Iterator[None]:
    norm = loaded.arch.final_norm
    if norm is None:
        raise RestartUnsupported(f"cannot find the final norm of {loaded.name}")

    def pre_hook(i: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if args:
                prefix.inputs[i], prefix.calls[i] = args[0], (args[1:], dict(kwargs))
            else:
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                prefix.inputs[i], prefix.calls[i] = kwargs["hidden_states"], ((), rest)

        return hook

    def post_hook(i: int):
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            prefix.outputs[i] = _block_output(out)

        return hook

    def stop(_module: nn.Module, args: tuple) -> None:
        prefix.final = args[0]
        raise StopForward

    with ExitStack() as stack:
        for i in range(prefix.start, len(loaded.arch.layers)):
            block = loaded.arch.layers[i]
            # Prepended: the record is the model's own input, before any other hook could replace it.
            pre = block.register_forward_pre_hook(pre_hook(i), with_kwargs=True, prepend=True)
            stack.callback(pre.remove)
            post = block.register_forward_hook(post_hook(i))
            stack.callback(post.remove)
        handle = norm.register_forward_pre_hook(stop)
        stack.callback(handle.remove)
        yield


def record_forward(
    loaded: LoadedModel, input_ids: Tensor, attention_mask: Tensor | None, start: int
) -> Prefix:
    """Run the model once (hooks already registered fire as usual) and record what `run_from` needs to
    restart it at any block ≥ start; the forward stops at the final norm (no unembedding runs)."""
    n = len(loaded.arch.layers)
    if not 0 <= start < n:
        raise OpenscopeError(f"cannot restart at block {start}: the model has {n} blocks")
    prefix = Prefix(start)
    with _recording(loaded, prefix), suppress(StopForward):
        loaded.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    _check_chain(loaded, prefix)
    prefix.outputs.clear()  # only needed for the check: let the allocator have them back
    return prefix


def _check_chain(loaded: LoadedModel, prefix: Prefix) -> None:
    """The recorded forward called each block once, fed each block's output to the next and the last
    one's to the final norm: then rerunning the blocks on recorded inputs is the same computation."""
    n = len(loaded.arch.layers)
    missing = [i for i in range(prefix.start, n) if i not in prefix.inputs or i not in prefix.outputs]
    if missing or prefix.final is None:
        raise RestartUnsupported(f"{loaded.name}'s forward did not run blocks {missing} and its final norm")
    following = [*(prefix.inputs[i] for i in range(prefix.start + 1, n)), prefix.final]
    for i, nxt in zip(range(prefix.start, n), following, strict=True):
        out = prefix.outputs[i]
        if out is not nxt and not (out.shape == nxt.shape and torch.equal(out, nxt)):
            raise RestartUnsupported(
                f"{loaded.name}'s forward changes the residual stream between block {i} and the next"
            )


def run_from(loaded: LoadedModel, prefix: Prefix, layer: int) -> Tensor:
    """The final norm's input [batch, seq, d_model] of a forward restarted at block `layer`: the model's
    blocks layer.. run on the recorded input of that block with their recorded arguments (hooks on them,
    e.g. splicing, fire as usual)."""
    if layer not in prefix.inputs:
        raise OpenscopeError(f"block {layer} was not recorded (the record starts at block {prefix.start})")
    hidden = prefix.inputs[layer]
    for i in range(layer, len(loaded.arch.layers)):
        args, kwargs = prefix.calls[i]
        hidden = _block_output(loaded.arch.layers[i](hidden, *args, **kwargs))
    return hidden


class Unembedding(NamedTuple):
    """The model's own way from the last residual stream to logits."""

    norm: nn.Module
    """The final norm."""
    weight: Tensor
    """[vocab, d_model] the unembedding matrix (the LM head's weight)."""
    bias: Tensor | None
    """[vocab] the LM head's bias, if it has one."""
    softcap: float | None
    """Gemma 2's final logit soft-cap c: logits become c·tanh(logits / c) (None: no cap)."""

    def normed(self, hidden: Tensor) -> Tensor:
        """The final norm of residual-stream rows [..., d_model] (the norm acts on each row alone)."""
        return self.norm(hidden)

    def logits(self, normed: Tensor) -> Tensor:
        """Float32 logits [..., vocab] of final-normed rows, as the causal-LM wrapper computes them."""
        return cap_logits(nn.functional.linear(normed, self.weight, self.bias).float(), self.softcap)


def cap_logits(logits: Tensor, cap: float | None) -> Tensor:
    """The final logit soft-cap, in the order Hugging Face's Gemma wrappers apply it (none when cap is None)."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def unembedding(loaded: LoadedModel) -> Unembedding:
    """The model's final norm and linear head; `RestartUnsupported` when they cannot be found."""
    norm, head = loaded.arch.final_norm, loaded.arch.lm_head
    weight = getattr(head, "weight", None)
    if norm is None or not isinstance(head, nn.Linear) or not isinstance(weight, Tensor):
        raise RestartUnsupported(f"cannot find the final norm and a linear LM head in {loaded.name}")
    bias = head.bias if isinstance(head.bias, Tensor) else None
    cap = getattr(text_config(loaded.model.config), "final_logit_softcapping", None)
    return Unembedding(norm, weight, bias, float(cap) if cap else None)
