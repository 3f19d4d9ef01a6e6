"""CLT training speed against per-layer transcoders of the same total width, side by side in one run.

What it measures
    The training step alone (forward, losses, backward, constrained Adam step: `clt_train_step` and
    `train_step`), on the shapes of Gemma 3 270M's CLT benchmark: L = 18 layers, d = 640, F latents per
    layer, batches of B tokens, JumpReLU thresholds calibrated to the target L0 per layer. The arms are
    one skip-CLT (18·F latents) and 18 skip-transcoders (F latents each, one step each on its layer's
    rows: 18·F latents in all), each on the sparse and on the dense path (`--arms` picks). Inputs are
    Gaussian: the speed of a step depends on the shapes and on how many latents fire, not on the values,
    and the data loading both pay alike is left out.

    Each round times one step of every arm, the order reversed every other round (ABBA...) so machine
    load hits all arms alike; the report gives the median seconds per step and the tokens/s (B / step),
    and the ratio CLT tokens/s over transcoder tokens/s. Single-threaded by default (`--threads`): on a
    shared machine the ratio is what to read, not the absolute figures.

Run
    python benchmarks/bench_clt_speed.py                        # B 4096, F 512, L0 32, 3 rounds
    python benchmarks/bench_clt_speed.py --batch 1024 --rounds 2 --arms clt-sparse,tc-dense
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gpu_check import sync  # the GPU check's (this folder): waits for queued kernels on CUDA

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.train.memory import keep_freed_memory
from openscope.train.steps import StepConfig, clt_train_step, make_optimizer, train_step

HERE = Path(__file__).resolve().parent
ARMS = ("clt-sparse", "clt-dense", "clt-auto", "tc-sparse", "tc-dense", "tc-auto")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--d", type=int, default=640, help="d_in = d_out (Gemma 3 270M: 640)")
    p.add_argument("--width", type=int, default=512, help="latents per layer (CLT) = per transcoder")
    p.add_argument("--target-l0", type=float, default=32.0, help="per layer, both")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--arms", default="clt-sparse,clt-dense,tc-sparse,tc-dense", help=f"of {','.join(ARMS)}")
    p.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave the C allocator's policy (see openscope.train.memory)",
    )
    p.add_argument("--out", type=Path, default=HERE / "out" / "clt_speed.json")
    return p.parse_args(argv)


class Arm:
    """One way of training the 18·F latents: a CLT, or one transcoder per layer."""

    def __init__(self, name: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
        self.name, self.x, self.y, self.step = name, x, y, 0
        kind, path = name.split("-")
        self.cfg = StepConfig(lr=1e-4, lr_warmup_steps=1, target_l0=args.target_l0, path=path)  # type: ignore[arg-type]
        n, d, f = args.layers, args.d, args.width
        if kind == "clt":
            self.clt = CrossLayerCoder(CLTConfig(n_layers=n, d_in=d, d_out=d, width=f, skip=True)).to(
                x.device
            )
            self.clt.calibrate_threshold_(x, args.target_l0)
            self.opt = make_optimizer(self.clt, 1e-4)
            self.coders: list[SparseCoder] = []
        else:
            cfg = CoderConfig(d_in=d, d_out=d, width=f, kind="skip_transcoder")
            self.coders = [SparseCoder(cfg).to(x.device) for _ in range(n)]
            for i, c in enumerate(self.coders):
                c.calibrate_threshold_(x[i], args.target_l0)
            self.opts = [make_optimizer(c, 1e-4) for c in self.coders]

    def run(self) -> float:
        """Seconds of one training step of all 18·F latents (the device's queue drained at both ends)."""
        sync(str(self.x.device))
        t0 = time.perf_counter()
        if self.coders:
            for i, (c, opt) in enumerate(zip(self.coders, self.opts, strict=True)):
                train_step(c, opt, self.x[i], self.y[i], self.cfg, self.step)
        else:
            clt_train_step(self.clt, self.opt, self.x, self.y, self.cfg, self.step)
        self.step += 1
        sync(str(self.x.device))
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.malloc_default and args.device == "cpu":
        keep_freed_memory()  # as `openscope train` does on the CPU
    names = [a for a in args.arms.split(",") if a]
    if unknown := set(names) - set(ARMS):
        raise SystemExit(f"unknown arms {sorted(unknown)}; expected some of {', '.join(ARMS)}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.layers, args.batch, args.d, generator=gen).to(args.device)
    y = torch.randn(args.layers, args.batch, args.d, generator=gen).to(args.device)
    arms = [Arm(n, args, x, y) for n in names]
    for arm in arms:  # one untimed warm-up step each (allocations, first-call costs)
        arm.run()
    times: dict[str, list[float]] = {a.name: [] for a in arms}
    for r in range(args.rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            times[arm.name].append(arm.run())
            log(f"round {r}: {arm.name} {times[arm.name][-1]:.2f} s")
    rows = {
        n: {"seconds": statistics.median(t), "tokens_per_s": args.batch / statistics.median(t)}
        for n, t in times.items()
    }
    ratios = {
        f"{c}/{t}": rows[c]["tokens_per_s"] / rows[t]["tokens_per_s"]
        for c in rows
        if c.startswith("clt")
        for t in rows
        if t.startswith("tc")
    }
    result = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "arms": rows,
        "ratios": ratios,
        "times": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for n, row in rows.items():
        print(f"{n:12s} {row['seconds']:8.2f} s/step {row['tokens_per_s']:8.0f} tok/s")
    for k, v in ratios.items():
        print(f"{k:24s} {v:.2f}x")
    return result


if __name__ == "__main__":
    main()
