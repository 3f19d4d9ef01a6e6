"""Training a multi-layer coder: a cross-layer transcoder (CLT) or a weakly causal crosscoder, from a
store or live.

`openscope train --kind clt` (or `skip_clt`) trains one `CrossLayerCoder` over consecutive layers whose
encoder at layer ℓ reads `ℓ.mlp_in` and whose latents write to `m.mlp_out` for every m ≥ ℓ.
`--kind crosscoder` trains one over one site kind at chosen layers (`--sites 5,9,12,15.resid_post`):
the same coder, the same loop and step with targets = inputs (a latent of layer ℓ reads ℓ's site and
reconstructs it and the later chosen ones); only which sites are read differs. Both share the data,
schedules, checkpoints, metrics and provenance of the single-layer trainer (all run on
`openscope.train.loop`; the step is `openscope.train.steps.clt_train_step`); what differs:

- Units: each layer's input and target are divided by their own scale C (E‖x/C‖² = 1, from the
  store's statistics or a live sample); the saved CLT is folded (`CrossLayerCoder.fold`)
  so it takes raw activations, in the Gemma Scope 2 multi-layer layout (`save_clt`).
- Loss, per layer and summed over layers, so every coefficient means what it does for a single-layer
  dictionary (a one-layer CLT trains exactly like a transcoder): Σ_m ‖ỹ_m − ŷ_m‖² (Matryoshka: the
  weighted sum over nested prefixes, the first p latents of every layer), + Σ_ℓ λ·(2/L0*)·(L0_ℓ − L0*)²
  (quadratic L0 towards the target at each layer; or Gemma Scope 1's λ·L0_ℓ, or ReLU's L1), + the
  frequency penalty over all L·F latents.
- Sparsity is not decoder-norm weighted: each latent's decoder row is unit-norm over all the layers it
  writes to (the constraint and why: `openscope.coders.clt`), so the weight would be 1 anyway.
- Start: data-dependent (default): cross-layer blocks zero (L independent transcoders), b_dec^m the
  mean target, θ per layer where L0 = target, each decoder row's sign turned to agree with the
  residual its latent's tokens leave, encoder scaled per layer to the best reconstruction size;
  or from single-layer transcoders (`--init-from`, `clt_from_transcoders`; with `--init-greedy`, Gemma
  Scope 2 App. B's greedy choice, `openscope.coders.clt_init`, and a target L0 that starts at the chosen
  latents' summed L0, measured on the first batch and kept in the checkpoint, decaying to --target-l0
  over the sparsity warm-up).
- Under torchrun every rank is a data-parallel replica of the one coder: each trains on its share of
  every global batch, with batch statistics reduced and gradients averaged (`openscope.train.parallel`),
  so the result is the single process's.

A crosscoder starts like a CLT (the data-dependent start; not from single-layer dictionaries) and is
saved in the same multi-layer layout with `type: crosscoder` and its `layers`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from openscope.activations.batches import ActivationBatch
from openscope.activations.store import ActivationStore
from openscope.coders.clt import CLTConfig, CrossLayerCoder, clt_from_transcoders
from openscope.coders.clt_init import clt_from_greedy, layer_l0
from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import find_dictionaries, load_dictionary
from openscope.coders.io import save_clt
from openscope.config import save_json, to_jsonable
from openscope.errors import OpenscopeError
from openscope.models.sites import Site, parse_sites
from openscope.train.config import TrainConfig, TrainResult, target_l0s, widths
from openscope.train.logs import Logs, MetricsSink, check_logs, log_heldout_clt, open_logs
from openscope.train.loop import (
    CHECKPOINT,
    METRICS,
    TrainingData,
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
from openscope.train.parallel import Replicas, env_world, training_device
from openscope.train.steps import (
    CLTStepStats,
    DeadLatentTracker,
    StepConfig,
    clt_train_step,
    make_optimizer,
)

log = logging.getLogger(__name__)

CROSSCODER = "crosscoder"
CLT_KINDS = ("clt", "skip_clt", CROSSCODER)
"""The kinds `train_clt` trains: the multi-layer coders (a CLT with or without skip, a crosscoder)."""


# ---- which layers -------------------------------------------------------------------------------


def clt_layers(spec: str, available: Iterable[str], n_layers: int | None = None) -> list[int]:
    """The consecutive layers a CLT covers: `all` (every layer whose mlp_in and mlp_out are available)
    or the layers a site spec names (e.g. `4-9.mlp_in`); each needs both sites, without gaps."""
    have = set(available)
    layers_of = {Site.from_name(s).layer for s in have if s.partition(".")[2] in ("mlp_in", "mlp_out")}
    complete = sorted(i for i in layers_of if f"{i}.mlp_in" in have and f"{i}.mlp_out" in have)
    if spec.strip() == "all":
        if not complete:
            raise OpenscopeError(
                f"a CLT needs mlp_in and mlp_out sites; the data has {', '.join(sorted(have)) or 'none'}"
            )
        chosen = complete
    else:
        n = n_layers or (max(layers_of) + 1 if layers_of else 1)
        chosen = sorted({s.layer for s in parse_sites(spec, n)})
        missing = [i for i in chosen if i not in complete]
        if missing:
            i = missing[0]
            raise OpenscopeError(
                f"a CLT on layer {i} needs {i}.mlp_in and {i}.mlp_out, which the data does not hold"
            )
    if chosen != list(range(chosen[0], chosen[-1] + 1)):
        raise OpenscopeError(f"a CLT covers consecutive layers; got {', '.join(map(str, chosen))}")
    return chosen


def _clt_data(cfg: TrainConfig, device: str) -> tuple[TrainingData, list[int]]:
    if cfg.model:
        # Live: capture only the chosen layers' mlp_in (the trainer adds their mlp_out).
        data, _ = live(
            dataclasses.replace(cfg, sites="*.mlp_in" if cfg.sites == "all" else cfg.sites), device
        )
        return data, clt_layers("all", data.widths)
    data, _ = from_store(dataclasses.replace(cfg, sites="all"), device)
    n_layers = ActivationStore(cfg.store, verify=False).manifest["model"].get("n_layers")
    return data, clt_layers(cfg.sites, data.widths, n_layers)


def expand_layer_lists(spec: str) -> str:
    """A site spec with bare layer lists spelled out: `5,9,12,15.resid_post` → `5.resid_post,9.resid_post,
    12.resid_post,15.resid_post` (a bare layer selector takes the site kind of the next one that names it)."""
    tokens = [t for t in re.split(r"[,\s]+", spec.strip()) if t]
    out: list[str] = []
    kind = ""
    for tok in reversed(tokens):
        if "." in tok:
            kind = tok.rpartition(".")[2]
        out.append(tok if "." in tok or not kind else f"{tok}.{kind}")
    return ",".join(reversed(out))


def crosscoder_sites(spec: str, available: Iterable[str], n_layers: int | None = None) -> list[str]:
    """The sites a crosscoder reads and reconstructs, in layer order: one site kind at one or more layers
    (`5,9,12,15.resid_post`, `5.resid_post,9.resid_post`, `4-7.attn_out`), each held by the data; `all`:
    every layer of the data's one site kind."""
    have = set(available)
    if spec.strip() == "all":
        kinds = sorted({s.partition(".")[2] for s in have})
        if len(kinds) != 1:
            raise OpenscopeError(
                f"a crosscoder reads one site kind and the data holds {', '.join(kinds) or 'none'}; name "
                "its sites, e.g. --sites 5,9,12,15.resid_post"
            )
        chosen = [Site.from_name(s) for s in have]
    else:
        n = n_layers or max((Site.from_name(s).layer + 1 for s in have), default=1)
        chosen = parse_sites(expand_layer_lists(spec), n)
        kinds = list(dict.fromkeys(s.kind for s in chosen))
        if len(kinds) > 1:
            raise OpenscopeError(
                f"a crosscoder reads one site kind at chosen layers; --sites {spec} names {' and '.join(kinds)}"
            )
        missing = [s.name for s in chosen if s.name not in have]
        if missing:
            raise OpenscopeError(
                f"a crosscoder on {missing[0]} needs that site, which the data does not hold "
                f"(it has {', '.join(sorted(have)) or 'none'})"
            )
    return [s.name for s in sorted(chosen, key=lambda s: s.order)]


