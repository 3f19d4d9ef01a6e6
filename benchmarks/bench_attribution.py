"""Benchmark: attribute a 16-token prompt on the real Gemma 3 270M; time, memory and graph size.

With trained dictionaries (the point of it):

    python benchmarks/bench_attribution.py --dictionaries dicts/transcoders/ [--dictionaries dicts/clt/]

Each `--dictionaries` argument is one set (per-layer transcoders, or one cross-layer transcoder folder,
or a folder holding them), attributed separately, so a CLT and a transcoder set compare side by side.
Without dictionaries, `--random transcoders|clt` builds random JumpReLU ones (width `--width`, thresholds
set so L0 ≈ `--l0` on the prompt) to time the machinery; their graphs mean nothing.

Reports per set: active latents, attributed latents, wall time of the attribution and of pruning +
JSON, peak RSS (the process high-water mark, after vs before; torch's CPU tensors live outside Python's
allocator, so tracemalloc's peak, also shown, counts Python objects only), nodes and edges before and
after pruning, the number of nodes holding 80% of the influence on the logits, replacement and
completeness scores. Graphs are written to benchmarks/out/attribution/.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import time
import tracemalloc
from pathlib import Path

import torch

from openscope.attribution import attribute, graph_file, save_graph
from openscope.attribution.commands import load_attribution_dictionaries
from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory
from openscope.models.hooks import run_to_sites
from openscope.models.load import LoadedModel, load_model
from openscope.models.sites import Site
from openscope.models.tokens import prompt_ids

log = logging.getLogger("bench_attribution")

PROMPT = "Fact: the Eiffel Tower is a famous old landmark located in the city of"
"""A factual-recall prompt: 16 tokens with BOS for Gemma 3's tokenizer."""
OUT = Path(__file__).parent / "out" / "attribution"


def rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_dictionaries(
    lm: LoadedModel, kind: str, width: int, l0: float, ids: torch.Tensor
) -> list[Dictionary]:
    """Random JumpReLU transcoders (or one CLT) with thresholds giving L0 ≈ l0 on the prompt."""
    d, n = lm.d_model, lm.n_layers
    x = run_to_sites(lm, ids, [Site(layer, "mlp_in") for layer in range(n)])
    inputs = [x[Site(layer, "mlp_in")][0, 1:] for layer in range(n)]  # no BOS

    def theta(z: torch.Tensor) -> float:
        return float(torch.quantile(z.flatten(), 1 - l0 / z.shape[-1]).clamp(min=1e-6))

    if kind == "clt":
        clt = CrossLayerCoder(CLTConfig(n_layers=n, d_in=d, d_out=d, width=width))
        with torch.no_grad():
            assert clt.log_threshold is not None
            for i in range(n):
                clt.log_threshold[i].fill_(math.log(theta(inputs[i] @ clt.w_enc[i])))
        return [Dictionary(clt.eval(), Site(0, "mlp_in"), Site(0, "mlp_out"), f"random-clt-{width}")]
    out = []
    for layer in range(n):
        c = SparseCoder(CoderConfig(d_in=d, d_out=d, width=width, kind="transcoder", seed=layer))
        with torch.no_grad():
            assert c.log_threshold is not None
            c.log_threshold.fill_(math.log(theta(c.pre_activations(inputs[layer]))))
        out.append(in_memory(c.eval(), Site(layer, "mlp_in"), Site(layer, "mlp_out"), f"random-tc{layer}"))
    return out


def bench(lm: LoadedModel, name: str, dicts: list[Dictionary], args: argparse.Namespace) -> None:
    before = rss_mib()
    tracemalloc.start()
    start = time.perf_counter()
    graph = attribute(
        lm,
        dicts,
        args.prompt,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
        max_tokens=64,
        progress=True,
    )
    t_attr = time.perf_counter() - start
    start = time.perf_counter()
    doc = graph_file(graph, model=lm.name, tokenizer=lm.tokenizer, slug=name)
    path = save_graph(doc, OUT / f"{name}.json")
    t_json = time.perf_counter() - start
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    m = doc.metadata.openscope
    assert m is not None
    s = m.metrics
    n_edges_pruned = len(doc.links)
    top = ", ".join(f"{n.token!r} {n.token_prob:.2f}" for n in doc.nodes if n.feature_type == "logit")
    print(f"\n== {name} ({len(dicts)} dictionaries) on {graph.n_tokens} tokens (BOS included)")
    print(f"  next tokens: {top}")
    print(f"  latents active {graph.n_active}, attributed {s.n_feature_nodes}")
    print(f"  attribution {t_attr:.1f} s, prune + JSON {t_json:.1f} s, batch {args.batch_size}")
    print(
        f"  peak RSS {rss_mib():.0f} MiB (was {before:.0f} MiB before), tracemalloc peak {py_peak / 2**20:.0f} MiB"
    )
    print(f"  nodes {graph.layout.n_nodes} ({graph.layout}), edges {s.n_edges}")
    print(f"  after pruning: {s.n_nodes} nodes, {n_edges_pruned} links")
    print(f"  nodes holding 80% of the influence: {s.nodes_for_80_percent}")
    print(f"  replacement score {s.replacement_score:.3f}, completeness {s.completeness_score:.3f}")
    print(f"  graph: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dictionaries", type=Path, action="append", default=[], help="A dictionary set (repeat)."
    )
    parser.add_argument("--random", choices=["transcoders", "clt"], action="append", default=[])
    parser.add_argument("--width", type=int, default=4096, help="Random dictionaries: latents per layer.")
    parser.add_argument("--l0", type=float, default=50, help="Random dictionaries: target L0 per token.")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-feature-nodes", type=int, default=8192)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default). On a busy "
        "2-core machine 1 thread ran the backward passes twice as fast as 2.",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.dictionaries and not args.random:
        parser.error("give --dictionaries DIR (trained) or --random transcoders|clt")
    lm = load_model(args.model)
    ids = prompt_ids(lm.tokenizer, args.prompt)
    print(
        f"{args.model}: prompt {args.prompt!r} is {ids.shape[1]} tokens with BOS; torch threads {torch.get_num_threads()}"
    )
    for folder in args.dictionaries:
        bench(lm, folder.name, load_attribution_dictionaries([folder], "cpu", lm), args)
    for kind in args.random:
        bench(
            lm, f"random-{kind}-{args.width}", random_dictionaries(lm, kind, args.width, args.l0, ids), args
        )


if __name__ == "__main__":
    main()
