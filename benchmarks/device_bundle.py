"""A model and a text that fit through a small pipe: for GPU checks on a machine with no model hub.

A lent GPU machine reaches no hub and takes only a few tens of MiB of files, while even Gemma 3 270M's
weights are hundreds of MiB. The GPU checks measure speed and equalities (hooks against hidden states, a
perfect splice, sparse against dense, resumed against uninterrupted), none of which depends on trained
weights. So `pack` keeps what a model is made of except its weights: its config and tokenizer (the real
architecture, sizes and vocabulary), plus documents of a text source as `.jsonl`; `unpack`, on the GPU
machine, builds the same architecture with seeded random weights and saves it as a model folder that
`--model` takes. Figures measured on it are the real model's speed; its losses mean nothing.

    python benchmarks/device_bundle.py pack .bundle                    # here: gemma-3-270m, 2000 wiki documents
    python benchmarks/device_bundle.py unpack .bundle /tmp/gemma       # there: a random-weight model folder
    python benchmarks/gpu_check.py --model /tmp/gemma --source .bundle/text.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from openscope.data.sources import open_source
from openscope.errors import OpenscopeError
from openscope.models.load import converted_dir, load_model

log = logging.getLogger("device_bundle")
#: A model folder's files that are not weights (those a folder lacks are skipped).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
TEXT = "text.jsonl"


def pack(model: str, source: str, docs: int, out: Path) -> None:
    """Write `model`'s config and tokenizer and `docs` documents of `source` into `out`."""
    folder = Path(model) if Path(model).is_dir() else converted_dir(model)
    if not (folder / "config.json").is_file():
        load_model(model)  # a known name converts into its cache folder on first load
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
    with (out / TEXT).open("w") as f:
        for i, text in enumerate(open_source(source).documents()):
            if i >= docs:
                break
            f.write(json.dumps({"text": text}) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    log.info(
        "packed %s (config, tokenizer) and %d documents of %s into %s: %.1f MiB",
        model,
        docs,
        source,
        out,
        size,
    )


def unpack(bundle: Path, out: Path, seed: int = 0) -> None:
    """Build the bundle's architecture with seeded random float32 weights and save it as a model folder."""
    if not (bundle / "config.json").is_file():
        raise OpenscopeError(f"{bundle} is not a bundle (no config.json); make one with `pack`")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(bundle)).to(torch.float32)
    model.save_pretrained(out)
    for name in MODEL_FILES:
        if name != "config.json" and (bundle / name).is_file():
            shutil.copy2(bundle / name, out / name)
    log.info("unpacked %s into %s: %.0fM random parameters", bundle, out, model.num_parameters() / 1e6)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("pack", help="config, tokenizer and text into a folder (here)")
    a.add_argument("out", type=Path)
    a.add_argument(
        "--model", default="gemma-3-270m", help="known name or model folder (default gemma-3-270m)"
    )
    a.add_argument("--source", default="wiki", help="text source (default wiki)")
    a.add_argument("--docs", type=int, default=2000, help="documents of the source (default 2000)")
    b = sub.add_parser("unpack", help="a random-weight model folder from a bundle (on the GPU machine)")
    b.add_argument("bundle", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.verb == "pack":
            pack(args.model, args.source, args.docs, args.out)
        else:
            unpack(args.bundle, args.out, args.seed)
    except OpenscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
