"""The training loop both trainers run on (the single-layer one in `trainer.py`, the cross-layer
transcoder one in `clt.py`): the data (an activation store, or a model run live), torchrun setup, the
output-folder rule, checkpoints and resume, and the step loop itself.

The batch order is a pure function of the seed, and a checkpoint records the step and the length of
the metrics file at that step, so a resumed run sees exactly the batches an uninterrupted one would,
cuts the metric rows logged after its checkpoint, and ends with the same files.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TextIO, cast

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from openscope.activations.batches import ActivationBatch, batches_ahead, close_iterator
from openscope.activations.live import LiveActivations
from openscope.activations.store import ActivationStore
from openscope.coders.io import read_coder_config
from openscope.coders.matryoshka import parse_matryoshka
from openscope.config import to_jsonable
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
from openscope.models.load import LoadedModel, load_model
from openscope.models.sites import Site, locate, parse_sites, site_width
from openscope.train.config import TrainConfig, target_l0s
from openscope.train.logs import Flushable, heldout_cutoff, is_logs_folder, without_heldout
from openscope.train.parallel import (
    Layout,
    Replicas,
    env_world,
    init_process_group,
    local_rows,
    plan_layout,
    replica_group,
)
from openscope.train.steps import StepConfig

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
"""The checkpoint's file name in the output folder (per rank under torchrun: `rank_file`)."""
METRICS = "metrics.jsonl"
"""The metrics file's name in the output folder (per rank under torchrun: `rank_file`)."""


# ---- the data ------------------------------------------------------------------------------------


class TrainingData(NamedTuple):
    """Where training activations come from, and what the trainer needs to know about them."""

    model_name: str
    """The model the activations are of (recorded in each saved dictionary)."""
    widths: dict[str, int]
    """Width of each site the data holds."""
    hook_points: dict[str, str]
    """Hook point of each site (recorded in each saved dictionary)."""
    scales: dict[str, float]
    """Normalisation scale C of each site (E‖x/C‖² = 1)."""
    description: str
    """The data in words (the provenance's `data`)."""
    batches: Callable[[list[str], int], Iterator[ActivationBatch]]
    """(site names, first batch) -> batches of cfg.batch_size rows, in a seeded order."""
    shards: Callable[[list[str], int, int, int], Iterator[ActivationBatch]] | None = None
    """Data that a replica computes itself (live): (site names, first batch, replica index, replicas)
    -> that replica's own batches of cfg.batch_size / replicas rows. None: replicas slice `batches`."""


def replica_batches(
    data: TrainingData, sites: list[str], start: int, par: RunLayout
) -> Iterator[ActivationBatch]:
    """This replica's batches from batch `start` on: the one place that decides how a data-parallel
    replica gets its rows. A live model's replica runs the forward on its own share of the contexts
    (`TrainingData.shards`); a store's replica reads the global batch and keeps its `local_rows`.
    Without replicas, the global batches. `par.ahead` of them are assembled in a background thread."""
    replicas = par.replicas
    if replicas is None:
        stream = data.batches(sites, start)
    elif data.shards is not None:
        stream = data.shards(sites, start, replicas.index, replicas.size)
    else:
        stream = _local(data.batches(sites, start), replicas)
    return batches_ahead(stream, par.ahead)


def _local(batches: Iterator[ActivationBatch], replicas: Replicas) -> Iterator[ActivationBatch]:
    """This replica's rows of each global batch; closing it closes `batches`."""
    try:
        for b in batches:
            yield local_rows(b, replicas.index, replicas.size)
    finally:
        close_iterator(batches)


def ahead_count(cfg: TrainConfig, device: str) -> int:
    """cfg.batches_ahead resolved: 2 on CUDA, 0 on the CPU when unset; 0 for a live model, whose forward
    must not run beside the step's own uses of the model (splices, held-out evaluation: hooks are global)."""
    if cfg.model or cfg.finetune:
        return 0
    if cfg.batches_ahead is not None:
        return cfg.batches_ahead
    return 2 if device.startswith("cuda") else 0


