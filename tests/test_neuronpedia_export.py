"""`openscope features --export --neuronpedia`: Neuronpedia's dashboard import batches, checked field by
field against SAEDashboard's schema (transcribed below) and value by value against the feature index."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_features import SITE, Brute, built, config, corpus, make_coder, sae, store  # noqa: F401 - fixtures

from openscope.activations.store import ActivationStore
from openscope.coders.dictionary import in_memory
from openscope.features import FeatureDB, compute_features
from openscope.features.correlations import NEURON_VALUES, feature_correlates, head_distribution, neuron_width
from openscope.features.neuronpedia import export_neuronpedia
from openscope.models.sites import Site

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


# ---- what the dashboards add: logit histogram, correlations, decoder weights per head -----------------


def _features(folder: Path) -> dict[int, dict[str, Any]]:
    return {f["feature_index"]: f for b in _batches(folder) for f in b["features"]}


def _inputs(store_root: Path) -> torch.Tensor:
    """The dictionary's input at every row of the store, in the order Brute reads them."""
    st = ActivationStore(store_root)
    return torch.cat([st.read_shard(i, [SITE.name])[SITE.name] for i in range(len(st.shards))]).float()


def test_logit_histogram_covers_the_whole_vocabulary(exported: Path, tiny, sae) -> None:  # noqa: F811
    w_u = tiny.model.lm_head.weight.detach().float()
    gain = 1 + tiny.model.model.norm.weight.detach().float()
    logits = (sae.coder.w_dec.detach() * gain) @ w_u.t()  # W_U·(g ⊙ d), every token
    features = _features(exported / "export" / "sae")
    assert features
    with FeatureDB(exported / "features.db") as db:
        for latent, f in features.items():
            heights, values = f["logits_hist_data_bar_heights"], f["logits_hist_data_bar_values"]
            assert len(heights) == len(values) == 40  # SAEDashboard's 40 bins, none trimmed
            assert sum(heights) == w_u.shape[0]  # every token in one bar
            hist = db.extras("sae", latent).logit_histogram
            assert hist is not None
            assert hist.lo == pytest.approx(float(logits[latent].min()), abs=1e-5)
            assert hist.hi == pytest.approx(float(logits[latent].max()), abs=1e-5)
            width = (hist.hi - hist.lo) / 40
            assert values[0] == pytest.approx(hist.lo + width / 2, abs=1e-5)
            assert values[-1] == pytest.approx(hist.hi - width / 2, abs=1e-5)
            # the counts are the histogram of that vector (torch.histc: the max in the last bin)
            want = torch.histc(logits[latent], bins=40, min=hist.lo, max=hist.hi)
            assert np.abs(np.array(heights) - want.numpy()).sum() <= 2  # float edges may move a token


def test_correlated_neurons_are_pearson_over_the_tokens(exported: Path, store, sae) -> None:  # noqa: F811
    acts = Brute(store, sae).acts.double().numpy()
    x = _inputs(store).double().numpy()
    features = _features(exported / "export" / "sae")
    assert len(features) > 5
    for latent, f in features.items():
        assert len(f["correlated_neurons_indices"]) == 3
        a = acts[:, latent]
        r = np.array([np.corrcoef(a, x[:, j])[0, 1] for j in range(x.shape[1])])
        top = np.argsort(-r, kind="stable")[:3]
        assert f["correlated_neurons_indices"] == top.tolist()
        assert f["correlated_neurons_pearson"] == pytest.approx(r[top].tolist(), abs=1e-4)
        cos = [a @ x[:, j] / np.sqrt((a @ a) * (x[:, j] @ x[:, j])) for j in top]
        assert f["correlated_neurons_l1"] == pytest.approx(cos, abs=1e-4)


