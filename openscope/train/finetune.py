"""End-to-end fine-tuning of trained dictionaries through the model (Gemma Scope 2 §2.4): `--finetune kl`.

A dictionary trained on reconstruction alone spends its capacity on directions that matter little to the
model's output. Fine-tuning adds the model's own verdict: each step runs the batch's contexts clean (the
site activations to train on, and the clean next-token distributions), then again with each dictionary's
reconstruction spliced in at its output site (kept positions only: BOS, EOS and pad pass through), and
minimises

    (MSE + α·β·KL) / (1 + β),   α = MSE / (KL + 1e-8), detached (a constant within the step),

where MSE is the step's usual reconstruction loss (normalised units; Matryoshka's when on) and KL the
mean over kept positions of KL(p_clean ‖ p_spliced). α puts both terms on the MSE's scale, so β alone says
how much the KL counts; β = 0 is plain training exactly. The sparsity and frequency losses are added as
usual. The model is frozen: gradients reach only the dictionary, through the layers after its site.

Batches are whole contexts (`batch_size // context_len` per step, in a seeded order shuffled within blocks
of `block_tokens`, so a resumed run sees the same ones), not the shuffled rows of a plain run: the KL needs
each row's context. The spliced forward restarts at the site's block from the clean forward's record
(`openscope.models.restart`), and both sets of logits are computed at kept positions only; a model whose
forward cannot be restarted runs full forwards instead (same values). Memory: the clean log-probabilities
of a batch, tokens × vocabulary × 4 bytes (4096 tokens of Gemma 3's 262k vocabulary: 4.3 GB), twice.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.activations.batches import ActivationBatch
from openscope.data.contexts import LabelledContext, source_contexts
from openscope.data.packing import to_batch
from openscope.errors import OpenscopeError
from openscope.models.hooks import hook_site, reading
from openscope.models.load import LoadedModel, load_model
from openscope.models.restart import Prefix, RestartUnsupported, record_forward, run_from, unembedding
from openscope.models.sites import Site
from openscope.models.tokens import keep_mask
from openscope.train.config import TrainConfig
from openscope.train.loop import live
from openscope.train.parallel import env_world

log = logging.getLogger(__name__)

FINETUNES = ("kl",)
"""The --finetune choices (empty: plain training)."""
DEFAULT_BETA = 1.0
"""β when --finetune kl is given without --beta."""
SINGLE_SITE_KINDS = ("sae", "transcoder", "skip_transcoder")
"""The dictionary kinds that can be fine-tuned (one output site each)."""


def check_finetune(cfg: TrainConfig) -> None:
    """--finetune and --beta make sense together and with the rest of the run (one-line errors)."""
    if not cfg.finetune:
        if cfg.beta is not None:
            raise OpenscopeError("--beta weighs the KL of --finetune kl; pass --finetune kl too")
        return
    if cfg.finetune not in FINETUNES:
        raise OpenscopeError(f"unknown --finetune {cfg.finetune!r}; use {', '.join(FINETUNES)}")
    if cfg.beta is not None and not cfg.beta >= 0:
        raise OpenscopeError(f"--beta must be zero or more, got {cfg.beta}")
    if not cfg.model:
        raise OpenscopeError(
            "--finetune kl splices the dictionaries into the live model: pass --model (a store holds no logits)"
        )
    if cfg.init_from is None:
        raise OpenscopeError("--finetune kl fine-tunes trained dictionaries: pass --init-from DIR")
    if cfg.kind not in SINGLE_SITE_KINDS:
        raise OpenscopeError(
            f"--finetune kl trains {', '.join(SINGLE_SITE_KINDS)} dictionaries, not --kind {cfg.kind}"
        )
    if env_world()[1] > 1:
        raise OpenscopeError("--finetune kl runs in one process (each step needs whole contexts)")


def beta_of(cfg: TrainConfig) -> float:
    """The run's β (DEFAULT_BETA when --beta is not given)."""
    return DEFAULT_BETA if cfg.beta is None else float(cfg.beta)