def store_site_names(store: ActivationStore, spec: str) -> list[str]:
    """The store's sites a --sites spec names: site names as given (`check_site` says when the store
    lacks one), patterns (`*.mlp_in`, `0-5.resid_post`, `mid.resid_post`) expanded against the model's
    layers and kept where the store holds them; "all" is every site of the store."""
    if spec == "all":
        return store.sites
    n_layers = int(store.manifest["model"].get("n_layers") or 0) or 1 + max(
        Site.from_name(s).layer for s in store.sites
    )
    names: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token or re.fullmatch(r"\d+\.\w+", token):
            names += [token] if token else []
            continue
        matched = [s.name for s in parse_sites(token, n_layers) if s.name in store.sites]
        if not matched:
            raise OpenscopeError(
                f"--sites {token!r} matches no site of the store at {store.root}; it has {', '.join(store.sites)}"
            )
        names += matched
    return list(dict.fromkeys(names))


def from_store(cfg: TrainConfig, device: str = "cpu") -> tuple[TrainingData, list[str]]:
    """The activation store at cfg.store, and the site names cfg.sites picks from it; batches for a CUDA
    `device` read ahead come in page-locked memory."""
    store = ActivationStore(cfg.store)
    if not store.complete and not cfg.incomplete_store:
        raise OpenscopeError(
            f"the store at {cfg.store} is incomplete (its harvest was interrupted after {len(store.shards)} "
            "shards): run the same harvest again to finish it, or pass --incomplete-store"
        )
    names = store_site_names(store, cfg.sites)
    for name in names:
        store.check_site(name)

    roles = role_ids(cfg.roles)
    store.check_roles(roles)
    cutoff = heldout_cutoff(store, cfg)  # --eval-every: the store's last contexts are held out
    # Page-locked batches for the GPU's non-blocking copies (the held-out filter would copy them out).
    pin = device.startswith("cuda") and ahead_count(cfg, device) > 0 and cutoff is None

    def batches(sites: list[str], start: int) -> Iterator[ActivationBatch]:
        stream = store.batches(
            sites, cfg.batch_size, seed=cfg.seed, epochs=None, drop_last=True, roles=roles, pin_memory=pin
        )
        held = stream if cutoff is None else without_heldout(stream, cutoff, cfg.batch_size)
        try:
            yield from itertools.islice(held, start, None)  # replays the seeded order up to the checkpoint
        finally:
            close_iterator(stream)  # the store's reader thread ends with the run, not at garbage collection

    info = store.manifest["sites"]
    data = TrainingData(
        store.manifest["model"]["name"],
        {n: int(i["width"]) for n, i in info.items()},
        {n: i["hook_point"] for n, i in info.items()},
        {n: store.stats(n).norm_scale for n in info},
        f"store {store.root} ({store.manifest['identity']['source']}"
        + (f", roles {cfg.roles})" if cfg.roles else ")"),
        batches,
    )
    return data, names


def live(cfg: TrainConfig, device: str, loaded: LoadedModel | None = None) -> tuple[TrainingData, list[str]]:
    """cfg.model (or `loaded`, already loaded) run live on cfg.source (one forward per batch feeds every
    site), and the input site names: cfg.sites, plus each mlp_in's mlp_out in the data for a transcoder.
    Data-parallel replicas each run the model on their own share of the contexts (`replica_batches`)."""
    if cfg.roles:
        raise OpenscopeError("--roles filters the rows of a chat store; harvest one and train with --store")
    loaded = loaded if loaded is not None else load_model(cfg.model, "float32", device)
    spec = "*.*" if cfg.sites == "all" else cfg.sites
    names = [s.name for s in parse_sites(spec, loaded.n_layers)]
    if cfg.kind != "sae":
        names += [n.replace(".mlp_in", ".mlp_out") for n in names if n.endswith(".mlp_in")]
    sites = [Site.from_name(n) for n in sorted(set(names), key=lambda n: Site.from_name(n).order)]
    points = {s.name: locate(loaded.arch.layers, loaded.arch.layers_path, s) for s in sites}

    def activations(shard: tuple[int, int] = (0, 1)) -> LiveActivations:
        return LiveActivations(
            loaded,
            sites,
            cfg.source,
            cfg.context_len,
            block_tokens=cfg.block_tokens,
            seed=cfg.seed,
            shard=shard,
        )

    acts = activations()
    # Normalisation scales from a fixed sample (the first contexts), so a resumed run gets the same ones.
    sample = acts.block(list(itertools.islice(acts.contexts(), 16)))
    data = TrainingData(
        loaded.name,
        {s.name: site_width(points[s.name], loaded.d_model) for s in sites},
        {n: p.hook_point for n, p in points.items()},
        {s.name: float(sample[s.name].double().pow(2).sum(1).mean().sqrt()) for s in sites},
        f"live {loaded.name} on {cfg.source!r}",
        lambda _sites, start: acts.batches(cfg.batch_size, start),
        # A replica forwards only its share of each block's contexts (made when the layout is known).
        lambda _sites, start, index, count: activations((index, count)).batches(cfg.batch_size, start),
    )
    return data, [n for n in names if cfg.kind == "sae" or n.endswith(".mlp_in")]


