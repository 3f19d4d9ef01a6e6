"""Export dictionaries for the tools people use: SAELens (`cfg.json` + `sae_weights.safetensors`) and
circuit-tracer (`config.yaml` + per-layer safetensors), and into openscope's own Gemma Scope 2 layout
(the way in for a peer's folder: `source_format` checks what the sources are). Every export is checked in full before anything
is written and lands in one rename; a non-empty target is only replaced when asked (`openscope.files`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from openscope.coders.dictionary import Dictionary, find_dictionaries, is_own_folder, load_dictionary
from openscope.coders.export.circuit_tracer import circuit_tracer_files, export_circuit_tracer
from openscope.coders.export.gemma_scope import export_gemma_scope
from openscope.coders.export.saelens import export_saelens, saelens_files
from openscope.coders.peers import FORMATS as PEER_FORMATS
from openscope.coders.peers import peer_format, refuse_pickles
from openscope.errors import OpenscopeError

FORMATS = ("saelens", "circuit-tracer", "gemma-scope")
"""The formats `export_folders` (and `openscope export --to`) writes."""
SOURCE_FORMATS = ("auto", "gemma-scope", *PEER_FORMATS)
"""What `openscope export --from` accepts: auto (each folder's own), gemma-scope (openscope's and Gemma
Scope 1/2 folders) or one peer's format."""
_WRITERS = {
    "saelens": export_saelens,
    "circuit-tracer": export_circuit_tracer,
    "gemma-scope": export_gemma_scope,
}


def source_format(path: Path) -> str:
    """The format of one found dictionary: gemma-scope (ours, Gemma Scope 1/2) or a peer's."""
    return "gemma-scope" if path.is_dir() and is_own_folder(path) else (peer_format(path) or "unknown")


def export_folders(
    sources: Sequence[str | Path],
    fmt: str,
    target: str | Path,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
    source: str = "auto",
) -> tuple[Path, list[Dictionary]]:
    """Load every dictionary at or below `sources` (folders, Hub references or release names) and
    export them all in format `fmt` to `target`. `source` (a SOURCE_FORMATS value) requires every
    dictionary found to be in that format.

    Returns the target and the dictionaries written.
    """
    if fmt not in FORMATS:
        raise OpenscopeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if source not in SOURCE_FORMATS:
        raise OpenscopeError(f"unknown source format {source!r}; choose one of {', '.join(SOURCE_FORMATS)}")
    folders = [folder for s in sources for folder in find_dictionaries(s)]
    if not folders:
        for s in sources:
            refuse_pickles(Path(s))  # a folder of pickles says so, rather than "nothing found"
        raise OpenscopeError(f"no dictionaries found under {', '.join(map(str, sources))}")
    if source != "auto":
        wrong = [f"{f} ({source_format(f)})" for f in folders if source_format(f) != source]
        if wrong:
            raise OpenscopeError(f"--from {source}, but these are not: {', '.join(wrong[:3])}")
    dictionaries = [load_dictionary(folder) for folder in folders]
    write = _WRITERS[fmt]
    return write(dictionaries, target, model_name=model_name, overwrite=overwrite), dictionaries


__all__ = [
    "FORMATS",
    "SOURCE_FORMATS",
    "circuit_tracer_files",
    "export_circuit_tracer",
    "export_folders",
    "export_gemma_scope",
    "export_saelens",
    "saelens_files",
]
