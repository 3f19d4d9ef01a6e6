"""`openscope features --export --neuronpedia`: Neuronpedia's dashboard import batches, checked field by
field against SAEDashboard's schema (transcribed below) and value by value against the feature index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_features import built, config, corpus, sae, store  # noqa: F401 - the feature index fixtures

from openscope.features import FeatureDB, compute_features

pytestmark = pytest.mark.usefixtures("one_thread")

# The schema, transcribed from SAEDashboard (github.com/jbloomAus/SAEDashboard, commit db4839a):
# sae_dashboard/neuronpedia/neuronpedia_dashboard.py — NeuronpediaDashboardBatch.to_dict,
# NeuronpediaDashboardFeature.to_dict, NeuronpediaDashboardActivation.to_dict (their __init__ types) —
# and sae_dashboard/neuronpedia/neuronpedia_runner.py (record_skipped_features: skipped_indexes.json).
# "int?": int or None; "str?": str or None; "[float]": a list of numbers; "[[str]]" etc. nested.
BATCH = {"model_id": "str", "layer": "int", "sae_set": "str", "sae_id_suffix": "str?", "features": "list"}
FEATURE = {
    "feature_index": "int",
    "neuron_alignment_indices": "[int]",
    "neuron_alignment_values": "[float]",
    "neuron_alignment_l1": "[float]",
    "correlated_neurons_indices": "[int]",
    "correlated_neurons_l1": "[float]",
    "correlated_neurons_pearson": "[float]",
    "correlated_features_indices": "[int]",
    "correlated_features_l1": "[float]",
    "correlated_features_pearson": "[float]",
    "neg_str": "[str]",
    "neg_values": "[float]",
    "pos_str": "[str]",
    "pos_values": "[float]",
    "frac_nonzero": "float",
    "freq_hist_data_bar_values": "[float]",
    "freq_hist_data_bar_heights": "[float]",
    "logits_hist_data_bar_heights": "[float]",
    "logits_hist_data_bar_values": "[float]",
    "n_prompts_total": "int",
    "n_tokens_in_prompt": "int",
    "dataset": "str",
    "decoder_weights_dist": "[float]",
    "activations": "list",
    "vector": "[float]",
}
ACTIVATION = {
    "bin_min": "float",
    "bin_max": "float",
    "bin_contains": "float",
    "tokens": "[str]",
    "values": "[float]",
    "qualifying_token_index": "int",
}
"""(dfa_values, dfa_maxValue, dfa_targetIndex are optional upstream and written only with DFA data.)"""
SKIPPED = {
    "model_id": "str",
    "layer": "str",
    "sae_set": "str",
    "log_sparsity": "int",
    "skipped_indexes": "[int]",
}


def _is(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or _is(value, kind[:-1])
    if kind.startswith("["):
        return isinstance(value, list) and all(_is(v, kind[1:-1]) for v in value)
    if kind == "float":  # JSON numbers: an int is a float to every reader
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"int": int, "str": str, "list": list}[kind]) and not isinstance(value, bool)


def check_schema(doc: dict[str, Any], schema: dict[str, str], where: str) -> None:
    assert set(doc) == set(schema), f"{where}: {sorted(set(doc) ^ set(schema))}"
    for key, kind in schema.items():
        assert _is(doc[key], kind), f"{where}.{key} is not {kind}: {doc[key]!r}"


@pytest.fixture(scope="module")
def exported(built: Path, sae, store, tiny, tmp_path_factory) -> Path:  # noqa: F811
    """`openscope features --export --neuronpedia` (the build's own path) on a copy of the index."""
    tmp = tmp_path_factory.mktemp("np")
    shutil.copyfile(built, tmp / "features.db")
    cfg = config(tmp, store, export=tmp / "export", neuronpedia=True)
    result = compute_features(cfg, tiny, [sae], progress=False)
    assert result.skipped == ["sae"]  # the dashboards were up to date: only the export ran
    return tmp


def _batches(folder: Path) -> list[dict[str, Any]]:
    return [
        json.loads((folder / f"batch-{i}.json").read_text())
        for i in range(len(list(folder.glob("batch-*.json"))))
    ]


def test_every_field_has_saedashboards_name_and_type(exported: Path) -> None:
    folder = exported / "export" / "sae"
    batches = _batches(folder)
    assert batches
    for b in batches:
        check_schema(b, BATCH, "batch")
        for f in b["features"]:
            check_schema(f, FEATURE, f"feature {f.get('feature_index')}")
            assert f["activations"]
            for a in f["activations"]:
                check_schema(a, ACTIVATION, f"feature {f['feature_index']} activation")
    check_schema(json.loads((folder / "skipped_indexes.json").read_text()), SKIPPED, "skipped_indexes")


def test_the_batches_hold_the_dashboards(exported: Path, sae) -> None:  # noqa: F811
    folder = exported / "export" / "sae"
    features = {f["feature_index"]: (b, f) for b in _batches(folder) for f in b["features"]}
    skipped = json.loads((folder / "skipped_indexes.json").read_text())
    w_dec = sae.coder.w_dec.detach().float()
    with FeatureDB(exported / "features.db") as db:
        info = db.dictionary("sae")
        dead = {i for i in range(info.width) if db.feature("sae", i).n_fired == 0}
        # Every latent once: alive ones in a batch, dead ones listed as skipped (Neuronpedia shows them dead).
        assert set(skipped["skipped_indexes"]) == dead
        assert set(features) == set(range(info.width)) - dead
        for latent, (batch, f) in features.items():
            d = db.feature("sae", latent)
            assert (batch["model_id"], batch["layer"], batch["sae_set"]) == (info.model, 1, "sae")
            assert f["frac_nonzero"] == d.frequency
            assert f["pos_str"] == [t.token for t in d.top_logits]
            assert f["neg_str"] == [t.token for t in d.bottom_logits]
            assert f["pos_values"] == pytest.approx([t.value for t in d.top_logits], abs=1e-5)
            assert sum(f["freq_hist_data_bar_heights"]) == d.n_fired  # every firing in one bar
            values = f["freq_hist_data_bar_values"]
            assert values == sorted(values) and 0 < values[0] <= d.max_activation
            # Top examples first (SAEDashboard's top group: bin_min -1, bin_max the top activation),
            # then each quantile group with its activation range.
            acts = f["activations"]
            assert len(acts) == len(d.top_examples) + sum(len(g.examples) for g in d.quantiles)
            for a, e in zip(acts, d.top_examples, strict=False):
                assert (a["bin_min"], a["bin_contains"]) == (-1, -1)
                assert a["bin_max"] == pytest.approx(d.max_activation, abs=1e-5)
                assert a["tokens"] == e.tokens and a["values"] == pytest.approx(e.activations, abs=1e-5)
                assert a["values"][a["qualifying_token_index"]] == pytest.approx(e.max_activation, abs=1e-5)
            quantile = acts[len(d.top_examples) :]
            for a in quantile:
                assert a["bin_min"] <= a["values"][a["qualifying_token_index"]] + 1e-5 <= a["bin_max"] + 2e-5
            if quantile:  # each group's share of the sampled firings
                shares = {(a["bin_min"], a["bin_max"]): a["bin_contains"] for a in quantile}
                assert sum(shares.values()) == pytest.approx(1, abs=1e-4)
            # Neuron alignment: the 3 largest coordinates of the decoder row, and their share of its L1.
            top = w_dec[latent].topk(3)
            assert f["neuron_alignment_indices"] == top.indices.tolist()
            share = (top.values.abs() / w_dec[latent].abs().sum()).tolist()
            assert f["neuron_alignment_l1"] == pytest.approx(share, abs=1e-5)
            assert f["n_tokens_in_prompt"] == 32 and f["dataset"] == info.source


def test_batches_split_at_the_batch_size(built: Path, tmp_path: Path) -> None:  # noqa: F811
    from openscope.features.neuronpedia import export_neuronpedia

    with FeatureDB(built) as db:
        alive = [i for i in range(db.dictionary("sae").width) if db.feature("sae", i).n_fired > 0]
    files = export_neuronpedia(built, "sae", tmp_path, list(range(10)), batch_size=4)
    assert files[-1].name == "skipped_indexes.json"
    indices = [f["feature_index"] for p in files[:-1] for f in json.loads(p.read_text())["features"]]
    assert indices == [i for i in range(10) if i in alive]
    assert all(len(json.loads(p.read_text())["features"]) <= 4 for p in files[:-1])
