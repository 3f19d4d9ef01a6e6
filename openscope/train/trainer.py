"""The trainer: one pass over shuffled store batches feeds every dictionary of the run.

Each site named in `sites` gets one dictionary (an SAE on that site, or a transcoder from a
layer's `mlp_in` to its `mlp_out`). All read the same batch, so one harvest (or, later, one
model forward) serves every layer. Checkpoints hold weights, Adam state, dead-latent counters
and the step; the batch order is a pure function of the seed, so a resumed run sees exactly
the batches an uninterrupted one would and ends with the same dictionaries. `--kind clt` trains one
cross-layer transcoder over many layers instead (`openscope.train.clt`, built on these helpers).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TextIO, cast

import torch
from tqdm.auto import tqdm

from openscope.activations.live import LiveActivations
from openscope.activations.store import ActivationBatch, ActivationStore
from openscope.coders import CoderConfig, SparseCoder, ThresholdEstimator, topk_to_jumprelu
from openscope.coders.dictionary import find_dictionaries, load_dictionary
from openscope.coders.io import read_coder_config, save_coder
from openscope.config import check_numbers, parse_ints, save_json, to_jsonable
from openscope.data.chat import role_ids
from openscope.errors import OpenscopeError
from openscope.files import (
    Ownership,
    Staged,
    absolute,
    atomic_file,
    check_output,
    check_target,
    is_empty_folder,
    prepare_output,
    recover,
    staged_path,
)
from openscope.models.load import load_model, resolve_device
from openscope.models.sites import Site, locate, parse_sites, site_width
from openscope.train.steps import DeadLatentTracker, StepConfig, make_optimizer, train_step

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """What to train, on which activations, and how (defaults follow Gemma Scope)."""

    store: Path = Path("openscope-out/activations")
    """Activation store made by `openscope harvest` (ignored in live mode)."""
    roles: str = ""
    """Chat stores: train only on tokens of these roles, e.g. `model` or `model,user` (of template, system, user, model); empty: every token."""
    model: str = ""
    """Live mode: run this model (name, directory or hub id) instead of reading --store; one forward per batch feeds every dictionary."""
    source: str = "wiki"
    """Live mode: text source (as for harvest)."""
    context_len: int = 256
    """Live mode: tokens per packed context."""
    block_tokens: int = 65_536
    """Live mode: tokens per shuffling block (memory: block_tokens x total site width x 4 bytes)."""
    sites: str = "all"
    """Sites to train on: names or patterns (`all`: every site of the store). Transcoders: the `mlp_in` sites.
    CLTs: the consecutive layers to cover, e.g. `4-9.mlp_in` (`all`: every layer whose mlp_in and mlp_out the data holds)."""
    kind: str = "sae"
    """sae, transcoder (mlp_in -> mlp_out of the same layer), skip_transcoder (adds x @ A), clt (one
    cross-layer transcoder over the chosen layers: layer l's latents write to mlp_out of l and every later
    layer) or skip_clt (a CLT with a skip x @ A per layer)."""
    activation: str = "jumprelu"
    """jumprelu (Gemma Scope), topk, batchtopk or relu (L1 baseline)."""
    width: int = 4096
    """Latents per dictionary (a CLT: per layer)."""
    k: int | None = None
    """Active latents per token for topk/batchtopk."""
    sparsity: str = "auto"
    """quadratic_l0 (Gemma Scope 2), l0 (Gemma Scope 1), l1, none; auto picks by activation."""
    target_l0: float = 50.0
    """Target L0 of the quadratic L0 loss."""
    sparsity_coeff: float = 1.0
    """λ of the sparsity loss after warm-up (quadratic L0: 1 holds L0 near its target; weaker values
    let reconstruction pull L0 above it)."""
    init_data_dependent: bool = True
    """Start from the first batch: b_dec = its mean target (the residual stream's large constant
    part), JumpReLU θ where L0 = target_l0, encoder scaled to the best reconstruction size. Off:
    Gemma Scope's init (zero biases, θ = init_threshold or 0.001, W_enc = W_decᵀ)."""
    init_threshold: float | None = None
    """JumpReLU initial θ (normalised units); unset: 0.001, or calibrated with the data-dependent
    init (Gemma Scope's 0.001 suits billions of tokens: Adam moves log θ by ~lr per step)."""
    sparsity_warmup_steps: int = 10_000
    """Steps of linear λ warm-up (Gemma Scope), capped at a fifth of the run's steps."""
    freq_coeff: float = 0.1
    """Weight of the penalty on latents firing on more than max_fire_rate of tokens (jumprelu)."""
    max_fire_rate: float = 0.1
    """Fire rate above which a latent is penalised."""
    matryoshka: str = ""
    """Nested prefix sizes for Matryoshka training, e.g. `128,512,2048` (empty: off; a CLT: per layer)."""
    init_from: Path | None = None
    """SAE/transcoder: start from the dictionaries saved under this folder (one per site, same kind and
    width) instead of a fresh init: fine-tune a base-model dictionary on new data, e.g. chat tokens.
    CLT: start from single-layer transcoders found under this folder (one per layer, e.g. an earlier
    `--kind transcoder` run): their first --width latents (a Matryoshka prefix) give each layer's encoder,
    threshold and own-layer decoder; later-layer decoder blocks start at zero."""
    lr: float = 7e-5
    """Adam learning rate (β = (0, 0.999))."""
    threshold_lr_scale: float = 50.0
    """JumpReLU: learning rate of log θ relative to --lr. Adam moves log θ by ~lr per step, so at 1×
    θ cannot keep up with the encoder (whose weights are ~0.01) and L0 drifts off its target."""
    lr_warmup_steps: int = 1000
    """Steps of linear learning-rate warm-up (Gemma Scope), capped at a tenth of the run's steps."""
    lr_decay: float = 0.2
    """Fraction of the run at its end over which the learning rate decays linearly to zero (lets
    the thresholds, and so L0, settle; 0: constant to the end)."""
    batch_size: int = 4096
    """Tokens per step."""
    tokens: int = 2_000_000
    """Training tokens per dictionary (the store is repeated in new shuffles if smaller)."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    output: Path = Path("openscope-out/dictionaries")
    """Folder for the dictionaries (one sub-folder each), metrics.jsonl and the checkpoint."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    resume: bool = False
    """Continue from the checkpoint in the output folder (or of an interrupted --overwrite run)."""
    overwrite: bool = False
    """Replace the training run already in the output folder (its dictionaries, metrics and checkpoint); the old run stays whole until the new one is saved. Only a folder openscope trained into is ever replaced."""
    incomplete_store: bool = False
    """Train on a store whose harvest has not finished (its finished shards only)."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, ..."""
    log_every: int = 20
    """Steps between metric lines in metrics.jsonl."""


