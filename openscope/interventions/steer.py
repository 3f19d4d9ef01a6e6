"""Steering: edit dictionary latents while the model runs, and compare generations with and without.

Three kinds of edit (an `Intervention`), at a dictionary's output site, at every position or chosen ones:

- **add**: y ← y + s·d_l, where d_l is latent l's output direction (its decoder row, times C_out for
  an unfolded coder: what one unit of the latent adds to the reconstruction). s is in the latent's
  own units, so s = (a typical activation) is a natural strength.
- **clamp**: encode the dictionary's input x, set latent l to v, decode, and add back the
  reconstruction error ε = y − decode(f(x)): y ← decode(f') + ε. Because the decoder is linear in
  the latents, this equals y + (v − f_l(x))·d_l — computed that way, so no other latent's
  contribution and no part of the error moves even by rounding. Several latents of one dictionary
  are clamped from one encoding of the unedited input, so they do not disturb each other.
- **multiply**: a clamp to value × the latent's own activation, y ← y + (s − 1)·f_l(x)·d_l (s = 0 removes
  the latent: the interventions of attribution graphs, `openscope.attribution.intervene`).

Every coder steers the same way, through the `openscope.coders.protocol.Coder` methods: latent
l = i·width + j is coder layer i's latent j (a single-layer coder: i = 0, j = l); it is read at the
i-th input site and every edit lands at each output site m ≥ i along its direction into ŷ_m
(`decoder_vectors`: a cross-layer transcoder's W_dec^{i→m}[j]). Per layer the clamps and multiplies
apply first, in the order given, then the adds.

Edits of several dictionaries apply together; each dictionary reads its input as the forward
produces it (edits upstream reach it). Positions are absolute token positions in the sequence
(BOS = 0); during generation with a KV cache the new token's position is tracked, so "position 3"
means the same token in every step, and `positions=None` edits every position, generated ones too.

Everything goes through `openscope.models.hooks.hook_site`: the model is never re-implemented.
`generate` runs greedy decoding by default (temperature > 0: seeded sampling, the same seed for the
unsteered and the steered run), `top_latents` gives the inspector's per-token top latents, and
`steer_request` answers the web app's `SteerRequest` with a `SteerResult`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import Dictionary, validate_dictionary
from openscope.errors import OpenscopeError
from openscope.features.schema import (
    InspectResult,
    InspectToken,
    LatentActivation,
    SteerIntervention,
    SteerRequest,
    SteerResult,
)
from openscope.models.hooks import SiteFn, hook_site, run_to_sites
from openscope.models.load import LoadedModel
from openscope.models.tokens import keep_mask, prompt_ids, token_pieces

Mode = Literal["add", "clamp", "multiply"]


class Intervention(NamedTuple):
    """One edit of one latent."""

    dictionary: Dictionary
    """The dictionary holding the latent (an SAE, transcoder, skip-transcoder or cross-layer transcoder)."""
    latent: int
    """Latent index (a cross-layer transcoder: layer i's latent j is i·width + j)."""
    mode: Mode = "add"
    """add: add value × the latent's output direction; clamp: set the latent's activation to value;
    multiply: multiply the latent's activation by value."""
    value: float = 1.0
    """Strength (add), target activation (clamp) or factor (multiply)."""
    positions: tuple[int, ...] | None = None
    """Absolute token positions to edit (BOS = 0); None: every position."""


# ---- the math (pure) -------------------------------------------------------------------------------


def coder_of(d: Dictionary) -> SparseCoder:
    """The dictionary's SparseCoder, for the analyses that need a single-layer one (refuses a CLT)."""
    if not isinstance(d.coder, SparseCoder):
        raise OpenscopeError(
            f"dictionary {d.name} is a cross-layer transcoder; steering supports single-layer ones"
        )
    return d.coder


def output_direction(coder: SparseCoder, latent: int) -> Tensor:
    """d_l [d_out]: what one unit of latent l adds to the coder's output (W_dec row × C_out)."""
    return coder.decoder_vectors(0, 0, torch.tensor([latent], device=coder.w_dec.device))[0].detach()


def add_direction(y: Tensor, direction: Tensor, strength: float, mask: Tensor | None) -> Tensor:
    """y + s·d at the masked positions (mask [batch, seq] bool; None: all), out of place."""
    delta = strength * direction.to(y.device, y.dtype)
    if mask is None:
        return y + delta
    return y + mask.unsqueeze(-1).to(y.device, y.dtype) * delta


def latent_values(coder: SparseCoder | CrossLayerCoder, i: int, x: Tensor, latents: Sequence[int]) -> Tensor:
    """f_l(x) [..., len(latents)]: the chosen latents' activations of coder layer i on its raw input x
    [..., d_in]."""
    w = coder.w_enc
    f = coder.encode_at(i, x.reshape(-1, x.shape[-1]).to(w.device, w.dtype))[:, list(latents)]
    return f.reshape(*x.shape[:-1], len(latents)).to(x.device)


def clamp_change(iv: Intervention, f: Tensor) -> Tensor:
    """How much a clamp or multiply moves the latent from its activation f: v − f, or (s − 1)·f."""
    return iv.value - f if iv.mode == "clamp" else (iv.value - 1.0) * f


def position_mask(offset: int, seq: int, batch: int, positions: Sequence[int] | None) -> Tensor | None:
    """[batch, seq] bool: which of the absolute positions offset..offset+seq-1 are edited (None: all)."""
    if positions is None:
        return None
    absolute = torch.arange(offset, offset + seq)
    hit = torch.isin(absolute, torch.tensor(list(positions), dtype=torch.long))
    return hit.unsqueeze(0).expand(batch, seq)


# ---- hooks ------------------------------------------------------------------------------------------


@dataclass
class StepState:
    """Where the current forward starts in the sequence (a KV-cached step sees only new tokens)."""

    offset: int = 0
    """Absolute position of the first token of the current forward."""


def check_intervention(iv: Intervention, loaded: LoadedModel | None = None) -> SparseCoder | CrossLayerCoder:
    """Validate one intervention; returns its coder."""
    coder = iv.dictionary.coder
    if iv.mode not in ("add", "clamp", "multiply"):
        raise OpenscopeError(f"unknown steering mode {iv.mode!r}; choose add, clamp or multiply")
    width = coder.cfg.width * iv.dictionary.n_layers  # a CLT numbers all its layers' latents
    if not 0 <= iv.latent < width:
        raise OpenscopeError(f"latent {iv.latent} is out of range for {iv.dictionary.name} (width {width})")
    if iv.positions is not None and any(p < 0 for p in iv.positions):
        raise OpenscopeError("steering positions must be non-negative token positions (BOS = 0)")
    if loaded is not None:
        validate_dictionary(iv.dictionary, loaded)
    return coder


class _Steer:
    """The hooks of all interventions on one dictionary (any coder): read the input at each edited layer,
    write each edit at every output site from that layer on (a single-layer coder: its one output site).

    Per layer, the clamps and multiplies apply first, in the order given, then the adds: all clamped
    latents of a layer are read from one encoding of its unedited input, so they do not disturb each other.
    """

    def __init__(self, d: Dictionary, ivs: list[Intervention], state: StepState) -> None:
        self.d, self.coder, self.state = d, d.coder, state
        width, device = self.coder.cfg.width, self.coder.w_enc.device
        self.edits: dict[int, list[tuple[Intervention, int]]] = {}
        """Per edited coder layer, (intervention, latent within the layer): clamps first, then adds."""
        for iv in sorted(ivs, key=lambda iv: iv.mode == "add"):  # stable: the given order within each
            self.edits.setdefault(iv.latent // width, []).append((iv, iv.latent % width))
        self.first = min(self.edits)
        """The first edited layer: output sites from it on are written."""
        self.directions = {
            (i, m): self.coder.decoder_vectors(
                i, m, torch.tensor([j for _, j in edits], device=device)
            ).detach()
            for i, edits in self.edits.items()
            for m in range(i, d.n_layers)
        }
        """Per (layer i, output layer m): [edits of layer i, d_out] each edited latent's direction into ŷ_m."""
        self.values: dict[int, Tensor | None] = {}
        """Per layer read in this forward: [batch, seq, clamps] its clamped latents' activations."""

    def reader(self, i: int) -> SiteFn:
        clamped = [j for iv, j in self.edits[i] if iv.mode != "add"]

        def read(x: Tensor) -> None:
            self.values[i] = latent_values(self.coder, i, x, clamped) if clamped else None

        return read

    def writer(self, m: int) -> SiteFn:
        same_site = m in self.edits and self.d.sites_in[m] == self.d.sites_out[m]

        def write(y: Tensor) -> Tensor:
            if same_site:
                self.reader(m)(y)
            out = y
            for i in range(self.first, m + 1):
                if i in self.edits:
                    out = self._edit(out, i, m)
            if m == self.d.n_layers - 1:
                self.values.clear()
            return out

        return write

    def _edit(self, y: Tensor, i: int, m: int) -> Tensor:
        """y plus the edits of layer i's latents, through their directions into ŷ_m."""
        if i not in self.values:
            raise OpenscopeError(
                f"dictionary {self.d.name}: output site {self.d.sites_out[m].name} ran before its input "
                f"site {self.d.sites_in[i].name}"
            )
        f, batch, seq = self.values[i], y.shape[0], y.shape[1]
        out, clamps = y, 0
        for (iv, _), direction in zip(self.edits[i], self.directions[(i, m)], strict=True):
            mask = position_mask(self.state.offset, seq, batch, iv.positions)
            if iv.mode == "add":
                out = add_direction(out, direction, iv.value, mask)
                continue
            assert f is not None
            change = clamp_change(iv, f[..., clamps]).to(y.dtype)
            clamps += 1
            if mask is not None:
                change = change * mask.to(y.device, y.dtype)
            out = out + change.unsqueeze(-1) * direction.to(y.device, y.dtype)
        return out


@contextmanager
def steering(
    loaded: LoadedModel, interventions: Sequence[Intervention], state: StepState | None = None
) -> Iterator[StepState]:
    """Apply the interventions in every forward inside the block; yields the StepState whose
    `offset` a caller running KV-cached steps must advance (plain full forwards keep it at 0)."""
    state = state or StepState()
    by_dict: dict[int, list[Intervention]] = {}
    dicts: dict[int, Dictionary] = {}
    for iv in interventions:
        check_intervention(iv, loaded)
        by_dict.setdefault(id(iv.dictionary.coder), []).append(iv)
        dicts[id(iv.dictionary.coder)] = iv.dictionary
    with ExitStack() as stack:
        for key, ivs in by_dict.items():
            d, steer = dicts[key], _Steer(dicts[key], ivs, state)
            for i in steer.edits:
                if d.sites_in[i] != d.sites_out[i]:
                    stack.enter_context(hook_site(loaded, d.sites_in[i], steer.reader(i)))
            for m in range(steer.first, d.n_layers):
                stack.enter_context(hook_site(loaded, d.sites_out[m], steer.writer(m)))
        yield state


# ---- generation -------------------------------------------------------------------------------------


def _pick(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy (temperature 0) or seeded nucleus sampling of one token from logits [vocab]."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = (sorted_p.cumsum(0) - sorted_p) >= top_p  # keep the smallest prefix reaching top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


@torch.inference_mode()
def generate_ids(
    loaded: LoadedModel,
    input_ids: Tensor,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """Generate up to max_new_tokens after input_ids [1, n] with the interventions applied (KV cache)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise OpenscopeError("generate one sequence at a time: input_ids must be [1, n]")
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    eos = loaded.tokenizer.eos_token_id
    out: list[int] = []
    params = inspect.signature(loaded.model.forward).parameters
    # transformers 5 renamed past_key_values to cache (argument and output); accept both.
    cache_arg = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # one row of the LM head, not n
    with steering(loaded, interventions) as state:
        past: Any = None
        current = input_ids.to(loaded.device)
        for _ in range(max_new_tokens):
            result = loaded.model(input_ids=current, use_cache=True, **{cache_arg: past}, **extra)
            past = getattr(result, cache_arg)
            token = _pick(result.logits[0, -1], temperature, top_p, gen)
            out.append(token)
            if token == eos:
                break
            state.offset += current.shape[1]
            current = torch.tensor([[token]], device=loaded.device)
    return out


def generate(
    loaded: LoadedModel,
    prompt: str,
    interventions: Sequence[Intervention],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> SteerResult:
    """Continue `prompt` without and with the interventions; the two texts side by side."""
    if max_new_tokens < 1:
        raise OpenscopeError("max_new_tokens must be at least 1")
    for iv in interventions:
        check_intervention(iv, loaded)
    ids = prompt_ids(loaded.tokenizer, prompt)
    plain = generate_ids(loaded, ids, (), max_new_tokens, temperature, top_p, seed)
    steered = generate_ids(loaded, ids, interventions, max_new_tokens, temperature, top_p, seed)
    decode = loaded.tokenizer.decode
    return SteerResult(
        prompt=prompt,
        unsteered=decode(plain, skip_special_tokens=True),
        steered=decode(steered, skip_special_tokens=True),
        interventions=[
            SteerIntervention(
                dictionary=iv.dictionary.name,
                latent=iv.latent,
                mode=iv.mode,  # type: ignore[arg-type]  # never multiply: refused above
                value=iv.value,
                positions=list(iv.positions) if iv.positions is not None else None,
            )
            for iv in interventions
        ],
        unsteered_ids=plain,
        steered_ids=steered,
    )


def steer_request(
    loaded: LoadedModel, dictionaries: Mapping[str, Dictionary], request: SteerRequest
) -> SteerResult:
    """Answer a web-app SteerRequest: `dictionaries` maps DictionaryInfo.name to a loaded Dictionary."""
    interventions = []
    for s in request.interventions:
        if s.dictionary not in dictionaries:
            known = ", ".join(sorted(dictionaries)) or "none"
            raise OpenscopeError(f"no dictionary {s.dictionary!r} is loaded for steering (loaded: {known})")
        positions = tuple(s.positions) if s.positions is not None else None
        interventions.append(Intervention(dictionaries[s.dictionary], s.latent, s.mode, s.value, positions))
    return generate(
        loaded,
        request.prompt,
        interventions,
        request.max_new_tokens,
        request.temperature,
        request.top_p,
        request.seed,
    )


# ---- the inspector ----------------------------------------------------------------------------------


@torch.inference_mode()
def latents_of(loaded: LoadedModel, dictionary: Dictionary, input_ids: Tensor) -> Tensor:
    """Latent activations [n, F] of one sequence input_ids [1, n] (the forward stops at the input site)."""
    coder = coder_of(dictionary)
    x = run_to_sites(loaded, input_ids.to(loaded.device), [dictionary.site_in])[dictionary.site_in]
    return coder.encode(x[0].to(coder.w_enc.device, coder.w_enc.dtype)).float().cpu()


def top_latents(loaded: LoadedModel, dictionary: Dictionary, text: str, k: int = 5) -> InspectResult:
    """Per token of `text` (after BOS), its k most active latents (only those that fire).

    BOS/EOS/pad positions are listed with no latents: dictionaries are not trained on them.
    """
    if k < 1:
        raise OpenscopeError("k must be at least 1")
    validate_dictionary(dictionary, loaded)
    ids = prompt_ids(loaded.tokenizer, text)
    acts = latents_of(loaded, dictionary, ids)
    k = min(k, acts.shape[1])
    values, latents = acts.topk(k, dim=1)
    keep = keep_mask(ids, loaded.tokenizer)[0]
    id_list = ids[0].tolist()
    pieces = token_pieces(loaded.tokenizer, sorted(set(id_list)))
    tokens = []
    for pos, tid in enumerate(id_list):
        top = []
        if keep[pos]:
            top = [
                LatentActivation(latent=int(j), activation=float(v))
                for v, j in zip(values[pos].tolist(), latents[pos].tolist(), strict=True)
                if v > 0
            ]
        tokens.append(InspectToken(token=pieces[tid], token_id=tid, position=pos, latents=top))
    return InspectResult(dictionary=dictionary.name, text=text, tokens=tokens)


inspect_text = top_latents
"""Alias of `top_latents` (the name the schema docstring first gave)."""
