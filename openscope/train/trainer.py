"""The single-layer trainer: one pass over shuffled batches feeds every dictionary of the run.

Each site named in `sites` gets one dictionary per width and target L0 (an SAE on that site, or a
transcoder from a layer's `mlp_in` to its `mlp_out`). All read the same batch, so one harvest (or one
live model forward) serves every layer, width and target; a dictionary's seed is that of its site, so
it ends the same as when trained alone. Checkpoints hold weights, Adam state, dead-latent counters
and the step; the batch order is a pure function of the seed, so a resumed run sees exactly
the batches an uninterrupted one would and ends with the same dictionaries (`openscope.train.loop`).
`--kind clt` trains one cross-layer transcoder over many layers instead (`openscope.train.clt`).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from openscope.activations.batches import ActivationBatch
from openscope.coders import CoderConfig, SparseCoder, ThresholdEstimator, topk_to_jumprelu
from openscope.coders.dictionary import find_dictionaries, load_dictionary
from openscope.coders.io import save_coder
from openscope.coders.matryoshka import check_width, parse_matryoshka
from openscope.config import check_numbers, flag, save_json, to_jsonable
from openscope.errors import OpenscopeError
from openscope.files import Staged
from openscope.models.load import resolve_device
from openscope.train.clt import CLT_KINDS, train_clt
from openscope.train.config import (
    TrainConfig,
    TrainResult,
    dictionaries_per_site,
    number_text,
    result_key,
    target_l0s,
    widths,
)
from openscope.train.finetune import KLFineTune, KLTerm, check_finetune
from openscope.train.logs import Logs, check_logs, heldout_row, open_logs
from openscope.train.loop import (
    CHECKPOINT,
    METRICS,
    RunLayout,
    TrainingData,
    check_precision,
    first_then_rest,
    from_store,
    live,
    open_run,
    replica_batches,
    run_identity,
    run_layout,
    run_steps,
    save_checkpoint,
    start_step,
    step_config,
)
from openscope.train.parallel import Replicas, training_device, update_thresholds
from openscope.train.steps import DeadLatentTracker, StepConfig, make_optimizer, train_step

log = logging.getLogger(__name__)


SINGLE_LAYER_KINDS = ("sae", "transcoder", "skip_transcoder")
"""The kinds this trainer trains (one site in, one out); several widths and targets each."""


class _Spec(NamedTuple):
    """One dictionary of a run: its sites, its width and target L0, and its seed."""

    site_in: str
    site_out: str
    site_index: int
    """The index of its site in the run: its seed is the run's seed + this (the same however many
    widths and targets train beside it)."""
    width: int
    target_l0: float


class _Dictionary:
    """One dictionary's training state."""

    def __init__(
        self,
        spec: _Spec,
        key: str,
        coder: SparseCoder,
        step_cfg: StepConfig,
        lr: float,
        threshold_lr_scale: float,
        dead_after: int,
    ):
        self.spec, self.key, self.step_cfg = spec, key, step_cfg
        self.site_in, self.site_out = spec.site_in, spec.site_out
        self.coder = coder
        self.optimizer = make_optimizer(coder, lr, threshold_lr_scale)
        self.tracker = DeadLatentTracker(coder.cfg.width, dead_after)
        self.thresholds = ThresholdEstimator(coder.cfg.width)
        """BatchTopK: the batches' cut-offs over the run's last tenth, for the JumpReLU file."""
        self.last: dict[str, float] = {}
        self.failed: str | None = None
        """Why this dictionary stopped training (a run that isolates failures), else None."""
        self.replicas: Replicas | None = None
        """Its data-parallel replicas under torchrun (None: it trains on whole batches)."""
        self.finetune: KLTerm | None = None
        """--finetune kl: its KL term (None: plain training)."""

    def state(self) -> dict[str, Any]:
        t = self.thresholds
        return {
            "coder": self.coder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tracker.tokens_since_fired,
            "last": self.last,
            "thresholds": [t.batches, t.global_sum, t.latent_sum, t.latent_batches],
            **({"failed": self.failed} if self.failed is not None else {}),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.coder.load_state_dict(state["coder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.tokens_since_fired = state["tokens_since_fired"]
        self.last = dict(state["last"])
        self.failed = state.get("failed")
        t = self.thresholds
        t.batches, t.global_sum, t.latent_sum, t.latent_batches = state["thresholds"]

    def saved_coder(self) -> SparseCoder:
        """What goes to disk: a BatchTopK coder becomes JumpReLU with the batches' mean cut-off as
        its one threshold (Bussmann et al.), so every Gemma Scope reader can use it."""
        if self.coder.cfg.activation != "batchtopk" or self.thresholds.batches == 0:
            return self.coder
        return topk_to_jumprelu(self.coder, self.thresholds.threshold().to(self.coder.w_enc.device))


def _pairs(cfg: TrainConfig, data: TrainingData, names: list[str]) -> list[tuple[str, str]]:
    """(input site, target site) per dictionary."""
    if cfg.kind != "sae" and cfg.sites == "all":
        names = [n for n in names if n.endswith(".mlp_in")]
    if not names:
        raise OpenscopeError(f"no sites to train on; the data has {', '.join(data.widths)}")
    pairs = []
    for name in names:
        if cfg.kind == "sae":
            pairs.append((name, name))
            continue
        if not name.endswith(".mlp_in"):
            raise OpenscopeError(f"a {cfg.kind} reads an mlp_in site, not {name!r}")
        target = name.replace(".mlp_in", ".mlp_out")
        if target not in data.widths:
            raise OpenscopeError(f"a {cfg.kind} on {name} needs {target}, which the data does not hold")
        pairs.append((name, target))
    return pairs


def _specs(cfg: TrainConfig, pairs: list[tuple[str, str]]) -> list[_Spec]:
    """Every dictionary of the run: per site, per width, per target L0 (in the order given)."""
    return [
        _Spec(site_in, site_out, i, w, t)
        for i, (site_in, site_out) in enumerate(pairs)
        for w in widths(cfg)
        for t in target_l0s(cfg)
    ]


def _folder_name(spec: _Spec, cfg: TrainConfig) -> str:
    """`{site}_{kind}_{activation}_w{width}`, and `_l0_{target}` when a site has several dictionaries."""
    name = f"{spec.site_in.replace('.', '_')}_{cfg.kind}_{cfg.activation}_w{spec.width}"
    return name if dictionaries_per_site(cfg) == 1 else f"{name}_l0_{number_text(spec.target_l0)}"


def train(
    cfg: TrainConfig, progress: bool = True, stop_after: int | None = None, isolate_failures: bool = False
) -> TrainResult:
    """Train every dictionary of the run (per site, one per width and target L0); `stop_after` ends
    early (as a crash would) after that many steps. `isolate_failures` (many dictionaries from one pass,
    as a suite runs them): a dictionary whose loss or data turns non-finite stops, is reported in
    `TrainResult.failed` and not saved, and the others go on; otherwise the first such error ends the run.

    Under `torchrun`, the ranks form dictionary groups x data-parallel replicas (`--data-parallel`,
    `openscope.train.parallel`): dictionary i goes to group i mod groups, each replica of a group trains
    on its rows of every global batch with batch statistics reduced and gradients averaged, so the
    result equals a single-process run (live, each replica runs the model on its own share of the
    contexts: other batches than one process's, of the same distribution). Each group's first replica
    checkpoints its dictionaries.
    """
    _check_config(cfg)
    if cfg.kind in CLT_KINDS:
        return train_clt(cfg, progress, stop_after)
    device = training_device(cfg.device)
    ft = KLFineTune(cfg, device) if cfg.finetune else None
    data, names = (ft.data, ft.names) if ft else live(cfg, device) if cfg.model else from_store(cfg, device)
    specs = _specs(cfg, _pairs(cfg, data, names))
    par = run_layout(cfg, len(specs), device)
    lay = par.layout
    total_steps = math.ceil(cfg.tokens / cfg.batch_size)
    step_cfgs = {t: step_config(cfg, total_steps, t, par.bf16) for t in target_l0s(cfg)}  # each target's own
    run = open_run(cfg, lay, create=False)
    out = run.folder
    identity = {**run_identity(cfg), **par.identity()}
    checkpoint = out / par.file(CHECKPOINT)
    metrics_path = out / par.file(METRICS)

    dicts = [
        _new_dictionary(cfg, data, spec, device, step_cfgs[spec.target_l0], par.replicas)
        for i, spec in enumerate(specs)
        if i % lay.groups == lay.group
    ]
    if cfg.init_from is not None:
        _start_from_saved(dicts, Path(cfg.init_from), cfg)
    if ft is not None:
        for d in dicts:
            d.finetune = ft.term(d.site_out)
    first = start_step(cfg, checkpoint, identity, dicts, metrics_path if par.writes else None)

    sites = sorted({s for d in dicts for s in (d.site_in, d.site_out)})
    batches = first_then_rest(replica_batches(data, sites, first, par) if dicts else iter(()))
    run = open_run(cfg, lay)  # the data gave its first batch: now the run's folder is made
    metrics = metrics_path.open("a") if par.writes else io.StringIO()  # other replicas write nothing
    logs = (
        open_logs(cfg, out, metrics, first, (lay.group, lay.groups), sites, total_steps)
        if par.writes
        else Logs([])
    )
    t0 = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=first,
        unit="step",
        desc=f"train{f' rank {lay.rank}' if lay.world > 1 else ''}",
        disable=not progress or not dicts or not par.writes,
        dynamic_ncols=True,
    )

    def one_step(step_index: int, batch: ActivationBatch) -> None:
        # `batch` holds this replica's rows only (`replica_batches`).
        batch = batch.to(device)  # once for all widths; without blocking from page-locked memory
        reps = par.replicas
        if step_index == 0:  # every replica starts from the whole first batch, so all start alike
            _calibrate(dicts, _whole_batch(batch, sites, reps), cfg, device)
        finite = None if reps is None else _finite_everywhere(batch, sites, reps)
        for d in dicts:
            if d.failed is None:
                args = (cfg, step_index, total_steps, device, logs)
                _train_isolated(d, batch, *args, isolate_failures, finite)
        bar.update(1)
        bar.set_postfix_str(_postfix(dicts), refresh=False)

    end = total_steps if stop_after is None else min(total_steps, stop_after)
    save = par.writes and bool(dicts)
    step = run_steps(
        batches,
        first,
        end,
        one_step,
        cfg.checkpoint_every,
        lambda step: save_checkpoint(checkpoint, step, dicts, identity, metrics) if save else None,
        bar,
        logs,
    )
    if save:
        with metrics_path.open("a") as tail:
            save_checkpoint(checkpoint, step, dicts, identity, tail)
    finals = {d.key: d.last for d in dicts}
    failed = {d.key: d.failed for d in dicts if d.failed is not None}
    if stop_after is not None and step < total_steps:
        return TrainResult({}, step, finals, time.perf_counter() - t0, failed if isolate_failures else None)
    if dicts and len(failed) == len(dicts):  # nothing left to save: the run fails, with the first reason
        raise OpenscopeError(next(iter(failed.values())))
    folders, finals = _finish(dicts, cfg, data, run, step, par)
    return TrainResult(folders, step, finals, time.perf_counter() - t0, failed if isolate_failures else None)


def _whole_batch(batch: ActivationBatch, sites: list[str], reps: Replicas | None) -> ActivationBatch:
    """The global batch of which `batch` holds this replica's rows (its sites' activations gathered from
    every replica; `batch` itself with one replica)."""
    if reps is None:
        return batch
    return batch._replace(acts={s: reps.gather_rows(batch.acts[s]) for s in sites})


def _finish(
    dicts: list[_Dictionary], cfg: TrainConfig, data: TrainingData, run: Staged, step: int, par: RunLayout
) -> tuple[dict[str, Path], dict[str, dict[str, float]]]:
    """Save the dictionaries (each group's first replica), gather every rank's folders and final
    metrics, and on rank 0 write run.json and commit the run's folder: (folders, final metrics)."""
    lay, out = par.layout, run.folder
    finals = {d.key: d.last for d in dicts}
    folders = {d.key: _save(d, cfg, data, out, step) for d in dicts if d.failed is None and par.writes}
    if lay.world > 1:
        folders, finals = _gather(folders, finals, lay.world)
    if lay.rank == 0:
        layout = {"world_size": lay.world} | ({"data_parallel": lay.replicas} if lay.replicas > 1 else {})
        save_json(out / "run.json", {"config": cfg, "steps": step, **layout, "final": finals})
        run.commit()
    return {key: Path(cfg.output) / folder.name for key, folder in folders.items()}, finals


def _check_config(cfg: TrainConfig) -> None:
    """Numbers in range, a valid --matryoshka and device: checked before anything is read or written."""
    check_numbers(
        cfg,
        positive=(
            "batch_size",
            "tokens",
            "k",
            "lr",
            "checkpoint_every",
            "log_every",
            "block_tokens",
            "context_len",
            "init_threshold",
        ),
        non_negative=(
            "sparsity_coeff",
            "freq_coeff",
            "threshold_lr_scale",
            "lr_warmup_steps",
            "sparsity_warmup_steps",
            "data_parallel",
        ),
        fractions=("max_fire_rate", "lr_decay"),
    )
    spec = parse_matryoshka(cfg.matryoshka)
    for width in widths(cfg):
        check_width(spec, width)
    if cfg.init_greedy and (cfg.init_from is None or cfg.kind not in ("clt", "skip_clt")):
        raise OpenscopeError(
            "--init-greedy chooses a CLT's latents from --init-from transcoders: --kind clt or skip_clt"
        )
    check_logs(cfg)
    check_finetune(cfg)
    for name, values in (("width", widths(cfg)), ("target_l0", target_l0s(cfg))):
        if len(values) > 1 and cfg.kind not in SINGLE_LAYER_KINDS:
            raise OpenscopeError(
                f"{flag(name)} takes one value for --kind {cfg.kind} (a list trains several SAEs or "
                f"transcoders per site), got {getattr(cfg, name)!r}"
            )
    check_precision(cfg, resolve_device(cfg.device))


def _new_dictionary(
    cfg: TrainConfig,
    data: TrainingData,
    spec: _Spec,
    device: str,
    step_cfg: StepConfig,
    replicas: Replicas | None = None,
) -> _Dictionary:
    """A dictionary of the run, freshly initialised (the run's seed + its site's index) with its sites'
    normalisation scales, and its own step settings (its target L0) and data-parallel replicas."""
    ccfg = CoderConfig(
        d_in=data.widths[spec.site_in],
        d_out=data.widths[spec.site_out],
        width=spec.width,
        kind=cfg.kind,  # type: ignore[arg-type]
        activation=cfg.activation,  # type: ignore[arg-type]
        k=cfg.k,
        init_threshold=cfg.init_threshold or 0.001,
        seed=cfg.seed + spec.site_index,
    )
    coder = SparseCoder(ccfg)
    coder.set_scales(data.scales[spec.site_in], data.scales[spec.site_out])
    key = result_key(spec.site_in, spec.width, spec.target_l0, cfg)
    # A latent counts as dead after 1M tokens without firing (or the whole run, if shorter).
    d = _Dictionary(
        spec,
        key,
        coder.to(device),
        step_cfg,
        cfg.lr,
        cfg.threshold_lr_scale,
        min(cfg.dead_tokens, cfg.tokens),
    )
    d.replicas = replicas
    return d


def _gather(
    folders: dict[str, Path], finals: dict[str, dict[str, float]], world: int
) -> tuple[dict[str, Path], dict[str, dict[str, float]]]:
    """Every rank's dictionary folders and final metrics, on every rank (torchrun)."""
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (folders, finals))
    return (
        {k: v for f, _ in gathered for k, v in f.items()},
        {k: v for _, f in gathered for k, v in f.items()},
    )


def unfold_into(coder: SparseCoder, saved: SparseCoder) -> None:
    """Load a saved (folded, raw-unit) coder into a training coder that has its normalisation scales set:
    the inverse of the fold done at saving, so both compute the same function of raw activations."""
    keys = ("d_in", "d_out", "width", "kind", "activation", "k")
    differ = [k for k in keys if getattr(coder.cfg, k) != getattr(saved.cfg, k)]
    if differ:
        k = differ[0]
        raise OpenscopeError(
            f"--init-from: the saved dictionary has {k} {getattr(saved.cfg, k)!r}, this run {getattr(coder.cfg, k)!r}"
        )
    # Folding with scales 1/C is the inverse of folding with C (the saved coder has no pre-encoder bias).
    source = copy.deepcopy(saved).cpu().float()
    source.set_scales(1 / float(coder.scale_in), 1 / float(coder.scale_out))
    raw = source.fold()
    with torch.no_grad():
        for name, value in raw.named_parameters():
            getattr(coder, name).copy_(value)
        if coder.cfg.kind == "sae" and coder.cfg.pre_encoder_bias:
            coder.b_enc.add_(raw.b_dec @ raw.w_enc)  # the coder subtracts b_dec before encoding


def _start_from_saved(dicts: list[_Dictionary], folder: Path, cfg: TrainConfig) -> None:
    """--init-from for single-layer dictionaries: each starts from the saved one that reads its site
    (of its width, when the folder holds several widths for that site)."""
    saved, by_width = {}, {}
    for path in find_dictionaries(folder):
        d = load_dictionary(path)
        if isinstance(d.coder, SparseCoder):
            saved.setdefault(d.site_in.name, d)
            by_width.setdefault((d.site_in.name, d.coder.cfg.width), d)
    for d in dicts:
        if d.site_in not in saved:
            have = ", ".join(sorted(saved)) or "none"
            raise OpenscopeError(f"--init-from {folder} has no dictionary for {d.site_in} (it has: {have})")
        source = by_width.get((d.site_in, d.spec.width), saved[d.site_in])
        unfold_into(d.coder, cast(SparseCoder, source.coder).to(d.coder.w_enc.device))
        log.info("%s starts from %s", d.key, source.folder)


def _calibrate(dicts: list[_Dictionary], batch: ActivationBatch, cfg: TrainConfig, device: str) -> None:
    """Data-dependent initialisation from the first batch (unless --init-data-dependent is off):
    b_dec = the mean target, JumpReLU θ at the target sparsity (unless --init-threshold is given),
    transcoders' decoder rows turned to agree with their targets, and the encoder scaled so the first
    reconstructions have the right size."""
    if not cfg.init_data_dependent or cfg.init_from is not None:
        return
    for d in dicts:
        x = batch.acts[d.site_in].to(device)
        y = batch.acts[d.site_out].to(device)
        d.coder.init_decoder_bias_(y)
        if cfg.activation == "jumprelu" and cfg.init_threshold is None:
            d.coder.calibrate_threshold_(x, d.spec.target_l0, cfg.init_threshold_per_latent)
        if d.site_in != d.site_out:
            d.coder.align_decoder_signs_(x, y)
        s = d.coder.fit_encoder_scale_(x, y)
        log.info("%s: data-dependent init (encoder scale %.3g)", d.key, s)


def _finite_everywhere(batch: ActivationBatch, sites: list[str], replicas: Replicas) -> dict[str, bool]:
    """Per site, whether its rows are finite on every replica (one all-reduce): replicas see different
    rows, and must all stop together on bad data, or the others would wait on the one that stopped."""
    local = torch.stack([torch.isfinite(batch.acts[s]).all() for s in sites])
    return dict(zip(sites, replicas.all_true(local).tolist(), strict=True))


def _train_isolated(
    d: _Dictionary,
    batch: ActivationBatch,
    cfg: TrainConfig,
    step: int,
    total_steps: int,
    device: str,
    metrics: Logs,
    isolate: bool,
    finite: dict[str, bool] | None = None,
) -> None:
    """One dictionary's step; with `isolate`, a non-finite loss or batch stops that dictionary only.
    `finite`: per site, whether every replica's rows are finite (data parallel; `_finite_everywhere`)."""
    try:
        _train_one(d, batch, cfg, step, total_steps, device, metrics, finite)
    except OpenscopeError as exc:
        if not isolate:
            raise
        d.failed = str(exc)
        log.warning("%s stopped: %s", d.key, exc)


def _train_one(
    d: _Dictionary,
    batch: ActivationBatch,
    cfg: TrainConfig,
    step: int,
    total_steps: int,
    device: str,
    metrics: Logs,
    finite: dict[str, bool] | None = None,
) -> None:
    x = batch.acts[d.site_in].to(device)
    y = None if cfg.kind == "sae" else batch.acts[d.site_out].to(device)
    if finite is not None:  # replicas go by every replica's rows, so all of them stop together
        ok = finite[d.site_in] and (y is None or finite[d.site_out])
    else:
        ok = bool(torch.isfinite(x).all()) and (y is None or bool(torch.isfinite(y).all()))
    if not ok:
        raise OpenscopeError(
            f"non-finite activations at step {step}, site {d.site_in}: the data holds NaN/inf; "
            "nothing was lost (the last checkpoint and saved dictionaries are intact)"
        )
    stats = train_step(d.coder, d.optimizer, x, y, d.step_cfg, step, d.tracker, d.replicas, d.finetune)
    if not math.isfinite(stats.loss):
        raise OpenscopeError(f"loss became {stats.loss} at step {step}, site {d.site_in}; lower --lr")
    d.last = {"l0": stats.l0, "fvu": stats.fvu, "dead_fraction": stats.dead / d.coder.cfg.width}
    if d.coder.cfg.activation == "batchtopk" and step >= total_steps - max(1, total_steps // 10):
        with torch.no_grad():
            if d.replicas is None:
                d.thresholds.update(d.coder.encode(x), per_row=False)
            else:
                assert d.coder.cfg.k is not None
                cut = d.replicas.batchtopk_cutoff(d.coder.cfg.k, cfg.batch_size)
                update_thresholds(d.thresholds, d.coder.encode(x, cut), d.replicas)
    if step % cfg.log_every == 0 or step == total_steps - 1:
        row: dict[str, Any] = {"step": step, "site": d.site_in}
        if d.key != d.site_in:  # several dictionaries per site: say which one
            row |= {"width": d.spec.width, "target_l0": d.spec.target_l0}
        row |= {"tokens": (step + 1) * cfg.batch_size, **stats._asdict()}
        row |= d.finetune.last if d.finetune is not None else {}
        metrics.log(row)
    if metrics.heldout is not None and metrics.heldout.due(step):  # --eval-every
        labels = {"width": d.spec.width, "target_l0": d.spec.target_l0} if d.key != d.site_in else {}
        measured = metrics.heldout.evaluate(d.coder, d.site_in, d.site_out)
        metrics.log(heldout_row(step, d.site_in, labels, (step + 1) * cfg.batch_size, measured))


def _postfix(dicts: list[_Dictionary]) -> str:
    shown = [
        f"{d.key}: L0 {d.last['l0']:.0f} FVU {d.last['fvu']:.3f} dead {d.last['dead_fraction']:.0%}"
        for d in dicts[:3]
        if d.last
    ]
    return " | ".join(shown) + (" ..." if len(dicts) > 3 else "")


def _save(d: _Dictionary, cfg: TrainConfig, data: TrainingData, out: Path, step: int) -> Path:
    folder = out / _folder_name(d.spec, cfg)
    coder = d.saved_coder()
    save_coder(
        coder.cpu(),
        folder,
        hook_point_in=data.hook_points[d.site_in],
        hook_point_out=data.hook_points[d.site_out],
        model_name=data.model_name,
        l0=d.last.get("l0"),
        provenance={
            "openscope": {
                "site_in": d.site_in,
                "site_out": d.site_out,
                "data": data.description,
                "tokens_seen": step * cfg.batch_size,
                "trained_as": cfg.activation if coder is not d.coder else None,
                "final_l0": d.last.get("l0"),
                "final_fvu": d.last.get("fvu"),
                "dead_fraction": d.last.get("dead_fraction"),
                # its own width and target: the settings that train it alone
                "train_config": to_jsonable(
                    dataclasses.replace(cfg, width=d.spec.width, target_l0=d.spec.target_l0)
                ),
                "command_line": shlex.join(sys.argv),
            }
        },
    )
    return folder
