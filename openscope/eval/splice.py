"""Splicing: run the model with dictionaries' reconstructions in place of the activations they model.

Inside `with spliced(loaded, dictionaries) as handle:` every forward of `loaded.model` replaces
each dictionary's output site with its reconstruction:

- SAE: the site's activation x becomes x̂ = decode(encode(x)).
- transcoder / skip-transcoder: the input site (mlp_in) is read, and the output site (mlp_out) is
  replaced by the coder's prediction from that input.

Several dictionaries at once give the whole replacement: a dictionary downstream of another reads
the activations that the upstream reconstruction produced (e.g. every layer's transcoders). Every
coder is spliced through the layer-by-layer `openscope.coders.protocol.Coder` methods, so a
cross-layer transcoder goes into all its layers at once: each layer's latents are encoded
(`encode_at`) when the forward reaches that layer's input site, and layer m's output site gets ŷ_m
(`decode_into`) from the latents of layers ≤ m. (The input of layer m+1 depends on the spliced output
of layer m, so a CLT is never encoded from a stack of all layers' clean inputs here.)

`add_error=True` adds back the reconstruction error ε = y − ŷ, so the site's value, and thus the
output, is unchanged for any dictionary. ε is computed as its own tensor term, ŷ + ε, rather than
by leaving y in place, so that later work can change ŷ (steering: edit latents) while holding ε
fixed, or treat ε as a constant node (attribution). With `detach_error=True` (the default) ε is
detached from the autograd graph: gradients flow through ŷ and the latents only, the convention of
attribution graphs' error nodes. `record=True` keeps the latents, ŷ and ε of the last forward in
`handle.terms`, by output site.

`ablated(loaded, sites)` zero-ablates sites instead (the baseline of "loss recovered").

Only kept positions are replaced: set `handle.keep = mask` ([batch, seq] bool, e.g.
`openscope.models.tokens.keep_mask`) before each forward, and BOS/EOS/pad positions pass through
unchanged. Gemma Scope dictionaries are not trained on BOS, whose residual norm is huge, so splicing
it would swamp every metric. Default (keep None): every position is replaced.

All hooking goes through `openscope.models.hooks.hook_site`; the model itself is never re-implemented.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.coders.dictionary import Dictionary, validate_dictionary
from openscope.errors import OpenscopeError
from openscope.models.hooks import SiteFn, hook_site
from openscope.models.load import LoadedModel
from openscope.models.sites import Site


class SpliceTerms(NamedTuple):
    """What one dictionary put into one output site in the last forward (kept positions, flattened)."""

    rows: Tensor | None
    """[N] indices into the flattened [batch·seq] positions that were replaced (None: all of them)."""
    latents: Tensor
    """[N, F] latent activations read at the matching input site (a CLT: the latents of that layer)."""
    reconstruction: Tensor
    """[N, d_out] ŷ, the dictionary's reconstruction (or prediction) of the site."""
    error: Tensor | None
    """[N, d_out] ε = y − ŷ that was added back (None without add_error)."""


class SpliceHandle:
    """Yielded by `spliced`/`ablated`: set `keep` per batch; read recorded terms after a forward."""

    def __init__(self, keep: Tensor | None = None) -> None:
        self._keep: Tensor | None = None
        self._rows: Tensor | None = None
        self.keep = keep
        self.terms: dict[Site, SpliceTerms] = {}
        """Per output site, the SpliceTerms of the last forward (only with record=True)."""

    @property
    def keep(self) -> Tensor | None:
        """[batch, seq] bool: positions to replace; others pass through. None replaces every position."""
        return self._keep

    @keep.setter
    def keep(self, mask: Tensor | None) -> None:
        if mask is not None and mask.ndim != 2:
            raise OpenscopeError(f"the keep mask must be [batch, seq], got shape {list(mask.shape)}")
        self._keep = None if mask is None else mask.bool()
        self._rows = None

    def rows(self, x: Tensor) -> Tensor | None:
        """Flat indices of the kept positions of activation x [batch, seq, width] (None: all)."""
        if self._keep is None:
            return None
        if tuple(self._keep.shape) != tuple(x.shape[:2]):
            raise OpenscopeError(
                f"the keep mask has shape {list(self._keep.shape)} but the forward runs "
                f"[batch, seq] = {list(x.shape[:2])}; set handle.keep for each batch"
            )
        if self._rows is None or self._rows.device != x.device:
            self._rows = self._keep.reshape(-1).nonzero().squeeze(1).to(x.device)
        return self._rows


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _kept(flat: Tensor, rows: Tensor | None) -> Tensor:
    return flat if rows is None else flat.index_select(0, rows)


def _put(y: Tensor, rows: Tensor | None, new: Tensor) -> Tensor:
    """y with the kept rows replaced by new (out of place: the original activation stays intact)."""
    new = new.to(y.dtype)
    if rows is None:
        return new.reshape(y.shape)
    return _flat(y).index_copy(0, rows, new).reshape(y.shape)


