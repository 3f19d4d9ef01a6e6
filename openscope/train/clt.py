"""Training a cross-layer transcoder (CLT): one coder over consecutive layers, from a store or live.

`openscope train --kind clt` (or `skip_clt`) trains one `CrossLayerCoder` whose encoder at layer ℓ
reads `ℓ.mlp_in` and whose latents write to `m.mlp_out` for every m ≥ ℓ. It shares the data,
schedules, checkpoints, metrics and provenance of the single-layer trainer (both run on
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
  or from single-layer transcoders (`--init-from`, `clt_from_transcoders`).
- One process: torchrun data parallelism is not implemented for CLTs (a CLT is one coder; the
  single-layer trainer shares dictionaries out across ranks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor
from tqdm.auto import tqdm

from openscope.activations.batches import ActivationBatch
from openscope.activations.store import ActivationStore
from openscope.coders.clt import CLTConfig, CrossLayerCoder, clt_from_transcoders
from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import find_dictionaries, load_dictionary
from openscope.coders.io import save_clt
from openscope.config import save_json, to_jsonable
from openscope.errors import OpenscopeError
from openscope.models.load import resolve_device
from openscope.models.sites import Site, parse_sites
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
    run_identity,
    run_steps,
    save_checkpoint,
    start_step,
    step_config,
)
from openscope.train.steps import CLTStepStats, DeadLatentTracker, clt_train_step, make_optimizer

log = logging.getLogger(__name__)

CLT_KINDS = ("clt", "skip_clt")


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
    data, _ = from_store(dataclasses.replace(cfg, sites="all"))
    n_layers = ActivationStore(cfg.store, verify=False).manifest["model"].get("n_layers")
    return data, clt_layers(cfg.sites, data.widths, n_layers)


def _one_width(data: TrainingData, sites: list[str]) -> int:
    widths = {data.widths[s] for s in sites}
    if len(widths) != 1:
        raise OpenscopeError(
            f"a CLT needs one width across {sites[0]}..{sites[-1]}; they have {sorted(widths)}"
        )
    return widths.pop()


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
    raw = clt_from_transcoders(load_transcoders(Path(cfg.init_from), layers), ccfg.width, ccfg.skip)
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
        clt.calibrate_threshold_(x, cfg.target_l0)
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

    def state(self) -> dict[str, Any]:
        return {
            "coder": self.clt.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tracker.tokens_since_fired,
            "last": self.last,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.clt.load_state_dict(state["coder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.tokens_since_fired = state["tokens_since_fired"]
        self.last = {k: list(v) for k, v in state["last"].items()}

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.last.items() if v}


def _stacked(batch: ActivationBatch, sites: list[str], scales: Tensor, device: str, step: int) -> Tensor:
    """[L, B, d] normalised activations of the sites (one per layer)."""
    t = torch.stack([batch.acts[s] for s in sites]).to(device)
    if not bool(torch.isfinite(t).all()):
        raise OpenscopeError(
            f"non-finite activations at step {step} in {sites[0]}..{sites[-1]}: the data holds NaN/inf; "
            "nothing was lost (the last checkpoint and saved dictionaries are intact)"
        )
    return t / scales.view(-1, 1, 1)


def train_clt(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train one CLT over the chosen layers (see `trainer.train`, which calls this for --kind clt/skip_clt)."""
    _check_clt_run(cfg)
    device = resolve_device(cfg.device)
    data, layers = _clt_data(cfg, device)
    sites_in = [f"{i}.mlp_in" for i in layers]
    sites_out = [f"{i}.mlp_out" for i in layers]
    scale_in = torch.tensor([data.scales[s] for s in sites_in], device=device)
    scale_out = torch.tensor([data.scales[s] for s in sites_out], device=device)
    total_steps = math.ceil(cfg.tokens / cfg.batch_size)
    step_cfg = step_config(cfg, total_steps)
    run = open_run(cfg, create=False)
    out = run.folder
    identity = {**run_identity(cfg), "world_size": 1}
    checkpoint = out / CHECKPOINT
    metrics_path = out / METRICS

    ccfg = _clt_config(cfg, data, sites_in, sites_out)
    clt = _initial_coder(cfg, ccfg, layers, scale_in.cpu(), scale_out.cpu()).to(device)
    state = _CLTState(clt, cfg.lr, cfg.threshold_lr_scale, min(1_000_000, cfg.tokens))
    log.info("CLT over layers %d-%d: %d x %d latents", layers[0], layers[-1], len(layers), cfg.width)

    first = start_step(cfg, checkpoint, identity, [state], metrics_path)

    batches = first_then_rest(data.batches(sites_in + sites_out, first))
    run = open_run(cfg)  # the data gave its first batch: now the run's folder is made
    metrics = metrics_path.open("a")
    t0 = time.perf_counter()
    bar = tqdm(
        total=total_steps * cfg.batch_size,
        initial=first * cfg.batch_size,
        unit="tok",
        unit_scale=True,
        desc=f"train CLT {layers[0]}-{layers[-1]}",
        disable=not progress,
        dynamic_ncols=True,
    )

    def one_step(step_index: int, batch: ActivationBatch) -> None:
        x = _stacked(batch, sites_in, scale_in, device, step_index)
        y = _stacked(batch, sites_out, scale_out, device, step_index)
        if step_index == 0 and cfg.init_data_dependent and cfg.init_from is None:
            calibrate_clt(state.clt, x, y, cfg)
        stats = clt_train_step(state.clt, state.optimizer, x, y, step_cfg, step_index, state.tracker)
        if not math.isfinite(stats.loss):
            raise OpenscopeError(f"loss became {stats.loss} at step {step_index} of the CLT; lower --lr")
        state.last = {
            "l0": stats.l0,
            "fvu": stats.fvu,
            "dead_fraction": [v / cfg.width for v in stats.dead],
        }
        if step_index % cfg.log_every == 0 or step_index == total_steps - 1:
            _log_metrics(metrics, stats, step_index, cfg, sites_in[0])
        bar.update(cfg.batch_size)
        bar.set_postfix_str(_postfix(state), refresh=False)

    end = total_steps if stop_after is None else min(total_steps, stop_after)
    step = run_steps(
        batches,
        first,
        end,
        one_step,
        cfg.checkpoint_every,
        lambda step: save_checkpoint(checkpoint, step, [state], identity, metrics),
        bar,
        metrics,
    )
    with metrics_path.open("a") as tail:
        save_checkpoint(checkpoint, step, [state], identity, tail)
    finals = {site: {k: v[i] for k, v in state.last.items()} for i, site in enumerate(sites_in) if state.last}
    if stop_after is not None and step < total_steps:
        return TrainResult({}, step, finals, time.perf_counter() - t0)

    folder = _save(state, cfg, data, layers, out, step, scale_in, scale_out)
    run_json = {"config": cfg, "steps": step, "world_size": 1, "layers": layers, "final": finals}
    save_json(out / "run.json", {**run_json, "mean": state.means()})
    run.commit()
    return TrainResult({sites_in[0]: Path(cfg.output) / folder.name}, step, finals, time.perf_counter() - t0)


