"""`evaluate`: measure dictionaries on held-out text and write report.json, report.md and plots.

Per batch: one clean forward captures every site the dictionaries read or write, and its logits;
those are reused for every dictionary. Reconstruction metrics (L0, FVU, MSE, dead/dense, firing
frequencies) come from the clean activations; a cross-layer transcoder or a crosscoder gets them pooled
over its layers and for each layer alone. Then one spliced forward per dictionary (that dictionary alone;
a CLT or crosscoder with all its layers at once) gives its CE and KL to the clean logits, one
zero-ablation forward per distinct output site gives CE_zero for loss recovered, and with `all_at_once`
one forward with every dictionary spliced gives the joint numbers. BOS/EOS/pad positions are never spliced or counted.
All sums are float64 and streamed: no per-token values are kept.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from openscope.coders.dictionary import (
    Dictionary,
    dictionary_folders,
    load_dictionary,
    model_of,
    unique_names,
    validate_dictionary,
)
from openscope.data.chat import role_ids
from openscope.data.contexts import LabelledContext, source_contexts
from openscope.data.packing import to_batch
from openscope.data.sources import is_chat_source, split_slice
from openscope.errors import OpenscopeError
from openscope.eval import metrics as m
from openscope.eval.report import write_report
from openscope.eval.results import DictionaryReport, EvalConfig, EvalReport, LMMetrics
from openscope.eval.splice import ablated, check_dictionaries, spliced
from openscope.models.hooks import reading
from openscope.models.load import LoadedModel, load_model, resolve_device
from openscope.models.sites import Site
from openscope.models.tokens import keep_mask
from openscope.reports import check_report_output

log = logging.getLogger(__name__)


# ---- the evaluation loop ------------------------------------------------------------------------


def _batches(cfg: EvalConfig, loaded: LoadedModel) -> Iterator[list[LabelledContext]]:
    stream = source_contexts(cfg.source, cfg.text_field, loaded.tokenizer, cfg.context_len)
    total = -(-cfg.tokens // cfg.context_len)
    contexts = itertools.islice(stream, total)
    while chunk := list(itertools.islice(contexts, cfg.batch_size)):
        yield chunk


def _check_finite(t: Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise OpenscopeError(f"{what} contain NaN or inf")


class _LMSums:
    """Streaming sums of one splice's CE, KL and (optionally) zero-ablation CE."""

    def __init__(self) -> None:
        self.ce = m.MeanSum()
        self.kl = m.MeanSum()
        self.ce_zero = m.MeanSum()

    def result(self, ce_clean: float) -> LMMetrics:
        zero = self.ce_zero.mean if self.ce_zero.count else None
        recovered = m.loss_recovered(ce_clean, self.ce.mean, zero) if zero is not None else None
        return LMMetrics(ce_clean, self.ce.mean, self.ce.mean - ce_clean, self.kl.mean, zero, recovered)


