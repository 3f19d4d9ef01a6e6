"""Cost per step of KL fine-tuning (`openscope train --finetune kl`) against plain live training, side by
side in one run on the same contexts and the same dictionary (an SAE of --width at --site, started from
the first batch as a fresh run would: the step cost does not depend on what it has learnt).

- plain: the live trainer's work per step: a forward that stops at the site, then `train_step`.
- finetune: the clean forward (site activations, record for the restart, clean logits at kept
  positions), then `train_step` with the KL term (the spliced forward restarted at the site's block,
  its logits at kept positions, and the backward through the layers after the site).

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune.py --model gemma-3-270m --site 9.resid_post
    python benchmarks/bench_finetune.py --tiny        # the tiny random Gemma 3 of the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from openscope.coders import CoderConfig, SparseCoder
from openscope.models.hooks import run_to_sites
from openscope.models.load import load_model
from openscope.models.sites import Site
from openscope.train import TrainConfig
from openscope.train.finetune import KLFineTune
from openscope.train.loop import step_config
from openscope.train.steps import make_optimizer, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random Gemma 3 instead")
    ap.add_argument("--site", default="9.resid_post")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--context-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=512, help="tokens per step (whole contexts)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--source", default="wiki")
    ap.add_argument("--beta", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' fixtures
        from tests.conftest import CORPUS, make_tiny_gemma, make_tokenizer

        tok = make_tokenizer()
        make_tiny_gemma(len(tok)).save_pretrained(tmp / "m")
        tok.save_pretrained(tmp / "m")
        (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": t * 20}) + "\n" for t in CORPUS * 40))
        args.model, args.source, args.site, args.width = (
            str(tmp / "m"),
            str(tmp / "docs.jsonl"),
            "1.resid_post",
            256,
        )
    loaded = load_model(args.model)
    cfg = TrainConfig(
        model=args.model, source=args.source, sites=args.site, width=args.width, context_len=args.context_len,
        batch_size=args.batch_size, block_tokens=args.batch_size, finetune="kl", beta=args.beta,
        init_from=tmp, device="cpu", lr=5e-4,
    )  # fmt: skip
    ft = KLFineTune(cfg, "cpu", loaded)
    site = Site.from_name(args.site)
    d = ft.data.widths[args.site]
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, width=args.width, kind="sae", activation="jumprelu"))
    coder.set_scales(ft.data.scales[args.site], ft.data.scales[args.site])
    batches = ft.batches([args.site], 0)
    first = next(batches)
    coder.init_decoder_bias_(first.acts[args.site])
    coder.calibrate_threshold_(first.acts[args.site], 50)
    coders = {"plain": coder, "finetune": SparseCoder(coder.cfg)}
    coders["finetune"].load_state_dict(coder.state_dict())
    opts = {k: make_optimizer(c, cfg.lr, 50.0) for k, c in coders.items()}
    step_cfg = step_config(cfg, 1000)
    term = ft.term(args.site)
    times: dict[str, list[float]] = {"plain": [], "finetune": []}
    for step in range(args.steps):
        t0 = time.perf_counter()
        b = next(batches)
        t1 = time.perf_counter()
        train_step(
            coders["finetune"], opts["finetune"], b.acts[args.site], None, step_cfg, step, loss_term=term
        )
        t2 = time.perf_counter()
        assert ft.current is not None
        ids, attn = ft.current.input_ids, ft.current.attention_mask
        acts = run_to_sites(loaded, ids, [site], attn)[site]  # plain live: forward to the site only
        x = acts.reshape(-1, d).index_select(0, ft.current.rows)
        train_step(coders["plain"], opts["plain"], x, None, step_cfg, step)
        t3 = time.perf_counter()
        times["finetune"].append(t2 - t0)
        times["plain"].append(t3 - t2)
        print(f"step {step}: tokens {len(x)} plain {t3 - t2:.3f}s finetune {t2 - t0:.3f}s "
              f"(clean {t1 - t0:.3f}s, step+KL {t2 - t1:.3f}s) kl {term.last['kl']:.4f}", flush=True)  # fmt: skip
    # the first step warms caches up: the median of the rest
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}
    print(json.dumps({"model": loaded.name, "site": args.site, "width": args.width, "tokens_per_step": len(x),
                      "plain_s": med["plain"], "finetune_s": med["finetune"],
                      "ratio": med["finetune"] / med["plain"]}))  # fmt: skip


if __name__ == "__main__":
    main()
