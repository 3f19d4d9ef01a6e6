"""Feature dashboards on the tiny model: every number checked against a brute-force computation."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from openscope.activations.harvest import HarvestConfig, harvest
from openscope.activations.store import ActivationStore, write_tensors
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory
from openscope.coders.io import save_coder
from openscope.errors import OpenscopeError
from openscope.features import FeatureDB, FeaturesConfig, compute_features, export_features
from openscope.features.directions import decoder_neighbours
from openscope.features.export import parse_latents
from openscope.features.schema import FeatureDetail
from openscope.features.streaming import hist_bin, hist_edges, segmented_topk
from openscope.models.sites import Site, locate

CONTEXT_LEN = 32
SITE = Site(1, "resid_post")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import CORPUS

    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    # The number first: repeated documents would give exactly tied activations.
    lines = [json.dumps({"text": f"Doc {i * 7919 % 1000}: {CORPUS[i % len(CORPUS)]}"}) for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def store(tiny, corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "acts"
    cfg = HarvestConfig(
        model=tiny.name,
        sites="1.resid_post,2.mlp_in",
        source=str(corpus),
        tokens=24 * CONTEXT_LEN,
        context_len=CONTEXT_LEN,
        batch_size=8,
        output=out,
        shard_mb=1,  # several shards, so batches cross shard boundaries
        device="cpu",
    )
    harvest(cfg, tiny, progress=False)
    return out


def make_coder(store_root: Path, site: Site, width: int, seed: int, kind: str = "sae") -> SparseCoder:
    """A random JumpReLU coder whose threshold makes about a fifth of the latents fire."""
    x = _rows(store_root, site.name)
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=width, kind=kind, seed=seed))  # type: ignore[arg-type]
    with torch.no_grad():
        coder.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        coder.calibrate_threshold_(x, target_l0=width / 5)
    return coder.eval()


def _rows(store_root: Path, key: str) -> torch.Tensor:
    st = ActivationStore(store_root)
    return torch.cat([st.read_shard(i, [key])[key] for i in range(len(st.shards))]).float()


@pytest.fixture(scope="module")
def sae(store) -> Dictionary:
    return in_memory(make_coder(store, SITE, 48, seed=1), SITE, name="sae")


@pytest.fixture(scope="module")
def transcoder(store) -> Dictionary:
    coder = make_coder(store, Site(2, "mlp_in"), 40, seed=2, kind="transcoder")
    return in_memory(coder, Site(2, "mlp_in"), Site(2, "mlp_out"), name="tc")


def config(tmp: Path, store: Path | None, **kw) -> FeaturesConfig:
    base = dict(
        output=tmp / "features.db",
        store=store,
        tokens=10**6,
        batch_tokens=4 * CONTEXT_LEN,
        top_k=5,
        window=3,
        quantile_buckets=3,
        quantile_examples=2,
        logits=4,
        neighbours=3,
        device="cpu",
    )
    base.update(kw)
    return FeaturesConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def built(tiny, store, sae, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("db")
    compute_features(config(tmp, store), tiny, [sae], progress=False)
    return tmp / "features.db"


class Brute:
    """Everything recomputed the slow, obvious way from the whole store at once."""

    def __init__(self, store_root: Path, d: Dictionary) -> None:
        st = ActivationStore(store_root)
        keys = [d.site_in.name, "context", "position"]
        parts = [st.read_shard(i, keys) for i in range(len(st.shards))]
        x = torch.cat([p[d.site_in.name] for p in parts]).float()
        self.context = torch.cat([p["context"] for p in parts]).long()
        self.position = torch.cat([p["position"] for p in parts]).long()
        with torch.no_grad():
            self.acts = d.coder.encode(x)
        self.contexts = {}
        for i, shard in enumerate(st.shards):
            ctx = st.read_shard(i, ["contexts"])["contexts"]
            for j in range(len(ctx)):
                self.contexts[shard["context_start"] + j] = ctx[j].tolist()

    def act_at(self, context: int, position: int, latent: int) -> float:
        hit = ((self.context == context) & (self.position == position)).nonzero()
        return float(self.acts[hit[0, 0], latent]) if len(hit) else 0.0


# ---- pure functions --------------------------------------------------------------------------------


def test_segmented_topk_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 7, (200,), generator=gen)
    score = torch.rand(200, generator=gen)
    got = segmented_topk(seg, score, 9, 4)
    for s in range(9):
        idx = (seg == s).nonzero().squeeze(1)
        want = idx[score[idx].argsort(descending=True)][:4].tolist()
        assert got[s][: len(want)].tolist() == want
        assert (got[s][len(want) :] == -1).all()


def test_histogram_bins_match_searchsorted():
    edges = hist_edges(1e-3, 1e5, 16)
    assert len(edges) == 8 * 16 + 1 and edges[-1].item() == pytest.approx(1e5)
    values = torch.rand(1000).double() * 10 ** torch.empty(1000).uniform_(-4, 6).double()
    want = (np.searchsorted(edges.numpy(), values.numpy(), side="right") - 1).clip(0, len(edges) - 2)
    assert hist_bin(values, 1e-3, 16, len(edges) - 1).tolist() == want.tolist()


def test_parse_latents():
    assert parse_latents("", 4) == [0, 1, 2, 3]
    assert parse_latents("0-2, 2,3", 8) == [0, 1, 2, 3]
    with pytest.raises(OpenscopeError, match="out of range"):
        parse_latents("5-9", 8)
    with pytest.raises(OpenscopeError, match="bad latent list"):
        parse_latents("a-b", 8)


# ---- the dashboards against brute force ------------------------------------------------------------


def test_frequencies_means_and_histograms_match_brute_force(built, store, sae):
    brute = Brute(store, sae)
    a = brute.acts
    edges = hist_edges(1e-3, 1e5, 16).numpy()
    with FeatureDB(built) as db:
        info = db.dictionary("sae")
        assert info.complete and info.n_tokens == len(a) and info.width == 48
        assert info.alive == int(((a > 0).sum(0) > 0).sum())
        for latent in range(48):
            f = db.feature("sae", latent)
            col = a[:, latent]
            fired = col[col > 0]
            assert f.n_fired == len(fired)
            assert f.frequency == pytest.approx(len(fired) / len(a))
            if len(fired):
                assert f.max_activation == pytest.approx(float(fired.max()), rel=1e-6)
                assert f.mean_activation == pytest.approx(float(fired.double().mean()), rel=1e-6)
            bins = (np.searchsorted(edges, fired.double().numpy(), side="right") - 1).clip(0, len(edges) - 2)
            counts = np.bincount(bins, minlength=len(edges) - 1)
            nz = np.nonzero(counts)[0]
            want = counts[nz[0] : nz[-1] + 1].tolist() if len(nz) else []
            assert f.histogram.counts == want
            assert sum(f.histogram.counts) == len(fired)
            if len(nz):
                assert f.histogram.edges == pytest.approx(edges[nz[0] : nz[-1] + 2].tolist())


def test_top_examples_are_the_max_activations_with_their_context(built, store, sae):
    brute = Brute(store, sae)
    a = brute.acts
    with FeatureDB(built) as db:
        for latent in range(48):
            f = db.feature("sae", latent)
            col = a[:, latent]
            n = min(5, int((col > 0).sum()))
            vals = col.topk(n).values
            assert [e.max_activation for e in f.top_examples] == pytest.approx(vals.tolist(), rel=1e-6)
            # The tiny model's sliding window (8) repeats contexts exactly, so ties are real: check that
            # each example's token really has its activation, and the values are the top ones.
            assert len({(e.context, e.position) for e in f.top_examples}) == n
            for e in f.top_examples:
                assert brute.act_at(e.context, e.position, latent) == pytest.approx(
                    e.max_activation, rel=1e-6
                )
            for e in f.top_examples:
                ctx = brute.contexts[e.context]
                assert e.token_ids == ctx[e.start : e.start + len(e.token_ids)]
                assert e.start + e.max_index == e.position
                assert e.start >= 0 and e.start + len(e.tokens) <= CONTEXT_LEN
                assert len(e.tokens) == len(e.activations) == len(e.token_ids) <= 7
                want_acts = [brute.act_at(e.context, e.start + i, latent) for i in range(len(e.tokens))]
                assert e.activations == pytest.approx(want_acts, rel=1e-6, abs=1e-7)
            if f.top_examples:
                assert f.top_token == f.top_examples[0].tokens[f.top_examples[0].max_index]


def test_quantile_examples_are_real_firings_grouped_by_activation(built, store, sae):
    brute = Brute(store, sae)
    with FeatureDB(built) as db:
        for latent in range(48):
            f = db.feature("sae", latent)
            fired = int((brute.acts[:, latent] > 0).sum())
            examples = [e for g in f.quantiles for e in g.examples]
            assert len(examples) == min(6, fired)
            assert len({(e.context, e.position) for e in examples}) == len(examples)
            for e in examples:
                assert e.max_activation > 0
                assert e.max_activation == pytest.approx(
                    brute.act_at(e.context, e.position, latent), rel=1e-6
                )
            for lo, hi in zip(f.quantiles, f.quantiles[1:], strict=False):
                assert lo.high <= hi.low and lo.index < hi.index


def test_top_logits_are_the_unembedding_of_the_normed_direction(built, tiny, sae):
    w_u = tiny.model.lm_head.weight.detach().float()
    gain = 1 + tiny.model.model.norm.weight.detach().float()  # Gemma RMSNorm: x/rms · (1 + w)
    logits = (sae.coder.w_dec.detach() * gain) @ w_u.t()
    with FeatureDB(built) as db:
        for latent in (0, 7, 30):
            f = db.feature("sae", latent)
            top = logits[latent].topk(4)
            bottom = logits[latent].topk(4, largest=False)
            assert [t.token_id for t in f.top_logits] == top.indices.tolist()
            assert [t.value for t in f.top_logits] == pytest.approx(top.values.tolist(), rel=1e-5)
            assert [t.token_id for t in f.bottom_logits] == bottom.indices.tolist()
            assert [t.value for t in f.bottom_logits] == pytest.approx(bottom.values.tolist(), rel=1e-5)
            assert f.top_logit == f.top_logits[0].token != ""


def test_neighbours_match_brute_force_cosine(built, sae):
    w = sae.coder.w_dec.detach()
    cos = torch.nn.functional.cosine_similarity(w[:, None, :], w[None, :, :], dim=-1)
    cos.fill_diagonal_(-math.inf)
    with FeatureDB(built) as db:
        for latent in range(48):
            f = db.feature("sae", latent)
            want = cos[latent].topk(3)
            assert [n.latent for n in f.neighbours] == want.indices.tolist()
            assert [n.cosine for n in f.neighbours] == pytest.approx(want.values.tolist(), abs=1e-5)
    got_cos, got_ids = decoder_neighbours(w, 3, chunk=7)  # chunking changes nothing
    assert got_ids.tolist() == cos.topk(3, dim=1).indices.tolist()
    assert torch.allclose(got_cos, cos.topk(3, dim=1).values, atol=1e-5)


# ---- resume, incremental, live ---------------------------------------------------------------------


def _dump(db_path: Path, name: str, width: int) -> list[dict]:
    """Every latent's dashboard and extras (correlations over the streamed tokens included)."""
    with FeatureDB(db_path) as db:
        return [{**db.feature(name, i).model_dump(), **db.extras(name, i).model_dump()} for i in range(width)]


