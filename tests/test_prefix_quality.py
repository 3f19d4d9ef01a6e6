"""The Matryoshka prefix-quality curve of `openscope eval --prefixes` on the tiny model: the full-width
prefix equals the main metrics, and a prefix's figures equal those of a dictionary built separately from
the first p latents and evaluated the normal way."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate
from openscope.eval.prefixes import prefix_sizes
from openscope.models.sites import Site

WIDTH, P = 32, 8
FIELDS = ("l0", "fvu", "delta_loss", "kl", "loss_recovered")


def _sae(d: int, seed: int, **kw: Any) -> SparseCoder:
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, width=WIDTH, seed=seed, **kw))
    with torch.no_grad():
        coder.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return coder


def _clt(d: int) -> CrossLayerCoder:
    coder = CrossLayerCoder(CLTConfig(n_layers=2, d_in=d, d_out=d, width=WIDTH, seed=3))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for w in coder.w_dec:
            w.normal_(0, 0.2, generator=g)
    return coder


def _cut_sae(c: SparseCoder, p: int) -> SparseCoder:
    out = SparseCoder(dataclasses.replace(c.cfg, width=p))
    state = c.state_dict()
    state["w_enc"] = state["w_enc"][:, :p]
    for name in ("b_enc", "w_dec", "log_threshold"):
        state[name] = state[name][:p]
    out.load_state_dict(state)
    return out


def _cut_clt(c: CrossLayerCoder, p: int) -> CrossLayerCoder:
    out = CrossLayerCoder(dataclasses.replace(c.cfg, width=p))
    state = c.state_dict()
    state["w_enc"] = state["w_enc"][:, :, :p]
    for name in ("b_enc", "log_threshold"):
        state[name] = state[name][:, :p]
    for key in [k for k in state if k.startswith("w_dec.")]:
        state[key] = state[key][:p]
    out.load_state_dict(state)
    return out


def _dicts(d: int) -> list[Dictionary]:
    return [
        in_memory(_sae(d, 1), Site(1, "resid_post"), name="sae"),
        in_memory(_sae(d, 2, kind="transcoder"), Site(1, "mlp_in"), Site(1, "mlp_out"), name="tc"),
        in_memory(_sae(d, 4, activation="topk", k=6), Site(2, "resid_post"), name="topk"),
        Dictionary(_clt(d), Site(0, "mlp_in"), Site(0, "mlp_out"), "clt"),
    ]


def _run(tiny, text_file: Path, out: Path, dicts: list[Dictionary], prefixes: str) -> dict[str, Any]:
    cfg = EvalConfig(
        source=str(text_file), tokens=96, context_len=24, output=out, device="cpu", prefixes=prefixes
    )
    evaluate(cfg, tiny, dicts, progress=False)
    return {d["name"]: d for d in json.loads((out / "report.json").read_text())["dictionaries"]}


def test_prefixes_equal_the_main_metrics_and_separately_cut_dictionaries(
    tiny, text_file, tmp_path, one_thread
):
    dicts = _dicts(tiny.d_model)
    report = _run(tiny, text_file, tmp_path / "curve", dicts, f"{P},{WIDTH}")
    for name, row in report.items():
        sizes = [p["size"] for p in row["prefixes"]]
        assert sizes == [P, WIDTH], name
        full = row["prefixes"][-1]
        for key in FIELDS:
            assert full[key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), (name, key)
        assert row["prefixes"][0]["l0"] <= row["l0"]
    cut = [
        d._replace(
            coder=_cut_clt(d.coder, P) if isinstance(d.coder, CrossLayerCoder) else _cut_sae(d.coder, P),
            name=d.name,
        )
        for d in dicts
        if d.name != "topk"  # TopK picks among all latents: a narrower copy is not its prefix
    ]
    alone = _run(tiny, text_file, tmp_path / "cut", cut, "none")
    for name, row in alone.items():
        assert row["prefixes"] == []
        first = report[name]["prefixes"][0]
        for key in FIELDS:
            assert first[key] == pytest.approx(row[key], rel=1e-5, abs=1e-8), (name, key)
    assert (tmp_path / "curve" / "prefix_quality.png").stat().st_size > 0
    assert "Matryoshka prefixes" in (tmp_path / "curve" / "report.md").read_text()
    assert not (tmp_path / "cut" / "prefix_quality.png").exists()


def test_auto_reads_the_recorded_matryoshka_prefixes(tiny, text_file, tmp_path, one_thread):
    d = in_memory(_sae(tiny.d_model, 1), Site(1, "resid_post"), name="m")
    trained = d._replace(config={"openscope": {"train_config": {"matryoshka": "4,16"}}})
    randomly = d._replace(name="r", config={"openscope": {"train_config": {"matryoshka": "random:8"}}})
    assert prefix_sizes(trained, "auto") == (4, 16)
    assert prefix_sizes(randomly, "auto") == (2, 8)  # 32/16, 32/4 (the ladder's parts of at least 1)
    assert prefix_sizes(d, "auto") == () and prefix_sizes(trained, "none") == ()
    report = _run(tiny, text_file, tmp_path / "auto", [trained, d._replace(name="plain")], "auto")
    assert [p["size"] for p in report["m"]["prefixes"]] == [4, 16, WIDTH]
    assert report["plain"]["prefixes"] == []


@pytest.mark.parametrize("option", ["16,8", "0,4", "64", "a,b", "4,4"])
def test_bad_prefixes_are_refused(option):
    d = in_memory(_sae(16, 1), Site(1, "resid_post"), name="m")
    with pytest.raises(OpenscopeError, match="--prefixes"):
        prefix_sizes(d, option)
