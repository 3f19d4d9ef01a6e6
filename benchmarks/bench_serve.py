"""Latency of the explorer's feature page and inspector on a real feature database.

Serves `create_app` over HTTP with uvicorn in a thread (the same stack `openscope serve` runs), then
times, from a client on the same machine:

- the feature page's data: `GET /api/feature` for random latents (each request reads the latent's
  dashboard from SQLite: examples, histograms, logits, neighbours);
- the inspector: `POST /api/inspect` on Wikipedia paragraphs of about --inspect-tokens tokens
  (a model forward to the dictionary's layer, the encoder, the top latents per token).

Reports p50/p95/max in milliseconds. The first request of each kind is a warm-up and not counted.

Run: python benchmarks/bench_serve.py --db openscope-out/demo/features.db \
         --dictionaries openscope-out/demo/dictionaries
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from openscope.data.sources import open_source
from openscope.models.load import load_model
from openscope.serve import ServeConfig
from openscope.serve.app import create_app


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, body: dict[str, Any] | None = None) -> float:
    """Milliseconds for one request (the whole response read)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()
    return (time.perf_counter() - start) * 1000


def _stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {
        "n": len(ms),
        "p50_ms": statistics.median(ms),
        "p95_ms": ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))],
        "max_ms": ms[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, required=True, help="feature database (openscope features)")
    ap.add_argument("--dictionaries", type=Path, nargs="+", required=True, help="dictionary folders")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--features", type=int, default=200, help="feature-page requests")
    ap.add_argument("--inspects", type=int, default=30, help="inspector requests")
    ap.add_argument("--inspect-chars", type=int, default=400, help="characters of text per inspector request")
    ap.add_argument("--source", default="wiki[9000:]")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/serve_latency.json"))
    args = ap.parse_args()

    loaded = load_model(args.model)
    app = create_app(ServeConfig(db=args.db, dictionaries=list(args.dictionaries)), loaded=loaded)
    import uvicorn

    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{base}/api/dictionaries") as resp:
        info = json.loads(resp.read())[0]
    name, width = info["name"], info["width"]

    rng = random.Random(0)
    _call(f"{base}/api/feature?dictionary={name}&latent=0")
    feature_ms = [
        _call(f"{base}/api/feature?dictionary={name}&latent={rng.randrange(width)}")
        for _ in range(args.features)
    ]
    texts = [
        t[: args.inspect_chars]
        for t, _ in zip(open_source(args.source).documents(), range(args.inspects + 1), strict=False)
    ]
    inspect_ms = [_call(f"{base}/api/inspect", {"text": t, "dictionary": name, "k": 5}) for t in texts]
    server.should_exit = True

    result = {
        "db": str(args.db),
        "dictionary": name,
        "width": width,
        "feature_page": _stats(feature_ms),
        "inspector": _stats(inspect_ms[1:]),
        "inspect_chars": args.inspect_chars,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