class TrainResult(NamedTuple):
    """What a training run produced."""

    folders: dict[str, Path]
    """Dictionary folder per input site."""
    steps: int
    """Optimisation steps taken in total."""
    final: dict[str, dict[str, float]]
    """Last measured L0, FVU and dead fraction per dictionary."""
    seconds: float
    """Wall time of this run."""


class _Data(NamedTuple):
    """Where training activations come from, and what the trainer needs to know about them."""

    model_name: str
    widths: dict[str, int]
    hook_points: dict[str, str]
    scales: dict[str, float]
    description: str
    batches: Callable[[list[str], int], Iterator[ActivationBatch]]
    """(site names, first batch) -> batches of cfg.batch_size rows, in a seeded order."""


def _from_store(cfg: TrainConfig) -> tuple[_Data, list[str]]:
    store = ActivationStore(cfg.store)
    if not store.complete and not cfg.incomplete_store:
        raise OpenscopeError(
            f"the store at {cfg.store} is incomplete (its harvest was interrupted after {len(store.shards)} "
            "shards): run the same harvest again to finish it, or pass --incomplete-store"
        )
    names = store.sites if cfg.sites == "all" else [s.strip() for s in cfg.sites.split(",") if s.strip()]
    for name in names:
        store.check_site(name)

    roles = role_ids(cfg.roles)
    store.check_roles(roles)

    def batches(sites: list[str], start: int) -> Iterator[ActivationBatch]:
        stream = store.batches(sites, cfg.batch_size, seed=cfg.seed, epochs=None, drop_last=True, roles=roles)
        return itertools.islice(stream, start, None)  # replays the seeded order up to the checkpoint

    info = store.manifest["sites"]
    data = _Data(
        store.manifest["model"]["name"],
        {n: int(i["width"]) for n, i in info.items()},
        {n: i["hook_point"] for n, i in info.items()},
        {n: store.stats(n).norm_scale for n in info},
        f"store {store.root} ({store.manifest['identity']['source']}"
        + (f", roles {cfg.roles})" if cfg.roles else ")"),
        batches,
    )
    return data, names


