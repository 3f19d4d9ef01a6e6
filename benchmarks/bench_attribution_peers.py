"""Benchmark: openscope's attribution graphs against circuit-tracer's, side by side, on Gemma 3 270M.

What it measures
    For a short (~10 tokens) and a long (~256 tokens) prompt, the same transcoders (openscope folders,
    exported with `openscope export --to circuit-tracer` for circuit-tracer), the same feature budget,
    batch size and torch threads: wall and CPU time of the attribution alone (model and transcoder
    loading excluded), peak resident memory of the attribution (the process's high-water mark reset
    just before it; circuit-tracer's: its process peak), openscope's memory estimate (made before its
    backward passes) against its measured peak, and whether the two graphs agree: the same active and
    selected features, the same logits, the adjacency equal on every block but token sources (relative
    difference), and token columns in the documented ratio √d_model (circuit-tracer's nnsight backend
    multiplies the gradient at Gemma's scaled embedding output by the unscaled embedding rows).

How it runs
    Each tool runs in its own subprocess, one after the other: openscope with this Python (this file's
    `--worker` mode), circuit-tracer with the Python of its own environment (`make circuit-tracer-venv`;
    `$OPENSCOPE_CIRCUIT_TRACER_PYTHON` or `--ct-python`) through `scripts/circuit_tracer_peer.py`. The
    model is the converted Gemma 3 270M folder (the PyPI package, see openscope.models.load), which
    circuit-tracer loads by path. Transcoders: `--dictionaries DIR` (a trained per-layer set), or by
    default random JumpReLU transcoders of width `--width` whose thresholds give L0 ≈ `--l0` on a
    sample text (`bench_attribution.random_dictionaries`; their graphs mean nothing, their costs are
    those of trained ones with that L0). On a shared 2-core machine keep `--threads 1`: with two
    threads competing for cores every tool slows down several-fold, unevenly.

    python benchmarks/bench_attribution_peers.py                        # short and long, ~15 min
    python benchmarks/bench_attribution_peers.py --prompts short --max-feature-nodes 4096
    python benchmarks/bench_attribution_peers.py --tools openscope --prompts long --tokens 1024 \\
        --max-memory-gb 20                                               # openscope alone, long prompt

Prints a table, then the JSON report. Each run's report is kept: it is written to
benchmarks/out/attribution_peers/report-{prompts}-{tools}-{tokens}.json (a later run with the same
prompts, tools and long-prompt length replaces only its own), and appended, with the time of the run,
to history.jsonl there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out" / "attribution_peers"
PEER_SCRIPT = ROOT / "scripts" / "circuit_tracer_peer.py"

SHORT = "The capital of the state containing Dallas is"
"""A two-hop factual prompt: 9 tokens with BOS for Gemma 3's tokenizer."""

LONG = (
    "The harbour town grew up around a sheltered bay on the northern coast, where fishing boats could "
    "wait out the winter storms. In the first centuries its people traded salted fish, wool and timber "
    "with the towns along the river, and the market square filled every autumn with merchants from the "
    "south who came for the cloth fair. A stone bridge replaced the old ferry, a guild hall rose beside "
    "the church, and the town council began to keep written accounts of every ship that entered the "
    "harbour. When the railway arrived the station was built on the hill above the old walls, and within "
    "a generation the quarter between the station and the docks was covered with warehouses, workshops "
    "and narrow streets of brick houses for the families who worked in them. The shipyards launched "
    "steamers for the coastal trade, the canning factory employed half the young women of the parish, "
    "and a tram line climbed from the quay to the new suburbs on the ridge. Two wars and the decline of "
    "the fisheries emptied many of those streets again. The factory closed, the yards built their last "
    "hull, and the warehouses stood silent for years until the town turned them into a museum, a library "
    "and studios for painters who came for the light over the bay. Today visitors walk along the "
    "restored quay, read the names of the lost trawlers on the memorial by the lighthouse, and eat "
    "smoked fish in the same market square where the cloth merchants once set up their stalls. Ask any "
    "of the older residents what changed most in their lifetime and they will tell you that the town "
    "itself is still the same, only quieter, and that on a clear evening you can still see the lights of "
    "the fishing boats far out on the water, heading home to the harbour of"
)
"""A long narrative prompt (cut to `--tokens` tokens with BOS, 256 by default; repeated for more)."""


