"""Data-parallel training on this machine's CPUs: one process against two torchrun replicas (gloo) at
the same global batch, side by side in one run of this script.

Each round trains the same dictionary three ways, in an order that rotates between rounds so machine
noise hits all alike: 1 process with 1 thread (the floor), 1 process with `--threads` threads, and 2
data-parallel processes (torchrun, gloo) with `--threads` / 2 threads each, so both of the last two
use the same cores. The report gives each way's median training rate in tokens per second (the step
loop and the save, as `TrainResult.seconds` counts them; process start and data loading excluded) and
the largest relative difference between the saved tensors of the one-process and two-process runs,
beside that between one process on 1 and on `--threads` threads (both float rounding only: the runs
are the same computation on the same global batches).

    python benchmarks/bench_ddp.py                     # Gemma 3 270M's 6.resid_post, width 4096
    python benchmarks/bench_ddp.py --tiny --rounds 1   # the tests' tiny random Gemma 3 (a smoke run)

The store is harvested once into --store (kept, reused when complete). Figures vary with machine load
(the cores may be shared): compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from openscope.activations import HarvestConfig, harvest
from openscope.activations.store import ActivationStore
from openscope.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_ddp")


def the_store(args: argparse.Namespace, work: Path) -> Path:
    """The store to train on: harvested unless a complete one is already at --store."""
    store = Path(args.store) if args.store else work / "store"
    if (store / "manifest.json").is_file() and ActivationStore(store, verify=False).complete:
        log.info("reusing the store at %s", store)
        return store
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train_many import tiny_model  # the sibling benchmark's tiny model, saved once

    model = str(tiny_model(work / "tiny")) if args.tiny else "gemma-3-270m"
    cfg = HarvestConfig(
        model=model,
        sites=args.site,
        source=args.source,
        tokens=args.tokens,
        context_len=128,
        batch_size=8,
        output=store,
        device="cpu",
    )
    harvest(cfg, progress=False)
    return store


def run_once(cfg: TrainConfig, procs: int, threads: int, out: Path) -> float:
    """Train `cfg` into `out` on `procs` torchrun processes of `threads` threads; its rate in tokens/s."""
    spec = out.with_suffix(".json")
    spec.write_text(json.dumps(dataclasses.asdict(cfg), default=str))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    cmd += [__file__, "--worker", str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{procs}-process run failed:\n{proc.stderr[-3000:]}")
    seconds = json.loads(spec.with_suffix(".result").read_text())["seconds"]
    return cfg.tokens / seconds


def worker(spec: Path) -> None:
    """One torchrun rank: train the run `spec` describes; rank 0 writes its training seconds."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    fields: dict[str, Any] = json.loads(spec.read_text())
    fields |= {k: Path(fields[k]) for k in ("store", "output")}
    cfg = TrainConfig(**fields)
    result = train(cfg, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        spec.with_suffix(".result").write_text(json.dumps({"seconds": result.seconds}))


def largest_difference(a: Path, b: Path) -> float:
    """The largest difference between two runs' saved tensors, relative to each tensor's largest value
    (saved dictionaries are folded into raw units: a threshold of 34 differs more than a weight of 0.06)."""
    worst = 0.0
    for folder in sorted(p.parent for p in a.glob("*/params.safetensors")):
        pa, pb = (load_file(str(r / folder.name / "params.safetensors")) for r in (a, b))
        worst = max([worst, *(float((pa[k] - pb[k]).abs().max() / pa[k].abs().max()) for k in pa)])
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny random Gemma 3 (a smoke run)")
    parser.add_argument("--store", default="", help="store folder (kept; reused when complete)")
    parser.add_argument("--site", default="", help="default: 6.resid_post (real) or 1.resid_post (tiny)")
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--tokens", type=int, default=0, help="tokens harvested (default 32768 / 4096)")
    parser.add_argument("--steps", type=int, default=16, help="training steps per run")
    parser.add_argument("--width", type=int, default=0, help="default 4096 (real) or 256 (tiny)")
    parser.add_argument("--activation", default="jumprelu")
    parser.add_argument("--batch-size", type=int, default=4096, help="the global batch")
    parser.add_argument("--threads", type=int, default=2, help="cores the 1-process and 2-process runs use")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="", help="write the report as JSON here too")
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.site = args.site or ("1.resid_post" if args.tiny else "6.resid_post")
    args.tokens = args.tokens or (4096 if args.tiny else 32768)
    args.width = args.width or (256 if args.tiny else 4096)
    work = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    store = the_store(args, work)
    cfg = TrainConfig(
        store=store,
        sites=args.site,
        width=args.width,
        activation=args.activation,
        k=32 if args.activation in ("topk", "batchtopk") else None,
        batch_size=args.batch_size,
        tokens=args.batch_size * args.steps,
        lr_warmup_steps=2,
        sparsity_warmup_steps=4,
        checkpoint_every=10**9,
        log_every=10**9,
        device="cpu",
    )
    ways = {"1 process, 1 thread": (1, 1), f"1 process, {args.threads} threads": (1, args.threads)}
    ways[f"2 processes, {max(1, args.threads // 2)} thread(s) each"] = (2, max(1, args.threads // 2))
    rates: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(args.rounds):
        order = list(ways)[r % len(ways) :] + list(ways)[: r % len(ways)]
        for way in order:
            procs, threads = ways[way]
            out = work / f"r{r}_{procs}x{threads}"
            rates[way].append(run_once(dataclasses.replace(cfg, output=out), procs, threads, out))
            log.info("round %d, %s: %.0f tokens/s", r, way, rates[way][-1])
    floor, one, two = (work / f"r0_{p}x{t}" for p, t in ways.values())
    report: dict[str, Any] = {
        "store": str(store),
        "site": args.site,
        "width": args.width,
        "activation": args.activation,
        "global_batch": args.batch_size,
        "steps": args.steps,
        "tokens_per_s": {w: statistics.median(v) for w, v in rates.items()},
        # Float rounding: compare with what a change of thread count alone does.
        "relative_difference_1_vs_2_processes": largest_difference(one, two),
        "relative_difference_1_vs_2_threads": largest_difference(floor, one),
    }
    base = report["tokens_per_s"][list(ways)[1]]
    report["speedup_2_processes_vs_1"] = report["tokens_per_s"][list(ways)[2]] / base
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
