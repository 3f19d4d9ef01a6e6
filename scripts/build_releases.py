"""Build openscope's registry of released dictionaries (`openscope/coders/releases.json`).

The registry maps SAELens-style release names (`gemma-scope-2-270m-pt-res`) and ids
(`layer_9_width_16k_l0_medium`) to a Hugging Face repository and the folder inside it, for every
Gemma Scope 1 and Gemma Scope 2 release. The names and folders are facts about Google's repositories;
SAELens keeps the most complete public list of them, so this script reads that list (a
`pretrained_saes.yaml` file from an installed `sae_lens` package, e.g. the one `make saelens-venv`
builds) and writes only the Gemma Scope entries, compactly:

    python scripts/build_releases.py .venv-peers/saelens/lib/python3.11/site-packages/sae_lens/pretrained_saes.yaml

Each release is {repo, model, folder?, ids | paths}: `ids` are brace patterns
(`layer_{5,9}_width_{16k,65k}_l0_{small,big}` stands for the 2 x 2 x 2 ids it expands to), each id's
folder being `folder/id` (or the id itself without `folder`); `paths` maps ids to folders where they
differ (the `-canonical` releases: `layer_0/width_16k/canonical` -> `layer_0/width_16k/average_l0_105`).
`openscope.coders.hub.expand` is the inverse of `compress` below; the test suite checks it on the
shipped file.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "openscope" / "coders" / "releases.json"
TOKEN = re.compile(r"([_/])")


def _key(token: str) -> tuple[int, int | str]:
    return (0, int(token)) if token.isdigit() else (1, token)


def compress(ids: list[str]) -> list[str]:
    """Brace patterns that expand to exactly `ids`: ids that differ in one token (between `_` and `/`)
    are merged into one pattern, repeatedly, position by position."""
    items: set[tuple[frozenset[str], ...]] = {tuple(frozenset([t]) for t in TOKEN.split(i)) for i in ids}
    changed = True
    while changed:
        changed = False
        for width in sorted({len(t) for t in items}):
            for pos in range(width):
                groups: dict[tuple, set[str]] = defaultdict(set)
                rest = {t for t in items if len(t) != width}
                for t in (t for t in items if len(t) == width):
                    groups[t[:pos] + t[pos + 1 :]].update(t[pos])
                merged = {(*k[:pos], frozenset(v), *k[pos:]) for k, v in groups.items()}
                if len(merged) < len(items) - len(rest):
                    changed = True
                items = rest | merged
    out = []
    for t in items:
        parts = []
        for s in t:
            values = sorted(s, key=_key)
            parts.append(values[0] if len(values) == 1 else "{" + ",".join(values) + "}")
        out.append("".join(parts))
    return sorted(out)


def build(saelens_yaml: Path) -> dict:
    data = yaml.safe_load(saelens_yaml.read_text())
    releases = {}
    for name in sorted(data):
        if not name.startswith("gemma-scope"):
            continue
        r = data[name]
        saes = r["saes"]
        entry: dict = {"repo": r["repo_id"], "model": r["model"]}
        folders = {s["path"].split("/")[0] for s in saes}
        if all(s["path"] == s["id"] for s in saes):
            entry["ids"] = compress([s["id"] for s in saes])
        elif len(folders) == 1 and all(s["path"] == f"{next(iter(folders))}/{s['id']}" for s in saes):
            entry["folder"] = next(iter(folders))
            entry["ids"] = compress([s["id"] for s in saes])
        else:
            entry["paths"] = {s["id"]: s["path"] for s in saes}
        releases[name] = entry
    return {
        "about": "Gemma Scope 1 and 2 releases: SAELens-style release name -> Hugging Face repo and "
        "folders (built by scripts/build_releases.py; `ids` are brace patterns).",
        "releases": releases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "saelens_yaml", type=Path, help="sae_lens/pretrained_saes.yaml of an installed SAELens"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    registry = build(args.saelens_yaml)
    args.out.write_text(json.dumps(registry, indent=1) + "\n")
    n = sum(1 for _ in registry["releases"])
    print(f"wrote {n} releases to {args.out}")


if __name__ == "__main__":
    main()