def check_dictionaries(
    loaded: LoadedModel, dictionaries: Sequence[Dictionary], hint: str = "splice them in separate runs"
) -> None:
    """Each dictionary's sites exist in the model with its widths, and no two write the same site
    (`hint` ends the error message then)."""
    writers: dict[Site, str] = {}
    for d in dictionaries:
        validate_dictionary(d, loaded)
        for site in d.sites_out:
            if site in writers:
                raise OpenscopeError(
                    f"dictionaries {writers[site]} and {d.name} both replace site {site.name}; {hint}"
                )
            writers[site] = d.name


class _Splicer:
    """The hooks of one dictionary: encode at each input site, replace each output site."""

    def __init__(
        self, d: Dictionary, handle: SpliceHandle, add_error: bool, detach_error: bool, record: bool
    ) -> None:
        self.d, self.handle = d, handle
        self.add_error, self.detach_error, self.record = add_error, detach_error, record
        self.inputs: dict[int, Tensor] = {}
        self.latents: dict[int, Tensor] = {}

    def _check_width(self, x: Tensor, width: int, site: Site) -> None:
        # Widths are validated up front; this catches a model whose site_width guess was wrong.
        if x.shape[-1] != width:
            raise OpenscopeError(
                f"dictionary {self.d.name} expects width {width} at site {site.name}, the model gives {x.shape[-1]}"
            )

    def reader(self, i: int) -> SiteFn:
        def read(x: Tensor) -> None:
            coder = self.d.coder
            self._check_width(x, coder.cfg.d_in, self.d.sites_in[i])
            if i == 0:
                self.inputs.clear()
                self.latents.clear()
            x_in = _kept(_flat(x), self.handle.rows(x)).to(coder.w_enc.dtype)
            self.inputs[i] = x_in
            self.latents[i] = coder.encode_at(i, x_in)

        return read

    def writer(self, m: int) -> SiteFn:
        same_site = self.d.sites_in[m] == self.d.sites_out[m]

        def write(y: Tensor) -> Tensor:
            coder, site = self.d.coder, self.d.sites_out[m]
            if same_site:
                self.reader(m)(y)
            if any(j not in self.latents for j in range(m + 1)):
                raise OpenscopeError(
                    f"dictionary {self.d.name}: site {site.name} ran before its input sites were read"
                )
            self._check_width(y, coder.cfg.d_out, site)
            rows = self.handle.rows(y)
            recon = coder.decode_into(m, [self.latents[j] for j in range(m + 1)], self.inputs[m])
            error = None
            if self.add_error:
                error = _kept(_flat(y), rows).to(recon.dtype) - recon
                if self.detach_error:
                    error = error.detach()
            if self.record:
                self.handle.terms[site] = SpliceTerms(rows, self.latents[m], recon, error)
            return _put(y, rows, recon if error is None else recon + error)

        return write


@contextmanager
def spliced(
    loaded: LoadedModel,
    dictionaries: Dictionary | Sequence[Dictionary],
    add_error: bool = False,
    *,
    detach_error: bool = True,
    record: bool = False,
    keep: Tensor | None = None,
) -> Iterator[SpliceHandle]:
    """Replace each dictionary's output site(s) by its reconstruction in every forward inside the block.

    add_error: add back ε = y − ŷ as a separate term (output unchanged; see the module docstring);
    detach_error: detach ε from autograd; record: keep the terms of the last forward in
    `handle.terms` (by output site); keep: the initial [batch, seq] keep mask (set `handle.keep` per
    batch). A cross-layer transcoder is spliced into all its layers at once.
    """
    dicts = [dictionaries] if isinstance(dictionaries, Dictionary) else list(dictionaries)
    check_dictionaries(loaded, dicts)
    handle = SpliceHandle(keep)
    splicers = [_Splicer(d, handle, add_error, detach_error, record) for d in dicts]
    with ExitStack() as stack:
        # Writers first: hooks on one module run in registration order, so a dictionary reading a
        # site that another replaces sees the replaced value (the whole replacement model).
        for sp in splicers:
            for m, site in enumerate(sp.d.sites_out):
                stack.enter_context(hook_site(loaded, site, sp.writer(m)))
        for sp in splicers:
            for i, site in enumerate(sp.d.sites_in):
                if site != sp.d.sites_out[i]:
                    stack.enter_context(hook_site(loaded, site, sp.reader(i)))
        yield handle


def _zero_fn(handle: SpliceHandle) -> Callable[[Tensor], Tensor]:
    """A site function that zeroes the kept positions of its activation."""

    def zero(y: Tensor) -> Tensor:
        rows = handle.rows(y)
        if rows is None:
            return torch.zeros_like(y)
        return _flat(y).index_fill(0, rows, 0.0).reshape(y.shape)

    return zero


@contextmanager
def ablated(
    loaded: LoadedModel, sites: Site | Sequence[Site], keep: Tensor | None = None
) -> Iterator[SpliceHandle]:
    """Zero-ablate the sites (kept positions only) in every forward inside the block."""
    handle = SpliceHandle(keep)
    with ExitStack() as stack:
        for site in [sites] if isinstance(sites, Site) else sites:
            stack.enter_context(hook_site(loaded, site, _zero_fn(handle)))
        yield handle
