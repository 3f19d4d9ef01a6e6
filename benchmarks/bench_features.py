"""Benchmark: `openscope features` streaming speed, and what a full run costs.

Synthetic mode (default): a random JumpReLU SAE (width 4096, d 640, L0 ≈ 64) over random batches of
whole contexts (4096 tokens each). Times, per batch, the encoder alone and the encoder plus every
streaming statistic (counts, sums, histograms, top-k and sampled examples with their windows), then
the end-of-run work on the real shapes (logit effects over a 262144-token vocabulary, decoder
neighbours), and extrapolates the total for --tokens (default 1M). The encoder is the floor: the
statistics should add a fraction of it.

Real mode: `--store DIR --dictionaries DIR [--model NAME]` runs `compute_features` end to end into a
temporary database and reports its tokens/s.

Run: python benchmarks/bench_features.py [--width 4096 --batches 8 --vocab 262144]
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from openscope.activations.batches import TokenBatch
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.features import FeaturesConfig, compute_features
from openscope.features.directions import decoder_neighbours, logit_effects
from openscope.features.streaming import LatentStats
from openscope.models.sites import Site

log = logging.getLogger("bench_features")


def synthetic_batch(index: int, n_ctx: int, ctx_len: int, d: int, site: Site) -> TokenBatch:
    """Whole contexts of random tokens and random activations (every position but BOS is a row)."""
    gen = torch.Generator().manual_seed(index)
    contexts = torch.randint(4, 50_000, (n_ctx, ctx_len), generator=gen)
    row_context, row_position = torch.ones(n_ctx, ctx_len, dtype=torch.bool).nonzero(as_tuple=True)
    keep = row_position > 0
    row_context, row_position = row_context[keep], row_position[keep]
    x = torch.randn(len(row_context), d, generator=gen)
    ids = torch.arange(index * n_ctx, (index + 1) * n_ctx)
    return TokenBatch(index, {site: x}, contexts, ids, row_context, row_position)


def make_coder(width: int, d: int, l0: int, x: torch.Tensor) -> SparseCoder:
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, width=width))
    with torch.no_grad():
        z = coder.pre_activations(x[:512])
        theta = torch.quantile(z.flatten()[:1_000_000], 1 - l0 / width)
        assert coder.log_threshold is not None
        coder.log_threshold.fill_(math.log(float(theta)))
    return coder.eval()


@torch.inference_mode()
def synthetic(args: argparse.Namespace) -> None:
    site = Site(0, "resid_post")
    n_ctx = max(1, args.batch_tokens // args.context_len)
    batches = [synthetic_batch(i, n_ctx, args.context_len, args.d, site) for i in range(args.batches + 1)]
    coder = make_coder(args.width, args.d, args.l0, batches[0].acts[site])
    cfg = FeaturesConfig(top_k=args.top_k, window=args.window)
    stats = LatentStats(args.width, cfg)
    stats.update(batches[0], coder.encode(batches[0].acts[site]))  # warm-up (first batch fills the slots)

    # Early batches replace many examples (a new batch beats the k-th best of latent l with
    # probability ~ k / firings so far), later ones few: report both halves of the run.
    t_enc = [0.0, 0.0]
    t_all = [0.0, 0.0]
    rows = [0, 0]
    half = len(batches) // 2
    for i, b in enumerate(batches[1:], start=1):
        t0 = time.perf_counter()
        acts = coder.encode(b.acts[site])
        t1 = time.perf_counter()
        stats.update(b, acts)
        t2 = time.perf_counter()
        h = int(i >= half)
        t_enc[h] += t1 - t0
        t_all[h] += t2 - t0
        rows[h] += len(b.row_context)
    l0 = float(stats.n_fired.sum()) / stats.tokens_done
    print(f"width {args.width}, d {args.d}, L0 {l0:.1f}, {sum(rows)} tokens in {args.batches} batches")
    for h, label in enumerate(("first half", "second half")):
        print(
            f"  {label}: encode only {rows[h] / t_enc[h]:7.0f} tokens/s, encode + statistics "
            f"{rows[h] / t_all[h]:7.0f} tokens/s (statistics add {t_all[h] / t_enc[h] - 1:.0%})"
        )

    t0 = time.perf_counter()
    w_u = torch.randn(args.vocab, args.d)
    t_alloc = time.perf_counter() - t0
    t0 = time.perf_counter()
    logit_effects(coder.w_dec.detach(), torch.ones(args.d), w_u, 10)
    t_logits = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoder_neighbours(coder.w_dec.detach(), 10)
    t_nb = time.perf_counter() - t0
    print(f"  logit effects (vocab {args.vocab}): {t_logits:.1f} s  (+{t_alloc:.1f} s making W_U)")
    print(f"  decoder neighbours: {t_nb:.1f} s")
    total = args.tokens / (rows[1] / t_all[1]) + t_logits + t_nb
    print(
        f"  estimated total for {args.tokens} tokens from a store: {total / 60:.1f} min (model forward not included)"
    )


def real(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = FeaturesConfig(
            dictionaries=[Path(p) for p in args.dictionaries],
            store=Path(args.store),
            model=args.model,
            tokens=args.tokens,
            output=Path(tmp) / "features.db",
        )
        t0 = time.perf_counter()
        result = compute_features(cfg, progress=True)
        total = time.perf_counter() - t0
    print(
        f"{', '.join(result.computed)}: {result.n_tokens} tokens, streaming {result.tokens_per_s:.0f} tokens/s, "
        f"total {total:.1f} s (with model load, logits, neighbours, writing)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--d", type=int, default=640)
    parser.add_argument("--l0", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--top-k", type=int, default=24)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--store", help="real mode: an activation store")
    parser.add_argument("--dictionaries", nargs="+", help="real mode: dictionary folders")
    parser.add_argument("--model", help="real mode: the model (default: the store's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.store:
        real(args)
    else:
        synthetic(args)


if __name__ == "__main__":
    main()