def evaluate(
    cfg: EvalConfig,
    loaded: LoadedModel | None = None,
    dictionaries: Sequence[Dictionary] | None = None,
    progress: bool = True,
) -> EvalReport:
    """Evaluate dictionaries and write the report. Pass `loaded` and/or `dictionaries` to use ones
    already in memory (then cfg.dictionaries is not read)."""
    if cfg.tokens < 1 or cfg.context_len < 2 or cfg.batch_size < 1 or cfg.histogram_bins < 1:
        raise OpenscopeError(
            "tokens, batch_size and histogram_bins must be positive and context_len at least 2"
        )
    device = resolve_device(cfg.device)
    inputs = [
        *cfg.dictionaries,
        *(p for p in [split_slice(cfg.source)[0].removeprefix("chat:")] if Path(p).exists()),
    ]
    check_report_output(cfg.output, cfg.overwrite, inputs)  # a bad --output is refused before the work
    if role_ids(cfg.roles) and not is_chat_source(cfg.source):
        raise OpenscopeError(f"--roles needs a chat source (sharegpt or chat:PATH), not {cfg.source!r}")
    if dictionaries is None:
        folders = dictionary_folders(cfg.dictionaries)
        if loaded is None and cfg.model:
            loaded = load_model(cfg.model, device=device, cache_dir=cfg.cache_dir)
        # Without a model yet, folders are read first: their config.json names the model to load.
        dictionaries = [load_dictionary(f, loaded) for f in folders]
    if loaded is None:
        loaded = load_model(cfg.model or model_of(dictionaries), device=device, cache_dir=cfg.cache_dir)
    dicts = unique_names(list(dictionaries))
    if not dicts:
        raise OpenscopeError("no dictionaries to evaluate")
    for d in dicts:
        validate_dictionary(d, loaded)
    if cfg.all_at_once:
        check_dictionaries(loaded, dicts, "--all-at-once needs at most one dictionary per site")
    for d in dicts:
        d.coder.to(loaded.device).eval()
    log.info("evaluating %d dictionaries on %s with %s", len(dicts), loaded.name, cfg.source)

    sums = _run(cfg, loaded, dicts, progress)
    ce_clean = sums.clean.mean
    reports = []
    for d in dicts:
        recon = sums.recon[d.name].result()
        reports.append(
            DictionaryReport(
                name=d.name,
                site_in=d.site_in.name,
                site_out=d.site_out.name,
                kind=d.coder.kind,
                n_layers=d.n_layers,
                width=d.coder.cfg.width * d.n_layers,
                folder=str(d.folder) if d.folder is not None else None,
                recon=recon,
                histogram=m.frequency_histogram(recon.frequencies, cfg.histogram_bins, recon.n_tokens),
                lm=sums.lm[d.name].result(ce_clean),
                layers=tuple(s.result() for s in sums.layer_recon.get(d.name, [])),
                model_layers=tuple(s.layer for s in d.sites_in) if d.is_multilayer else (),
            )
        )
    report = EvalReport(
        model=loaded.name,
        source=cfg.source,
        n_contexts=sums.n_contexts,
        n_tokens=sums.n_tokens,
        n_ce_positions=sums.clean.count,
        dictionaries=reports,
        joint=sums.joint.result(ce_clean) if sums.joint is not None else None,
        seconds=sums.seconds,
        tokens_per_s=sums.n_contexts * cfg.context_len / sums.seconds if sums.seconds > 0 else 0.0,
        files=[],
    )
    files = write_report(report, cfg.output, cfg, cfg.overwrite)
    return report._replace(files=files)


class _RunSums(NamedTuple):
    clean: m.MeanSum
    recon: dict[str, m.ReconstructionSums]
    lm: dict[str, _LMSums]
    joint: _LMSums | None
    n_contexts: int
    n_tokens: int
    seconds: float
    layer_recon: dict[str, list[m.ReconstructionSums]]
    """Per layer of each multi-layer dictionary (CLT, crosscoder), by name."""