def test_correlated_features_find_a_planted_pair(tiny, store, tmp_path: Path) -> None:  # noqa: F811
    coder = make_coder(store, SITE, 48, seed=1)
    with torch.no_grad():  # latent 7 is a copy of latent 3: they always fire together, equally
        coder.w_enc[:, 7] = coder.w_enc[:, 3]
        coder.b_enc[7] = coder.b_enc[3]
        assert coder.log_threshold is not None
        coder.log_threshold[7] = coder.log_threshold[3]
    d = in_memory(coder, SITE, name="pair")
    compute_features(
        config(tmp_path, store, export=tmp_path / "export", neuronpedia=True), tiny, [d], progress=False
    )
    features = _features(tmp_path / "export" / "pair")
    for a, b in ((3, 7), (7, 3)):
        assert features[a]["correlated_features_indices"][0] == b
        assert features[a]["correlated_features_pearson"][0] == pytest.approx(1, abs=1e-5)
        assert features[a]["correlated_features_l1"][0] == pytest.approx(1, abs=1e-5)
    # The sample is every token here (fewer than the sample size): numpy's correlations over them.
    acts = Brute(store, d).acts.double().numpy()
    with sqlite3.connect(tmp_path / "features.db") as conn:
        settings = json.loads(conn.execute("SELECT settings FROM dictionaries").fetchone()[0])
    assert settings["correlation_sample"] == len(acts)
    live = acts.std(0) > 0
    r = np.corrcoef(acts[:, live], rowvar=False)
    np.fill_diagonal(r, -np.inf)
    ids = np.flatnonzero(live).tolist()
    for latent, f in features.items():
        assert len(f["correlated_features_indices"]) == 3
        row = r[ids.index(latent)]
        top = np.argsort(-row, kind="stable")[:3]
        # the top 3 by numpy's correlations (3 and 7 tie with every other latent: either may come first)
        got = [row[ids.index(i)] for i in f["correlated_features_indices"]]
        assert got == pytest.approx(row[top].tolist(), abs=1e-6)
        assert f["correlated_features_pearson"] == pytest.approx(row[top].tolist(), abs=1e-4)
        cos = [
            acts[:, latent]
            @ acts[:, ids[j]]
            / np.linalg.norm(acts[:, latent])
            / np.linalg.norm(acts[:, ids[j]])
            for j in top
        ]
        assert f["correlated_features_l1"] == pytest.approx(cos, abs=1e-4)


def test_feature_correlates_match_numpy_in_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.relu(torch.randn(300, 20, generator=gen))
    codes[:, 5] = 0  # never fires: no correlates, and no one's correlate
    codes[:, 9] = 2 * codes[:, 4] + 1e-3 * torch.rand(300, generator=gen)
    got = feature_correlates(codes, 3, chunk_values=37)  # chunks of one latent
    live = [i for i in range(20) if i != 5]
    r = np.full((20, 20), -np.inf)
    r[np.ix_(live, live)] = np.corrcoef(codes[:, live].double().numpy(), rowvar=False)
    np.fill_diagonal(r, -np.inf)
    assert got[5] == []
    for latent in set(range(20)) - {5}:
        row = r[latent]
        top = np.argsort(-row, kind="stable")[:3]
        assert [i for i, _, _ in got[latent]] == top.tolist()
        assert [p for _, p, _ in got[latent]] == pytest.approx(row[top].tolist(), abs=1e-5)
    assert got[4][0][0] == 9 and got[9][0][0] == 4


def test_decoder_weights_dist_of_an_attn_out_dictionary(tiny, store, tmp_path: Path) -> None:  # noqa: F811
    coder = make_coder(store, SITE, 24, seed=3, kind="transcoder")
    with torch.no_grad():  # 4 heads of 16: latent 0 writes only into head 2
        coder.w_dec[0] = 0
        coder.w_dec[0, 32:48] = torch.randn(16, generator=torch.Generator().manual_seed(0))
    d = in_memory(coder, SITE, Site(1, "attn_out"), name="attn")
    compute_features(
        config(tmp_path, store, export=tmp_path / "export", neuronpedia=True), tiny, [d], progress=False
    )
    with FeatureDB(tmp_path / "features.db") as db:
        assert db.extras("attn", 0).head_distribution == pytest.approx([0, 0, 1, 0], abs=1e-6)
    for latent, f in _features(tmp_path / "export" / "attn").items():
        dist = f["decoder_weights_dist"]
        assert len(dist) == 4 and sum(dist) == pytest.approx(1, abs=1e-4)
        if latent == 0:
            assert dist == [0, 0, 1, 0]
    w = torch.zeros(2, 12)
    w[0, 4:8], w[1] = 3.0, 1.0  # pure: head 1 alone; every head equally
    assert head_distribution(w, 3) == [[0.0, 1.0, 0.0], pytest.approx([1 / 3] * 3)]


def test_an_older_database_exports_empty_extras(built: Path, tmp_path: Path) -> None:  # noqa: F811
    old = tmp_path / "old.db"
    shutil.copyfile(built, old)
    with sqlite3.connect(old) as conn:
        conn.execute("DROP TABLE latent_extras")  # as made before the table existed
    files = export_neuronpedia(old, "sae", tmp_path / "out", list(range(48)))
    features = [f for p in files[:-1] for f in json.loads(p.read_text())["features"]]
    assert features
    for f in features:
        check_schema(f, FEATURE, "feature")
        for key in ("logits_hist_data_bar_heights", "correlated_neurons_indices", "correlated_features_l1"):
            assert f[key] == []


def test_neuron_sums_stay_within_their_memory_budget() -> None:
    """A dictionary whose [F, d_in] sums would pass the budget keeps no correlated neurons; one within
    it keeps every coordinate."""
    assert neuron_width(4096, 640) == 640
    assert neuron_width(NEURON_VALUES // 640 + 1, 640) == 0
