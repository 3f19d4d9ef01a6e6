"""Benchmark: evaluation tokens/s, the full-forward reference (today's path) vs restarted forwards.

On Gemma 3 270M (fp32, CPU), with random SAEs of width 4096 at the middle layer's resid_post: one
dictionary, then eight at the same site, each with loss recovered (the zero-ablated forward). The two
paths run interleaved, A B A B..., so load from other processes hits both alike; each run evaluates the
same held-out wiki contexts, and its tokens/s is the evaluation loop's own (model load and report
writing excluded). Prints every run, then the mean tokens/s of each path and their ratio; the two
paths' delta loss and KL are printed side by side as a check that they measure the same thing.

Run: OMP_NUM_THREADS=1 python benchmarks/bench_eval_speed.py [--threads 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory
from openscope.eval import EvalConfig, evaluate
from openscope.eval.results import EvalReport
from openscope.models.load import LoadedModel, load_model
from openscope.models.sites import Site

log = logging.getLogger("bench_eval_speed")


def random_saes(loaded: LoadedModel, site: Site, n: int, width: int) -> list[Dictionary]:
    """n random JumpReLU SAEs at the site, thresholds set so about 64 latents fire per token."""
    out = []
    for i in range(n):
        coder = SparseCoder(CoderConfig(d_in=loaded.d_model, d_out=loaded.d_model, width=width, seed=i))
        if coder.log_threshold is not None:
            with torch.no_grad():
                coder.log_threshold.fill_(-1.5)
        out.append(in_memory(coder, site, name=f"sae{i}"))
    return out


def run(
    loaded: LoadedModel, dicts: list[Dictionary], fast: bool, args: argparse.Namespace, root: Path
) -> EvalReport:
    out = Path(tempfile.mkdtemp(dir=root))
    cfg = EvalConfig(
        source=args.source,
        tokens=args.tokens,
        context_len=args.context_len,
        batch_size=args.batch_size,
        output=out / "eval",
        device="cpu",
    )
    return evaluate(cfg, loaded, dicts, progress=False, fast=fast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs per setting")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 8], help="dictionaries at the site")
    parser.add_argument("--source", default="wiki[9000:]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("openscope").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model("gemma-3-270m")
    site = Site(loaded.n_layers // 2, "resid_post")
    log.info(
        "threads=%d site=%s width=%d tokens/run=%d context=%d batch=%d rounds=%d (A = full, B = restarted)",
        args.threads, site.name, args.width, args.tokens, args.context_len, args.batch_size, args.rounds,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            dicts = random_saes(loaded, site, n, args.width)
            speeds: dict[bool, list[float]] = {False: [], True: []}
            last: dict[bool, EvalReport] = {}
            for r in range(args.rounds):
                for fast in (False, True):
                    report = run(loaded, dicts, fast, args, Path(tmp))
                    speeds[fast].append(report.tokens_per_s)
                    last[fast] = report
                    log.info(
                        "  %d dict(s) round %d %-9s %7.2f tok/s (%.1f s)",
                        n, r, "restarted" if fast else "full", report.tokens_per_s, report.seconds,
                    )  # fmt: skip
            slow, fast_ = statistics.mean(speeds[False]), statistics.mean(speeds[True])
            log.info(
                "%d dict(s): full %.2f tok/s | restarted %.2f tok/s | x%.2f", n, slow, fast_, fast_ / slow
            )
            a, b = last[False].dictionaries[0].lm, last[True].dictionaries[0].lm
            log.info(
                "  check sae0: delta loss %.6f vs %.6f, KL %.6f vs %.6f, CE zero %.5f vs %.5f",
                a.delta_loss, b.delta_loss, a.kl, b.kl, a.ce_zero or 0.0, b.ce_zero or 0.0,
            )  # fmt: skip


if __name__ == "__main__":
    main()
