"""`evaluate`: measure dictionaries on held-out text and write report.json, report.md and plots.

Per batch: one clean forward captures every site the dictionaries read or write; it serves every
dictionary. Reconstruction metrics (L0, FVU, MSE, dead/dense, firing frequencies) come from the clean
activations; a cross-layer transcoder or a crosscoder gets them pooled over its layers and for each layer
alone. Then each dictionary alone is spliced in (a CLT or crosscoder with all its layers at once) for its
CE and KL to the clean next-token distribution, each distinct set of output sites is zero-ablated for
CE_zero (loss recovered), shared by the dictionaries writing it, and with `all_at_once` every dictionary
is spliced at once for the joint numbers. BOS/EOS/pad positions are never spliced or counted.

Those altered forwards restart at the first block their hooks touch from the clean forward's record,
and only the counted positions go through the 262k-entry unembedding (`openscope.eval.restart`);
`evaluate(..., fast=False)` runs the full-forward reference instead. All sums are float64 and streamed:
no per-token values are kept.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

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
from openscope.data.labelled import LabelledSet, labelled_set
from openscope.data.packing import to_batch
from openscope.data.sources import is_chat_source, split_slice
from openscope.errors import OpenscopeError
from openscope.eval import metrics as m
from openscope.eval import saebench as sb
from openscope.eval.absorption import AbsorptionReport, run_absorption
from openscope.eval.prefixes import prefix_curve, prefix_dictionaries, prefix_point
from openscope.eval.probing import ProbingReport, run_probing
from openscope.eval.report import write_report
from openscope.eval.restart import (
    BatchLosses,
    Variant,
    check_finite,
    clean_forward,
    full_losses,
    restarted_losses,
)
from openscope.eval.results import DictionaryReport, EvalConfig, EvalReport, LMMetrics
from openscope.eval.splice import ablated, check_dictionaries, spliced
from openscope.models.load import LoadedModel, load_model, resolve_device
from openscope.models.restart import RestartUnsupported, unembedding
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


class _LMSums:
    """Streaming sums of one splice's CE, KL and (optionally) zero-ablation CE."""

    def __init__(self) -> None:
        self.ce = m.MeanSum()
        self.kl = m.MeanSum()
        self.ce_zero = m.MeanSum()
        self.kl_zero = m.MeanSum()

    def result(self, ce_clean: float) -> LMMetrics:
        zero = self.ce_zero.mean if self.ce_zero.count else None
        recovered = m.loss_recovered(ce_clean, self.ce.mean, zero) if zero is not None else None
        kl_zero = self.kl_zero.mean if self.kl_zero.count else None
        return LMMetrics(
            ce_clean, self.ce.mean, self.ce.mean - ce_clean, self.kl.mean, zero, recovered, kl_zero
        )

    def add(self, losses: BatchLosses, splice: int, zero: int | None) -> None:
        """Add a batch: the CE and KL of its variant `splice`, and of its zero-ablation `zero` (if any)."""
        self.ce.add(losses.ce[splice], losses.mask)
        self.kl.add(losses.kl[splice], losses.mask)
        if zero is not None:
            self.ce_zero.add(losses.ce[zero], losses.mask)
            self.kl_zero.add(losses.kl[zero], losses.mask)


