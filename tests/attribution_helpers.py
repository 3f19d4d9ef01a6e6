"""Random dictionaries for attribution tests on the tiny Gemma 3 (shared by test_attribution.py and
test_serve_graphs.py): per-layer (skip-)transcoders with unfolded scales, a skip-CLT, and both saved as
folders the CLI and the explorer load."""

from __future__ import annotations

from pathlib import Path

import torch

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory
from openscope.coders.io import save_clt, save_coder
from openscope.models.load import LoadedModel
from openscope.models.sites import Site, locate

D = 64
"""The tiny model's width."""


def transcoder(layer: int, seed: int = 0, skip: bool = True) -> Dictionary:
    """A random (skip-)transcoder with unfolded scales C_in ≠ C_out, so the replacement must honour them."""
    kind = "skip_transcoder" if skip else "transcoder"
    c = SparseCoder(CoderConfig(d_in=D, d_out=D, width=24, kind=kind, seed=seed))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c.b_enc.normal_(0, 0.3, generator=g)
        c.b_dec.normal_(0, 0.1, generator=g)
        if c.w_skip is not None:
            c.w_skip.normal_(0, 0.05, generator=g)
    c.set_scales(1.3, 0.7)
    return in_memory(c.eval(), Site(layer, "mlp_in"), Site(layer, "mlp_out"), name=f"tc{layer}")


def clt(seed: int = 0, n_layers: int = 3) -> Dictionary:
    c = CrossLayerCoder(CLTConfig(n_layers=n_layers, d_in=D, d_out=D, width=16, skip=True, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c.b_enc.normal_(0, 0.3, generator=g)
        c.b_dec.normal_(0, 0.1, generator=g)
        assert c.w_skip is not None
        c.w_skip.normal_(0, 0.05, generator=g)
    return Dictionary(c.eval(), Site(0, "mlp_in"), Site(0, "mlp_out"), "clt")


def transcoders(tiny: LoadedModel) -> list[Dictionary]:
    return [transcoder(layer, seed=layer, skip=layer != 1) for layer in range(tiny.n_layers)]


def save_dictionaries(tiny: LoadedModel, model_dir: Path, root: Path) -> tuple[Path, Path]:
    """Save `transcoders` under root/tc/layer_i and `clt` under root/clt/all; returns both folders."""

    def hook(layer: int, kind: str) -> str:
        return locate(tiny.arch.layers, tiny.arch.layers_path, Site(layer, kind)).hook_point

    for d in transcoders(tiny):
        layer = d.site_in.layer
        assert isinstance(d.coder, SparseCoder)
        save_coder(
            d.coder,
            root / "tc" / f"layer_{layer}",
            hook_point_in=hook(layer, "mlp_in"),
            hook_point_out=hook(layer, "mlp_out"),
            model_name=str(model_dir),
        )
    c = clt().coder
    assert isinstance(c, CrossLayerCoder)
    save_clt(
        c,
        root / "clt" / "all",
        hook_point_in=hook(0, "mlp_in"),
        hook_point_out=hook(0, "mlp_out"),
        model_name=str(model_dir),
    )
    return root / "tc", root / "clt" / "all"