# ---- what a run is -------------------------------------------------------------------------------


def step_config(
    cfg: TrainConfig, total_steps: int, target_l0: float | None = None, bf16: bool = False
) -> StepConfig:
    """The step's losses and schedules, for the dictionary with `target_l0` (default: the run's one
    target), its products in bfloat16 if `bf16`. Gemma Scope's warm-ups were set for runs of 100k+ steps;
    a shorter run would end before its λ is up, so each is capped at a fraction of the run."""
    target = target_l0s(cfg)[0] if target_l0 is None else target_l0
    sparsity = cfg.sparsity
    if sparsity == "auto":
        sparsity = {"jumprelu": "quadratic_l0", "relu": "l1"}.get(cfg.activation, "none")
    spec = parse_matryoshka(cfg.matryoshka)
    return StepConfig(
        lr=cfg.lr,
        lr_warmup_steps=min(cfg.lr_warmup_steps, total_steps // 10),
        total_steps=total_steps,
        lr_decay_steps=round(cfg.lr_decay * total_steps),
        sparsity=sparsity,  # type: ignore[arg-type]
        sparsity_coeff=cfg.sparsity_coeff,
        target_l0=target if sparsity == "quadratic_l0" else None,
        sparsity_warmup_steps=min(cfg.sparsity_warmup_steps, total_steps // 5),
        freq_coeff=cfg.freq_coeff,
        max_fire_rate=cfg.max_fire_rate,
        revive=cfg.revive,  # type: ignore[arg-type]  (checked by TrainConfig)
        resample_every=cfg.resample_every,
        preact_coeff=cfg.preact_coeff,
        matryoshka_prefixes=spec.fixed,
        matryoshka_random=spec.random,
        matryoshka_seed=cfg.seed,
        bf16=bf16,
    )


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it (not where it writes, how
    often it logs, or on which device)."""
    skip = {"resume", "device", "checkpoint_every", "log_every", "output", "overwrite", "incomplete_store"}
    skip.add("batches_ahead")  # how the batches are read, never which
    skip |= {"data_parallel", "precision"}  # as resolved, in `RunLayout.identity` (older runs lack them)
    if not cfg.roles:
        skip.add("roles")  # checkpoints of runs from before role filters still resume
    if not cfg.finetune:
        skip |= {"finetune", "beta"}  # nor do those of runs from before fine-tuning
    if cfg.revive == "none":
        skip |= {"revive", "resample_every"}  # nor those of runs from before revival
    if cfg.revive != "preact":
        skip.add("preact_coeff")
    if not cfg.init_greedy:
        skip.add("init_greedy")  # nor those of runs from before the greedy CLT init
    if cfg.dead_tokens == TrainConfig.dead_tokens:
        skip.add("dead_tokens")
    # The sinks never change what trains; the held-out rows do (so eval_tokens counts when eval is on).
    skip |= {"log", "eval_every"} | ({"eval_tokens"} if not cfg.eval_every else set())
    return {k: v for k, v in to_jsonable(cfg).items() if k not in skip}


# ---- torchrun ------------------------------------------------------------------------------------


class RunLayout(NamedTuple):
    """Where this process stands in a run (`openscope.train.parallel`)."""

    layout: Layout
    """Ranks as dictionary groups x data-parallel replicas."""
    replicas: Replicas | None
    """This rank's data-parallel replicas (None: one replica, nothing to synchronise)."""
    device: str
    """The device this rank trains on (under torchrun on CUDA: the local rank's GPU, `rank_device`)."""
    bf16: bool
    """Whether the dictionaries' products run in bfloat16 (--precision)."""
    ahead: int
    """Batches assembled ahead of the step in a background thread (--batches-ahead, resolved)."""

    @property
    def writes(self) -> bool:
        """Whether this rank writes its group's checkpoint, metrics and dictionaries (its first replica)."""
        return self.layout.replica == 0

    def file(self, name: str) -> str:
        """This rank's group's own file (`rank_file`)."""
        return rank_file(name, self.layout.group, self.layout.groups)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it beyond its settings: the layout, and
        bfloat16 products (omitted when off, as in the checkpoints from before they existed)."""
        ident: dict[str, Any] = {"world_size": self.layout.world}
        if self.layout.replicas > 1:
            ident["data_parallel"] = self.layout.replicas
        return ident | ({"precision": "bf16"} if self.bf16 else {})


def run_layout(cfg: TrainConfig, n_dicts: int, device: str) -> RunLayout:
    """The run's layout for `n_dicts` dictionaries, checked (the batch splits over the replicas; a resumed
    checkpoint is of this layout) before any process waits on another; then, under torchrun, the process
    group (gloo, or nccl for CUDA) and this rank's replica group."""
    rank, world, _ = env_world()
    layout = plan_layout(rank, world, cfg.data_parallel, n_dicts, cfg.batch_size)
    if layout.replicas > 1 and cfg.revive == "resample":
        raise OpenscopeError("--revive resample draws from one process's batch: use aux with --data-parallel")
    _check_resume_layout(cfg, layout)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.startswith("cuda"))
    if device.startswith("cuda"):
        # TF32 for the products autocast leaves in float32; set both ways, since the flag is the process's
        # and an earlier bf16 run in it must not turn a float32 run's products into TF32 ones.
        torch.backends.cuda.matmul.allow_tf32 = cfg.precision != "float32"
    if world > 1:
        init_process_group(device)
    return RunLayout(layout, replica_group(layout), device, bf16, ahead_count(cfg, device))