def test_interrupted_run_resumes_to_the_same_result(tiny, store, sae, built, tmp_path):
    cfg = config(tmp_path, store, checkpoint_every=2)
    seen = []

    def interrupt(index: int) -> None:
        seen.append(index)
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_features(cfg, tiny, [sae], progress=False, on_batch=interrupt)
    conn = sqlite3.connect(cfg.output)
    assert conn.execute("SELECT batches_done FROM progress").fetchall() == [(2,)]
    assert conn.execute("SELECT COUNT(*) FROM features").fetchone() == (0,)
    conn.close()
    with FeatureDB(cfg.output) as db:
        assert [(d.name, d.complete) for d in db.dictionaries()] == [("sae", False)]
        with pytest.raises(OpenscopeError, match="no dashboards yet"):
            db.feature("sae", 0)
    resumed: list[int] = []
    result = compute_features(cfg, tiny, [sae], progress=False, on_batch=resumed.append)
    assert resumed[0] == 2  # continued at the checkpoint, not from the start
    assert result.computed == ["sae"]
    assert _dump(cfg.output, "sae", 48) == _dump(built, "sae", 48)


def test_adding_a_dictionary_leaves_the_first_untouched(tiny, store, sae, transcoder, built, tmp_path):
    cfg = config(tmp_path, store)
    shutil.copy(built, cfg.output)
    before = _dump(cfg.output, "sae", 48)
    conn = sqlite3.connect(cfg.output)
    rows_before = conn.execute("SELECT * FROM examples WHERE dictionary='sae' ORDER BY 1,2,3,4,5").fetchall()
    conn.close()
    result = compute_features(cfg, tiny, [sae, transcoder], progress=False)
    assert result.computed == ["tc"] and result.skipped == ["sae"]
    conn = sqlite3.connect(cfg.output)
    assert (
        conn.execute("SELECT * FROM examples WHERE dictionary='sae' ORDER BY 1,2,3,4,5").fetchall()
        == rows_before
    )
    conn.close()
    assert _dump(cfg.output, "sae", 48) == before
    with FeatureDB(cfg.output) as db:
        assert [d.name for d in db.dictionaries()] == ["sae", "tc"]
        tc = db.dictionary("tc")
        assert (tc.site, tc.site_out, tc.kind) == ("2.mlp_in", "2.mlp_out", "transcoder")
        detail = db.feature("tc", 0)
        assert detail.top_logits  # mlp_out lives in the residual stream
    brute = Brute(store, transcoder)
    assert db_frequency(cfg.output, "tc", 5) == pytest.approx(float((brute.acts[:, 5] > 0).float().mean()))
    # Nothing to do the second time.
    again = compute_features(cfg, tiny, [sae, transcoder], progress=False)
    assert again.computed == [] and again.n_tokens == 0


