"""Many dictionaries per pass: one run with `--width A,B --target-l0 S,T` vs one run per (width, target),
on the same activation store, side by side in one run of this script.

Each round trains the N = widths × targets dictionaries both ways (the order alternates between rounds so
machine noise hits both alike); the report gives the median wall time of each way, the rate in
dictionary-tokens per second (N × training tokens / wall time) and the rows read per second, and the
largest difference between the two ways' saved tensors (0: bit for bit). With several CPU threads a lone
run repeated can differ from itself in the last bits of its thresholds (a multi-threaded kernel); with
`--threads 1` the two ways are equal bit for bit.

    python benchmarks/bench_train_many.py                  # the tests' tiny random Gemma 3, built here
    python benchmarks/bench_train_many.py --real --tokens 200000 --widths 1024,4096 --targets 20,50

`--real` harvests layer 6's resid_post of Gemma 3 270M (loaded from its PyPI package) into --store (kept,
and reused when it is already there). `--live` trains from the model run live instead of a store (one
forward per batch feeds every dictionary of a run; each separate run pays its own forwards). Figures
vary with machine load: compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from openscope.activations import HarvestConfig, harvest
from openscope.activations.store import ActivationStore
from openscope.train import TrainConfig, train
from openscope.train.config import number_text

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_train_many")


def tiny_model(folder: Path) -> Path:
    """The tests' tiny random Gemma 3 (seed 0) and its tokenizer, saved once under folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_gemma, make_tokenizer  # pyright: ignore[reportMissingImports]

    if not (folder / "config.json").is_file():
        tok = make_tokenizer()
        make_tiny_gemma(len(tok)).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def the_store(args: argparse.Namespace, work: Path) -> Path:
    """The activation store to train on: harvested unless a complete one is already at --store."""
    store = Path(args.store) if args.store else work / "store"
    if (store / "manifest.json").is_file() and ActivationStore(store, verify=False).complete:
        log.info("reusing the store at %s", store)
        return store
    model = args.model
    cfg = HarvestConfig(
        model=model,
        sites=args.site,
        source=args.source,
        tokens=args.tokens,
        context_len=args.context_len,
        batch_size=args.harvest_batch,
        output=store,
        device=args.device,
    )
    t0 = time.perf_counter()
    harvest(cfg, progress=False)
    log.info("harvested %d tokens of %s in %.0f s", args.tokens, args.site, time.perf_counter() - t0)
    return store


def train_cfg(args: argparse.Namespace, store: Path, out: Path, width: str, target: str) -> TrainConfig:
    live = dict(model=args.model, source=args.source, context_len=args.context_len) if args.live else {}
    return TrainConfig(
        store=store,
        **live,
        sites=args.site,
        width=width,
        target_l0=target,
        batch_size=args.batch_size,
        tokens=args.train_tokens or args.tokens,
        lr_warmup_steps=10,
        sparsity_warmup_steps=20,
        output=out,
        checkpoint_every=10**9,  # the end's checkpoint only, as in a real run of this length
        device=args.device,
        log_every=10**9,
    )


def together(args: argparse.Namespace, store: Path, out: Path) -> tuple[float, dict[str, Path]]:
    t0 = time.perf_counter()
    result = train(train_cfg(args, store, out, args.widths, args.targets), progress=False)
    return time.perf_counter() - t0, result.folders


def separately(args: argparse.Namespace, store: Path, out: Path) -> tuple[float, dict[str, Path]]:
    """One run per (width, target); the folders keyed as the run together keys them."""
    folders: dict[str, Path] = {}
    t0 = time.perf_counter()
    for w in args.widths.split(","):
        for t in args.targets.split(","):
            result = train(train_cfg(args, store, out / f"w{w}_l0_{t}", w, t), progress=False)
            folders[f"{args.site}_w{w}_l0_{number_text(float(t))}"] = result.folders[args.site]
    return time.perf_counter() - t0, folders


def largest_difference(a: dict[str, Path], b: dict[str, Path]) -> float:
    """The largest absolute difference between the two ways' saved tensors (0.0: bit for bit)."""
    if a.keys() != b.keys():
        raise SystemExit(f"the two ways made different dictionaries: {sorted(a)} vs {sorted(b)}")
    worst = 0.0
    for key in a:
        pa, pb = (load_file(str(f[key] / "params.safetensors")) for f in (a, b))
        worst = max([worst, *(float((pa[k] - pb[k]).abs().max()) for k in pa)])
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--real", action="store_true", help="Gemma 3 270M instead of the tiny random model")
    parser.add_argument("--live", action="store_true", help="train from the model run live, not a store")
    parser.add_argument("--store", default="", help="store folder (kept; reused when complete)")
    parser.add_argument("--site", default="", help="default: 6.resid_post (--real) or 1.resid_post")
    parser.add_argument("--source", default="wiki")
    parser.add_argument("--tokens", type=int, default=0, help="tokens harvested (default 200000 / 20000)")
    parser.add_argument("--train-tokens", type=int, default=0, help="training tokens (default: --tokens)")
    parser.add_argument("--widths", default="", help="default: 1024,4096 (--real) or 64,256")
    parser.add_argument("--targets", default="20,50")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--harvest-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.site = args.site or ("6.resid_post" if args.real else "1.resid_post")
    args.tokens = args.tokens or (200_000 if args.real else 20_000)
    args.widths = args.widths or ("1024,4096" if args.real else "64,256")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("openscope").setLevel(logging.WARNING)

    n = len(args.widths.split(",")) * len(args.targets.split(","))
    train_tokens = args.train_tokens or args.tokens
    walls: dict[str, list[float]] = {"together": [], "separately": []}
    differences: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.model = "gemma-3-270m" if args.real else str(tiny_model(work / "tiny"))
        store = work / "unused" if args.live else the_store(args, work)
        for r in range(args.rounds):
            order = (together, separately) if r % 2 == 0 else (separately, together)
            got = {}
            for way in order:
                wall, folders = way(args, store, work / f"round{r}" / way.__name__)
                walls[way.__name__].append(wall)
                got[way.__name__] = folders
                log.info("round %d: %s %.1f s", r + 1, way.__name__, wall)
            differences.append(largest_difference(got["together"], got["separately"]))
        rows = None if args.live else ActivationStore(store, verify=False).n_rows
    med = {k: statistics.median(v) for k, v in walls.items()}
    report: dict[str, Any] = {
        "model": "gemma-3-270m" if args.real else "tiny random Gemma 3",
        "site": args.site,
        "data": f"live ({args.source})" if args.live else "store",
        "store_rows": rows,
        "dictionaries": f"{n} (widths {args.widths} x targets {args.targets})",
        "training_tokens_per_dictionary": train_tokens,
        "batch_size": args.batch_size,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "wall_s_median": {k: round(v, 2) for k, v in med.items()},
        "wall_s_per_round": {k: [round(x, 2) for x in v] for k, v in walls.items()},
        "dictionary_tokens_per_s": {k: round(n * train_tokens / v) for k, v in med.items()},
        "rows_read_per_s": {
            "together": round(train_tokens / med["together"]),
            "separately": round(n * train_tokens / med["separately"]),
        },
        "speedup_together_vs_separately": round(med["separately"] / med["together"], 3),
        "largest_difference_per_round": differences,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
