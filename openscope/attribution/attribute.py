"""Attribution: the direct linear effects between a prompt's nodes in its local replacement model.

Nodes (ordered as circuit-tracer orders them, `graph.NodeLayout`): every latent active on the prompt
(layer, position, latent), one error node per layer and position, one token-embedding node per
position, and the top next-token logits covering `logit_probability` of the probability (at most
`max_logits`). A **logit target** is the logit minus the mean logit over the vocabulary, read from the
final norm's output (before any logit soft-capping): (W_U[t] − mean_v W_U[v]) · h.

Edges. The replacement model (`replacement.ReplacementModel`) is linear in its sources, so the direct
effect of source s on target t is A[t, s] = ∂(target t) / ∂(s's output) · (s's output):

- a latent's output is a·d (activation times decoder row; a CLT latent writes to every later layer's
  MLP output, and the contraction sums over them), an error node's is ε, a token's its embedding;
- a latent target's value is its encoder pre-activation z = W_enc · x + b at its layer's MLP input x.

So adding δ to a source latent's activation changes target t's pre-activation (or logit target) by
exactly A[t, s]·δ/a in the replacement model (and scaling a token or error vector by 1 + δ changes it by
A[t, s]·δ) — the check the tests make. "Direct" means through the frozen residual stream only: every
other latent is held at its clean activation, so paths through other latents are separate edges.

Each row A[t, :] is one backward pass: inject the target's read-out vector at its site and contract the
gradients at every source with the sources' output vectors. Rows are computed in batches, as circuit-
tracer does: the replacement model runs once on B copies of the prompt, copy b carries target b, and
one backward gives B rows (`rows`). With `max_feature_nodes` below the number of active latents,
latents are attributed in order of their (partial) influence on the logits, recomputed as rows arrive,
and only those attributed become graph nodes. Before the first backward pass the memory the run will
need is estimated and logged, and a run over the limit is refused (`memory`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from openscope.attribution.graph import NodeLayout, count_below
from openscope.attribution.memory import MemoryEstimate, check_memory, estimate_memory
from openscope.attribution.replacement import ActiveFeatures, FrozenRun, LayerSlot, ReplacementModel
from openscope.attribution.rows import Readout, RowStore, backward_rows, readout_bytes
from openscope.coders.dictionary import Dictionary
from openscope.errors import OpenscopeError
from openscope.models.load import LoadedModel
from openscope.models.tokens import prompt_ids

log = logging.getLogger(__name__)


class AttributionGraph(NamedTuple):
    """An unpruned attribution graph: the adjacency matrix and what its nodes are."""

    prompt: str
    """The prompt text (without the BOS the tokenisation adds)."""
    input_ids: Tensor
    """[T] the token ids attributed (BOS first)."""
    slots: tuple[LayerSlot, ...]
    """Per model layer, the dictionary (and its layer) that replaced the MLP."""
    features: Tensor
    """[n, 3] (layer, position, latent within the layer) of each feature node, sorted."""
    activations: Tensor
    """[n] each feature node's activation."""
    logit_ids: Tensor
    """[k] token id of each logit node, most probable first."""
    logit_probs: Tensor
    """[k] their next-token probabilities."""
    adjacency: Tensor
    """[N, N] direct effects, rows targets and columns sources, nodes in `layout` order."""
    layout: NodeLayout
    """How many feature, error, token and logit nodes there are."""
    n_active: int
    """Latents active on the prompt (more than the feature nodes when max_feature_nodes cut them)."""
    seconds: float
    """Wall time of the attribution."""
    memory: MemoryEstimate | None = None
    """The memory estimate made before the backward passes (`memory`)."""

    @property
    def n_layers(self) -> int:
        return len(self.slots)

    @property
    def n_tokens(self) -> int:
        return self.layout.n_tokens