def _check_clt_run(cfg: TrainConfig) -> None:
    """A CLT run is of a CLT kind, jumprelu or relu, in one process."""
    if cfg.kind not in CLT_KINDS:
        raise OpenscopeError(f"train_clt trains {' or '.join(CLT_KINDS)}, not {cfg.kind!r}")
    if cfg.activation not in ("jumprelu", "relu"):
        raise OpenscopeError(f"a CLT is jumprelu or relu, not {cfg.activation}")
    _, world = init_distributed()
    if world > 1:
        raise OpenscopeError(
            "CLT training runs in one process (torchrun data parallelism is not implemented for CLTs)"
        )


def _clt_config(cfg: TrainConfig, data: TrainingData, sites_in: list[str], sites_out: list[str]) -> CLTConfig:
    """The CLT's shape and start settings from the run's settings and the data's widths."""
    return CLTConfig(
        n_layers=len(sites_in),
        d_in=_one_width(data, sites_in),
        d_out=_one_width(data, sites_out),
        width=cfg.width,
        activation="relu" if cfg.activation == "relu" else "jumprelu",
        skip=cfg.kind == "skip_clt",
        init_threshold=cfg.init_threshold or 0.001,
        seed=cfg.seed,
    )


def _log_metrics(metrics: TextIO, stats: CLTStepStats, step: int, cfg: TrainConfig, site: str) -> None:
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
    metrics.write(json.dumps(row) + "\n")


def _postfix(state: _CLTState) -> str:
    m = state.means()
    if not m:
        return ""
    n = state.clt.cfg.n_layers
    return f"per-layer mean: L0 {m['l0']:.1f} FVU {m['fvu']:.3f} dead {m['dead_fraction']:.0%} ({n} layers)"


def _save(
    state: _CLTState,
    cfg: TrainConfig,
    data: TrainingData,
    layers: list[int],
    out: Path,
    step: int,
    scale_in: Tensor,
    scale_out: Tensor,
) -> Path:
    first, last = layers[0], layers[-1]
    folder = out / f"{first}-{last}_{cfg.kind}_{cfg.activation}_w{cfg.width}"
    means = state.means()
    save_clt(
        state.clt.fold(scale_in, scale_out).cpu(),
        folder,
        hook_point_in=data.hook_points[f"{first}.mlp_in"],
        hook_point_out=data.hook_points[f"{first}.mlp_out"],
        model_name=data.model_name,
        l0=means.get("l0"),
        provenance={
            "openscope": {
                "site_in": f"{first}.mlp_in",
                "site_out": f"{first}.mlp_out",
                "layers": [first, last],
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
