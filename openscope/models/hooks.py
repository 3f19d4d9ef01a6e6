"""Forward hooks on HF modules: read a site, replace a site, and stop the forward early.

Everything that touches activations (harvest, splicing, steering, attribution) goes through
`hook_site`, which knows whether a site is a module's input or output and how HF wraps
them, so that logic lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from functools import partial
from typing import Any

import torch
from torch import Tensor

from openscope.models.load import LoadedModel
from openscope.models.sites import Site, locate

SiteFn = Callable[[Tensor], Tensor | None]
"""Called with a site's activation [batch, seq, width]; may return a replacement tensor."""


class StopForward(Exception):
    """Raised from a hook once every requested site is captured, so later layers never run."""


@contextmanager
def hook_site(loaded: LoadedModel, site: Site, fn: SiteFn) -> Iterator[None]:
    """Call `fn` on the activation at `site` during every forward inside the block."""
    point = locate(loaded.arch.layers, loaded.arch.layers_path, site)
    if point.io == "input":

        def pre_hook(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def hook(_module: Any, _args: Any, output: Any) -> Any:
            tensor = output[0] if isinstance(output, tuple) else output
            new = fn(tensor)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = point.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def reading(
    loaded: LoadedModel, readers: Mapping[Site, Callable[[Tensor], None]], stop: bool = True
) -> Iterator[None]:
    """Call each reader with its site's activation during forwards inside the block.

    With `stop`, the hook of the last site (in forward order) raises StopForward after its
    reader ran, so no later layer and no LM head runs (`run_with_readers` swallows it).
    """
    last = max(readers, key=lambda s: s.order) if readers else None

    def hook_for(site: Site, fn: Callable[[Tensor], None]) -> SiteFn:
        def hook(x: Tensor) -> None:
            fn(x.detach())
            if stop and site == last:
                raise StopForward

        return hook

    with ExitStack() as stack:
        for site, fn in readers.items():
            stack.enter_context(hook_site(loaded, site, hook_for(site, fn)))
        yield


@contextmanager
def capture(loaded: LoadedModel, sites: Sequence[Site], stop: bool = True) -> Iterator[dict[Site, Tensor]]:
    """Collect the activations at `sites` during a forward into the yielded dict (see `reading`)."""
    acts: dict[Site, Tensor] = {}
    with reading(loaded, {s: partial(acts.__setitem__, s) for s in sites}, stop):
        yield acts


@torch.inference_mode()
def run_with_readers(
    loaded: LoadedModel,
    input_ids: Tensor,
    readers: Mapping[Site, Callable[[Tensor], None]],
    attention_mask: Tensor | None = None,
) -> None:
    """One forward that hands every site to its reader and stops after the last one it needs.

    Readers that copy what they need out of the activation (instead of keeping it) let the
    allocator reuse the layer's memory, which keeps a many-site harvest as fast as a bare forward.
    """
    with reading(loaded, readers), suppress(StopForward):
        loaded.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def run_to_sites(
    loaded: LoadedModel,
    input_ids: Tensor,
    sites: Sequence[Site],
    attention_mask: Tensor | None = None,
) -> dict[Site, Tensor]:
    """One forward that captures every site and stops after the last one it needs."""
    acts: dict[Site, Tensor] = {}
    run_with_readers(loaded, input_ids, {s: partial(acts.__setitem__, s) for s in sites}, attention_mask)
    return acts