def _crosscoder_data(cfg: TrainConfig, device: str) -> tuple[TrainingData, list[str]]:
    if cfg.model:
        spec = expand_layer_lists(cfg.sites)
        # Live: capture the chosen sites only (as an SAE run would: no transcoder targets added).
        data, _ = live(dataclasses.replace(cfg, sites=spec, kind="sae"), device)
        return data, crosscoder_sites(spec, data.widths)
    data, _ = from_store(dataclasses.replace(cfg, sites="all"), device)
    n_layers = ActivationStore(cfg.store, verify=False).manifest["model"].get("n_layers")
    return data, crosscoder_sites(cfg.sites, data.widths, n_layers)


def _run_sites(cfg: TrainConfig, device: str) -> tuple[TrainingData, list[str], list[str]]:
    """The data and the coder's sites, one per layer: (data, sites read, sites predicted)."""
    if cfg.kind == CROSSCODER:
        data, sites = _crosscoder_data(cfg, device)
        return data, sites, sites
    data, layers = _clt_data(cfg, device)
    return data, [f"{i}.mlp_in" for i in layers], [f"{i}.mlp_out" for i in layers]


def _one_width(data: TrainingData, sites: list[str], kind: str = "CLT") -> int:
    found = {data.widths[s] for s in sites}
    if len(found) != 1:
        raise OpenscopeError(
            f"a {kind} needs one width across {sites[0]}..{sites[-1]}; they have {sorted(found)}"
        )
    return found.pop()


