"""Run a fixed tiny-model pipeline through the command line and fingerprint everything it writes.

Used to show that a restructuring changes no behaviour: run it before and after the change and compare
the two fingerprints (`--compare OLD.json`). The pipeline covers every stage on a tiny random Gemma 3
(built with fixed seeds, the one the tests use) and real text: harvest → train an SAE, a transcoder
set and a cross-layer transcoder → eval → feature dashboards → an attribution graph and an
intervention → every chat analysis (contrast, ablate, jailbreak, sweep, cot, roles, diff).

The fingerprint maps each file to a digest of its content. Measured durations (`seconds`,
`tokens_per_s`, creation times) are dropped from JSON first, and SQLite databases are fingerprinted by
their rows, not their pages. The work folder is fixed (`--work`), so the paths recorded in provenance
are the same in both runs.

    python scripts/pipeline_fingerprint.py --out before.json
    python scripts/pipeline_fingerprint.py --out after.json --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"seconds", "tokens_per_s", "create_time_ms", "wall_seconds", "model_seconds", "command_line"}
"""JSON keys whose values are measured times (or the invoking command), different in every run."""


def tiny_models(work: Path) -> tuple[Path, Path]:
    """The tests' tiny random Gemma 3 (seed 0) and a second checkpoint of it (seed 1), saved once."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_gemma, make_tokenizer  # pyright: ignore[reportMissingImports]

    out = []
    for seed in (0, 1):
        path = work / f"model{seed}"
        if not (path / "config.json").is_file():
            tok = make_tokenizer()
            make_tiny_gemma(len(tok), seed=seed).save_pretrained(path)
            tok.save_pretrained(path)
        out.append(path)
    return out[0], out[1]