def db_frequency(path: Path, name: str, latent: int) -> float:
    with FeatureDB(path) as db:
        return db.feature(name, latent).frequency


def test_live_mode_matches_the_store(tiny, corpus, store, sae, built, tmp_path):
    cfg = config(
        tmp_path, None, source=str(corpus), context_len=CONTEXT_LEN, tokens=ActivationStore(store).n_rows
    )
    compute_features(cfg, tiny, [sae], progress=False)
    live, stored = _dump(cfg.output, "sae", 48), _dump(built, "sae", 48)
    brute = Brute(store, sae)
    for latent, (a, b) in enumerate(zip(live, stored, strict=True)):
        assert a["n_fired"] == b["n_fired"]
        values = [e["max_activation"] for e in a["top_examples"]]
        assert values == pytest.approx([e["max_activation"] for e in b["top_examples"]], rel=1e-4)
        # Live contexts get the same global ids as the store's (ties may pick other equal tokens).
        for e in a["top_examples"]:
            assert brute.act_at(e["context"], e["position"], latent) == pytest.approx(
                e["max_activation"], rel=1e-4
            )


# ---- search, export, CLI, errors -------------------------------------------------------------------


def test_search_by_token_and_by_logit(built):
    with FeatureDB(built) as db:
        f = db.feature("sae", 3)
        hits = db.search_by_token(f.top_token, limit=100)
        assert any(h.latent == 3 and h.score == pytest.approx(f.max_activation) for h in hits)
        scores = [h.score or 0.0 for h in hits]
        assert scores == sorted(scores, reverse=True)
        for h in hits:
            d = db.feature(h.dictionary, h.latent)
            match = [
                e
                for e in d.top_examples
                if e.tokens[e.max_index].strip().lower() == f.top_token.strip().lower()
            ]
            assert match and h.score == pytest.approx(max(e.max_activation for e in match))
        word = f.top_logits[0].token
        hits = db.search_by_logit(word, dictionary="sae")
        assert any(h.latent == 3 and h.score == pytest.approx(f.top_logits[0].value) for h in hits)
        assert db.search_by_token("no-such-token-anywhere") == []
        page = db.features("sae", offset=0, limit=10, order="frequency")
        assert len(page) == 10 and [p.frequency for p in page] == sorted(
            (p.frequency for p in page), reverse=True
        )