def top_logits(logits: Tensor, max_logits: int, probability: float) -> tuple[Tensor, Tensor]:
    """(ids, probs) of the fewest most probable tokens whose probabilities sum to `probability`, at most
    `max_logits` of them."""
    if max_logits < 1:
        raise OpenscopeError(f"max_logits must be at least 1, got {max_logits}")
    if not 0.0 < probability <= 1.0:
        raise OpenscopeError(f"the logit probability to cover must be in (0, 1], got {probability}")
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = probs.topk(min(max_logits, probs.numel()))
    cut = count_below(top_p.cumsum(0), probability) + 1
    return top_i[:cut], top_p[:cut]


def _prompt(loaded: LoadedModel, prompt: str | Tensor, max_tokens: int) -> tuple[str, Tensor]:
    """(text, ids [T]) of a prompt given as text (BOS is prepended) or token ids; refuses a long one."""
    if isinstance(prompt, str):
        if not prompt:
            raise OpenscopeError("the prompt is empty")
        text, ids = prompt, prompt_ids(loaded.tokenizer, prompt)[0]
    else:
        ids = prompt.reshape(-1)
        text = loaded.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    if ids.numel() > max_tokens:
        raise OpenscopeError(
            f"the prompt is {ids.numel()} tokens (with BOS), more than max_tokens={max_tokens}: the graph grows "
            "with the square of its nodes; shorten the prompt or raise --max-tokens"
        )
    return text, ids