def _live(cfg: TrainConfig, device: str) -> tuple[_Data, list[str]]:
    if cfg.roles:
        raise OpenscopeError("--roles filters the rows of a chat store; harvest one and train with --store")
    loaded = load_model(cfg.model, "float32", device)
    spec = "*.*" if cfg.sites == "all" else cfg.sites
    names = [s.name for s in parse_sites(spec, loaded.n_layers)]
    if cfg.kind != "sae":
        names += [n.replace(".mlp_in", ".mlp_out") for n in names if n.endswith(".mlp_in")]
    sites = [Site.from_name(n) for n in sorted(set(names), key=lambda n: Site.from_name(n).order)]
    points = {s.name: locate(loaded.arch.layers, loaded.arch.layers_path, s) for s in sites}
    live = LiveActivations(
        loaded, sites, cfg.source, cfg.context_len, block_tokens=cfg.block_tokens, seed=cfg.seed
    )
    # Normalisation scales from a fixed sample (the first contexts), so a resumed run gets the same ones.
    sample = live.block(list(itertools.islice(live.contexts(), 16)))
    data = _Data(
        loaded.name,
        {s.name: site_width(points[s.name], loaded.d_model) for s in sites},
        {n: p.hook_point for n, p in points.items()},
        {s.name: float(sample[s.name].double().pow(2).sum(1).mean().sqrt()) for s in sites},
        f"live {loaded.name} on {cfg.source!r}",
        lambda _sites, start: live.batches(cfg.batch_size, start),
    )
    return data, [n for n in names if cfg.kind == "sae" or n.endswith(".mlp_in")]


def _pairs(cfg: TrainConfig, data: _Data, names: list[str]) -> list[tuple[str, str]]:
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


