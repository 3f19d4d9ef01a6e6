"""Forward hooks on HF modules: read a site, replace a site, and stop the forward early.

Everything that touches activations (harvest, splicing, steering, attribution) goes through
`hook_site`, which knows whether a site is a module's input or output and how HF wraps
them, so that logic lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
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
def capture(loaded: LoadedModel, sites: Sequence[Site], stop: bool = True) -> Iterator[dict[Site, Tensor]]:
    """Collect the activations at `sites` during a forward into the yielded dict.

    With `stop`, the hook of the last site (in forward order) raises StopForward, so no later
    layer and no LM head runs; call the model through `run_to_sites` to swallow it.
    """
    acts: dict[Site, Tensor] = {}
    last = max(sites, key=lambda s: s.order) if sites else None

    def reader(site: Site) -> SiteFn:
        def fn(x: Tensor) -> None:
            acts[site] = x.detach()
            if stop and site == last:
                raise StopForward

        return fn

    with ExitStack() as stack:
        for site in sites:
            stack.enter_context(hook_site(loaded, site, reader(site)))
        yield acts


@torch.inference_mode()
def run_to_sites(
    loaded: LoadedModel,
    input_ids: Tensor,
    sites: Sequence[Site],
    attention_mask: Tensor | None = None,
) -> dict[Site, Tensor]:
    """One forward that captures every site and stops after the last one it needs."""
    with capture(loaded, sites) as acts, suppress(StopForward):
        loaded.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return acts
