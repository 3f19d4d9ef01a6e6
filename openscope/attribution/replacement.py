"""The local replacement model of one prompt: MLPs replaced by transcoders, the rest frozen linear.

On a given prompt the Hugging Face model runs once, clean, and everything nonlinear outside the MLPs
is recorded; then `ReplacementModel.run` re-runs it with forward hooks that make it linear in the
residual stream (the construction of Ameisen et al. 2025, as circuit-tracer builds it):

- **attention patterns** frozen: the outputs of `q_proj` and `k_proj` are replaced by their clean
  values, so queries, keys (after their own `q_norm`/`k_norm` and rotary embeddings), and thus the
  softmax pattern are constants; attention is then linear in the values. The replacement runs the
  model's own eager attention (`eager_attention`), whose backward is then one product per head.
- **normalisation scales** frozen: every RMSNorm on the residual path (Gemma 3: `input_layernorm`,
  `post_attention_layernorm`, `pre_feedforward_layernorm`, and the final norm) returns
  y_clean + (x − x_clean) ⊙ g, where g = s·G is the clean per-position gain (s = 1/RMS(x_clean), G the
  norm's weight gain; the denominator is a constant, so the norm is a fixed diagonal map). Gemma's
  `post_feedforward_layernorm` is part of the MLP output, which is replaced whole.
- **MLPs replaced**: each layer's MLP output (the `mlp_out` site, Gemma's `post_feedforward_layernorm`
  output; the MLP itself runs on no tokens) becomes the transcoder's prediction from the frozen latents, plus the skip connection
  x_m A_m of the live MLP input (linear), plus the **error node** ε_m = y_m − ŷ_m (true MLP output
  minus the reconstruction on the clean prompt), held constant. Latents are frozen at their clean
  values: in the replacement model they are sources, not functions of the residual stream.

With the error nodes added back the replacement reproduces the clean logits exactly (up to float
rounding), and it is linear in every source: token embeddings, latents (each writes a · d, d its
decoder row, into its own and, for a cross-layer transcoder, every later layer's MLP output) and error
nodes. BOS/EOS/pad positions carry no latents and no error node: dictionaries are not trained there
(circuit-tracer's zero-BOS). What a skip-transcoder's skip term x·A does there is a convention, with two
options (`freeze_skip_at_bos`):

- **live** (the default, as circuit-tracer has it): the skip term stays a linear function of the live
  MLP input at every position, BOS included; the rest of the MLP output at BOS is a constant. Edges into
  BOS's MLP output then flow on through the skip, so the BOS token column matches circuit-tracer's.
- **frozen** (`freeze_skip_at_bos=True`, openscope's convention before): the whole MLP output at a
  BOS/EOS/pad position is a constant of the replacement model, skip included, so nothing flows through
  the MLP at positions the dictionary was never trained on.

Both reproduce the clean logits; they differ only in the edges that pass through a skip at BOS (the
BOS token column and, through it, whatever BOS feeds). Plain transcoders and CLTs have no skip term and
are the same under both.

Dictionaries are given as `Dictionary` values: single-layer transcoders or skip-transcoders
(L.mlp_in → L.mlp_out) and/or cross-layer transcoders (mlp_in → mlp_out over consecutive layers);
together they must replace every layer's MLP exactly once. Only forward hooks on the HF modules are
used (`openscope.models.hooks.hook_site` for sites): the model is never re-implemented.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from inspect import signature
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import Dictionary
from openscope.errors import OpenscopeError
from openscope.eval.splice import check_dictionaries
from openscope.models.hooks import StopForward, hook_site
from openscope.models.load import LoadedModel, check_attribution_support
from openscope.models.sites import Site, locate
from openscope.models.tokens import keep_mask

log = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-4
"""Largest relative misfit of y = x ⊙ g allowed when reading a norm's gain (else it is no RMSNorm)."""


# ---- which dictionary replaces which layer ----------------------------------------------------------


