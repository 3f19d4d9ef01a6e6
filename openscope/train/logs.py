"""Where a training run's metrics go, and its periodic held-out evaluation.

Every run writes metrics.jsonl (one JSON row per dictionary every --log-every steps: the numbers of the
progress bar and the losses). `--log wandb` and `--log tensorboard` send the same rows to Weights &
Biases (offline with `WANDB_MODE=offline`: no network needed; `wandb sync` uploads later) and to
TensorBoard event files, under the run folder's `logs/`. Both are optional extras
(`pip install openscope[wandb]`, `openscope[tensorboard]`); each sink is a `MetricsSink`.

Held-out evaluation (`--eval-every N`, store runs): the store's last contexts, about --eval-tokens rows,
are held out of training (the training batches are the store's seeded batches with those rows taken
out, packed again to --batch-size, so the order stays a pure function of the seed and resume stays
exact), and every N steps and at the last one each dictionary's L0 and FVU on them are logged as
`heldout_l0` / `heldout_fvu` rows. This lives in `train` (evaluation by splicing is `openscope.eval`,
a later layer): it measures reconstruction only, on the same sites the dictionary trains on.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TextIO

import torch
from torch import Tensor

from openscope.activations.batches import ActivationBatch
from openscope.activations.store import ActivationStore
from openscope.coders.clt import CrossLayerCoder
from openscope.coders.coder import SparseCoder
from openscope.config import to_jsonable
from openscope.data.chat import role_ids
from openscope.errors import OpenscopeError
from openscope.train.config import TrainConfig

LOGS = "logs"
"""The folder of the wandb and tensorboard sinks inside a run's output folder."""
SINKS = ("wandb", "tensorboard")
"""The sinks `--log` can name besides metrics.jsonl (always written)."""
HELDOUT_SHARE = 0.2
"""The most of a store's contexts --eval-tokens may hold out of training."""


# ---- sinks ---------------------------------------------------------------------------------------