def pipeline(work: Path) -> Path:
    """Run every stage into work/out (emptied first); returns that folder."""
    from openscope.cli import run

    m0, m1 = tiny_models(work)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cpu = ["--device", "cpu"]
    small = ["--context-len", "64", "--batch-size", "4"]
    sae = out / "sae" / "1_resid_post_sae_jumprelu_w64"
    tc_folders = [str(out / "tc" / f"{i}_mlp_in_transcoder_jumprelu_w32") for i in range(3)]
    steps: list[Any] = [
        [
            "harvest",
            "--model",
            str(m0),
            "--source",
            "wiki[:300]",
            "--sites",
            "*.resid_post,*.mlp_in,*.mlp_out",
            "--tokens",
            "8192",
            *small,
            "--output",
            str(out / "acts"),
            *cpu,
        ],
        [
            "train",
            "--store",
            str(out / "acts"),
            "--sites",
            "1.resid_post",
            "--width",
            "64",
            "--tokens",
            "4096",
            "--batch-size",
            "256",
            "--lr",
            "1e-3",
            "--target-l0",
            "8",
            "--output",
            str(out / "sae"),
            *cpu,
        ],
        [
            "train",
            "--store",
            str(out / "acts"),
            "--kind",
            "transcoder",
            "--sites",
            "0.mlp_in,1.mlp_in,2.mlp_in",
            "--width",
            "32",
            "--tokens",
            "4096",
            "--batch-size",
            "256",
            "--lr",
            "1e-3",
            "--target-l0",
            "8",
            "--output",
            str(out / "tc"),
            *cpu,
        ],
        [
            "train",
            "--store",
            str(out / "acts"),
            "--kind",
            "clt",
            "--width",
            "32",
            "--tokens",
            "4096",
            "--batch-size",
            "256",
            "--lr",
            "1e-3",
            "--target-l0",
            "8",
            "--output",
            str(out / "clt"),
            *cpu,
        ],
        [
            "eval",
            "--dictionaries",
            str(out / "sae"),
            "--dictionaries",
            str(out / "tc"),
            "--dictionaries",
            str(out / "clt"),
            "--model",
            str(m0),
            "--source",
            "wiki[9000:9100]",
            "--tokens",
            "2048",
            *small,
            "--output",
            str(out / "eval"),
            *cpu,
        ],
        [
            "features",
            "--dictionaries",
            str(out / "sae"),
            "--dictionaries",
            str(out / "tc"),
            "--store",
            str(out / "acts"),
            "--tokens",
            "4096",
            "--output",
            str(out / "features.db"),
            "--export",
            str(out / "export"),
            "--export-latents",
            "0-3",
            *cpu,
        ],
        ["export", str(out / "sae"), "--to", "saelens", "--out", str(out / "saelens")],
        [
            "export",
            str(out / "tc"),
            "--to",
            "circuit-tracer",
            "--out",
            str(out / "ct"),
            "--model-name",
            "tiny",
        ],
        [
            "attribute",
            "The capital of France is",
            *[a for f in tc_folders for a in ("--dictionaries", f)],
            "--model",
            str(m0),
            "--node-threshold",
            "1.0",
            "--output",
            str(out / "graphs" / "paris.json"),
        ],
        [
            "attribute",
            "The capital of France is",
            "--dictionaries",
            str(out / "clt"),
            "--model",
            str(m0),
            "--output",
            str(out / "graphs" / "paris-clt.json"),
        ],
        "intervene",  # built once the graph exists: its first feature node is zeroed
        [
            "chat",
            "contrast",
            "--model",
            str(m0),
            "--n",
            "16",
            "--sites",
            "*.resid_post",
            "--dictionaries",
            str(out / "sae"),
            "--output",
            str(out / "chat" / "contrast"),
            *cpu,
        ],
        [
            "chat",
            "ablate",
            "--model",
            str(m0),
            "--contrast",
            str(out / "chat" / "contrast"),
            "--site",
            "1.resid_post",
            "--n",
            "8",
            "--n-generate",
            "2",
            "--max-new-tokens",
            "4",
            "--dictionary",
            str(sae),
            "--output",
            str(out / "chat" / "ablate"),
            *cpu,
        ],
        [
            "chat",
            "jailbreak",
            "--model",
            str(m0),
            "--contrast",
            str(out / "chat" / "contrast"),
            "--site",
            "1.resid_post",
            "--n-requests",
            "4",
            "--n-templates",
            "3",
            "--max-template-chars",
            "800",
            "--dictionary",
            str(sae),
            "--output",
            str(out / "chat" / "jailbreak"),
            *cpu,
        ],
        [
            "chat",
            "sweep",
            "--model",
            str(m0),
            "--direction",
            str(out / "chat" / "contrast"),
            "--site",
            "1.resid_post",
            "--strengths",
            "0.5",
            "--strengths",
            "2",
            "--n-prompts",
            "2",
            "--max-new-tokens",
            "4",
            "--output",
            str(out / "chat" / "sweep"),
            *cpu,
        ],
        [
            "chat",
            "cot",
            "--model",
            str(m0),
            "--n-questions",
            "4",
            "--dictionary",
            str(sae),
            "--output",
            str(out / "chat" / "cot"),
            *cpu,
        ],
        [
            "chat",
            "roles",
            "--dictionary",
            str(sae),
            "--model",
            str(m0),
            "--source",
            "sharegpt[:10]",
            "--tokens",
            "2048",
            "--context-len",
            "64",
            "--output",
            str(out / "chat" / "roles"),
            *cpu,
        ],
        [
            "chat",
            "diff",
            "--dictionary",
            str(sae),
            "--model-a",
            str(m0),
            "--model-b",
            str(m1),
            "--source",
            "sharegpt[:10]",
            "--tokens",
            "1024",
            "--context-len",
            "64",
            "--output",
            str(out / "chat" / "diff"),
            *cpu,
        ],
        [
            "chat",
            "tokens",
            "--model",
            str(m0),
            "--source",
            "sharegpt[:10]",
            "--output",
            str(out / "roles.json"),
        ],
    ]
    for args in steps:
        if args == "intervene":
            graph = out / "graphs" / "paris.json"
            node = next(
                n
                for n in json.loads(graph.read_text())["nodes"]
                if n["feature_type"] == "cross layer transcoder"
            )
            args = [
                "intervene",
                str(graph),
                "--zero",
                node["node_id"],
                "--output",
                str(out / "intervene.json"),
            ]
        print("openscope " + " ".join(args[:2]), flush=True)
        status = run(args)
        if status != 0:
            raise SystemExit(f"step failed ({status}): openscope {' '.join(args)}")
    return out


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def digest(path: Path) -> str:
    """A file's fingerprint: JSON without measured times, SQLite by its rows, anything else by bytes."""
    data = path.read_bytes()
    if path.suffix in (".json", ".jsonl"):
        lines = data.decode().splitlines() if path.suffix == ".jsonl" else [data.decode()]
        scrubbed = [json.dumps(_scrub(json.loads(line)), sort_keys=True) for line in lines if line.strip()]
        data = "\n".join(scrubbed).encode()
    elif path.suffix == ".db":
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        rows = []
        for line in conn.iterdump():
            rows.append(line)
        conn.close()
        data = "\n".join(sorted(rows)).encode()
    return hashlib.sha256(data).hexdigest()


def fingerprint(out: Path) -> dict[str, str]:
    skip = {
        ".db-wal",
        ".db-shm",
        ".pt",
    }  # checkpoints pickle Adam state byte-for-byte: weights are checked in params
    return {
        str(p.relative_to(out)): digest(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and not any(str(p).endswith(s) for s in skip)
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/openscope-fingerprint"), help="Fixed work folder."
    )
    parser.add_argument("--out", type=Path, required=True, help="Where to write the fingerprint (JSON).")
    parser.add_argument("--compare", type=Path, help="An earlier fingerprint to compare with.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prints = fingerprint(pipeline(args.work))
    args.out.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
    print(f"{len(prints)} files fingerprinted -> {args.out}")
    if args.compare:
        old = json.loads(args.compare.read_text())
        differ = sorted(k for k in old.keys() | prints.keys() if old.get(k) != prints.get(k))
        for name in differ:
            print(
                f"differs: {name} ({'missing' if name not in prints else 'new' if name not in old else 'changed'})"
            )
        print(f"{len(differ)} of {len(old.keys() | prints.keys())} files differ")


if __name__ == "__main__":
    main()