def test_export_json_is_the_schema(built, tmp_path):
    files = export_features(built, "sae", tmp_path / "out", "0-2")
    assert [p.name for p in files] == ["0.json", "1.json", "2.json"]
    with FeatureDB(built) as db:
        assert FeatureDetail.model_validate_json(files[1].read_text()) == db.feature("sae", 1)
    # --neuronpedia: Neuronpedia's import batches (checked in tests/test_neuronpedia_export.py)
    np_files = export_features(built, "sae", tmp_path / "np", [4], neuronpedia=True)
    assert [p.name for p in np_files] == ["batch-0.json", "skipped_indexes.json"]
    assert [f["feature_index"] for f in json.loads(np_files[0].read_text())["features"]] == [4]


def test_bad_input_is_one_line_errors(tiny, built, store, sae, tmp_path):
    with FeatureDB(built) as db:
        with pytest.raises(OpenscopeError, match="no dictionary 'nope'"):
            db.feature("nope", 0)
        with pytest.raises(OpenscopeError, match="out of range"):
            db.feature("sae", 48)
        with pytest.raises(OpenscopeError, match="unknown order"):
            db.features("sae", order="bogus")
    with pytest.raises(OpenscopeError, match="no feature database"):
        FeatureDB(tmp_path / "missing.db")
    # A store whose shards lack token ids.
    bare = tmp_path / "bare"
    shutil.copytree(store, bare)
    st = ActivationStore(bare)
    for i in range(len(st.shards)):
        write_tensors(st.shard_path(i), st.read_shard(i, ["1.resid_post"]))
    with pytest.raises(OpenscopeError, match="holds no token ids") as err:
        compute_features(config(tmp_path, bare), tiny, [sae], progress=False)
    assert "\n" not in str(err.value)
    # A store without the dictionary's site.
    with pytest.raises(OpenscopeError, match="holds no site"):
        other = in_memory(sae.coder, Site(0, "resid_post"), name="x")
        compute_features(config(tmp_path, store), tiny, [other], progress=False)


def test_cli_builds_and_exports(tiny, tiny_model_dir, store, tmp_path):
    from openscope.cli import app

    coder = make_coder(store, SITE, 16, seed=5)
    point = locate(tiny.arch.layers, tiny.arch.layers_path, SITE)
    save_coder(
        coder,
        tmp_path / "dicts/run/1_resid_post",
        hook_point_in=point.hook_point,
        model_name=str(tiny_model_dir),
        provenance={"openscope": {"site_in": SITE.name, "site_out": SITE.name}},
    )
    db = tmp_path / "f.db"
    args = ["features", "--dictionaries", str(tmp_path / "dicts"), "--store", str(store), "--output", str(db)]
    args += ["--tokens", "256", "--top-k", "3", "--export", str(tmp_path / "json"), "--export-latents", "0-1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "1_resid_post" in result.output
    assert sorted(p.name for p in (tmp_path / "json/1_resid_post").iterdir()) == ["0.json", "1.json"]
    with FeatureDB(db) as fdb:
        assert fdb.dictionary("1_resid_post").n_tokens >= 256