def _layers_text(kind: str, layers: list[int]) -> str:
    """`0-17` (a CLT's consecutive layers) or `5,9,12,15` (a crosscoder's chosen ones)."""
    return ",".join(map(str, layers)) if kind == CROSSCODER else f"{layers[0]}-{layers[-1]}"


# ---- the coder at step 0 ------------------------------------------------------------------------


def load_transcoders(folder: Path, layers: list[int]) -> list[SparseCoder]:
    """The single-layer transcoders (ℓ.mlp_in → ℓ.mlp_out) under folder for each layer, in order."""
    found: dict[int, tuple[SparseCoder, Path]] = {}
    for path in find_dictionaries(folder):
        d = load_dictionary(path)
        if not isinstance(d.coder, SparseCoder) or d.coder.cfg.kind == "sae":
            continue
        layer = d.site_in.layer
        if d.site_in.kind != "mlp_in" or d.site_out != Site(layer, "mlp_out") or layer not in layers:
            continue
        if layer in found:
            raise OpenscopeError(
                f"{folder} holds two transcoders for layer {layer}: {found[layer][1]} and {path}"
            )
        found[layer] = (d.coder, path)
    missing = [i for i in layers if i not in found]
    if missing:
        raise OpenscopeError(
            f"--init-from {folder} has no transcoder {missing[0]}.mlp_in -> {missing[0]}.mlp_out"
        )
    return [found[i][0] for i in layers]