class LayerSlot(NamedTuple):
    """The dictionary that replaces one model layer's MLP."""

    dictionary: Dictionary
    """A transcoder, skip-transcoder or cross-layer transcoder."""
    index: int
    """The layer inside the coder (0 for a single-layer transcoder; model layer − first layer for a CLT)."""

    @property
    def coder(self) -> SparseCoder | CrossLayerCoder:
        """The dictionary's coder (layer `index` of it replaces this model layer)."""
        return self.dictionary.coder

    @property
    def width(self) -> int:
        """Latents read at this layer (a CLT: its per-layer width)."""
        return self.dictionary.coder.cfg.width

    @property
    def latent_offset(self) -> int:
        """Index, within the dictionary, of this layer's first latent (a CLT numbers layer i's latents
        from i·width; a single-layer transcoder from 0)."""
        return self.index * self.width

    @property
    def writes(self) -> range:
        """Model layers whose MLP output this layer's latents write (a CLT: this layer and every later one)."""
        first = self.dictionary.site_out.layer
        return range(first + self.index, first + self.dictionary.n_layers)


def replacement_slots(loaded: LoadedModel, dictionaries: Sequence[Dictionary]) -> tuple[LayerSlot, ...]:
    """One LayerSlot per model layer: which dictionary replaces its MLP (clear errors otherwise)."""
    if not dictionaries:
        raise OpenscopeError(
            "attribution needs dictionaries: per-layer transcoders or a cross-layer transcoder"
        )
    for d in dictionaries:
        if d.coder.kind == "sae":
            raise OpenscopeError(
                f"{d.name} is an SAE ({d.site_in.name}); attribution replaces MLPs and needs transcoders "
                "(L.mlp_in -> L.mlp_out) or a cross-layer transcoder"
            )
        for s_in, s_out in zip(d.sites_in, d.sites_out, strict=True):
            if s_in.kind != "mlp_in" or s_out != Site(s_in.layer, "mlp_out"):
                raise OpenscopeError(
                    f"{d.name} maps {s_in.name} -> {s_out.name}; attribution replaces MLPs: "
                    "expected L.mlp_in -> L.mlp_out"
                )
    check_dictionaries(loaded, dictionaries, hint="give one dictionary per layer")
    slots: dict[int, LayerSlot] = {}
    for d in dictionaries:
        for i, site in enumerate(d.sites_out):
            slots[site.layer] = LayerSlot(d, i)
    missing = [layer for layer in range(loaded.n_layers) if layer not in slots]
    if missing:
        raise OpenscopeError(
            f"no transcoder for layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
            f"{loaded.name}: attribution replaces every MLP, so give a transcoder per layer "
            f"(0-{loaded.n_layers - 1}) or a cross-layer transcoder covering them"
        )
    return tuple(slots[layer] for layer in range(loaded.n_layers))


# ---- frozen norms (pure) ----------------------------------------------------------------------------


def rms_gain(x: Tensor, y: Tensor, unit_out: Tensor) -> Tensor:
    """The per-position gain g [..., d] with y = x ⊙ g, for an RMSNorm y = x·s·G.

    unit_out is the norm applied to a row of ones (∝ G). Per row, s is the least-squares fit of y to
    x ⊙ unit_out, so no epsilon or weight convention (Gemma's 1 + w, Llama's w) needs to be known.
    """
    basis = x * unit_out
    scale = (y * basis).sum(-1, keepdim=True) / basis.pow(2).sum(-1, keepdim=True).clamp(min=1e-30)
    return scale * unit_out


class FrozenNorm(NamedTuple):
    """A norm's clean input, output and gain: in the replacement it returns y + (x' − x) ⊙ gain."""

    x: Tensor
    """[T, d] clean input."""
    y: Tensor
    """[T, d] clean output."""
    gain: Tensor
    """[T, d] per-position gain (y = x ⊙ gain)."""


def residual_norms(loaded: LoadedModel) -> list[nn.Module]:
    """The norms on the residual path: every norm that is a direct child of a block (not the one whose
    output is the mlp_out site: the MLP output is replaced whole) and the final norm."""
    arch = loaded.arch
    replaced = {
        id(locate(arch.layers, arch.layers_path, Site(layer, "mlp_out")).module)
        for layer in range(loaded.n_layers)
    }
    norms = [
        child
        for block in arch.layers
        for child in block.children()
        if "norm" in type(child).__name__.lower() and id(child) not in replaced
    ]
    if arch.final_norm is None:
        raise OpenscopeError(f"cannot find the final norm of {loaded.name}; attribution needs it")
    return [*norms, arch.final_norm]


