"""Dictionaries from other tools' folders: SAELens, sparsify, circuit-tracer and dictionary_learning.

`peer_format` tells a folder's format from its files, `peer_entries` lists the dictionaries a folder
holds (one, or a circuit-tracer transcoder set's layer files), and `read_peer` reads one of them into a
coder plus a config.json-style dict (`PeerCoder`); `openscope.coders.dictionary.load_dictionary` binds
it to sites like any Gemma Scope folder. Each module's docstring gives its format's keys and math.
No reader ever unpickles a file, except dictionary_learning's `ae.pt` through
torch.load(weights_only=True).
"""

from __future__ import annotations

from pathlib import Path

from openscope.coders.peers.circuit_tracer import (
    is_circuit_tracer_folder,
    layer_files,
    read_clt,
    read_transcoder_layer,
)
from openscope.coders.peers.common import PeerCoder, pickles_in, refuse_pickles
from openscope.coders.peers.dictionary_learning import is_dictionary_learning_folder, read_dictionary_learning
from openscope.coders.peers.saelens import is_saelens_folder, read_saelens
from openscope.coders.peers.sparsify import is_sparsify_folder, read_sparsify
from openscope.errors import OpenscopeError

FORMATS = ("saelens", "sparsify", "circuit-tracer", "dictionary-learning")
"""The peer formats openscope reads (the values of `openscope export --from` besides ours)."""


def peer_format(path: Path) -> str | None:
    """The peer format of a folder (or of a circuit-tracer layer file), or None."""
    if path.is_file():
        return "circuit-tracer" if is_circuit_tracer_folder(path.parent) else None
    if is_saelens_folder(path):
        return "saelens"
    if is_sparsify_folder(path):
        return "sparsify"
    if is_circuit_tracer_folder(path):
        return "circuit-tracer"
    if is_dictionary_learning_folder(path):
        return "dictionary-learning"
    return None


def peer_entries(folder: Path) -> list[Path]:
    """The dictionaries a peer folder holds: its layer files for a circuit-tracer transcoder set, else
    the folder itself."""
    if is_circuit_tracer_folder(folder):
        return layer_files(folder) or [folder]
    return [folder]


def read_peer(path: Path) -> PeerCoder:
    """Read a peer folder (or one circuit-tracer layer file) into a coder."""
    fmt = peer_format(path)
    if fmt == "saelens":
        return read_saelens(path)
    if fmt == "sparsify":
        return read_sparsify(path)
    if fmt == "circuit-tracer":
        return read_transcoder_layer(path) if path.is_file() else _circuit_tracer_folder(path)
    if fmt == "dictionary-learning":
        return read_dictionary_learning(path)
    refuse_pickles(path if path.is_dir() else path.parent)
    raise OpenscopeError(f"{path} is not a SAELens, sparsify, circuit-tracer or dictionary_learning folder")


def _circuit_tracer_folder(folder: Path) -> PeerCoder:
    files = layer_files(folder)
    if not files:
        return read_clt(folder)
    if len(files) == 1:
        return read_transcoder_layer(files[0])
    raise OpenscopeError(
        f"{folder} is a circuit-tracer set of {len(files)} transcoders; load one layer file "
        f"({files[0].name}, ...) or the whole folder where several dictionaries are accepted"
    )


__all__ = ["FORMATS", "PeerCoder", "peer_entries", "peer_format", "pickles_in", "read_peer", "refuse_pickles"]
