"""Export dictionaries for the tools people use: SAELens (`cfg.json` + `sae_weights.safetensors`) and
circuit-tracer (`config.yaml` + per-layer safetensors). Every export is checked in full before anything
is written and lands in one rename; a non-empty target is only replaced when asked (`openscope.files`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from openscope.coders.dictionary import Dictionary, find_dictionaries, load_dictionary
from openscope.coders.export.circuit_tracer import circuit_tracer_files, export_circuit_tracer
from openscope.coders.export.saelens import export_saelens, saelens_files
from openscope.errors import OpenscopeError

FORMATS = ("saelens", "circuit-tracer")
"""The formats `export_folders` (and `openscope export --to`) writes."""


def export_folders(
    sources: Sequence[str | Path],
    fmt: str,
    target: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, list[Dictionary]]:
    """Load every dictionary at or below `sources` and export them all in format `fmt` to `target`.

    Returns the target and the dictionaries written.
    """
    if fmt not in FORMATS:
        raise OpenscopeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    folders = [folder for source in sources for folder in find_dictionaries(source)]
    if not folders:
        raise OpenscopeError(f"no dictionaries found under {', '.join(map(str, sources))}")
    dictionaries = [load_dictionary(folder) for folder in folders]
    write = export_saelens if fmt == "saelens" else export_circuit_tracer
    return write(dictionaries, target, model_name=model_name, overwrite=overwrite), dictionaries


__all__ = [
    "FORMATS",
    "circuit_tracer_files",
    "export_circuit_tracer",
    "export_folders",
    "export_saelens",
    "saelens_files",
]
