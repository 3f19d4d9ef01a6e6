"""Run circuit-tracer itself on a prompt: its attribution graph, timings and (optionally) its graph JSON.

This script runs in circuit-tracer's own virtual environment (`make circuit-tracer-venv` builds
.venv-peers/circuit-tracer: torch 2.13.0, circuit-tracer 0.5.0, nnsight < 0.8), never in openscope's;
it imports nothing from openscope. openscope's tests and benchmarks call it as a subprocess to compare
their graphs with circuit-tracer's on the same model folder and the same transcoders (exported by
`openscope export --to circuit-tracer`):

    .venv-peers/circuit-tracer/bin/python scripts/circuit_tracer_peer.py \
        --model MODEL_DIR --transcoders EXPORT_DIR --prompt-ids 2,651,6037 --out OUT_DIR [--json SLUG]

circuit-tracer finds a local transcoder folder by its absolute path (its cache lookup joins the path to
the cache root, and an absolute path wins), so both folders are made absolute here. Writes to OUT_DIR:

- `graph.safetensors`: `adjacency` [N, N] (rows targets, columns sources, circuit-tracer's node order:
  selected features, errors layer-major, tokens, logits), `active_features` [n, 3] (layer, position,
  latent), `selected_features` [k], `activation_values` [n], `logit_ids` [m], `logit_probs` [m],
  `input_ids` [T];
- `run.json`: wall times (model load, attribution, graph JSON), the attribution's CPU time, peak RSS,
  versions, node counts;
- with `--json SLUG`: `SLUG.json`, the graph file circuit-tracer's `create_graph_files` writes (what
  its viewer and Neuronpedia read), pruned with `--node-threshold` / `--edge-threshold`.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Hugging Face model folder.")
    parser.add_argument(
        "--transcoders", required=True, help="circuit-tracer transcoder folder (config.yaml)."
    )
    parser.add_argument("--prompt-ids", required=True, help="Token ids, comma-separated (BOS first).")
    parser.add_argument("--out", required=True, help="Folder to write.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--max-n-logits", type=int, default=10)
    parser.add_argument("--desired-logit-prob", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--json", default=None, help="Also write circuit-tracer's graph JSON as SLUG.json.")
    parser.add_argument("--node-threshold", type=float, default=0.8)
    parser.add_argument("--edge-threshold", type=float, default=0.98)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from circuit_tracer import ReplacementModel, attribute  # slow import (nnsight, transformers)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = ReplacementModel.from_pretrained(
        str(Path(args.model).resolve()),
        str(Path(args.transcoders).resolve()),
        backend="nnsight",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    load_s = time.perf_counter() - start
    ids = torch.tensor([int(i) for i in args.prompt_ids.split(",")])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), time.process_time()
    graph = attribute(
        ids,
        model,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
    )
    attribute_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save_file(
        {
            "adjacency": graph.adjacency_matrix.float().contiguous(),
            "active_features": graph.active_features.long().contiguous(),
            "selected_features": graph.selected_features.long().contiguous(),
            "activation_values": graph.activation_values.float().contiguous(),
            "logit_ids": graph.logit_token_ids.long().contiguous(),
            "logit_probs": graph.logit_probabilities.float().contiguous(),
            "input_ids": graph.input_tokens.long().contiguous(),
        },
        str(out / "graph.safetensors"),
    )
    json_s = None
    if args.json:
        from circuit_tracer.utils.create_graph_files import create_graph_files

        start = time.perf_counter()
        create_graph_files(
            graph,
            slug=args.json,
            output_path=str(out),
            node_threshold=args.node_threshold,
            edge_threshold=args.edge_threshold,
        )
        json_s = time.perf_counter() - start
    report = {
        "load_s": load_s,
        "attribute_s": attribute_s,
        "cpu_s": cpu_s,
        "json_s": json_s,
        "rss_before_mib": rss_before,
        "rss_peak_mib": rss_peak,
        "n_tokens": int(ids.numel()),
        "n_active": int(graph.active_features.shape[0]),
        "n_selected": int(graph.selected_features.numel()),
        "n_logits": int(graph.logit_probabilities.numel()),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "scan": graph.scan,
        "versions": {p: version(p) for p in ("circuit-tracer", "nnsight", "torch", "transformers")},
    }
    (out / "run.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