def ct_python(arg: str | None) -> str:
    """circuit-tracer's Python: --ct-python, $OPENSCOPE_CIRCUIT_TRACER_PYTHON, or the Makefile's venv."""
    return (
        arg
        or os.environ.get("OPENSCOPE_CIRCUIT_TRACER_PYTHON")
        or str(ROOT / ".venv-peers" / "circuit-tracer" / "bin" / "python")
    )


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path, dict[str, list[int]]]:
    """(model folder, openscope dictionaries, circuit-tracer export, prompt ids by name)."""
    sys.path.insert(0, str(HERE))
    from bench_attribution import random_dictionaries  # the sibling benchmark's random transcoders

    from openscope.coders.dictionary import load_dictionary
    from openscope.coders.export import export_circuit_tracer
    from openscope.coders.io import save_coder
    from openscope.models.load import converted_dir, load_model
    from openscope.models.sites import Site, locate
    from openscope.models.tokens import prompt_ids

    lm = load_model(args.model)
    model_dir = converted_dir(args.model) if not Path(args.model).is_dir() else Path(args.model)
    prompts = {"short": prompt_ids(lm.tokenizer, SHORT)[0].tolist()}
    text = LONG
    while prompt_ids(lm.tokenizer, text).shape[1] < args.tokens:  # past ~300 tokens the text repeats
        text = f"{text} {LONG}"
    prompts["long"] = prompt_ids(lm.tokenizer, text)[0].tolist()[: args.tokens]
    if args.dictionaries is not None:
        folder = args.dictionaries
    else:
        folder = OUT / f"random-w{args.width}-l0{args.l0:g}"
        if not (folder / "layer_0" / "config.json").is_file():
            import torch

            sample = torch.tensor([prompt_ids(lm.tokenizer, LONG)[0].tolist()])
            for d in random_dictionaries(lm, "transcoders", args.width, args.l0, sample):
                layer = d.site_in.layer

                def hook(kind: str, layer: int = layer) -> str:
                    return locate(lm.arch.layers, lm.arch.layers_path, Site(layer, kind)).hook_point

                save_coder(
                    d.coder,  # type: ignore[arg-type]
                    folder / f"layer_{layer}",
                    hook_point_in=hook("mlp_in"),
                    hook_point_out=hook("mlp_out"),
                    model_name=args.model,
                )
    export = OUT / f"ct-{folder.name}"
    dicts = [load_dictionary(f, lm) for f in sorted(folder.iterdir()) if (f / "config.json").is_file()]
    export_circuit_tracer(dicts, export, model_name=str(model_dir), overwrite=True)
    return model_dir, folder, export, prompts


def worker(args: argparse.Namespace) -> None:
    """openscope's side: attribute once, save the graph's tensors, print the figures as JSON."""
    import torch
    from safetensors.torch import save_file

    from openscope.attribution import attribute
    from openscope.attribution.commands import load_attribution_dictionaries
    from openscope.attribution.memory import peak_rss, reset_peak_rss
    from openscope.models.load import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    dicts = load_attribution_dictionaries([args.dictionaries], "cpu", lm)
    ids = torch.tensor([int(i) for i in args.ids.split(",")])
    reset = reset_peak_rss()
    before = peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    graph = attribute(
        lm,
        dicts,
        ids,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        max_tokens=len(ids),
        max_memory_gb=args.max_memory_gb,
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "adjacency": graph.adjacency.contiguous(),
            "features": graph.features.contiguous(),
            "logit_ids": graph.logit_ids.contiguous(),
        },
        str(out / "graph.safetensors"),
    )
    m = graph.memory
    print(
        json.dumps(
            {
                "attribute_s": wall,
                "cpu_s": cpu,
                "peak_gib": peak / 2**30,
                "before_gib": before / 2**30,
                "peak_reset": reset,
                "estimate_gib": m.total / 2**30 if m is not None else None,
                "estimate": m.describe() if m is not None else None,
                "n_active": graph.n_active,
                "n_selected": graph.layout.n_features,
                "n_tokens": graph.n_tokens,
            }
        )
    )