PRECISIONS = ("auto", "float32", "tf32", "bf16")
"""The --precision choices."""


def check_precision(cfg: TrainConfig, device: str) -> None:
    """--precision is one of PRECISIONS, and tf32 runs on CUDA."""
    if cfg.precision not in PRECISIONS:
        raise OpenscopeError(f"unknown --precision {cfg.precision!r}; use {', '.join(PRECISIONS)}")
    if cfg.precision == "tf32" and not device.startswith("cuda"):
        raise OpenscopeError(f"--precision tf32 needs a CUDA device, not {device}; use float32 or bf16")


def rank_file(name: str, rank: int, world: int) -> str:
    """A rank's own file under torchrun (`checkpoint.rank1.pt`); the name itself in one process. With
    data-parallel replicas, `rank` and `world` are the dictionary group and the number of groups."""
    if world == 1:
        return name
    stem, _, ext = name.partition(".")
    return f"{stem}.rank{rank}.{ext}"


def _check_resume_layout(cfg: TrainConfig, layout: Layout) -> None:
    """--resume: the checkpoint in the output folder (or of an interrupted --overwrite run) was written
    by a run of this layout; read on every rank before any waits on another (memory-mapped: only the
    checkpoint's small header is read)."""
    if not cfg.resume:
        return
    target = absolute(cfg.output)
    for folder in (target, staged_path(target)):
        found = sorted(folder.glob("checkpoint*.pt")) if folder.is_dir() else []
        if found:
            break
    else:
        return  # `open_run` says there is none
    try:
        saved = torch.load(found[0], map_location="cpu", weights_only=True, mmap=True).get("identity", {})
        was = Layout(0, int(saved.get("world_size", 1)), int(saved.get("data_parallel", 1)))
    except Exception:
        return  # `load_checkpoint` says what is wrong with it
    if (was.world, was.replicas) != (layout.world, layout.replicas):
        how = (
            "one process"
            if was.world == 1
            else f"torchrun --nproc-per-node {was.world} --data-parallel {was.replicas}"
        )
        raise OpenscopeError(
            f"--resume: the checkpoint in {folder} was written by {was.describe()}, this run is "
            f"{layout.describe()}; resume it with {how}, or start again with --overwrite"
        )


# ---- checkpoints ---------------------------------------------------------------------------------


class Stateful(Protocol):
    """Anything whose training state a checkpoint holds (a single-layer dictionary, a CLT's state)."""

    def state(self) -> dict[str, Any]: ...