def attention_projections(loaded: LoadedModel) -> list[nn.Module]:
    """Every block's query and key projections (their outputs fix the attention pattern)."""
    out = []
    for layer, block in enumerate(loaded.arch.layers):
        attn = getattr(block, "self_attn", None)
        q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
        if not isinstance(q, nn.Module) or not isinstance(k, nn.Module):
            raise OpenscopeError(
                f"cannot freeze the attention pattern of layer {layer} of {loaded.name}: no self_attn.q_proj/k_proj"
            )
        out += [q, k]
    return out


@contextmanager
def forward_hooks(hooks: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Register forward hooks (module, fn(module, args, output)) for the block, in order."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eager_attention(loaded: LoadedModel) -> Iterator[None]:
    """Run the block with the model's plain ("eager") attention: with the pattern frozen, its backward
    is one product with the pattern per head (fused kernels such as SDPA's recompute the pattern and
    the query and key gradients too). The model's own choice is restored afterwards."""
    model = loaded.model
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if not isinstance(before, str) or before == "eager" or not callable(switch):
        yield
        return
    try:
        switch("eager")
    except (ValueError, ImportError, NotImplementedError):  # a model without an eager path keeps its own
        yield
        return
    try:
        yield
    finally:
        switch(before)


def input_embeddings(loaded: LoadedModel) -> nn.Module:
    """The model's token-embedding module (its output is the residual stream before layer 0)."""
    module = loaded.model.get_input_embeddings()  # type: ignore[operator]
    if not isinstance(module, nn.Module):
        raise OpenscopeError(f"cannot find the input embeddings of {loaded.name}")
    return module


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _no_tokens(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: give a module zero tokens, so it costs nothing (its output is replaced whole)."""
    if args:
        return (args[0][:, :0], *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"][:, :0]}


# ---- the model --------------------------------------------------------------------------------------


class ActiveFeatures(NamedTuple):
    """The latents that fire on the prompt, sorted by layer, then position, then latent."""

    layer: Tensor
    """[n] model layer whose MLP input the latent reads."""
    position: Tensor
    """[n] token position."""
    latent: Tensor
    """[n] latent index within that layer's encoder (a CLT: within the layer's block of latents)."""
    activation: Tensor
    """[n] its activation on the clean prompt."""

    @property
    def count(self) -> int:
        """How many latents are active."""
        return int(self.layer.numel())


class CleanRun(NamedTuple):
    """What the clean forward of the prompt recorded."""

    embeddings: Tensor
    """[T, d] the embedding output (the residual stream before layer 0): the token nodes' vectors."""
    mlp_in: list[Tensor]
    """Per layer [T, d_in] the MLP input (the transcoders' input)."""
    mlp_out: list[Tensor]
    """Per layer [T, d_out] the true MLP output (the mlp_out site)."""
    final: Tensor
    """[T, d] the final norm's output."""
    logits: Tensor
    """[V] the model's next-token logits at the last position."""


class FrozenRun(NamedTuple):
    """Live tensors of one forward of the replacement model (batch B copies of the prompt)."""

    mlp_in: list[Tensor]
    """Per layer [B, T, d_in] the MLP input (targets read their pre-activation here)."""
    final: Tensor
    """[B, T, d] the final norm's output (logit targets read here)."""
    logits: Tensor | None
    """[B, T, V] logits when requested (the LM head runs), else None."""
    probes: list[Tensor]
    """Zero-valued leaf tensors added to the embeddings ([0]) and to each layer's MLP output ([1 + m]),
    [B, T, d] each: their gradients are the gradients at the sources (empty unless grad=True)."""


class ReplacementModel:
    """The local replacement model of one prompt (module docstring): build it, then `run` it."""

    def __init__(
        self,
        loaded: LoadedModel,
        dictionaries: Sequence[Dictionary],
        input_ids: Tensor,
        *,
        freeze_skip_at_bos: bool = False,
    ) -> None:
        if input_ids.ndim == 2:
            if input_ids.shape[0] != 1:
                raise OpenscopeError("attribute one prompt at a time: input_ids must be [1, T]")
            input_ids = input_ids[0]
        if input_ids.numel() == 0:
            raise OpenscopeError("the prompt has no tokens")
        check_attribution_support(loaded)
        self.loaded = loaded
        self.slots = replacement_slots(loaded, dictionaries)
        self.input_ids = input_ids.to(loaded.device)
        self.keep = keep_mask(self.input_ids, loaded.tokenizer)
        """[T] bool: positions with latents and error nodes (not BOS/EOS/pad)."""
        self.freeze_skip_at_bos = freeze_skip_at_bos
        self.skip_live = (self.keep if freeze_skip_at_bos else torch.ones_like(self.keep))[:, None]
        """[T, 1] bool: positions where a skip term is live (module docstring: every one by default)."""
        self._norms = residual_norms(loaded)
        self._projections = attention_projections(loaded)
        if loaded.dtype != torch.float32:
            log.warning("attribution computes in the model's dtype %s; float32 is exact", loaded.dtype)
        self.clean, self.frozen_norms, self.frozen_projections = self._clean_run()
        self.latents = self._latents()
        """Per layer [T, F] the latents on the clean prompt (zero at positions not kept)."""
        self.errors = self._errors()
        """[L, T, d_out] the error nodes ε_m = y_m − ŷ_m (zero at positions not kept)."""
        self._base = self._constant_outputs()

    @property
    def n_layers(self) -> int:
        return self.loaded.n_layers

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    # ---- the clean forward --------------------------------------------------------------------------

    @torch.no_grad()
    def _clean_run(self) -> tuple[CleanRun, list[FrozenNorm], list[Tensor]]:
        loaded, n = self.loaded, self.n_layers
        norm_io: dict[int, tuple[Tensor, Tensor]] = {}
        projections: dict[int, Tensor] = {}
        embeds: dict[int, Tensor] = {}
        acts: dict[Site, Tensor] = {}

        # Keyed by module (each runs once per forward), so no assumption on the order they run in.
        def keep_io(i: int) -> Callable[..., None]:
            return lambda _m, args, output: norm_io.__setitem__(
                i, (args[0][0].clone(), _first(output)[0].clone())
            )

        def keep_output(store: dict[int, Tensor], i: int) -> Callable[..., None]:
            return lambda _m, _a, output: store.__setitem__(i, _first(output)[0].clone())

        hooks = [(m, keep_io(i)) for i, m in enumerate(self._norms)]
        hooks += [(m, keep_output(projections, i)) for i, m in enumerate(self._projections)]
        hooks.append((input_embeddings(loaded), keep_output(embeds, 0)))
        with ExitStack() as stack:
            stack.enter_context(forward_hooks(hooks))
            for site in [Site(layer, kind) for layer in range(n) for kind in ("mlp_in", "mlp_out")]:
                stack.enter_context(
                    hook_site(loaded, site, lambda x, s=site: acts.__setitem__(s, x[0].clone()))
                )
            # Only the last position's logits are needed: a long prompt's [T, vocab] would be large.
            last = (
                {"logits_to_keep": 1}
                if "logits_to_keep" in signature(loaded.model.forward).parameters
                else {}
            )
            logits = loaded.model(input_ids=self.input_ids[None], use_cache=False, **last).logits[0, -1]
        if len(norm_io) != len(self._norms) or len(projections) != len(self._projections) or not embeds:
            raise OpenscopeError(
                f"{loaded.name} did not run every norm and attention projection in its forward"
            )
        frozen = [self._freeze(m, *norm_io[i]) for i, m in enumerate(self._norms)]
        clean = CleanRun(
            embeddings=embeds[0],
            mlp_in=[acts[Site(layer, "mlp_in")] for layer in range(n)],
            mlp_out=[acts[Site(layer, "mlp_out")] for layer in range(n)],
            final=frozen[-1].y,
            logits=logits.float(),
        )
        return clean, frozen, [projections[i] for i in range(len(self._projections))]

    @staticmethod
    @torch.no_grad()
    def _freeze(module: nn.Module, x: Tensor, y: Tensor) -> FrozenNorm:
        ones = torch.ones(1, x.shape[-1], dtype=x.dtype, device=x.device)
        gain = rms_gain(x.float(), y.float(), module(ones).float()[0]).to(x.dtype)
        misfit = float((x * gain - y).norm() / y.norm().clamp(min=1e-30))
        if misfit > NORM_TOLERANCE:
            raise OpenscopeError(
                f"{type(module).__name__} is not an RMSNorm (y = x * gain misfits by {misfit:.2g}); "
                "attribution freezes RMSNorm scales only (Gemma, Llama, Qwen, Mistral)"
            )
        return FrozenNorm(x, y, gain)

    @torch.no_grad()
    def _latents(self) -> list[Tensor]:
        out = []
        for layer, slot in enumerate(self.slots):
            x = self.clean.mlp_in[layer].to(slot.coder.w_enc.dtype)
            z = slot.coder.encode_at(slot.index, x)
            out.append((z * self.keep[:, None].to(z.dtype)).detach())
        return out

    def _coder_latents(self, slot: LayerSlot, upto: int) -> list[Tensor]:
        """The latents of coder layers 0..upto of the slot's dictionary (a CLT reads many layers)."""
        first = slot.dictionary.site_in.layer
        return [self.latents[first + j] for j in range(upto + 1)]

    @torch.no_grad()
    def _errors(self) -> Tensor:
        errors = []
        for m, slot in enumerate(self.slots):
            x = self.clean.mlp_in[m].to(slot.coder.w_enc.dtype)
            recon = slot.coder.decode_into(slot.index, self._coder_latents(slot, slot.index), x)
            error = (self.clean.mlp_out[m] - recon.to(self.clean.mlp_out[m].dtype)) * self.keep[:, None]
            errors.append(error)
        return torch.stack(errors)

    @torch.no_grad()
    def _constant_outputs(self) -> list[Tensor]:
        """Per layer [T, d_out] the MLP output minus its live part (the skip where `skip_live`)."""
        base = []
        for m, slot in enumerate(self.slots):
            skip = slot.coder.skip_at(slot.index, self.clean.mlp_in[m].to(slot.coder.w_enc.dtype))
            out = self.clean.mlp_out[m]
            base.append(out if skip is None else out - skip.to(out.dtype) * self.skip_live)
        return base

    # ---- sources and targets ------------------------------------------------------------------------

    def active(self) -> ActiveFeatures:
        """Every latent that fires on the prompt (at kept positions), sorted by layer, position, latent."""
        layers, positions, latents, values = [], [], [], []
        for layer, z in enumerate(self.latents):
            pos, lat = z.nonzero(as_tuple=True)
            layers.append(torch.full_like(pos, layer))
            positions.append(pos)
            latents.append(lat)
            values.append(z[pos, lat])
        return ActiveFeatures(torch.cat(layers), torch.cat(positions), torch.cat(latents), torch.cat(values))

    @torch.no_grad()
    def encoder_vectors(self, features: ActiveFeatures) -> Tensor:
        """[n, d_in] what each feature's pre-activation reads from its layer's MLP input."""
        ref = self.clean.mlp_in[0]  # on the model's device, where the backward pass reads the vectors
        out = torch.empty(features.count, ref.shape[-1], dtype=ref.dtype, device=ref.device)
        for layer, slot in enumerate(self.slots):
            sel = (features.layer == layer).nonzero().squeeze(1)
            if sel.numel():
                out[sel] = slot.coder.encoder_vectors(
                    slot.index, features.latent[sel].to(slot.coder.w_enc.device)
                ).to(out)
        return out

    @torch.no_grad()
    def latent_offsets(self, layer: int, position: int, latent: int, delta: float) -> dict[int, Tensor]:
        """MLP-output offsets (model layer → [T, d_out]) that add δ to one latent's activation."""
        slot = self.slots[layer]
        first = slot.dictionary.site_out.layer
        out = {}
        for m in slot.writes:
            offset = torch.zeros_like(self.clean.mlp_out[m])
            row = slot.coder.decoder_vectors(slot.index, m - first, torch.tensor([latent]))[0]
            offset[position] = delta * row.to(offset)
            out[m] = offset
        return out

    # ---- the frozen forward -------------------------------------------------------------------------

    def run(
        self,
        batch: int = 1,
        *,
        embed_offset: Tensor | None = None,
        mlp_offsets: dict[int, Tensor] | None = None,
        grad: bool = False,
        logits: bool = False,
    ) -> FrozenRun:
        """One forward of the replacement model on `batch` copies of the prompt.

        embed_offset [T, d] / mlp_offsets {layer: [T, d_out]}: added to the embeddings / MLP outputs (to
        intervene on a source: `latent_offsets`, or a multiple of a token or error vector). grad: build
        the autograd graph through zero probes at the sources (`FrozenRun.probes`) for backward passes.
        logits: run the LM head too (otherwise the forward stops at the final norm).
        """
        loaded, n, t = self.loaded, self.n_layers, self.n_tokens
        mlp_offsets = mlp_offsets or {}
        probes: list[Tensor] = []
        if grad:
            shapes = [self.clean.embeddings, *self.clean.mlp_out]
            probes = [
                torch.zeros(batch, t, s.shape[-1], dtype=s.dtype, device=s.device, requires_grad=True)
                for s in shapes
            ]
        live: dict[int, Tensor] = {}
        final: list[Tensor] = []
        skip_live = self.skip_live

        def add(value: Tensor, offset: Tensor | None, probe: Tensor | None) -> Tensor:
            if offset is not None:
                value = value + offset.to(value)
            return value if probe is None else value + probe

        def embed_hook(_m: nn.Module, _a: tuple, output: Any) -> Tensor:
            return add(_first(output), embed_offset, probes[0] if probes else None)

        def norm_hook(frozen: FrozenNorm) -> Callable[..., Tensor]:
            return lambda _m, args, _o: frozen.y + (args[0] - frozen.x) * frozen.gain

        def clean_output(value: Tensor) -> Callable[..., Tensor]:
            return lambda _m, _a, output: value.expand(batch, *value.shape).to(_first(output).dtype)

        def read_mlp_in(m: int) -> Callable[[Tensor], None]:
            return lambda x: live.__setitem__(m, x)

        def write_mlp_out(m: int) -> Callable[[Tensor], Tensor]:
            slot = self.slots[m]

            def write(y: Tensor) -> Tensor:
                out = self._base[m].expand(batch, t, -1)
                skip = slot.coder.skip_at(
                    slot.index, live[m].reshape(batch * t, -1).to(slot.coder.w_enc.dtype)
                )
                if skip is not None:
                    out = out + skip.reshape(batch, t, -1).to(out.dtype) * skip_live
                return add(out, mlp_offsets.get(m), probes[1 + m] if probes else None).to(y.dtype)

            return write

        def final_hook(_m: nn.Module, _a: tuple, output: Any) -> None:
            final.append(_first(output))
            if not logits:
                raise StopForward

        hooks: list[tuple[nn.Module, Callable[..., Any]]] = [(input_embeddings(loaded), embed_hook)]
        hooks += [(m, norm_hook(f)) for m, f in zip(self._norms, self.frozen_norms, strict=True)]
        hooks += [
            (m, clean_output(v)) for m, v in zip(self._projections, self.frozen_projections, strict=True)
        ]
        ids = self.input_ids[None].expand(batch, t)
        lm_logits: Tensor | None = None
        with ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(grad))
            stack.enter_context(eager_attention(loaded))
            # Norm hooks first: the mlp_in reader on the same module must see the frozen output.
            stack.enter_context(forward_hooks(hooks))
            for m in range(n):
                stack.enter_context(hook_site(loaded, Site(m, "mlp_in"), read_mlp_in(m)))
                stack.enter_context(hook_site(loaded, Site(m, "mlp_out"), write_mlp_out(m)))
            for block in loaded.arch.layers:
                # The MLP's output is replaced whole: run it on no tokens (after the mlp_in reader, which
                # for some models reads the MLP's own input).
                if isinstance(mlp := getattr(block, "mlp", None), nn.Module):
                    stack.callback(mlp.register_forward_pre_hook(_no_tokens, with_kwargs=True).remove)
            stack.enter_context(forward_hooks([(loaded.arch.final_norm, final_hook)]))  # type: ignore[list-item]
            stack.enter_context(suppress(StopForward))
            out = loaded.model(input_ids=ids, use_cache=False)
            lm_logits = out.logits
        if not final:
            raise OpenscopeError(f"the final norm of {loaded.name} did not run")
        return FrozenRun(
            mlp_in=[live[m] for m in range(n)],
            final=final[0],
            logits=lm_logits,
            probes=probes,
        )