@torch.inference_mode()
def _run(cfg: EvalConfig, loaded: LoadedModel, dicts: list[Dictionary], progress: bool) -> _RunSums:
    tok = loaded.tokenizer
    device = loaded.device
    sites = sorted({s for d in dicts for s in (*d.sites_in, *d.sites_out)}, key=lambda s: s.order)
    clean = m.MeanSum()
    recon = {
        d.name: m.ReconstructionSums(d.coder.cfg.width * d.n_layers, d.coder.cfg.d_out * d.n_layers)
        for d in dicts
    }
    layer_recon = {
        d.name: [m.ReconstructionSums(d.coder.cfg.width, d.coder.cfg.d_out) for _ in range(d.n_layers)]
        for d in dicts
        if d.is_multilayer
    }
    lm = {d.name: _LMSums() for d in dicts}
    joint = _LMSums() if cfg.all_at_once else None
    n_contexts = n_tokens = 0
    total = -(-cfg.tokens // cfg.context_len) * cfg.context_len
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc="eval", disable=not progress, dynamic_ncols=True
    )
    wanted = role_ids(cfg.roles)
    start = time.perf_counter()
    with bar:
        for chunk in _batches(cfg, loaded):
            batch = to_batch([c.input_ids for c in chunk], tok)
            ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
            keep = keep_mask(ids, tok)
            measured = keep
            if wanted:  # chat data: only tokens of the chosen roles are measured (all are spliced)
                roles = torch.tensor([c.roles for c in chunk], device=device)
                measured = keep & torch.isin(roles, torch.tensor(wanted, device=device))
            rows = measured.reshape(-1).nonzero().squeeze(1)
            mask = m.ce_positions(keep) & measured[:, 1:]

            def forward(ids: Tensor = ids, attn: Tensor = attn) -> Tensor:
                return loaded.model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()

            # The clean forward, once: its kept activations and logits serve every dictionary.
            acts: dict[Site, Tensor] = {}
            readers = {s: _kept_reader(acts, s, rows) for s in sites}
            with reading(loaded, readers, stop=False):
                logits = forward()
            for s in sites:
                _check_finite(acts[s], f"the model's activations at site {s.name}")
            _check_finite(logits, "the clean model's logits")
            clean.add(m.next_token_ce(logits, ids), mask)

            for d in dicts:
                target, recon_y, latents = clean_reconstruction(d, acts)
                _check_finite(recon_y, f"reconstructions of dictionary {d.name}")
                recon[d.name].add(target, recon_y, latents)
                for i, layer_sums in enumerate(layer_recon.get(d.name, [])):
                    layer_sums.add(*(_layer_part(t, d.n_layers, i) for t in (target, recon_y, latents)))

            # Dictionaries that write the same sites share one zero-ablation forward per batch.
            zero_ce: dict[tuple[Site, ...], Tensor] = {}
            for d in dicts:
                _splice_into(lm[d.name], loaded, [d], keep, mask, ids, logits, forward, d.name)
                if cfg.loss_recovered:
                    if d.sites_out not in zero_ce:
                        zero_ce[d.sites_out] = _zero_ablated_ce(loaded, d.sites_out, keep, ids, forward)
                    lm[d.name].ce_zero.add(zero_ce[d.sites_out], mask)
            if joint is not None:
                _splice_into(joint, loaded, dicts, keep, mask, ids, logits, forward, "all dictionaries")
                if cfg.loss_recovered:
                    outs = tuple(sorted({s for d in dicts for s in d.sites_out}, key=lambda s: s.order))
                    joint.ce_zero.add(_zero_ablated_ce(loaded, outs, keep, ids, forward), mask)

            n_contexts += len(chunk)
            n_tokens += len(rows)
            bar.update(ids.numel())
    if n_contexts == 0:
        raise OpenscopeError(f"text source {cfg.source!r} gave no contexts")
    if n_contexts * cfg.context_len < total:
        log.warning("the text source ran out after %d contexts", n_contexts)
    if clean.count == 0:
        raise OpenscopeError(
            "no position to measure: every token was BOS, EOS or padding"
            + (f", or not of the roles {cfg.roles!r}" if cfg.roles else "")
        )
    seconds = time.perf_counter() - start
    return _RunSums(clean, recon, lm, joint, n_contexts, n_tokens, seconds, layer_recon)


def clean_reconstruction(d: Dictionary, acts: dict[Site, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(target [N, L·d_out], reconstruction [N, L·d_out], latents [N, L·F]) of a dictionary on clean
    activations [N, width] per site; a CLT's (or crosscoder's) L layers sit side by side, so FVU pools its
    layers (each dimension keeps its own mean) and L0 counts its latents over all layers (L = 1: the plain
    tensors)."""
    recon, latents = d.coder.reconstruct([acts[s] for s in d.sites_in])
    y = torch.stack([acts[s] for s in d.sites_out])

    def side_by_side(t: Tensor) -> Tensor:
        return t.transpose(0, 1).reshape(t.shape[1], -1)

    return side_by_side(y), side_by_side(recon), side_by_side(latents)


def _layer_part(t: Tensor, n_layers: int, i: int) -> Tensor:
    """Layer i's columns [N, w] of a CLT's side-by-side [N, n_layers·w] tensor (`clean_reconstruction`)."""
    return t.reshape(t.shape[0], n_layers, -1)[:, i]


def _kept_reader(acts: dict[Site, Tensor], site: Site, rows: Tensor) -> Callable[[Tensor], None]:
    def read(x: Tensor) -> None:
        acts[site] = x.reshape(-1, x.shape[-1]).index_select(0, rows).float()

    return read


def _splice_into(
    sums: _LMSums,
    loaded: LoadedModel,
    dicts: list[Dictionary],
    keep: Tensor,
    mask: Tensor,
    ids: Tensor,
    clean_logits: Tensor,
    forward: Callable[[], Tensor],
    what: str,
) -> None:
    with spliced(loaded, dicts, keep=keep):
        logits = forward()
    _check_finite(logits, f"logits with {what} spliced in")
    sums.ce.add(m.next_token_ce(logits, ids), mask)
    sums.kl.add(m.next_token_kl(clean_logits, logits)[:, :-1], mask)


def _zero_ablated_ce(
    loaded: LoadedModel, sites: Sequence[Site], keep: Tensor, ids: Tensor, forward: Callable[[], Tensor]
) -> Tensor:
    with ablated(loaded, sites, keep=keep):
        logits = forward()
    return m.next_token_ce(logits, ids)
