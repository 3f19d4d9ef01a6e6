"""Refusal rates of one or more models on held-out harmful and harmless prompts, with every answer
written out so the string judge can be checked by hand (docs/refusal-organism.md).

    python examples/refusal_organism/rates.py MODEL [MODEL ...] --harmful 'advbench[400:]' \
        --harmless 'sharegpt[:64]' --n 64 --output openscope-out/refusal-organism/rates.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from openscope.analysis.contrast import encode_prompts
from openscope.analysis.refusal import judge_answers
from openscope.data.prompts import load_prompts
from openscope.files import write_text
from openscope.models.load import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="Models (anything --model takes).")
    parser.add_argument("--harmful", default="advbench[400:]", help="Held-out harmful prompts.")
    parser.add_argument("--harmless", default="sharegpt[:64]", help="Held-out harmless prompts.")
    parser.add_argument("--n", type=int, default=64, help="Prompts of each set.")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="Tokens per greedy answer.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads.")
    parser.add_argument("--output", type=Path, required=True, help="JSON file for the rates and answers.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = {"harmful": load_prompts(args.harmful, args.n), "harmless": load_prompts(args.harmless, args.n)}
    doc: dict = {"harmful": args.harmful, "harmless": args.harmless, "models": {}}
    for name in args.models:
        loaded = load_model(name)
        row = {}
        for which, prompts in sets.items():
            judged = judge_answers(
                loaded, encode_prompts(loaded, prompts, True), max_new_tokens=args.max_new_tokens
            )
            row[which] = {
                "refusal_rate": judged.rate,
                "answers": [
                    {"prompt": p, "answer": a, "refused": r}
                    for p, a, r in zip(prompts, judged.answers, judged.refused, strict=True)
                ],
            }
            print(f"{name}: {which} refusal rate {judged.rate:.1%} ({len(prompts)} prompts)")
        doc["models"][name] = row
    write_text(args.output, json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