class MetricsSink(Protocol):
    """Something a training run sends its metric rows to (a row: `step`, `site`, numbers, lists)."""

    def log(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one JSON line per row (the file stays open: checkpoints record its length)."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def log(self, row: Mapping[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.file.close()


def row_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metric row as named scalars: `<dictionary>/<metric>`, the dictionary its site (plus
    `_w<width>_l0_<target>` when a site has several); a per-layer list gives `<metric>/<i>` each; a
    held-out row gives its `heldout_*` values only."""
    name = str(row.get("site", "run"))
    if "width" in row and "target_l0" in row:
        name += f"_w{row['width']}_l0_{row['target_l0']:g}"
    heldout = any(k.startswith("heldout_") for k in row)  # its `tokens` is the training row's
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in ("step", "site", "width", "target_l0") or (heldout and not key.startswith("heldout_")):
            continue
        if isinstance(value, list):
            out |= {f"{name}/{key}/{i}": float(v) for i, v in enumerate(value)}
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{name}/{key}"] = float(value)
    return out


def _import_sink(name: str) -> ModuleType:
    """The sink's library (optional extras, imported only when asked for)."""
    try:
        if name == "wandb":
            import wandb  # optional extra: openscope[wandb]

            return wandb
        import torch.utils.tensorboard as tensorboard  # optional extra: needs the tensorboard package

        return tensorboard
    except ImportError:
        raise OpenscopeError(
            f"--log {name} needs the {name} package: pip install 'openscope[{name}]'"
        ) from None


class TensorboardSink:
    """TensorBoard event files in `folder`; a resumed run purges the events after its checkpoint."""

    def __init__(self, folder: Path, first_step: int) -> None:
        writer = _import_sink("tensorboard").SummaryWriter
        self.writer = writer(str(folder), purge_step=first_step or None, flush_secs=10)

    def log(self, row: Mapping[str, Any]) -> None:
        for tag, value in row_scalars(row).items():
            self.writer.add_scalar(tag, value, int(row["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run in `folder` (its id kept there, so a resumed run continues the same
    run); the project is $WANDB_PROJECT or `openscope`, the mode $WANDB_MODE (offline: no network)."""

    def __init__(self, folder: Path, name: str, config: Mapping[str, Any], first_step: int) -> None:
        wandb = _import_sink("wandb")
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if first_step and id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "openscope"),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(folder),
            config=dict(config),
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, row: Mapping[str, Any]) -> None:
        self.run.log(row_scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class Flushable(Protocol):
    """What the step loop flushes before each checkpoint and closes at the end (a file, `Logs`)."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class Logs:
    """The run's sinks together (metrics.jsonl first, then those --log names), and its held-out rows
    (`--eval-every`, else None)."""

    def __init__(self, sinks: Sequence[MetricsSink], heldout: HeldOut | None = None) -> None:
        self.sinks = list(sinks)
        self.heldout = heldout

    def log(self, row: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(row)

    def flush(self) -> None:
        """Flush metrics.jsonl (a checkpoint records its length)."""
        for sink in self.sinks:
            if isinstance(sink, JsonlSink):
                sink.file.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def sink_names(cfg: TrainConfig) -> list[str]:
    """The sinks --log names (comma list of wandb, tensorboard; empty: metrics.jsonl only)."""
    names = [n.strip() for n in cfg.log.split(",") if n.strip()]
    for n in names:
        if n not in SINKS:
            raise OpenscopeError(f"--log takes {' or '.join(SINKS)} (a comma list), not {n!r}")
    return list(dict.fromkeys(names))


def check_logs(cfg: TrainConfig) -> None:
    """--log, --eval-every and --eval-tokens valid and their libraries installed (before any work)."""
    for name in sink_names(cfg):
        _import_sink(name)
    if cfg.eval_every < 0:
        raise OpenscopeError(f"--eval-every must be >= 0 (0: off), got {cfg.eval_every}")
    if cfg.eval_tokens <= 0:
        raise OpenscopeError(f"--eval-tokens must be positive, got {cfg.eval_tokens}")
    if cfg.eval_every and cfg.model:
        raise OpenscopeError(
            "--eval-every holds out the last contexts of a store; a live run (--model) has no store: "
            "harvest one and train with --store"
        )


def open_logs(
    cfg: TrainConfig,
    folder: Path,
    metrics: TextIO,
    first_step: int,
    place: tuple[int, int] = (0, 1),
    heldout_sites: Sequence[str] = (),
    total_steps: int = 0,
) -> Logs:
    """metrics.jsonl (the open file) plus the sinks --log names, under `folder`/logs (`place`: this
    process's index and their number under torchrun, each in a `rank<i>` sub-folder logging its own
    dictionaries), and with --eval-every the held-out rows of `heldout_sites`."""
    rank, world = place
    sinks: list[MetricsSink] = [JsonlSink(metrics)]
    suffix = f"rank{rank}" if world > 1 else ""
    for name in sink_names(cfg):
        where = folder / LOGS / name / suffix
        if name == "tensorboard":
            sinks.append(TensorboardSink(where, first_step))
        else:
            label = Path(cfg.output).name + (f" {suffix}" if suffix else "")
            sinks.append(WandbSink(where, label, to_jsonable(cfg), first_step))
    heldout = open_heldout(cfg, heldout_sites, total_steps) if heldout_sites else None
    return Logs(sinks, heldout)


def is_logs_folder(folder: Path) -> bool:
    """A run's `logs` folder as openscope writes it: only wandb/ and tensorboard/ inside."""
    return folder.name == LOGS and all(
        p.is_dir() and not p.is_symlink() and p.name in SINKS for p in folder.iterdir()
    )


# ---- the held-out slice ---------------------------------------------------------------------------


def heldout_cutoff(store: ActivationStore, cfg: TrainConfig) -> int | None:
    """The first held-out context of the store (contexts from it on are held out of training), or None
    without --eval-every. About --eval-tokens rows, from the store's mean rows per context."""
    if not cfg.eval_every:
        return None
    n_contexts = sum(int(s["n_contexts"]) for s in store.shards)
    n_rows = sum(int(s["n_rows"]) for s in store.shards)
    end = max((_context_end(s) for s in store.shards), default=0)
    held = math.ceil(cfg.eval_tokens * n_contexts / max(n_rows, 1))
    if held > HELDOUT_SHARE * n_contexts:
        raise OpenscopeError(
            f"--eval-tokens {cfg.eval_tokens} would hold out {held} of the store's {n_contexts} contexts "
            f"({n_rows} rows); hold out at most a fifth: lower --eval-tokens"
        )
    return end - held


def _context_end(shard: Mapping[str, Any]) -> int:
    return int(shard.get("context_start", 0)) + int(shard["n_contexts"])


def _take(batch: ActivationBatch, index: Tensor) -> ActivationBatch:
    return ActivationBatch(
        {k: v[index] for k, v in batch.acts.items()},
        batch.token_ids[index],
        batch.context[index],
        batch.position[index],
        None if batch.role is None else batch.role[index],
    )


def _cat(batches: Sequence[ActivationBatch]) -> ActivationBatch:
    if len(batches) == 1:
        return batches[0]
    roles = [b.role for b in batches]
    return ActivationBatch(
        {k: torch.cat([b.acts[k] for b in batches]) for k in batches[0].acts},
        torch.cat([b.token_ids for b in batches]),
        torch.cat([b.context for b in batches]),
        torch.cat([b.position for b in batches]),
        None if any(r is None for r in roles) else torch.cat(roles),  # type: ignore[arg-type]
    )


def without_heldout(
    batches: Iterator[ActivationBatch], cutoff: int, batch_size: int
) -> Iterator[ActivationBatch]:
    """The batches with the held-out rows (context ≥ cutoff) taken out, packed again to batch_size
    rows in their order (a pure function of the stream: resumed runs see the same batches)."""
    pending: list[ActivationBatch] = []
    n = 0
    for batch in batches:
        keep = batch.context < cutoff
        if not bool(keep.all()):
            batch = _take(batch, keep.nonzero().squeeze(1))
        pending.append(batch)
        n += len(batch.context)
        while n >= batch_size:
            whole = _cat(pending)
            yield _take(whole, torch.arange(batch_size))
            pending, n = [_take(whole, torch.arange(batch_size, n))], n - batch_size


def heldout_rows(store: ActivationStore, sites: Sequence[str], cutoff: int, roles: str) -> dict[str, Tensor]:
    """The held-out rows (context ≥ cutoff; of `roles` only, when given) of each site, float32."""
    wanted = torch.tensor(list(role_ids(roles)), dtype=torch.uint8)
    keys = [store.check_site(s) for s in sites]
    meta = ["context"] + (["role"] if len(wanted) else [])
    parts: list[dict[str, Tensor]] = []
    for i, shard in enumerate(store.shards):
        if _context_end(shard) <= cutoff:
            continue
        data = store.read_shard(i, keys + meta)
        keep = data["context"] >= cutoff
        if len(wanted):
            keep &= torch.isin(data["role"], wanted)
        parts.append({k: data[k][keep].float() for k in keys})
    rows = {s: torch.cat([p[k] for p in parts]) for s, k in zip(sites, keys, strict=True)} if parts else {}
    if not rows or len(next(iter(rows.values()))) == 0:
        raise OpenscopeError("the held-out contexts of the store hold no rows: raise --eval-tokens")
    return rows


class HeldOut:
    """The held-out rows of a run's sites and the evaluation of a dictionary on them."""

    def __init__(self, rows: dict[str, Tensor], every: int, total_steps: int, batch_size: int) -> None:
        self.rows, self.every, self.total_steps, self.batch_size = rows, every, total_steps, batch_size
        self._variance: dict[tuple[str, ...], Tensor] = {}

    def due(self, step: int) -> bool:
        """Whether to evaluate after step `step` (every --eval-every steps, and after the last)."""
        return (step + 1) % self.every == 0 or step == self.total_steps - 1

    def _total_variance(self, sites: Sequence[str]) -> Tensor:
        """Σ‖y − ȳ‖² of the held-out targets of each site [len(sites)] (ȳ over all held-out rows)."""
        key = tuple(sites)
        if key not in self._variance:
            ys = [self.rows[s].double() for s in sites]
            self._variance[key] = torch.stack([(y - y.mean(0)).pow(2).sum() for y in ys])
        return self._variance[key]

    def _measure(
        self, forward: Callable[[slice], tuple[Tensor, Tensor, Tensor]], sites_out: Sequence[str]
    ) -> tuple[list[float], list[float]]:
        """(L0 per layer, FVU per layer) of `forward(rows) -> (target, reconstruction, l0)` over the
        held-out rows in batches of batch_size (targets and reconstructions [L, B, d], l0 [L])."""
        n = len(self.rows[sites_out[0]])
        sse = torch.zeros(len(sites_out), dtype=torch.float64)
        l0 = torch.zeros(len(sites_out), dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                rows = slice(start, min(n, start + self.batch_size))
                y, y_hat, batch_l0 = forward(rows)
                sse += (y - y_hat).double().pow(2).sum((1, 2)).cpu()
                l0 += batch_l0.double().cpu() * (rows.stop - rows.start)
        fvu = sse / self._total_variance(sites_out).clamp_min(1e-12)
        return (l0 / n).tolist(), fvu.tolist()

    def evaluate(self, coder: SparseCoder, site_in: str, site_out: str) -> dict[str, float]:
        """A single-layer dictionary's held-out L0 and FVU (raw activations in, as it trains)."""
        device = coder.w_enc.device

        def forward(rows: slice) -> tuple[Tensor, Tensor, Tensor]:
            x = self.rows[site_in][rows].to(device)
            y = self.rows[site_out][rows].to(device)
            out = coder(x)
            return y.unsqueeze(0), out.reconstruction.unsqueeze(0), out.l0.reshape(1)

        l0, fvu = self._measure(forward, [site_out])
        return {"heldout_l0": l0[0], "heldout_fvu": fvu[0], "heldout_rows": len(self.rows[site_in])}

    def evaluate_clt(
        self, clt: CrossLayerCoder, sites: tuple[list[str], list[str]], scales: tuple[Tensor, Tensor]
    ) -> dict[str, Any]:
        """A CLT's or crosscoder's held-out L0 and FVU per layer (normalised units, as it trains),
        with their means over layers."""
        (sites_in, sites_out), (scale_in, scale_out) = sites, scales
        device = scale_in.device

        def stacked(names: list[str], scale: Tensor, rows: slice) -> Tensor:
            return torch.stack([self.rows[s][rows] for s in names]).to(device) / scale.view(-1, 1, 1)

        def forward(rows: slice) -> tuple[Tensor, Tensor, Tensor]:
            x = stacked(sites_in, scale_in, rows)
            y = stacked(sites_out, scale_out, rows)
            out = clt.train_forward(x)
            # FVU is scale-free per layer: compare in raw units so the total variance is the raw one.
            s = scale_out.view(-1, 1, 1)
            return y * s, out.reconstruction * s, out.l0

        l0, fvu = self._measure(forward, sites_out)
        return {
            "heldout_l0": sum(l0) / len(l0),
            "heldout_fvu": sum(fvu) / len(fvu),
            "heldout_rows": len(self.rows[sites_in[0]]),
            "heldout_l0_per_layer": l0,
            "heldout_fvu_per_layer": fvu,
        }


def open_heldout(cfg: TrainConfig, sites: Sequence[str], total_steps: int) -> HeldOut | None:
    """The run's held-out rows of `sites` (None without --eval-every)."""
    if not cfg.eval_every:
        return None
    store = ActivationStore(cfg.store)
    cutoff = heldout_cutoff(store, cfg)
    assert cutoff is not None
    rows = heldout_rows(store, sorted(set(sites)), cutoff, cfg.roles)
    return HeldOut(rows, cfg.eval_every, total_steps, cfg.batch_size)


def heldout_row(
    step: int, site: str, labels: Mapping[str, Any], tokens: int, measured: Mapping[str, Any]
) -> dict[str, Any]:
    """The metrics row of one held-out evaluation (`labels`: width and target L0 when a site has several)."""
    return {"step": step, "site": site, **labels, "tokens": tokens, **measured}


def log_heldout_clt(
    logs: Logs,
    clt: CrossLayerCoder,
    step: int,
    cfg: TrainConfig,
    sites: tuple[list[str], list[str]],
    scales: tuple[Tensor, Tensor],
) -> None:
    """--eval-every for a CLT or crosscoder: after `step`, when due, its held-out row."""
    if logs.heldout is not None and logs.heldout.due(step):
        measured = logs.heldout.evaluate_clt(clt, sites, scales)
        logs.log(heldout_row(step, sites[0][0], {}, (step + 1) * cfg.batch_size, measured))


__all__ = [
    "LOGS",
    "Flushable",
    "HeldOut",
    "JsonlSink",
    "Logs",
    "MetricsSink",
    "TensorboardSink",
    "WandbSink",
    "check_logs",
    "heldout_cutoff",
    "heldout_row",
    "heldout_rows",
    "is_logs_folder",
    "log_heldout_clt",
    "open_heldout",
    "open_logs",
    "row_scalars",
    "without_heldout",
]