def save_checkpoint(
    path: Path, step: int, dicts: Sequence[Stateful], identity: dict[str, Any], metrics: TextIO
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


def load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at path, checked to be an openscope training checkpoint of the run `identity`."""
    if not path.is_file():
        raise OpenscopeError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:
        raise OpenscopeError(f"checkpoint {path} is unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("identity"), dict):
        raise OpenscopeError(f"checkpoint {path} is not an openscope training checkpoint")
    # The layout and bfloat16 keys appear only when not the default: either side may lack them.
    keys = [*identity, *(k for k in ("data_parallel", "precision") if k not in identity)]
    differ = [k for k in keys if state["identity"].get(k) != identity.get(k)]
    if differ:
        k = differ[0]
        raise OpenscopeError(
            f"checkpoint {path} is from another run ({k}: {state['identity'].get(k)!r} there, {identity.get(k)!r} now)"
        )
    return state


def start_step(
    cfg: TrainConfig, checkpoint: Path, identity: dict[str, Any], states: Sequence[Any], metrics: Path | None
) -> int:
    """The step a run starts at: with --resume, the checkpoint's (its states loaded into `states`, which
    have a `load`, and `metrics` cut back to what it held at that checkpoint; None: a replica that does
    not write them); otherwise 0."""
    if not cfg.resume:
        return 0
    saved = load_checkpoint(checkpoint, identity)
    for d, st in zip(states, saved["dicts"], strict=True):
        d.load(st)
    size = saved.get("metrics_bytes")
    if isinstance(size, int) and metrics is not None and metrics.is_file() and metrics.stat().st_size > size:
        os.truncate(metrics, size)  # rows logged after the checkpoint are logged again from here
    log.info("resuming at step %d", int(saved["step"]))
    return int(saved["step"])


# ---- the output folder ---------------------------------------------------------------------------


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
        is_logs_folder(p)
        or (
            _is_dictionary_folder(p)
            and not Ownership("", files=("config.json", "params*.safetensors", "*.tmp")).foreign(p)
        )
    ),
)
"""What a training output folder holds: --overwrite replaces a folder only if it holds nothing else."""


def open_run(cfg: TrainConfig, layout: Layout | None = None, create: bool = True) -> Staged:
    """Where a training run writes (`openscope.files`): the output folder, or with --overwrite a staged
    copy that replaces it once the dictionaries are saved. --resume continues the run whose checkpoint
    is in the output folder, or else that of an interrupted --overwrite run. `create=False` decides and
    checks without writing anything (the trainer creates the folder once its data has given a first
    batch, so bad data leaves nothing behind). Under torchrun rank 0 decides and the others follow
    (its error too, so no rank waits for one that failed)."""
    groups = 1 if layout is None else layout.groups
    if layout is not None and layout.world > 1:
        box: list[Any] = [None]
        if layout.rank == 0:
            try:
                box[0] = _open_run(cfg, groups, create)
            except OpenscopeError as exc:
                box[0] = str(exc)
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise OpenscopeError(box[0])
        return cast(Staged, box[0])
    return _open_run(cfg, groups, create)


_METRICS_ONLY = Ownership(
    "", files=("metrics*.jsonl", "*.tmp"), folders=("logs",), folder_check=is_logs_folder
)


def _open_run(cfg: TrainConfig, groups: int, create: bool) -> Staged:
    target = absolute(cfg.output)
    recover(target)
    check_target(target)
    inputs = [p for p in (cfg.store if not cfg.model else None, cfg.init_from) if p is not None]
    checkpoints = [rank_file(CHECKPOINT, g, groups) for g in range(groups)]
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
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return prepare_output(target, RUN, overwrite=cfg.overwrite, inputs=inputs)


# ---- the step loop -------------------------------------------------------------------------------


def first_then_rest(batches: Iterator[ActivationBatch]) -> Iterator[ActivationBatch]:
    """The same batches, the first one already read: data that cannot give one fails here, before
    the run writes anything."""
    first = next(batches, None)
    return batches if first is None else _then(first, batches)


def _then(first: ActivationBatch, rest: Iterator[ActivationBatch]) -> Iterator[ActivationBatch]:
    try:
        yield first
        yield from rest
    finally:
        close_iterator(rest)


def run_steps(
    batches: Iterator[ActivationBatch],
    start_step: int,
    end: int,
    step_fn: Callable[[int, ActivationBatch], None],
    checkpoint_every: int,
    save: Callable[[int], None],
    bar: tqdm,
    metrics: Flushable,
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
        close_iterator(batches)  # the batches read ahead, and their thread, end with the loop
        bar.close()
        metrics.close()
    return step