def next_token_kl(clean_logp: Tensor, logits: Tensor) -> Tensor:
    """Mean over rows of KL(p_clean ‖ p): clean log-probabilities [N, V] against logits [N, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1).mean()


def finetune_loss(mse: Tensor, kl: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """((MSE + α·β·KL) / (1 + β), α) with α = MSE / (KL + 1e-8) detached (Gemma Scope 2 §2.4)."""
    alpha = (mse / (kl + 1e-8)).detach()
    return (mse + alpha * beta * kl) / (1 + beta), alpha


class CleanPass(NamedTuple):
    """What the clean forward of one batch of contexts left for the spliced ones."""

    input_ids: Tensor
    """[C, L] token ids (on the model's device)."""
    attention_mask: Tensor
    """[C, L] 1 where a token is not padding."""
    rows: Tensor
    """[N] flat indices into the [C·L] positions that are kept (spliced, and counted in the KL)."""
    clean_logp: Tensor
    """[N, V] clean next-token log-probabilities at the kept positions."""
    prefix: Prefix | None
    """The clean forward's record for restarts (None: this model runs full forwards)."""
    context: Tensor
    """[N] global context index of each kept row (identifies the batch the rows belong to)."""


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


class KLFineTune:
    """The data of a --finetune kl run (context batches from the live model, cleanly run) and the KL
    term each dictionary's step adds (`term`)."""

    def __init__(self, cfg: TrainConfig, device: str, loaded: LoadedModel | None = None) -> None:
        check_finetune(cfg)
        self.cfg, self.beta = cfg, beta_of(cfg)
        self.loaded = loaded if loaded is not None else load_model(cfg.model, "float32", device)
        self.loaded.model.requires_grad_(False)  # frozen: gradients reach the dictionaries only
        data, self.names = live(cfg, device, self.loaded)
        self.sites = [Site.from_name(n) for n in data.widths]
        self.data = data._replace(
            description=f"{data.description}, fine-tuned with KL (β = {self.beta:g})", batches=self.batches
        )
        self.per_batch = max(1, cfg.batch_size // cfg.context_len)
        """Contexts per step."""
        self.start = min(s.layer for s in self.sites)
        self.restart = True
        """Spliced forwards restart at their site's block (off once the model refuses a restart)."""
        self.current: CleanPass | None = None
        """The clean pass of the batch last served (the one being trained on)."""

    def contexts(self) -> Iterator[LabelledContext]:
        return source_contexts(self.cfg.source, "text", self.loaded.tokenizer, self.cfg.context_len)

    def batches(self, _sites: list[str], start: int) -> Iterator[ActivationBatch]:
        """Batches of whole contexts forever (the source repeats), from batch `start`: each block of
        contexts is shuffled by a generator seeded with its index, so the order is a pure function of
        the seed."""
        per = self.per_batch
        block = max(per, self.cfg.block_tokens // self.cfg.context_len // per * per)
        served, block_index, first, offset = 0, 0, 0, 0
        contexts = self.contexts()
        while True:
            chunk = list(itertools.islice(contexts, block))
            if len(chunk) < per:
                if served == first:  # a whole pass of the source without one batch
                    raise OpenscopeError(
                        f"text source {self.cfg.source!r} gives fewer than the {per} contexts of one batch "
                        f"(--batch-size {self.cfg.batch_size} / --context-len {self.cfg.context_len})"
                    )
                first, contexts = served, self.contexts()  # start the text again
                continue
            n = len(chunk) // per
            if served + n <= start:
                served, block_index, offset = served + n, block_index + 1, offset + len(chunk)
                continue
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + block_index)
            perm = torch.randperm(len(chunk), generator=gen).tolist()
            for i in range(n):
                if served >= start:
                    picked = perm[i * per : (i + 1) * per]
                    yield self.clean([chunk[j] for j in picked], [offset + j for j in picked])
                served += 1
            offset += len(chunk)
            block_index += 1

    @torch.no_grad()
    def clean(self, contexts: Sequence[LabelledContext], ids: Sequence[int]) -> ActivationBatch:
        """Run `contexts` (global indices `ids`) clean: their kept rows at every site as a batch, and
        the clean pass the dictionaries' KL terms read (`current`)."""
        loaded = self.loaded
        ctx = torch.tensor([c.input_ids for c in contexts], dtype=torch.long)
        keep = keep_mask(ctx, loaded.tokenizer)
        packed = to_batch(ctx.tolist(), loaded.tokenizer)
        input_ids, attn = packed.input_ids.to(loaded.device), packed.attention_mask.to(loaded.device)
        rows = keep.reshape(-1).nonzero().squeeze(1).to(loaded.device)
        acts: dict[Site, Tensor] = {}
        readers = {s: partial(acts.__setitem__, s) for s in self.sites}
        prefix = None
        if self.restart:
            try:
                with reading(loaded, readers, stop=False):
                    prefix = record_forward(loaded, input_ids, attn, self.start)
            except RestartUnsupported as exc:
                log.info("full forwards for the KL (%s)", exc)
                self.restart = False
        if prefix is not None:
            assert prefix.final is not None  # record_forward refuses a record without it
            head = unembedding(loaded)
            logits = head.logits(head.normed(_flat(prefix.final).index_select(0, rows)))
        else:
            with reading(loaded, readers, stop=False):
                out = loaded.model(input_ids=input_ids, attention_mask=attn, use_cache=False)
            logits = _flat(out.logits).index_select(0, rows)
        context = torch.tensor(ids).unsqueeze(1).expand_as(ctx)[keep]
        self.current = CleanPass(
            input_ids, attn, rows, torch.log_softmax(logits.float(), -1), prefix, context
        )
        positions = torch.arange(ctx.shape[1]).expand_as(ctx)
        return ActivationBatch(
            {s.name: _flat(a).index_select(0, rows).float().cpu() for s, a in acts.items()},
            ctx[keep],
            context,
            positions[keep],
        )

    def term(self, site_out: str) -> KLTerm:
        """The KL term of the dictionary writing `site_out` (`train_step`'s `loss_term`)."""
        return KLTerm(self, Site.from_name(site_out))

    def spliced_logits(self, site: Site, reconstruction: Tensor) -> Tensor:
        """[N, V] logits at the kept positions of the current batch with `reconstruction` [N, d] (raw
        units, kept rows in order) in place of `site` (with autograd through the layers after it)."""
        cp, loaded = self.current, self.loaded
        if cp is None:
            raise OpenscopeError("the KL term ran before any batch was served")

        def write(y: Tensor) -> Tensor:
            return _flat(y).index_copy(0, cp.rows, reconstruction.to(y.dtype)).reshape(y.shape)

        with hook_site(loaded, site, write):
            if cp.prefix is not None:
                head = unembedding(loaded)
                hidden = run_from(loaded, cp.prefix, site.layer)
                return head.logits(head.normed(_flat(hidden).index_select(0, cp.rows)))
            out = loaded.model(input_ids=cp.input_ids, attention_mask=cp.attention_mask, use_cache=False)
            return _flat(out.logits).index_select(0, cp.rows)


class KLTerm:
    """One dictionary's fine-tuning loss: called by `train_step` with its reconstruction loss and raw
    reconstruction of the batch's rows; `last` holds the step's KL and α for the metrics."""

    def __init__(self, owner: KLFineTune, site: Site) -> None:
        self.owner, self.site = owner, site
        self.last: dict[str, float] = {}

    def __call__(self, mse: Tensor, reconstruction: Tensor) -> Tensor:
        cp = self.owner.current
        if cp is None or reconstruction.shape[0] != len(cp.rows):
            raise OpenscopeError("--finetune kl: the step's rows are not the current batch's kept positions")
        kl = next_token_kl(cp.clean_logp, self.owner.spliced_logits(self.site, reconstruction))
        loss, alpha = finetune_loss(mse, kl, self.owner.beta)
        self.last = {"kl": float(kl.detach()), "alpha": float(alpha)}
        return loss