def _step_config(cfg: TrainConfig, total_steps: int) -> StepConfig:
    """The step's losses and schedules. Gemma Scope's warm-ups were set for runs of 100k+ steps; a
    shorter run would end before its λ is up, so each is capped at a fraction of the run."""
    sparsity = cfg.sparsity
    if sparsity == "auto":
        sparsity = {"jumprelu": "quadratic_l0", "relu": "l1"}.get(cfg.activation, "none")
    prefixes = parse_ints(cfg.matryoshka, "--matryoshka")
    return StepConfig(
        lr=cfg.lr,
        lr_warmup_steps=min(cfg.lr_warmup_steps, total_steps // 10),
        total_steps=total_steps,
        lr_decay_steps=round(cfg.lr_decay * total_steps),
        sparsity=sparsity,  # type: ignore[arg-type]
        sparsity_coeff=cfg.sparsity_coeff,
        target_l0=cfg.target_l0 if sparsity == "quadratic_l0" else None,
        sparsity_warmup_steps=min(cfg.sparsity_warmup_steps, total_steps // 5),
        freq_coeff=cfg.freq_coeff,
        max_fire_rate=cfg.max_fire_rate,
        matryoshka_prefixes=prefixes,
    )


def _identity(cfg: TrainConfig) -> dict[str, Any]:
    skip = {"resume", "device", "checkpoint_every", "log_every", "output", "overwrite", "incomplete_store"}
    if not cfg.roles:
        skip.add("roles")  # checkpoints of runs from before role filters still resume
    return {k: v for k, v in to_jsonable(cfg).items() if k not in skip}


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


class _Stateful(Protocol):
    """Anything whose training state a checkpoint holds (a `_Dictionary`, a CLT's state)."""

    def state(self) -> dict[str, Any]: ...


def _save_checkpoint(
    path: Path, step: int, dicts: Sequence[_Stateful], identity: dict[str, Any], metrics: TextIO
) -> None:
    """Write the checkpoint (atomically) with the length of the metrics file at this step, so a resumed
    run cuts the rows logged after it and metrics.jsonl never repeats a step."""
    metrics.flush()
    state = {
        "step": step,
        "identity": identity,
        "dicts": [d.state() for d in dicts],
        "metrics_bytes": metrics.tell(),
    }
    with atomic_file(path) as fh:
        torch.save(state, fh)


def _load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    if not path.is_file():
        raise OpenscopeError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:
        raise OpenscopeError(f"checkpoint {path} is unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("identity"), dict):
        raise OpenscopeError(f"checkpoint {path} is not an openscope training checkpoint")
    differ = [k for k, v in identity.items() if state["identity"].get(k) != v]
    if differ:
        k = differ[0]
        raise OpenscopeError(
            f"checkpoint {path} is from another run ({k}: {state['identity'].get(k)!r} there, {identity[k]!r} now)"
        )
    return state


def _start_step(
    cfg: TrainConfig, checkpoint: Path, identity: dict[str, Any], states: Sequence[Any], metrics: Path
) -> int:
    """The step a run starts at: with --resume, the checkpoint's (its states loaded into `states`, which
    have a `load`, and `metrics` cut back to what it held at that checkpoint); otherwise 0."""
    if not cfg.resume:
        return 0
    saved = _load_checkpoint(checkpoint, identity)
    for d, st in zip(states, saved["dicts"], strict=True):
        d.load(st)
    size = saved.get("metrics_bytes")
    if isinstance(size, int) and metrics.is_file() and metrics.stat().st_size > size:
        os.truncate(metrics, size)  # rows logged after the checkpoint are logged again from here
    log.info("resuming at step %d", int(saved["step"]))
    return int(saved["step"])


def _is_dictionary_folder(folder: Path) -> bool:
    """A dictionary folder openscope trained: its config.json carries our provenance."""
    try:
        return "openscope" in read_coder_config(folder)
    except OpenscopeError:
        return False


RUN = Ownership(
    "a training run",
    files=("run.json", "metrics*.jsonl", "checkpoint*.pt", "*.tmp"),
    folders=("*",),
    folder_check=lambda p: (
        _is_dictionary_folder(p)
        and not Ownership("", files=("config.json", "params*.safetensors", "*.tmp")).foreign(p)
    ),
)
"""What a training output folder holds: --overwrite replaces a folder only if it holds nothing else."""


def open_run(cfg: TrainConfig, rank: int = 0, world: int = 1, create: bool = True) -> Staged:
    """Where a training run writes (`openscope.files`): the output folder, or with --overwrite a staged
    copy that replaces it once the dictionaries are saved. --resume continues the run whose checkpoint
    is in the output folder, or else that of an interrupted --overwrite run. `create=False` decides and
    checks without writing anything (the trainer creates the folder once its data has given a first
    batch, so bad data leaves nothing behind). Under torchrun rank 0 decides and the others follow."""
    if world > 1:
        import torch.distributed as dist

        box: list[Any] = [None]
        if rank == 0:
            box[0] = _open_run(cfg, world, create)
        dist.broadcast_object_list(box, src=0)
        return cast(Staged, box[0])
    return _open_run(cfg, world, create)


_METRICS_ONLY = Ownership("", files=("metrics*.jsonl", "*.tmp"))


def _open_run(cfg: TrainConfig, world: int, create: bool) -> Staged:
    target = absolute(cfg.output)
    recover(target)
    check_target(target)
    inputs = [p for p in (cfg.store if not cfg.model else None, cfg.init_from) if p is not None]
    checkpoints = [CHECKPOINT] if world == 1 else [_rank_file(CHECKPOINT, r, world) for r in range(world)]
    if cfg.resume:
        for folder in (target, staged_path(target)):
            if all((folder / c).is_file() for c in checkpoints):
                return Staged(target, folder)
        raise OpenscopeError(f"--resume: no checkpoint at {target / checkpoints[0]}")
    if target.is_dir() and (target / checkpoints[0]).is_file() and not cfg.overwrite:
        raise OpenscopeError(
            f"{target} already holds a run's checkpoint: pass --resume to continue it, --overwrite to "
            "replace the run, or choose another --output"
        )
    # A run stopped before its first checkpoint leaves only metrics rows that nothing can resume from.
    stale = target.is_dir() and not is_empty_folder(target) and not _METRICS_ONLY.foreign(target)
    if not create:
        empty = stale or check_output(target, RUN, overwrite=cfg.overwrite, inputs=inputs)
        return Staged(target, target if empty else staged_path(target))
    if stale:
        for path in target.iterdir():
            path.unlink()
    return prepare_output(target, RUN, overwrite=cfg.overwrite, inputs=inputs)


def first_then_rest(batches: Iterator[ActivationBatch]) -> Iterator[ActivationBatch]:
    """The same batches, the first one already read: data that cannot give one fails here, before
    the run writes anything."""
    first = next(batches, None)
    return batches if first is None else itertools.chain([first], batches)


def _run_steps(
    batches: Iterator[ActivationBatch],
    start_step: int,
    end: int,
    step_fn: Callable[[int, ActivationBatch], None],
    checkpoint_every: int,
    save: Callable[[int], None],
    bar: Any,
    metrics: TextIO,
) -> int:
    """Feed batches start_step .. end−1 to `step_fn(step_index, batch)`, calling `save(step)` every
    `checkpoint_every` steps (metrics flushed first, so the file never lags a checkpoint); the progress
    bar and metrics file are closed however the loop ends. Returns the steps done."""
    step = start_step
    try:
        for step_index, batch in enumerate(batches, start=start_step):
            if step_index >= end:
                break
            step_fn(step_index, batch)
            step = step_index + 1
            if step % checkpoint_every == 0:
                metrics.flush()
                save(step)
    finally:
        bar.close()
        metrics.close()
    return step


def _folder_name(site_in: str, cfg: TrainConfig) -> str:
    return f"{site_in.replace('.', '_')}_{cfg.kind}_{cfg.activation}_w{cfg.width}"


def _dist() -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _rank_file(name: str, rank: int, world: int) -> str:
    if world == 1:
        return name
    stem, _, ext = name.partition(".")
    return f"{stem}.rank{rank}.{ext}"


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train every dictionary of the run; `stop_after` ends early (as a crash would) after that many steps.

    Under `torchrun`, the dictionaries are shared out across ranks (dictionary i goes to rank
    i mod world size); each rank reads the same seeded batches, so the result equals a
    single-process run. Each rank checkpoints its own dictionaries.
    """
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
    if cfg.kind in ("clt", "skip_clt"):
        from openscope.train.clt import train_clt  # that module builds on this one's helpers

        return train_clt(cfg, progress, stop_after)
    rank, world = _dist()
    device = resolve_device(cfg.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    data, names = _live(cfg, device) if cfg.model else _from_store(cfg)
    pairs = _pairs(cfg, data, names)
    total_steps = math.ceil(cfg.tokens / cfg.batch_size)
    step_cfg = _step_config(cfg, total_steps)
    run = open_run(cfg, rank, world, create=False)
    out = run.folder
    identity = {**_identity(cfg), "world_size": world}
    checkpoint = out / _rank_file(CHECKPOINT, rank, world)
    metrics_path = out / _rank_file("metrics.jsonl", rank, world)

    dicts: list[_Dictionary] = []
    for i, (site_in, site_out) in enumerate(pairs):
        if i % world != rank:
            continue
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
        dicts.append(
            _Dictionary(
                site_in,
                site_out,
                coder.to(device),
                cfg.lr,
                cfg.threshold_lr_scale,
                min(1_000_000, cfg.tokens),
            )
        )

    if cfg.init_from is not None:
        _start_from_saved(dicts, Path(cfg.init_from), cfg)
    start_step = _start_step(cfg, checkpoint, identity, dicts, metrics_path)

    sites = sorted({s for d in dicts for s in (d.site_in, d.site_out)})
    batches = first_then_rest(data.batches(sites, start_step) if dicts else iter(()))
    run = open_run(cfg, rank, world)  # the data gave its first batch: now the run's folder is made
    metrics = metrics_path.open("a")
    t0 = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=start_step,
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
    step = _run_steps(
        batches,
        start_step,
        end,
        one_step,
        cfg.checkpoint_every,
        lambda step: _save_checkpoint(checkpoint, step, dicts, identity, metrics),
        bar,
        metrics,
    )
    if dicts:
        with metrics_path.open("a") as tail:
            _save_checkpoint(checkpoint, step, dicts, identity, tail)
    finals = {d.site_in: d.last for d in dicts}
    if stop_after is not None and step < total_steps:
        return TrainResult({}, step, finals, time.perf_counter() - t0)

    folders = {d.site_in: _save(d, cfg, data, out, step) for d in dicts}
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (folders, finals))
        folders = {k: v for f, _ in gathered for k, v in f.items()}
        finals = {k: v for _, f in gathered for k, v in f.items()}
    if rank == 0:
        save_json(out / "run.json", {"config": cfg, "steps": step, "world_size": world, "final": finals})
        run.commit()
    folders = {site: Path(cfg.output) / folder.name for site, folder in folders.items()}
    return TrainResult(folders, step, finals, time.perf_counter() - t0)


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


def _save(d: _Dictionary, cfg: TrainConfig, data: _Data, out: Path, step: int) -> Path:
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