def evaluate(
    cfg: EvalConfig,
    loaded: LoadedModel | None = None,
    dictionaries: Sequence[Dictionary] | None = None,
    progress: bool = True,
    fast: bool = True,
) -> EvalReport:
    """Evaluate dictionaries and write the report. Pass `loaded` and/or `dictionaries` to use ones
    already in memory (then cfg.dictionaries is not read). `fast=False` runs the reference: a full
    forward with full logits per splice and ablation (same numbers up to float rounding, slower)."""
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
    labelled = _check_saebench_options(cfg)  # a bad labelled set is refused before the model loads
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
    cut = prefix_dictionaries(dicts, cfg.prefixes)
    log.info("evaluating %d dictionaries on %s with %s", len(dicts), loaded.name, cfg.source)

    sums = _run(cfg, loaded, dicts, progress, fast, [p for ps in cut.values() for _, p in ps])
    ce_clean = sums.clean.mean
    probing, absorption = _probing_and_absorption(cfg, loaded, dicts, labelled, progress)
    reports = []
    extra: dict[str, object] = {}
    for d in dicts:
        recon = sums.recon[d.name].result()
        lm = sums.lm[d.name].result(ce_clean)
        weights = sb.weight_metrics(d)
        if cfg.format == "saebench":
            extra |= _saebench_files(
                cfg, loaded.name, d, recon, lm, sums.core[d.name], weights, probing, absorption
            )
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
                lm=lm,
                layers=tuple(s.result() for s in sums.layer_recon.get(d.name, [])),
                model_layers=tuple(s.layer for s in d.sites_in) if d.is_multilayer else (),
                saebench=sb.core_metrics(recon, lm, lm.kl_zero, sums.core[d.name], weights),
                probing=probing.get(d.name),
                absorption=absorption.get(d.name),
                prefixes=prefix_curve(
                    [
                        prefix_point(p, sums.recon[c.name].result(), sums.lm[c.name].result(ce_clean))
                        for p, c in cut.get(d.name, [])
                    ],
                    d.coder.cfg.width,
                    recon,
                    lm,
                ),
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
    files = write_report(report, cfg.output, cfg, cfg.overwrite, extra=extra)
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
    core: dict[str, sb.CoreSums]
    """SAEBench's core sums of each dictionary, by name."""


@torch.inference_mode()
def _run(
    cfg: EvalConfig,
    loaded: LoadedModel,
    spliced: list[Dictionary],
    progress: bool,
    fast: bool,
    prefixes: Sequence[Dictionary] = (),
) -> _RunSums:
    """The streamed sums of every dictionary; `prefixes` (Matryoshka prefixes cut as dictionaries) are
    measured alone like the others but never spliced with --all-at-once."""
    dicts = [*spliced, *prefixes]
    sites = sorted({s for d in dicts for s in (*d.sites_in, *d.sites_out)}, key=lambda s: s.order)
    recon = {
        d.name: m.ReconstructionSums(d.coder.cfg.width * d.n_layers, d.coder.cfg.d_out * d.n_layers)
        for d in dicts
    }
    layer_recon = {
        d.name: [m.ReconstructionSums(d.coder.cfg.width, d.coder.cfg.d_out) for _ in range(d.n_layers)]
        for d in dicts
        if d.is_multilayer
    }
    sums = _RunSums(
        m.MeanSum(),
        recon,
        {d.name: _LMSums() for d in dicts},
        _LMSums() if cfg.all_at_once else None,
        0,
        0,
        0.0,
        layer_recon,
        {d.name: sb.CoreSums(d.coder.cfg.width * d.n_layers) for d in dicts},
    )
    fast = fast and _restartable(loaded)
    total = -(-cfg.tokens // cfg.context_len) * cfg.context_len
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc="eval", disable=not progress, dynamic_ncols=True
    )
    start = time.perf_counter()
    with bar:
        for chunk in _batches(cfg, loaded):
            n_tokens, fast = _batch(cfg, loaded, (dicts, spliced), sites, chunk, sums, fast)
            sums = sums._replace(n_contexts=sums.n_contexts + len(chunk), n_tokens=sums.n_tokens + n_tokens)
            bar.update(len(chunk) * cfg.context_len)
    if sums.n_contexts == 0:
        raise OpenscopeError(f"text source {cfg.source!r} gave no contexts")
    if sums.n_contexts * cfg.context_len < total:
        log.warning("the text source ran out after %d contexts", sums.n_contexts)
    if sums.clean.count == 0:
        raise OpenscopeError(
            "no position to measure: every token was BOS, EOS or padding"
            + (f", or not of the roles {cfg.roles!r}" if cfg.roles else "")
        )
    return sums._replace(seconds=time.perf_counter() - start)


def _restartable(loaded: LoadedModel) -> bool:
    """Whether the model's final norm and head are found, so forwards can restart (else full forwards)."""
    try:
        unembedding(loaded)
    except RestartUnsupported as exc:
        log.info("full forwards for every splice: %s", exc)
        return False
    return True


