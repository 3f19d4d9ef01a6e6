"""`openscope features --export`: one JSON file per feature (`FeatureDetail`), or with `--neuronpedia`
Neuronpedia's dashboard import batches (`openscope.features.neuronpedia`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from openscope.errors import OpenscopeError
from openscope.features.db import FeatureDB
from openscope.features.neuronpedia import export_neuronpedia
from openscope.files import Ownership, absolute, child, replacing, safe_name, write_text

FEATURE_EXPORT = Ownership("a feature export", files=("*.json", "*.tmp"))
"""What `<export>/<dictionary>/` holds: one `<latent>.json` per feature."""


def export_features(
    db_path: str | Path,
    dictionary: str,
    out: str | Path,
    latents: str | Sequence[int] | None = None,
    neuronpedia: bool = False,
    overwrite: bool = False,
    directions: Tensor | None = None,
    context_len: int = 0,
) -> list[Path]:
    """Write features of one dictionary as JSON files `<out>/<dictionary>/<latent>.json`.

    The dictionary's folder is written whole and renamed into place (`openscope.files`); an earlier
    export there is replaced only with `overwrite`. The folder's name is the dictionary's name made
    safe (never `..`, never a path), so it always lies inside `out`.

    The JSON is `FeatureDetail` (the schema the web app serves); with `neuronpedia` the folder holds
    Neuronpedia's dashboard import batches instead (`openscope.features.neuronpedia`: `directions`
    [F, d_out] gives their neuron alignment, `context_len` their tokens per prompt). latents: a spec
    such as "0-99,512", a list, or None for all.
    """
    with FeatureDB(db_path) as db:
        info = db.dictionary(dictionary)
        if latents is None or isinstance(latents, str):
            chosen = parse_latents(latents or "", info.width)
        else:
            chosen = list(latents)
    if neuronpedia:
        return export_neuronpedia(
            db_path,
            dictionary,
            out,
            chosen,
            directions=directions,
            context_len=context_len,
            overwrite=overwrite,
        )
    with FeatureDB(db_path) as db:
        root = absolute(out)
        target = child(root, safe_name(dictionary, "dictionary"))
        with replacing(target, FEATURE_EXPORT, overwrite=overwrite, flag="--export") as folder:
            for latent in chosen:
                detail = db.feature(dictionary, latent)
                write_text(folder / f"{latent}.json", detail.model_dump_json(), sync=False)
    return [target / f"{latent}.json" for latent in chosen]


def export_feature_json(db_path: str | Path, dictionary: str, latent: int) -> str:
    """One feature's JSON (FeatureDetail) as a string."""
    with FeatureDB(db_path) as db:
        return db.feature(dictionary, latent).model_dump_json()


def parse_latents(spec: str, width: int) -> list[int]:
    """`0-9,17` → [0..9, 17]; '' → all latents. Out-of-range latents are an error."""
    if not spec.strip():
        return list(range(width))
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise OpenscopeError(f"bad latent list {spec!r}; expected e.g. 0-99,512")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi >= width or lo > hi:
            raise OpenscopeError(f"latents {part} are out of range for width {width} (0..{width - 1})")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))
