"""Harvest speed and memory on the real Gemma 3 270M, side by side with the bare model in one run.

Measures, on the same batches of wiki contexts:
1. the bare body forward (no LM head) vs a harvest of every layer's resid_post (target: >= 0.9x);
2. the full forward with the LM head vs a harvest of one site at layer 5 (target: >= 2.5x);
3. peak memory (max RSS) of a harvest at two token budgets (target: bounded by batch and shard size).

Run: python benchmarks/bench_harvest.py [--tokens 8192]. Figures vary with machine load: compare ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from openscope.activations import HarvestConfig, harvest
from openscope.data import iter_contexts, open_source
from openscope.data.packing import to_batch
from openscope.models import load_model


def forward_rate(fn, batches) -> float:
    fn(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(b.input_ids.numel() for b in batches) / (time.perf_counter() - start)


def harvest_rate(loaded, sites: str, tokens: int, ctx: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(
            sites=sites,
            tokens=tokens,
            context_len=ctx,
            batch_size=batch,
            output=Path(tmp) / "s",
            device="cpu",
        )
        return harvest(cfg, loaded=loaded, progress=False).tokens_per_s


def peak_rss_mb(tokens: int, ctx: int, batch: int, shard_mb: int) -> tuple[float, float]:
    """(peak RSS after loading the model, peak RSS during the harvest) of a fresh process, in MB.

    Reads VmHWM from /proc (reset after the load), not ru_maxrss, which a child inherits from its parent.
    """
    code = (
        "import tempfile; from pathlib import Path;"
        "from openscope.activations import HarvestConfig, harvest; from openscope.models import load_model;"
        "hwm = lambda: int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024;"
        "lm = load_model('gemma-3-270m'); loaded = hwm(); open('/proc/self/clear_refs', 'w').write('5');"
        f"harvest(HarvestConfig(sites='*.resid_post', tokens={tokens}, context_len={ctx}, batch_size={batch},"
        f" output=Path(tempfile.mkdtemp()) / 's', shard_mb={shard_mb}, device='cpu'), loaded=lm, progress=False);"
        "print(loaded, hwm())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    load, run = out.stdout.strip().splitlines()[-1].split()
    return float(load), float(run)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=32768,
        help="tokens per measurement of the all-layer harvest vs the bare forward (several shards, so the "
        "last shard's write, a fixed cost of every run, weighs little as in a real harvest)",
    )
    parser.add_argument(
        "--head-tokens", type=int, default=4096, help="tokens per measurement of layer 5 vs full+head"
    )
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("gemma-3-270m")
    n_ctx = args.tokens // args.context_len
    docs = open_source("wiki").documents()
    contexts = list(itertools.islice(iter_contexts(docs, loaded.tokenizer, args.context_len), n_ctx))
    batches = [
        to_batch(contexts[i : i + args.batch_size], loaded.tokenizer)
        for i in range(0, n_ctx, args.batch_size)
    ]
    model: Any = loaded.model
    head_batches = batches[: max(1, args.head_tokens // (args.context_len * args.batch_size))]
    body = model.get_decoder()  # the decoder stack without the LM head

    # Interleave the measurements over rounds so machine noise hits all of them alike; report medians.
    rates: dict[str, list[float]] = {"bare": [], "all_resid": [], "full": [], "layer5": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            rates["bare"].append(
                forward_rate(
                    lambda b: body(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False),
                    batches,
                )
            )
            rates["all_resid"].append(
                harvest_rate(loaded, "*.resid_post", args.tokens, args.context_len, args.batch_size)
            )
            rates["full"].append(
                forward_rate(
                    lambda b: loaded.model(
                        input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
                    ),
                    head_batches,
                )
            )
            rates["layer5"].append(
                harvest_rate(loaded, "5.resid_post", args.head_tokens, args.context_len, args.batch_size)
            )
    med = {k: statistics.median(v) for k, v in rates.items()}
    report: dict[str, object] = {
        "tokens_per_measurement (all layers vs bare)": n_ctx * args.context_len,
        "tokens_per_measurement (layer 5 vs full with head)": args.head_tokens,
        "rounds": args.rounds,
        "bare_body_forward_tok_s": round(med["bare"]),
        "harvest_all_18_resid_post_tok_s": round(med["all_resid"]),
        "ratio_all_resid_vs_bare (target >= 0.9)": round(med["all_resid"] / med["bare"], 3),
        "full_forward_with_lm_head_tok_s": round(med["full"]),
        "harvest_layer5_resid_post_tok_s": round(med["layer5"]),
        "ratio_layer5_vs_full (target >= 2.5)": round(med["layer5"] / med["full"], 3),
        "per_round_ratio_all_resid_vs_bare": [
            round(a / b, 3) for a, b in zip(rates["all_resid"], rates["bare"], strict=True)
        ],
    }
    if not args.skip_memory:
        for tokens in (args.tokens // 8, args.tokens):
            load, run = peak_rss_mb(tokens, args.context_len, args.batch_size, shard_mb=64)
            report[f"peak_rss_mb_{tokens}_tokens (model loaded / during harvest, shard_mb=64)"] = [
                round(load),
                round(run),
            ]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