def _batch(
    cfg: EvalConfig,
    loaded: LoadedModel,
    measured_and_joint: tuple[list[Dictionary], list[Dictionary]],
    sites: list[Site],
    chunk: list[LabelledContext],
    sums: _RunSums,
    fast: bool,
) -> tuple[int, bool]:
    """Add one batch to the sums of every dictionary measured (the second list: those --all-at-once
    splices together); (tokens measured, whether restarts still work on this model)."""
    dicts, joint_dicts = measured_and_joint
    tok, device = loaded.tokenizer, loaded.device
    batch = to_batch([c.input_ids for c in chunk], tok)
    ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
    keep = keep_mask(ids, tok)
    measured = keep
    if wanted := role_ids(cfg.roles):  # chat data: only tokens of the chosen roles are measured
        roles = torch.tensor([c.roles for c in chunk], device=device)
        measured = keep & torch.isin(roles, torch.tensor(wanted, device=device))
    rows = measured.reshape(-1).nonzero().squeeze(1)
    mask = m.ce_positions(keep) & measured[:, 1:]
    plan = _plan(loaded, dicts, cfg, keep, joint_dicts)

    # The clean forward, once: its kept activations (and logits, or the record restarts start from)
    # serve every dictionary.
    acts: dict[Site, Tensor] = {}
    readers = {s: _kept_reader(acts, s, rows) for s in sites}

    def after_clean() -> None:
        for s in sites:
            check_finite(acts[s], f"the model's activations at site {s.name}")
        for d in dicts:
            target, recon_y, latents = clean_reconstruction(d, acts)
            check_finite(recon_y, f"reconstructions of dictionary {d.name}")
            sums.recon[d.name].add(target, recon_y, latents)
            sums.core[d.name].add(target, recon_y, latents, rows // ids.shape[1] + sums.n_contexts)
            for i, layer_sums in enumerate(sums.layer_recon.get(d.name, [])):
                layer_sums.add(*(_layer_part(t, d.n_layers, i) for t in (target, recon_y, latents)))

    losses = None
    if fast:
        try:
            prefix = clean_forward(loaded, ids, attn, readers, min(v.start for v in plan.variants))
        except RestartUnsupported as exc:
            log.warning("full forwards for every splice from now on: %s", exc)
            fast = False
        else:
            after_clean()
            losses = restarted_losses(loaded, prefix, plan.variants, mask, ids)
    if losses is None:
        losses = full_losses(loaded, ids, attn, readers, plan.variants, mask, after_clean)
    sums.clean.add(losses.ce_clean, losses.mask)
    for d in dicts:
        sums.lm[d.name].add(losses, plan.splice[d.name], plan.zero.get(d.name))
    if sums.joint is not None and plan.joint is not None:
        sums.joint.add(losses, plan.joint, plan.joint_zero)
    return len(rows), fast


class _Plan(NamedTuple):
    """The altered forwards of one batch, and which serves what (indices into variants)."""

    variants: list[Variant]
    splice: dict[str, int]
    """Each dictionary alone spliced in, by name."""
    zero: dict[str, int]
    """Its output sites zero-ablated, by dictionary name (shared by dictionaries writing the same sites)."""
    joint: int | None
    joint_zero: int | None


def _plan(
    loaded: LoadedModel, dicts: list[Dictionary], cfg: EvalConfig, keep: Tensor, joint_dicts: list[Dictionary]
) -> _Plan:
    variants: list[Variant] = []

    def add(what: str, sites: Sequence[Site], hooks: Callable[[], AbstractContextManager[Any]]) -> int:
        variants.append(Variant(what, tuple(sites), hooks))
        return len(variants) - 1

    splice: dict[str, int] = {}
    zero: dict[str, int] = {}
    zero_of: dict[tuple[Site, ...], int] = {}
    for d in dicts:
        splice[d.name] = add(
            f"{d.name} spliced in", (*d.sites_in, *d.sites_out), partial(spliced, loaded, [d], keep=keep)
        )
        if cfg.loss_recovered:
            if d.sites_out not in zero_of:
                names = ", ".join(s.name for s in d.sites_out)
                zero_of[d.sites_out] = add(
                    f"{names} zero-ablated", d.sites_out, partial(ablated, loaded, d.sites_out, keep=keep)
                )
            zero[d.name] = zero_of[d.sites_out]
    joint = joint_zero = None
    if cfg.all_at_once:
        every = [s for d in joint_dicts for s in (*d.sites_in, *d.sites_out)]
        joint = add("all dictionaries spliced in", every, partial(spliced, loaded, joint_dicts, keep=keep))
        if cfg.loss_recovered:
            outs = tuple(sorted({s for d in joint_dicts for s in d.sites_out}, key=lambda s: s.order))
            joint_zero = add(
                "every output site zero-ablated", outs, partial(ablated, loaded, outs, keep=keep)
            )
    return _Plan(variants, splice, zero, joint, joint_zero)


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


# ---- SAEBench's evals and files ----------------------------------------------------------------------


def _probing_and_absorption(
    cfg: EvalConfig, loaded: LoadedModel, dicts: list[Dictionary], labelled: list[LabelledSet], progress: bool
) -> tuple[dict[str, ProbingReport], dict[str, AbsorptionReport]]:
    """Sparse probing and absorption of each dictionary, by name, as far as asked for."""
    probing = (
        run_probing(
            loaded,
            dicts,
            labelled,
            seed=cfg.seed,
            context_len=cfg.probing_context_len,
            batch_size=cfg.batch_size,
            per_class=cfg.probing_texts,
            progress=progress,
        )
        if cfg.probing
        else {}
    )
    absorption = (
        run_absorption(loaded, dicts, cfg.absorption_words, seed=cfg.seed, progress=progress)
        if cfg.absorption
        else {}
    )
    return probing, absorption


def _check_saebench_options(cfg: EvalConfig) -> list[LabelledSet]:
    """Refuse bad --format / --probing / --absorption values; the labelled sets --probing reads."""
    if cfg.format not in ("openscope", "saebench"):
        raise OpenscopeError(f"--format must be openscope or saebench, not {cfg.format!r}")
    if cfg.absorption and cfg.absorption_words < 10:
        raise OpenscopeError(f"--absorption-words must be at least 10, got {cfg.absorption_words}")
    if not cfg.probing:
        return []
    if cfg.probing_context_len < 2:
        raise OpenscopeError(f"--probing-context-len must be at least 2, got {cfg.probing_context_len}")
    tasks = [t.strip() for t in cfg.probing_tasks.split(",") if t.strip()]
    if not tasks:
        raise OpenscopeError("--probing needs at least one labelled set in --probing-tasks")
    return [labelled_set(t, cfg.probing_texts, cfg.seed) for t in tasks]


def _saebench_files(
    cfg: EvalConfig,
    model: str,
    d: Dictionary,
    recon: m.ReconstructionMetrics,
    lm: LMMetrics,
    sums: sb.CoreSums,
    weights: dict[str, Tensor] | None,
    probing: dict[str, ProbingReport],
    absorption: dict[str, AbsorptionReport],
) -> dict[str, object]:
    """SAEBench's result files of one dictionary: relative path -> JSON."""
    core_cfg = {
        "model_name": model,
        "batch_size_prompts": cfg.batch_size,
        "dataset": cfg.source,
        "context_size": cfg.context_len,
        "compute_kl": cfg.loss_recovered,
        "compute_ce_loss": cfg.loss_recovered,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": weights is not None,
        "exclude_special_tokens_from_reconstruction": True,
    }
    metrics = sb.core_metrics(recon, lm, lm.kl_zero, sums, weights)
    out: dict[str, object] = {
        sb.result_path(sb.CORE, d.name): sb.eval_output(
            sb.CORE, core_cfg, metrics, sb.core_details(recon, sums, weights), d, model
        )
    }
    if d.name in probing:
        out[sb.result_path(sb.SPARSE_PROBING, d.name)] = sb.probing_output(probing[d.name], d, model)
    if d.name in absorption:
        out[sb.result_path(sb.ABSORPTION, d.name)] = sb.absorption_output(absorption[d.name], d, model)
    return out
