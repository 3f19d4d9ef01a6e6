"""Benchmark: one SparseCoder training step, dense reference path vs the sparse fast path.

Width 16384, d 640, batch 4096 tokens, fp32, for TopK and JumpReLU at k (or L0) = 32 and 64.
Prints tokens/s of each path and their ratio. Run: python benchmarks/bench_coder_step.py
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import cast

import torch

from openscope.coders import CoderConfig, SparseCoder
from openscope.coders.coder import Activation, Path
from openscope.train.steps import StepConfig, make_optimizer, train_step

log = logging.getLogger("bench_coder_step")


def make_coder(activation: Activation, k: int, d: int, width: int, x: torch.Tensor) -> SparseCoder:
    """A coder whose L0 on x is about k (JumpReLU thresholds set at the matching quantile)."""
    cfg = CoderConfig(
        d_in=d, d_out=d, width=width, activation=activation, k=k if activation == "topk" else None
    )
    coder = SparseCoder(cfg)
    if coder.log_threshold is not None:
        with torch.no_grad():
            z = coder.pre_activations(x[:256])
            theta = torch.quantile(z.flatten()[:1_000_000], 1 - k / width)
            coder.log_threshold.fill_(math.log(float(theta)))
    return coder


def time_steps(
    coder: SparseCoder, x: torch.Tensor, path: Path, activation: Activation, k: int, n: int
) -> float:
    """Mean seconds per training step over n steps, after one warm-up step."""
    opt = make_optimizer(coder)
    if activation == "jumprelu":
        sc = StepConfig(sparsity="quadratic_l0", target_l0=k, path=path, lr_warmup_steps=0)
    else:
        sc = StepConfig(sparsity="none", path=path, lr_warmup_steps=0)
    train_step(coder, opt, x, None, sc, 0)
    start = time.perf_counter()
    for i in range(n):
        train_step(coder, opt, x, None, sc, i + 1)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--d", type=int, default=640)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--activations", nargs="+", default=["topk", "jumprelu"])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d)
    log.info("threads=%d width=%d d=%d batch=%d", torch.get_num_threads(), args.width, args.d, args.batch)
    for activation in cast(list[Activation], args.activations):
        for k in args.ks:
            coder = make_coder(activation, k, args.d, args.width, x)
            state = {n: t.clone() for n, t in coder.state_dict().items()}
            dense = time_steps(coder, x, "dense", activation, k, args.steps)
            coder.load_state_dict(state)
            sparse = time_steps(coder, x, "sparse", activation, k, args.steps)
            log.info(
                "%-8s k=%-3d dense %6.0f tok/s (%.2f s/step) | sparse %6.0f tok/s (%.2f s/step) | x%.2f",
                activation,
                k,
                args.batch / dense,
                dense,
                args.batch / sparse,
                sparse,
                dense / sparse,
            )


if __name__ == "__main__":
    main()