def _fill_rows(
    run: FrozenRun,
    store: RowStore,
    readout: Readout,
    active: ActiveFeatures,
    encoders: Callable[[Tensor], Tensor],
    logit_vectors: Tensor,
    logit_probs: Tensor,
    budget: int,
    update_interval: int,
    bar: tqdm,
) -> Tensor:
    """Compute the logit rows, then `budget` latents' rows (all, or the most influential first, re-ranked
    as rows arrive) into the store; returns [n] bool, which latents were attributed. encoders: latent
    indices -> their read-out vectors [len, d]; logit_vectors [k, d]: each logit's."""
    n_layers, t, n, k = readout.n_layers, readout.n_tokens, active.count, len(logit_vectors)
    batch = run.final.shape[0]
    logits_start = store.rows.shape[1] - k
    for i in range(0, k, batch):
        j = min(i + batch, k)
        layers = torch.full((j - i,), n_layers)
        grads = backward_rows(run, n_layers, layers, torch.full((j - i,), t - 1), logit_vectors[i:j])
        readout.rows(grads, store.block(j - i))
        store.close(torch.arange(logits_start + i, logits_start + j))
        bar.update(j - i)
    visited = torch.zeros(n, dtype=torch.bool)
    seed = torch.zeros(store.rows.shape[1])
    seed[logits_start:] = logit_probs.float().cpu()
    while store.filled - k < budget:
        if budget == n:
            pending = torch.arange(n)
        else:
            # Rank the unvisited latents by their influence through the rows computed so far; re-rank
            # after a queue that grows with the graph (a ranking is a pass over all rows).
            ranked = store.influence(seed)[:n].argsort(descending=True)
            done = store.filled - k
            pending = ranked[~visited[ranked]][: min(max(update_interval * batch, done // 4), budget - done)]
            # Batches of similar layers cost less (the readout skips layers above the batch's targets);
            # the queue lives on the CPU with the rows, the latents' layers on the model's device.
            pending = pending[active.layer[pending].cpu().argsort(stable=True)]
        for chunk in pending.split(batch):
            grads = backward_rows(run, n_layers, active.layer[chunk], active.position[chunk], encoders(chunk))
            readout.rows(grads, store.block(len(chunk)))
            store.close(chunk)
            visited[chunk] = True
            bar.update(len(chunk))
    return visited


def attribute(
    loaded: LoadedModel,
    dictionaries: Sequence[Dictionary],
    prompt: str | Tensor,
    *,
    max_logits: int = 10,
    logit_probability: float = 0.95,
    batch_size: int = 32,
    max_feature_nodes: int | None = None,
    max_tokens: int = 64,
    update_interval: int = 4,
    freeze_skip_at_bos: bool = False,
    max_memory_gb: float | None = None,
    progress: bool = False,
) -> AttributionGraph:
    """The attribution graph of a prompt (module docstring) in the replacement model of `dictionaries`.

    prompt: text (BOS is prepended) or token ids [T] / [1, T]; max_logits / logit_probability: which
    logits become nodes; batch_size: rows per backward pass (and copies of the prompt in the forward);
    max_feature_nodes: attribute at most this many latents, the most influential first (None: all);
    max_tokens: refuse longer prompts (the graph grows with the square of its nodes); update_interval:
    batches between re-rankings when max_feature_nodes cuts; freeze_skip_at_bos: hold skip-transcoders'
    skip term constant at BOS/EOS/pad (`replacement` module docstring; default: live, as circuit-tracer);
    max_memory_gb: refuse, before any backward pass, a run whose memory estimate (`memory`, logged)
    exceeds this (None: the machine's physical memory).
    """
    start_time = time.perf_counter()
    if batch_size < 1:
        raise OpenscopeError(f"batch_size must be at least 1, got {batch_size}")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise OpenscopeError(f"max_feature_nodes must be non-negative, got {max_feature_nodes}")
    if max_memory_gb is not None and max_memory_gb <= 0:
        raise OpenscopeError(f"max_memory_gb must be positive, got {max_memory_gb}")
    text, ids = _prompt(loaded, prompt, max_tokens)
    rm = ReplacementModel(loaded, dictionaries, ids, freeze_skip_at_bos=freeze_skip_at_bos)
    n_layers, t = rm.n_layers, rm.n_tokens
    active = rm.active()
    n = active.count
    budget = n if max_feature_nodes is None else min(n, max_feature_nodes)
    logit_ids, logit_probs = top_logits(rm.clean.logits, max_logits, logit_probability)
    k = len(logit_ids)
    layout_cols = NodeLayout(n, n_layers * t, t, k)
    log.info("%d latents active on %d tokens; attributing %d of them and %d logits", n, t, budget, k)
    batch = max(1, min(batch_size, max(k, budget)))
    estimate = estimate_memory(
        rm,
        batch=batch,
        n_rows=k + budget,
        n_cols=layout_cols.n_nodes,
        n_kept=budget + (n_layers + 1) * t + k,
        readout=readout_bytes(active, rm),
    )
    log.info("memory estimate: %s", estimate.describe())
    check_memory(estimate, max_memory_gb)

    readout = Readout(rm, active, k)

    def encoders(chunk: Tensor) -> Tensor:  # gathered per batch: a long prompt has many latents
        return rm.encoder_vectors(ActiveFeatures(*(field[chunk] for field in active)))

    unembed = getattr(loaded.arch.lm_head, "weight", None)
    if not isinstance(unembed, Tensor):
        raise OpenscopeError(f"cannot find the unembedding of {loaded.name}")
    with torch.no_grad():
        logit_vectors = (unembed[logit_ids.to(unembed.device)] - unembed.mean(0)).detach()
    run = rm.run(batch=batch, grad=True)
    store = RowStore(k + budget, layout_cols.n_nodes)
    with tqdm(total=k + budget, desc="attribution rows", unit="row", disable=not progress) as bar:
        visited = _fill_rows(
            run, store, readout, active, encoders, logit_vectors, logit_probs, budget, update_interval, bar
        )
    del run  # the autograd graph of the batched forward
    selected = visited.nonzero().squeeze(1)
    layout, adjacency = store.adjacency(selected, layout_cols)
    del store
    features = torch.stack(
        [active.layer[selected], active.position[selected], active.latent[selected]], dim=1
    )
    seconds = time.perf_counter() - start_time
    log.info("attributed %d rows in %.1f s", k + budget, seconds)
    return AttributionGraph(
        prompt=text,
        input_ids=ids.cpu(),
        slots=rm.slots,
        features=features.cpu(),
        activations=active.activation[selected].float().cpu(),
        logit_ids=logit_ids.cpu(),
        logit_probs=logit_probs.cpu(),
        adjacency=adjacency,
        layout=layout,
        n_active=n,
        seconds=seconds,
        memory=estimate,
    )
