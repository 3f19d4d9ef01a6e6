"""One naming rule for dictionaries: eval reports, the feature database and the explorer name the same
folders the same way (`openscope.coders.dictionary.unique_names`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import dictionary_folders, in_memory, load_dictionary, unique_names
from openscope.coders.io import save_coder
from openscope.eval import EvalConfig, evaluate
from openscope.features import FeatureDB, FeaturesConfig, compute_features
from openscope.models.load import LoadedModel
from openscope.models.sites import Site, locate
from openscope.serve.state import name_dictionaries


def _save(loaded: LoadedModel, model_dir: Path, folder: Path, layer: int, seed: int) -> None:
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=32, seed=seed))
    with torch.no_grad():
        coder.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    site = Site(layer, "resid_post")
    point = locate(loaded.arch.layers, loaded.arch.layers_path, site)
    save_coder(
        coder,
        folder,
        hook_point_in=point.hook_point,
        model_name=str(model_dir),
        provenance={"openscope": {"site_in": site.name, "site_out": site.name}},
    )


def test_unique_names_tells_a_clash_apart_by_parent_then_counter():
    def d(name: str, folder: str | None):
        return in_memory(
            SparseCoder(CoderConfig(d_in=4, d_out=4, width=4)), Site(0, "resid_post"), name=name
        )._replace(folder=Path(folder) if folder else None)

    dicts = [d("x", "a/x"), d("x", "b/x"), d("y", "a/y"), d("z", None), d("z", None), d("w", "c/w")]
    assert [u.name for u in unique_names(dicts)] == ["a/x", "b/x", "y", "z", "z#2", "w"]
    # Names already taken count as clashes; the same folder twice ends with a counter.
    assert [u.name for u in unique_names(dicts[2:4], taken=["y", "z"])] == ["a/y", "z#2"]
    assert [u.name for u in unique_names([dicts[0], dicts[0], dicts[1]])] == ["a/x", "a/x#2", "b/x"]


def test_eval_features_and_explorer_name_the_same_folders_alike(tiny, tiny_model_dir, text_file, tmp_path):
    tree = tmp_path / "dicts"
    _save(tiny, tiny_model_dir, tree / "a" / "sae", 0, seed=1)
    _save(tiny, tiny_model_dir, tree / "b" / "sae", 1, seed=2)  # the same folder name, another parent
    _save(tiny, tiny_model_dir, tree / "b" / "other", 1, seed=3)
    expected = {"a/sae", "b/sae", "other"}

    report = evaluate(
        EvalConfig(
            dictionaries=[tree],
            source=str(text_file),
            tokens=64,
            context_len=32,
            output=tmp_path / "eval",
            device="cpu",
        ),
        tiny,
        progress=False,
    )
    data = json.loads((tmp_path / "eval" / "report.json").read_text())
    in_report = [d["name"] for d in data["dictionaries"]]
    assert set(in_report) == expected and [d.name for d in report.dictionaries] == in_report

    db = tmp_path / "features.db"
    cfg = FeaturesConfig(
        dictionaries=[tree],
        output=db,
        source=str(text_file),
        tokens=64,
        context_len=32,
        batch_tokens=64,
        top_k=2,
        window=2,
        logits=2,
        neighbours=2,
        device="cpu",
    )
    result = compute_features(cfg, tiny, progress=False)
    assert sorted(result.computed) == sorted(in_report)
    with FeatureDB(db) as fdb:
        infos = fdb.dictionaries()
    assert sorted(i.name for i in infos) == sorted(in_report)

    # The explorer keeps the database's names for the folders it records, and names others the same way.
    loaded = [load_dictionary(f) for f in dictionary_folders([tree])]
    assert set(name_dictionaries(loaded, infos)) == expected
    assert set(name_dictionaries(loaded, [])) == expected
