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
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def peak_rss_mb(tokens: int, ctx: int, batch: int) -> float:
    code = (
        "import resource; from pathlib import Path; import tempfile;"
        "from openscope.activations import HarvestConfig, harvest;"
        "t = tempfile.mkdtemp();"
        f"harvest(HarvestConfig(sites='*.resid_post', tokens={tokens}, context_len={ctx}, batch_size={batch},"
        " output=Path(t) / 's', shard_mb=64, device='cpu'), progress=False);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per measurement")
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
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
    body = loaded.model.get_decoder() if hasattr(loaded.model, "get_decoder") else loaded.model.model

    with torch.inference_mode():
        bare = forward_rate(
            lambda b: body(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False), batches
        )
        all_resid = harvest_rate(loaded, "*.resid_post", args.tokens, args.context_len, args.batch_size)
        full = forward_rate(
            lambda b: loaded.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False),
            batches,
        )
        layer5 = harvest_rate(loaded, "5.resid_post", args.tokens, args.context_len, args.batch_size)

    report = {
        "tokens_per_measurement": n_ctx * args.context_len,
        "bare_body_forward_tok_s": round(bare),
        "harvest_all_18_resid_post_tok_s": round(all_resid),
        "ratio_all_resid_vs_bare (target >= 0.9)": round(all_resid / bare, 3),
        "full_forward_with_lm_head_tok_s": round(full),
        "harvest_layer5_resid_post_tok_s": round(layer5),
        "ratio_layer5_vs_full (target >= 2.5)": round(layer5 / full, 3),
    }
    if not args.skip_memory:
        small, large = args.tokens // 2, args.tokens * 2
        report[f"peak_rss_mb_harvest_{small}_tokens"] = round(
            peak_rss_mb(small, args.context_len, args.batch_size)
        )
        report[f"peak_rss_mb_harvest_{large}_tokens"] = round(
            peak_rss_mb(large, args.context_len, args.batch_size)
        )
    report["self_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