def run_json(cmd: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float]:
    """Run a worker; (its last JSON line, CPU seconds of the child from the OS)."""
    before = os.times()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed:\n{done.stderr[-4000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line), (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )


def compare(ours_dir: Path, theirs_dir: Path, d_model: int) -> dict[str, Any]:
    """Agreement of the two graphs (module docstring). Where the feature budget cut, the tools may have
    attributed different latents (they re-rank on different schedules); a direct effect does not depend
    on which other nodes are in the graph, so the adjacencies are compared on the nodes both kept."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(ours_dir / "graph.safetensors")), load_file(str(theirs_dir / "graph.safetensors"))
    ours = [tuple(f) for f in a["features"].tolist()]
    theirs = [tuple(f) for f in b["active_features"][b["selected_features"]].tolist()]
    common = sorted(set(ours) & set(theirs))
    out: dict[str, Any] = {
        "selected_jaccard": len(common) / max(1, len(set(ours) | set(theirs))),
        "same_logits": torch.equal(a["logit_ids"], b["logit_ids"]),
    }
    if not out["same_logits"] or not common:
        return out
    n_rest = int(a["adjacency"].shape[0]) - len(ours)  # errors, tokens, logits: the same in both
    index_a, index_b = {f: i for i, f in enumerate(ours)}, {f: i for i, f in enumerate(theirs)}
    keep_a = torch.tensor([index_a[f] for f in common] + list(range(len(ours), len(ours) + n_rest)))
    keep_b = torch.tensor([index_b[f] for f in common] + list(range(len(theirs), len(theirs) + n_rest)))
    x, y = a["adjacency"][keep_a][:, keep_a], b["adjacency"][keep_b][:, keep_b]
    n_tok, n_logits = int(b["input_ids"].numel()), len(a["logit_ids"])
    tok = slice(x.shape[0] - n_logits - n_tok, x.shape[0] - n_logits)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, tok] = False
    out["max_rel_diff"] = float((x - y)[mask].abs().max()) / float(y[mask].abs().max())
    out["token_ratio"] = float(x[:, tok].abs().sum() / y[:, tok].abs().sum().clamp(min=1e-30))
    out["sqrt_d_model"] = d_model**0.5
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dictionaries", type=Path, default=None, help="A trained per-layer transcoder set.")
    parser.add_argument("--width", type=int, default=2048, help="Random transcoders: latents per layer.")
    parser.add_argument("--l0", type=float, default=50, help="Random transcoders: L0 per token.")
    parser.add_argument("--prompts", nargs="+", default=["short", "long"], choices=["short", "long"])
    parser.add_argument("--tokens", type=int, default=256, help="Tokens of the long prompt (BOS included).")
    parser.add_argument("--tools", nargs="+", default=["openscope", "circuit-tracer"])
    parser.add_argument("--batch-size", type=int, default=32, help="openscope's rows per backward pass.")
    parser.add_argument("--ct-batch-size", type=int, default=None, help="circuit-tracer's (default: same).")
    parser.add_argument("--max-feature-nodes", type=int, default=2048)
    parser.add_argument("--max-memory-gb", type=float, default=None, help="openscope's limit.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ct-python", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ids", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    model_dir, folder, export, prompts = prepare(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    report: dict[str, Any] = {
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("ids", "out")}
    }
    from openscope.models.load import load_model

    d_model = load_model(args.model).d_model
    for name in args.prompts:
        ids = ",".join(map(str, prompts[name]))
        result: dict[str, Any] = {"tokens": len(prompts[name])}
        out_os, out_ct = OUT / f"{name}-openscope", OUT / f"{name}-circuit-tracer"
        if "openscope" in args.tools:
            cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--dictionaries", str(folder)]
            cmd += ["--ids", ids, "--out", str(out_os), "--batch-size", str(args.batch_size)]
            cmd += ["--max-feature-nodes", str(args.max_feature_nodes), "--threads", str(args.threads)]
            if args.max_memory_gb is not None:
                cmd += ["--max-memory-gb", str(args.max_memory_gb)]
            result["openscope"], _ = run_json(cmd, env)
        if "circuit-tracer" in args.tools:
            cmd = [ct_python(args.ct_python), str(PEER_SCRIPT), "--model", str(model_dir)]
            cmd += ["--transcoders", str(export), "--prompt-ids", ids, "--out", str(out_ct)]
            cmd += [
                "--batch-size",
                str(args.ct_batch_size or args.batch_size),
                "--threads",
                str(args.threads),
            ]
            cmd += ["--max-feature-nodes", str(args.max_feature_nodes)]
            result["circuit-tracer"], _ = run_json(cmd, env)
        if "openscope" in result and "circuit-tracer" in result:
            result["speedup"] = result["circuit-tracer"]["attribute_s"] / result["openscope"]["attribute_s"]
            result["agreement"] = compare(out_os, out_ct, d_model)
        report[name] = result
        print_row(name, result)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / report_name(args)).write_text(json.dumps(report, indent=2))
    with (OUT / "history.jsonl").open("a") as history:
        history.write(json.dumps(report) + "\n")
    print(json.dumps(report, indent=2))


def report_name(args: argparse.Namespace) -> str:
    """The run's report file, named by its prompts, tools and long-prompt length (one file per kind of
    run: a side-by-side report is not replaced by a later single-tool run)."""
    tools = "+".join(sorted(args.tools))
    return f"report-{'+'.join(args.prompts)}-{tools}-{args.tokens}.json"


def print_row(name: str, result: dict[str, Any]) -> None:
    """One readable block per prompt."""
    print(f"\n== {name} prompt: {result['tokens']} tokens")
    if "openscope" in result:
        o = result["openscope"]
        print(
            f"  openscope:      {o['attribute_s']:7.1f} s wall, {o['cpu_s']:7.1f} s CPU, peak {o['peak_gib']:.2f} GiB "
            f"(estimate {o['estimate_gib']:.2f} GiB), {o['n_active']} active, {o['n_selected']} attributed"
        )
    if "circuit-tracer" in result:
        c = result["circuit-tracer"]
        print(
            f"  circuit-tracer: {c['attribute_s']:7.1f} s wall, {c['cpu_s']:7.1f} s CPU, peak {c['rss_peak_mib'] / 1024:.2f} GiB (process), "
            f"{c['n_active']} active, {c['n_selected']} attributed"
        )
    if "speedup" in result:
        print(f"  openscope is {result['speedup']:.2f}x as fast; agreement {result['agreement']}")


if __name__ == "__main__":
    main()