def _initial_coder(
    cfg: TrainConfig, ccfg: CLTConfig, layers: list[int], scale_in: Tensor, scale_out: Tensor
) -> CrossLayerCoder:
    """The CLT to train (normalised units): random (Gemma Scope init), or from transcoders."""
    if cfg.init_from is None:
        return CrossLayerCoder(ccfg)
    transcoders = load_transcoders(Path(cfg.init_from), layers)
    if cfg.init_greedy:
        raw, choice = clt_from_greedy(transcoders, ccfg.width, ccfg.skip)
        skipped = [int(u.sum()) for u in choice.used]
        log.info("greedy CLT init: later-layer latents marked used per layer: %s", skipped)
    else:
        raw = clt_from_transcoders(transcoders, ccfg.width, ccfg.skip)
    got = (raw.cfg.d_in, raw.cfg.d_out, raw.cfg.activation)
    if got != (ccfg.d_in, ccfg.d_out, ccfg.activation):
        raise OpenscopeError(
            f"the transcoders in {cfg.init_from} are {got[2]} {got[0]} -> {got[1]}; the CLT is "
            f"{ccfg.activation} {ccfg.d_in} -> {ccfg.d_out}"
        )
    log.info("CLT starts from the transcoders in %s", cfg.init_from)
    # The raw transcoders, in the units the training sees: the inverse of the fold done at saving.
    return raw.fold(1 / scale_in, 1 / scale_out)


@torch.no_grad()
def calibrate_clt(clt: CrossLayerCoder, x: Tensor, y: Tensor, cfg: TrainConfig) -> None:
    """Data-dependent start from the first (normalised) batch; see the module docstring."""
    clt.zero_cross_layer_decoders_()
    clt.init_decoder_bias_(y)
    if clt.log_threshold is not None and cfg.init_threshold is None:
        clt.calibrate_threshold_(x, target_l0s(cfg)[0], cfg.init_threshold_per_latent)
    clt.align_decoder_signs_(x, y)
    s = clt.fit_encoder_scale_(x, y)
    log.info("CLT data-dependent init (encoder scales %.3g..%.3g)", float(s.min()), float(s.max()))


# ---- training state -----------------------------------------------------------------------------


