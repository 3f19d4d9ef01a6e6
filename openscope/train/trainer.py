"""The single-layer trainer: one pass over shuffled batches feeds every dictionary of the run.

Each site named in `sites` gets one dictionary (an SAE on that site, or a transcoder from a
layer's `mlp_in` to its `mlp_out`). All read the same batch, so one harvest (or, later, one
model forward) serves every layer. Checkpoints hold weights, Adam state, dead-latent counters
and the step; the batch order is a pure function of the seed, so a resumed run sees exactly
the batches an uninterrupted one would and ends with the same dictionaries (`openscope.train.loop`).
`--kind clt` trains one cross-layer transcoder over many layers instead (`openscope.train.clt`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from openscope.activations.batches import ActivationBatch
from openscope.coders import CoderConfig, SparseCoder, ThresholdEstimator, topk_to_jumprelu
from openscope.coders.dictionary import find_dictionaries, load_dictionary
from openscope.coders.io import save_coder
from openscope.config import check_numbers, parse_ints, save_json, to_jsonable
from openscope.errors import OpenscopeError
from openscope.models.load import resolve_device
from openscope.train.clt import CLT_KINDS, train_clt
from openscope.train.config import TrainConfig, TrainResult
from openscope.train.loop import (
    CHECKPOINT,
    METRICS,
    TrainingData,
    first_then_rest,
    from_store,
    init_distributed,
    live,
    open_run,
    rank_file,
    run_identity,
    run_steps,
    save_checkpoint,
    start_step,
    step_config,
)
from openscope.train.steps import DeadLatentTracker, StepConfig, make_optimizer, train_step

log = logging.getLogger(__name__)


class _Dictionary:
    """One dictionary's training state."""

    def __init__(
        self,
        site_in: str,
        site_out: str,
        coder: SparseCoder,
        lr: float,
        threshold_lr_scale: float,
        dead_after: int,
    ):
        self.site_in, self.site_out = site_in, site_out
        self.coder = coder
        self.optimizer = make_optimizer(coder, lr, threshold_lr_scale)
        self.tracker = DeadLatentTracker(coder.cfg.width, dead_after)
        self.thresholds = ThresholdEstimator(coder.cfg.width)
        """BatchTopK: the batches' cut-offs over the run's last tenth, for the JumpReLU file."""
        self.last: dict[str, float] = {}

    def state(self) -> dict[str, Any]:
        t = self.thresholds
        return {
            "coder": self.coder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tracker.tokens_since_fired,
            "last": self.last,
            "thresholds": [t.batches, t.global_sum, t.latent_sum, t.latent_batches],
        }

    def load(self, state: dict[str, Any]) -> None:
        self.coder.load_state_dict(state["coder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.tokens_since_fired = state["tokens_since_fired"]
        self.last = dict(state["last"])
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


def _folder_name(site_in: str, cfg: TrainConfig) -> str:
    return f"{site_in.replace('.', '_')}_{cfg.kind}_{cfg.activation}_w{cfg.width}"


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train every dictionary of the run; `stop_after` ends early (as a crash would) after that many steps.

    Under `torchrun`, the dictionaries are shared out across ranks (dictionary i goes to rank
    i mod world size); each rank reads the same seeded batches, so the result equals a
    single-process run. Each rank checkpoints its own dictionaries.
    """
    _check_config(cfg)
    if cfg.kind in CLT_KINDS:
        return train_clt(cfg, progress, stop_after)
    rank, world = init_distributed()
    device = resolve_device(cfg.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    data, names = live(cfg, device) if cfg.model else from_store(cfg)
    pairs = _pairs(cfg, data, names)
    total_steps = math.ceil(cfg.tokens / cfg.batch_size)
    step_cfg = step_config(cfg, total_steps)
    run = open_run(cfg, rank, world, create=False)
    out = run.folder
    identity = {**run_identity(cfg), "world_size": world}
    checkpoint = out / rank_file(CHECKPOINT, rank, world)
    metrics_path = out / rank_file(METRICS, rank, world)

    dicts = [
        _new_dictionary(cfg, data, i, site_in, site_out, device)
        for i, (site_in, site_out) in enumerate(pairs)
        if i % world == rank
    ]
    if cfg.init_from is not None:
        _start_from_saved(dicts, Path(cfg.init_from), cfg)
    first = start_step(cfg, checkpoint, identity, dicts, metrics_path)

    sites = sorted({s for d in dicts for s in (d.site_in, d.site_out)})
    batches = first_then_rest(data.batches(sites, first) if dicts else iter(()))
    run = open_run(cfg, rank, world)  # the data gave its first batch: now the run's folder is made
    metrics = metrics_path.open("a")
    t0 = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=first,
        unit="step",
        desc=f"train{f' rank {rank}' if world > 1 else ''}",
        disable=not progress or not dicts,
        dynamic_ncols=True,
    )

    def one_step(step_index: int, batch: ActivationBatch) -> None:
        if step_index == 0:
            _calibrate(dicts, batch, cfg, device)
        for d in dicts:
            _train_one(d, batch, cfg, step_cfg, step_index, total_steps, device, metrics)
        bar.update(1)
        bar.set_postfix_str(_postfix(dicts), refresh=False)

    end = total_steps if stop_after is None else min(total_steps, stop_after)
    step = run_steps(
        batches,
        first,
        end,
        one_step,
        cfg.checkpoint_every,
        lambda step: save_checkpoint(checkpoint, step, dicts, identity, metrics),
        bar,
        metrics,
    )
    if dicts:
        with metrics_path.open("a") as tail:
            save_checkpoint(checkpoint, step, dicts, identity, tail)
    finals = {d.site_in: d.last for d in dicts}
    if stop_after is not None and step < total_steps:
        return TrainResult({}, step, finals, time.perf_counter() - t0)

    folders = {d.site_in: _save(d, cfg, data, out, step) for d in dicts}
    if world > 1:
        folders, finals = _gather(folders, finals, world)
    if rank == 0:
        save_json(out / "run.json", {"config": cfg, "steps": step, "world_size": world, "final": finals})
        run.commit()
    folders = {site: Path(cfg.output) / folder.name for site, folder in folders.items()}
    return TrainResult(folders, step, finals, time.perf_counter() - t0)


def _check_config(cfg: TrainConfig) -> None:
    """Numbers in range, a valid --matryoshka and device: checked before anything is read or written."""
    check_numbers(
        cfg,
        positive=(
            "batch_size",
            "tokens",
            "target_l0",
            "width",
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
        ),
        fractions=("max_fire_rate", "lr_decay"),
    )
    parse_ints(cfg.matryoshka, "--matryoshka")
    resolve_device(cfg.device)


def _new_dictionary(
    cfg: TrainConfig, data: TrainingData, i: int, site_in: str, site_out: str, device: str
) -> _Dictionary:
    """The run's i-th dictionary, freshly initialised (seed + i) with its sites' normalisation scales."""
    ccfg = CoderConfig(
        d_in=data.widths[site_in],
        d_out=data.widths[site_out],
        width=cfg.width,
        kind=cfg.kind,  # type: ignore[arg-type]
        activation=cfg.activation,  # type: ignore[arg-type]
        k=cfg.k,
        init_threshold=cfg.init_threshold or 0.001,
        seed=cfg.seed + i,
    )
    coder = SparseCoder(ccfg)
    coder.set_scales(data.scales[site_in], data.scales[site_out])
    # A latent counts as dead after 1M tokens without firing (or the whole run, if shorter).
    return _Dictionary(
        site_in, site_out, coder.to(device), cfg.lr, cfg.threshold_lr_scale, min(1_000_000, cfg.tokens)
    )


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
    """--init-from for single-layer dictionaries: each starts from the saved one that reads its site."""
    saved = {}
    for path in find_dictionaries(folder):
        d = load_dictionary(path)
        if isinstance(d.coder, SparseCoder):
            saved.setdefault(d.site_in.name, d)
    for d in dicts:
        if d.site_in not in saved:
            have = ", ".join(sorted(saved)) or "none"
            raise OpenscopeError(f"--init-from {folder} has no dictionary for {d.site_in} (it has: {have})")
        unfold_into(d.coder, cast(SparseCoder, saved[d.site_in].coder).to(d.coder.w_enc.device))
        log.info("%s starts from %s", d.site_in, saved[d.site_in].folder)


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
            d.coder.calibrate_threshold_(x, cfg.target_l0)
        if d.site_in != d.site_out:
            d.coder.align_decoder_signs_(x, y)
        s = d.coder.fit_encoder_scale_(x, y)
        log.info("%s: data-dependent init (encoder scale %.3g)", d.site_in, s)


def _train_one(
    d: _Dictionary,
    batch: ActivationBatch,
    cfg: TrainConfig,
    step_cfg: StepConfig,
    step: int,
    total_steps: int,
    device: str,
    metrics: Any,
) -> None:
    x = batch.acts[d.site_in].to(device)
    y = None if cfg.kind == "sae" else batch.acts[d.site_out].to(device)
    if not torch.isfinite(x).all() or (y is not None and not torch.isfinite(y).all()):
        raise OpenscopeError(
            f"non-finite activations at step {step}, site {d.site_in}: the data holds NaN/inf; "
            "nothing was lost (the last checkpoint and saved dictionaries are intact)"
        )
    stats = train_step(d.coder, d.optimizer, x, y, step_cfg, step, d.tracker)
    if not math.isfinite(stats.loss):
        raise OpenscopeError(f"loss became {stats.loss} at step {step}, site {d.site_in}; lower --lr")
    d.last = {"l0": stats.l0, "fvu": stats.fvu, "dead_fraction": stats.dead / d.coder.cfg.width}
    if d.coder.cfg.activation == "batchtopk" and step >= total_steps - max(1, total_steps // 10):
        with torch.no_grad():
            d.thresholds.update(d.coder.encode(x), per_row=False)
    if step % cfg.log_every == 0 or step == total_steps - 1:
        row = {"step": step, "site": d.site_in, "tokens": (step + 1) * cfg.batch_size, **stats._asdict()}
        metrics.write(json.dumps(row) + "\n")


def _postfix(dicts: list[_Dictionary]) -> str:
    shown = [
        f"{d.site_in}: L0 {d.last['l0']:.0f} FVU {d.last['fvu']:.3f} dead {d.last['dead_fraction']:.0%}"
        for d in dicts[:3]
        if d.last
    ]
    return " | ".join(shown) + (" ..." if len(dicts) > 3 else "")


def _save(d: _Dictionary, cfg: TrainConfig, data: TrainingData, out: Path, step: int) -> Path:
    folder = out / _folder_name(d.site_in, cfg)
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
                "train_config": to_jsonable(cfg),
                "command_line": shlex.join(sys.argv),
            }
        },
    )
    return folder
