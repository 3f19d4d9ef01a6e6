"""CLT benchmark: a cross-layer transcoder against per-layer skip-transcoders of the same total width.

What it measures
    On Gemma 3 270M (18 layers), one cross-layer transcoder (F latents per layer, 18·F in all; layer
    ℓ's latents write to the MLP output of ℓ and every later layer) and 18 single-layer
    skip-transcoders (F latents each, 18·F in all) are trained on the same activation store, same
    batches, same tokens, target L0 per layer, learning rate and schedule. Both are then evaluated on
    held-out text (`wiki[9000:]` by default) by `openscope.eval.evaluate`: per layer L0 and FVU of the
    MLP output, and the delta LM loss, KL and loss recovered with all 18 layers spliced in at once
    (the replacement model an attribution graph uses). Training time and tokens/s are recorded for
    both (the CLT's decoder is ~9.5× the transcoders' at 18 layers: Σ_ℓ (18 − ℓ) blocks instead of 18).

How it runs
    1. Harvest (or reuse: the store is resumable and a complete one is reused) every layer's
       `mlp_in` and `mlp_out` from `--source` into OUT/store, in bfloat16 (46 kB per token).
    2. `openscope train --kind skip_clt` and `--kind skip_transcoder --sites all` on that store (a
       finished run is reused, an interrupted one resumed).
    3. One `evaluate` call for both: the transcoders are spliced as the CLT whose cross-layer blocks
       are zero (`clt_from_transcoders`: the same function as the 18 spliced together, exactly), so
       each batch costs one clean forward, two spliced forwards and one shared zero-ablation.
    4. Write OUT/clt_bench.json and OUT/clt_bench.md (a row per layer, then the joint numbers).

Run (the full run takes a quiet machine; the tiny one below checks that everything works)
    python benchmarks/bench_clt.py --tokens 300000 --width 512
    python benchmarks/bench_clt.py --tokens 20000 --eval-tokens 2048 --out /tmp/clt_bench_tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "clt"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--source", default="wiki[:9000]", help="training text")
    p.add_argument("--heldout", default="wiki[9000:]", help="evaluation text")
    p.add_argument("--store", type=Path, help="existing store with every layer's mlp_in and mlp_out")
    p.add_argument("--tokens", type=int, default=300_000, help="harvested = training tokens")
    p.add_argument("--width", type=int, default=512, help="latents per layer (CLT) = per transcoder")
    p.add_argument("--target-l0", type=float, default=32.0, help="per layer, both")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--no-skip", action="store_true", help="plain CLT and transcoders (no x @ A)")
    p.add_argument("--eval-tokens", type=int, default=16_384)
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--fresh", action="store_true", help="retrain (the store is kept)")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def harvest_store(args: argparse.Namespace, loaded: Any) -> Path:
    from openscope.activations import HarvestConfig, harvest

    if args.store is not None:
        return args.store
    cfg = HarvestConfig(
        model=args.model,
        sites="*.mlp_in,*.mlp_out",
        source=args.source,
        tokens=args.tokens,
        context_len=args.context_len,
        output=args.out / "store",
        dtype="bfloat16",
        device=args.device,
    )
    t0 = time.perf_counter()
    result = harvest(cfg, loaded=loaded, progress=True)
    log(f"store: {result.n_rows} rows x 36 sites in {time.perf_counter() - t0:.0f} s")
    return result.output


def train_or_reuse(cfg: Any) -> tuple[dict[str, Path], float]:
    """Train (resuming an interrupted run, reusing a finished one); returns (folders, seconds)."""
    from openscope.coders.dictionary import find_dictionaries
    from openscope.config import to_jsonable
    from openscope.train import train

    out = Path(cfg.output)
    done = out / "bench_timing.json"
    config = to_jsonable(cfg)
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved["config"] != config:
            raise SystemExit(f"{out} holds a run with other settings; pass --fresh to retrain")
        log(f"reusing {out}")
        return {str(p): p for p in find_dictionaries(out)}, float(saved["seconds"])
    # An interrupted run resumes; its (training-only) time is not counted twice.
    resume = (out / "checkpoint.pt").is_file()
    t0 = time.perf_counter()
    result = train(dataclasses.replace(cfg, resume=resume), progress=True)
    seconds = time.perf_counter() - t0
    done.write_text(
        json.dumps({"seconds": seconds, "steps": result.steps, "resumed": resume, "config": config})
    )
    return {k: v for k, v in result.folders.items()}, seconds


def layer_table(report: Any) -> list[dict[str, Any]]:
    return [
        {"layer": i, "l0": r.l0, "fvu": r.fvu, "dead": r.dead, "dense": r.dense}
        for i, r in enumerate(report.layers)
    ]


def summary(d: Any, train_s: float, tokens: int) -> dict[str, Any]:
    layers = layer_table(d)
    n = len(layers)
    return {
        "train_seconds": train_s,
        "train_tokens_per_s": tokens / train_s if train_s > 0 else None,
        "width_total": d.width,
        "mean_l0": sum(r["l0"] for r in layers) / n,
        "mean_fvu": sum(r["fvu"] for r in layers) / n,
        "dead_total": sum(r["dead"] for r in layers),
        "delta_loss": d.lm.delta_loss,
        "kl": d.lm.kl,
        "loss_recovered": d.lm.loss_recovered,
        "ce_clean": d.lm.ce_clean,
        "ce_spliced": d.lm.ce_spliced,
        "ce_zero": d.lm.ce_zero,
        "per_layer": layers,
    }


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def markdown(res: dict[str, Any]) -> str:
    c, t = res["clt"], res["transcoders"]
    lines = [
        f"# CLT vs per-layer {res['kind_transcoder']}s on {res['model']}",
        "",
        f"{res['n_layers']} layers, {res['width_per_layer']} latents per layer (both {c['width_total']} in all), "
        f"target L0 {res['target_l0']} per layer, {res['train_tokens']} training tokens ({res['source']}), "
        f"evaluated on {res['eval_tokens']} tokens of {res['heldout']} ({res['eval_seconds']:.0f} s).",
        "",
        "| | CLT | transcoders |",
        "|---|---:|---:|",
        f"| delta LM loss, all layers spliced (nats) | {fmt(c['delta_loss'], '.4f')} | {fmt(t['delta_loss'], '.4f')} |",
        f"| KL to clean | {fmt(c['kl'], '.4f')} | {fmt(t['kl'], '.4f')} |",
        f"| loss recovered vs zero-ablating every MLP | {fmt(c['loss_recovered'], '.4f')} | {fmt(t['loss_recovered'], '.4f')} |",
        f"| mean per-layer L0 | {fmt(c['mean_l0'], '.1f')} | {fmt(t['mean_l0'], '.1f')} |",
        f"| mean per-layer FVU | {fmt(c['mean_fvu'], '.4f')} | {fmt(t['mean_fvu'], '.4f')} |",
        f"| dead latents (of {c['width_total']}) | {c['dead_total']} | {t['dead_total']} |",
        f"| training time (s) | {fmt(c['train_seconds'], '.0f')} | {fmt(t['train_seconds'], '.0f')} |",
        f"| training tokens/s | {fmt(c['train_tokens_per_s'], '.0f')} | {fmt(t['train_tokens_per_s'], '.0f')} |",
        "",
        "| layer | CLT L0 | CLT FVU | transcoder L0 | transcoder FVU |",
        "|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(c["per_layer"], t["per_layer"], strict=True):
        lines.append(
            f"| {a['layer']} | {fmt(a['l0'], '.1f')} | {fmt(a['fvu'], '.4f')} | {fmt(b['l0'], '.1f')} | {fmt(b['fvu'], '.4f')} |"
        )
    lines += [
        "",
        f"CE clean {fmt(c['ce_clean'], '.4f')}; FVU of each layer's MLP output (post_feedforward_layernorm).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from openscope.activations.harvest import resolve_device
    from openscope.coders.clt import clt_from_transcoders
    from openscope.coders.dictionary import Dictionary, load_dictionary
    from openscope.eval import EvalConfig, evaluate
    from openscope.models.load import load_model
    from openscope.train import TrainConfig
    from openscope.train.clt import load_transcoders

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=resolve_device(args.device))
    log(f"model {loaded.name}: {loaded.n_layers} layers, loaded in {time.perf_counter() - t0:.1f} s")
    store = harvest_store(args, loaded)

    skip = not args.no_skip
    kind_clt, kind_tc = ("skip_clt", "skip_transcoder") if skip else ("clt", "transcoder")
    common = dict(
        store=store,
        sites="all",
        width=args.width,
        target_l0=args.target_l0,
        lr=args.lr,
        batch_size=args.batch_size,
        tokens=args.tokens,
        device=args.device,
        checkpoint_every=20,
    )
    runs = {"clt": args.out / "clt", "transcoders": args.out / "transcoders"}
    if args.fresh:
        for folder in runs.values():
            shutil.rmtree(folder, ignore_errors=True)
    log("training the CLT")
    clt_folders, clt_s = train_or_reuse(TrainConfig(kind=kind_clt, output=runs["clt"], **common))  # type: ignore[arg-type]
    log("training the per-layer transcoders")
    _, tc_s = train_or_reuse(TrainConfig(kind=kind_tc, output=runs["transcoders"], **common))  # type: ignore[arg-type]

    clt = load_dictionary(next(iter(clt_folders.values())), loaded)
    layers = list(range(clt.n_layers))
    coders = load_transcoders(runs["transcoders"], [clt.site_in.layer + i for i in layers])
    as_clt = clt_from_transcoders(coders, skip=skip)
    transcoders = Dictionary(
        as_clt, clt.site_in, clt.site_out, "transcoders", None, {"model_name": loaded.name}
    )
    clt = clt._replace(name="clt")
    cfg = EvalConfig(
        source=args.heldout,
        tokens=args.eval_tokens,
        context_len=args.context_len,
        output=args.out / "eval",
        device=args.device,
    )
    t0 = time.perf_counter()
    report = evaluate(cfg, loaded, [clt, transcoders], progress=True)
    eval_s = time.perf_counter() - t0
    trained_tokens = math.ceil(args.tokens / args.batch_size) * args.batch_size
    res = {
        "model": loaded.name,
        "n_layers": clt.n_layers,
        "first_site": clt.site_in.name,
        "width_per_layer": args.width,
        "target_l0": args.target_l0,
        "kind_clt": kind_clt,
        "kind_transcoder": kind_tc,
        "train_tokens": trained_tokens,
        "source": args.source,
        "heldout": args.heldout,
        "eval_tokens": report.n_tokens,
        "eval_seconds": eval_s,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "device": str(loaded.device),
        "clt": summary(report.dictionaries[0], clt_s, trained_tokens),
        "transcoders": summary(report.dictionaries[1], tc_s, trained_tokens),
    }
    (args.out / "clt_bench.json").write_text(json.dumps(res, indent=2))
    (args.out / "clt_bench.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