class _CLTState:
    """The CLT's training state: coder (normalised units), Adam, dead-latent counters, last metrics."""

    def __init__(self, clt: CrossLayerCoder, lr: float, threshold_lr_scale: float, dead_after: int) -> None:
        self.clt = clt
        self.optimizer = make_optimizer(clt, lr, threshold_lr_scale)
        self.tracker = DeadLatentTracker(clt.cfg.n_layers * clt.cfg.width, dead_after)
        self.last: dict[str, list[float]] = {}
        """Last step's per-layer l0, fvu and dead_fraction."""
        self.l0_start: float | None = None
        """--init-greedy: the target L0 at step 0 (the chosen latents' summed L0, mean over layers)."""

    def state(self) -> dict[str, Any]:
        return {
            "coder": self.clt.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tracker.tokens_since_fired,
            "last": self.last,
        } | ({"l0_start": self.l0_start} if self.l0_start is not None else {})

    def load(self, state: Mapping[str, Any]) -> None:
        self.clt.load_state_dict(state["coder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.tokens_since_fired = state["tokens_since_fired"]
        self.last = {k: list(v) for k, v in state["last"].items()}
        self.l0_start = state.get("l0_start")

    def step_config(self, cfg: StepConfig) -> StepConfig:
        """The step's settings: with a greedy start, the target L0 decaying from `l0_start` over the
        sparsity warm-up."""
        if self.l0_start is None:
            return cfg
        return dataclasses.replace(
            cfg, target_l0_start=self.l0_start, target_l0_decay_steps=cfg.sparsity_warmup_steps
        )

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.last.items() if v}


def _stacked(
    batch: ActivationBatch,
    sites: list[str],
    scales: Tensor,
    device: str,
    step: int,
    replicas: Replicas | None = None,
) -> Tensor:
    """[L, B, d] normalised activations of the sites (one per layer), checked finite (with `replicas`:
    on every replica, so all of them stop together on bad data and none waits on one that stopped)."""
    t = torch.stack([batch.acts[s] for s in sites]).to(device)
    finite = torch.isfinite(t).all()
    if not bool(finite if replicas is None else replicas.all_true(finite)):
        raise OpenscopeError(
            f"non-finite activations at step {step} in {sites[0]}..{sites[-1]}: the data holds NaN/inf; "
            "nothing was lost (the last checkpoint and saved dictionaries are intact)"
        )
    return t / scales.view(-1, 1, 1)


def train_clt(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train one CLT or crosscoder over the chosen layers (see `trainer.train`, which calls this for
    --kind clt, skip_clt or crosscoder); under torchrun every rank is a data-parallel replica."""
    _check_clt_run(cfg)
    device = training_device(cfg.device)
    data, sites_in, sites_out = _run_sites(cfg, device)
    par = run_layout(cfg, 1, device)
    layers = [Site.from_name(s).layer for s in sites_in]
    label = "crosscoder" if cfg.kind == CROSSCODER else "CLT"
    scale_in = torch.tensor([data.scales[s] for s in sites_in], device=device)
    scale_out = torch.tensor([data.scales[s] for s in sites_out], device=device)
    total_steps = math.ceil(cfg.tokens / cfg.batch_size)
    step_cfg = step_config(cfg, total_steps, bf16=par.bf16)
    run = open_run(cfg, par.layout, create=False)
    out = run.folder
    identity = {**run_identity(cfg), **par.identity()}
    checkpoint = out / CHECKPOINT
    metrics_path = out / METRICS

    ccfg = _clt_config(cfg, data, sites_in, sites_out)
    clt = _initial_coder(cfg, ccfg, layers, scale_in.cpu(), scale_out.cpu()).to(device)
    state = _CLTState(clt, cfg.lr, cfg.threshold_lr_scale, min(cfg.dead_tokens, cfg.tokens))
    log.info(
        "%s over layers %s: %d x %d latents", label, _layers_text(cfg.kind, layers), len(layers), ccfg.width
    )

    first = start_step(cfg, checkpoint, identity, [state], metrics_path if par.writes else None)

    reps = par.replicas
    sites = list(dict.fromkeys(sites_in + sites_out))
    batches = first_then_rest(replica_batches(data, sites, first, par))  # this replica's rows only
    run = open_run(cfg, par.layout)  # the data gave its first batch: now the run's folder is made
    metrics = metrics_path.open("a") if par.writes else io.StringIO()  # other replicas write nothing
    logs = (
        open_logs(cfg, out, metrics, first, (0, 1), sites_in + sites_out, total_steps)
        if par.writes
        else Logs([])
    )
    t0 = time.perf_counter()
    bar = tqdm(
        total=total_steps * cfg.batch_size,
        initial=first * cfg.batch_size,
        unit="tok",
        unit_scale=True,
        desc=f"train {label} {_layers_text(cfg.kind, layers)}",
        disable=not progress or not par.writes,
        dynamic_ncols=True,
    )

    def one_step(step_index: int, batch: ActivationBatch) -> None:
        x, y = _inputs(batch, (sites_in, sites_out), (scale_in, scale_out), device, step_index, reps)
        if step_index == 0 and cfg.init_data_dependent and cfg.init_from is None:
            # Every replica starts from the whole first batch (its rows gathered), so all start alike.
            whole = (x, y) if reps is None else (reps.gather_rows(x, 1), reps.gather_rows(y, 1))
            calibrate_clt(state.clt, *whole, cfg)
        if step_index == 0 and cfg.init_greedy:
            whole_x = x if reps is None else reps.gather_rows(x, 1)
            state.l0_start = max(float(layer_l0(state.clt, whole_x).mean()), 1e-3)
            log.info("greedy CLT init: target L0 starts at %.4g", state.l0_start)
        step_now = state.step_config(step_cfg)
        stats = clt_train_step(state.clt, state.optimizer, x, y, step_now, step_index, state.tracker, reps)
        if not math.isfinite(stats.loss):
            raise OpenscopeError(f"loss became {stats.loss} at step {step_index} of the {label}; lower --lr")
        dead = [v / widths(cfg)[0] for v in stats.dead]
        state.last = {"l0": stats.l0, "fvu": stats.fvu, "dead_fraction": dead}
        if step_index % cfg.log_every == 0 or step_index == total_steps - 1:
            _log_metrics(logs, stats, step_index, cfg, sites_in[0])
        log_heldout_clt(logs, state.clt, step_index, cfg, (sites_in, sites_out), (scale_in, scale_out))
        bar.update(cfg.batch_size)
        bar.set_postfix_str(_postfix(state), refresh=False)

    end = total_steps if stop_after is None else min(total_steps, stop_after)
    step = run_steps(
        batches,
        first,
        end,
        one_step,
        cfg.checkpoint_every,
        lambda step: save_checkpoint(checkpoint, step, [state], identity, metrics) if par.writes else None,
        bar,
        logs,
    )
    if par.writes:
        with metrics_path.open("a") as tail:
            save_checkpoint(checkpoint, step, [state], identity, tail)
    finals = {site: {k: v[i] for k, v in state.last.items()} for i, site in enumerate(sites_in) if state.last}
    if stop_after is not None and step < total_steps:
        return TrainResult({}, step, finals, time.perf_counter() - t0)

    folder = out / _folder_name(cfg, sites_in)
    if par.writes:
        _save(state, cfg, data, sites_in, sites_out, out, step, (scale_in, scale_out))
    if par.layout.world > 1:
        dist.barrier()  # every replica is done before the run's folder is committed
    if par.layout.rank == 0:
        run_json = {"config": cfg, "steps": step, **par.identity(), "layers": layers, "final": finals}
        run_json.pop("precision", None)
        save_json(out / "run.json", {**run_json, "mean": state.means()})
        run.commit()
    return TrainResult({sites_in[0]: Path(cfg.output) / folder.name}, step, finals, time.perf_counter() - t0)


def _inputs(
    batch: ActivationBatch,
    sites: tuple[list[str], list[str]],
    scales: tuple[Tensor, Tensor],
    device: str,
    step: int,
    replicas: Replicas | None = None,
) -> tuple[Tensor, Tensor]:
    """The coder's normalised inputs and targets [L, B, d] from a batch (a replica's own rows under
    data parallelism, checked on every replica: `_stacked`)."""
    batch = batch.to(device)  # once for inputs and targets; page-locked rows copy without blocking
    x = _stacked(batch, sites[0], scales[0], device, step, replicas)
    # A crosscoder's targets are its inputs (same sites, same scales).
    return x, x if sites[1] == sites[0] else _stacked(batch, sites[1], scales[1], device, step, replicas)


def _check_clt_run(cfg: TrainConfig) -> None:
    """A CLT or crosscoder run is of one of CLT_KINDS, jumprelu or relu, in one process; a crosscoder's
    sites are named (live) and it starts fresh. (One width and target L0: `trainer.train` checks.)"""
    if cfg.kind not in CLT_KINDS:
        raise OpenscopeError(f"train_clt trains {' or '.join(CLT_KINDS)}, not {cfg.kind!r}")
    if cfg.activation not in ("jumprelu", "relu"):
        raise OpenscopeError(f"a {cfg.kind} is jumprelu or relu, not {cfg.activation}")
    check_logs(cfg)
    if cfg.kind == CROSSCODER and cfg.init_from is not None:
        raise OpenscopeError("--init-from starts a CLT from transcoders; a crosscoder starts fresh")
    if cfg.kind == CROSSCODER and cfg.model and cfg.sites.strip() == "all":
        raise OpenscopeError("a live crosscoder needs its sites named, e.g. --sites 5,9,12,15.resid_post")
    _, world, _ = env_world()
    if cfg.data_parallel not in (0, world):
        raise OpenscopeError(
            f"a {cfg.kind} is one dictionary: under torchrun every process is a data-parallel replica of it; "
            f"--data-parallel must be 0 (auto) or {world}, not {cfg.data_parallel}"
        )


def _clt_config(cfg: TrainConfig, data: TrainingData, sites_in: list[str], sites_out: list[str]) -> CLTConfig:
    """The coder's shape and start settings from the run's settings and the data's widths."""
    return CLTConfig(
        n_layers=len(sites_in),
        d_in=_one_width(data, sites_in, cfg.kind),
        d_out=_one_width(data, sites_out, cfg.kind),
        width=widths(cfg)[0],
        activation="relu" if cfg.activation == "relu" else "jumprelu",
        skip=cfg.kind == "skip_clt",
        init_threshold=cfg.init_threshold or 0.001,
        seed=cfg.seed,
        kind="crosscoder" if cfg.kind == CROSSCODER else "clt",
    )


def _log_metrics(metrics: MetricsSink, stats: CLTStepStats, step: int, cfg: TrainConfig, site: str) -> None:
    n = len(stats.l0)
    row = {
        "step": step,
        "site": site,
        "tokens": (step + 1) * cfg.batch_size,
        "loss": stats.loss,
        "reconstruction": stats.reconstruction,
        "sparsity": stats.sparsity,
        "frequency": stats.frequency,
        "l0": sum(stats.l0) / n,
        "fvu": sum(stats.fvu) / n,
        "dead": sum(stats.dead),
        "lr": stats.lr,
        "sparsity_coeff": stats.sparsity_coeff,
        "l0_per_layer": stats.l0,
        "fvu_per_layer": stats.fvu,
        "dead_per_layer": stats.dead,
    }
    metrics.log(row)


def _postfix(state: _CLTState) -> str:
    m = state.means()
    if not m:
        return ""
    n = state.clt.cfg.n_layers
    return f"per-layer mean: L0 {m['l0']:.1f} FVU {m['fvu']:.3f} dead {m['dead_fraction']:.0%} ({n} layers)"


def _folder_name(cfg: TrainConfig, sites_in: list[str]) -> str:
    """`<first>-<last>_<kind>_<activation>_w<width>` (a CLT), `<layers>_<site kind>_crosscoder_...`."""
    layers = [Site.from_name(s).layer for s in sites_in]
    kind = Site.from_name(sites_in[0]).kind
    where = f"{'_'.join(map(str, layers))}_{kind}" if cfg.kind == CROSSCODER else f"{layers[0]}-{layers[-1]}"
    return f"{where}_{cfg.kind}_{cfg.activation}_w{widths(cfg)[0]}"


def _save(
    state: _CLTState,
    cfg: TrainConfig,
    data: TrainingData,
    sites_in: list[str],
    sites_out: list[str],
    out: Path,
    step: int,
    scales: tuple[Tensor, Tensor],
) -> Path:
    """Save the coder folded for raw activations: a CLT in `<first>-<last>_<kind>_...`, a crosscoder in
    `<layers>_<site kind>_crosscoder_...` (e.g. `5_9_12_15_resid_post_crosscoder_jumprelu_w4096`)."""
    layers = [Site.from_name(s).layer for s in sites_in]
    first, last = layers[0], layers[-1]
    crosscoder = cfg.kind == CROSSCODER
    kind = Site.from_name(sites_in[0]).kind
    folder = out / _folder_name(cfg, sites_in)
    means = state.means()
    save_clt(
        state.clt.fold(*scales).cpu(),
        folder,
        hook_point_in=data.hook_points[sites_in[0]],
        hook_point_out=data.hook_points[sites_out[0]],
        model_name=data.model_name,
        l0=means.get("l0"),
        layers=layers if crosscoder else None,
        site_kind=kind if crosscoder else None,
        provenance={
            "openscope": {
                "site_in": sites_in[0],
                "site_out": sites_out[0],
                "layers": layers if crosscoder else [first, last],
                "data": data.description,
                "tokens_seen": step * cfg.batch_size,
                "final_l0": state.last.get("l0"),
                "final_fvu": state.last.get("fvu"),
                "dead_fraction": state.last.get("dead_fraction"),
                "train_config": to_jsonable(cfg),
                "command_line": shlex.join(sys.argv),
            }
        },
    )
    return folder
