"""Attribution graphs on the tiny random Gemma 3: the replacement model is exact, every edge is the effect
of an intervention, pruning keeps what it should, the JSON is the schema the explorer reads, the CLI runs,
and graph interventions equal manual ablations."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from attribution_helpers import D, clt, save_dictionaries, transcoder, transcoders
from typer.testing import CliRunner

from openscope.attribution import attribute, graph_file, load_graph, save_graph
from openscope.attribution.attribute import AttributionGraph, top_logits
from openscope.attribution.commands import AttributeConfig, InterveneConfig, run_attribute, run_intervene
from openscope.attribution.graph import (
    NodeLayout,
    graph_scores,
    logit_seed,
    node_influence,
    normalize_rows,
    prune,
)
from openscope.attribution.intervene import intervene, node_id_of, parse_edit
from openscope.attribution.replacement import ReplacementModel
from openscope.attribution.schema import GraphFile, LatentEdit
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory
from openscope.coders.io import save_coder
from openscope.errors import OpenscopeError
from openscope.models.hooks import hook_site
from openscope.models.load import LoadedModel
from openscope.models.sites import Site
from openscope.models.tokens import prompt_ids

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def threads() -> Iterator[None]:
    """Tiny tensors on a shared 2-core machine: one thread avoids costly thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["transcoders", "clt"])
def case(request, tiny, threads) -> tuple[list[Dictionary], AttributionGraph]:
    dicts = transcoders(tiny) if request.param == "transcoders" else [clt()]
    return dicts, attribute(tiny, dicts, PROMPT, batch_size=16)


# ---- (a) the replacement model is exact -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["transcoders", "clt"])
def test_replacement_reproduces_the_clean_logits(tiny, threads, kind):
    dicts = transcoders(tiny) if kind == "transcoders" else [clt()]
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    with torch.no_grad():
        clean = tiny.model(input_ids=ids).logits[0]
    rm = ReplacementModel(tiny, dicts, ids)
    run = rm.run(batch=3, logits=True)
    assert run.logits is not None
    for b in range(3):  # every copy of the batched forward is the clean model
        torch.testing.assert_close(run.logits[b], clean, atol=1e-4, rtol=0)
    # The frozen norms are exact linear maps y = x ⊙ gain of their clean input.
    for f in rm.frozen_norms:
        torch.testing.assert_close(f.x * f.gain, f.y, atol=1e-5, rtol=1e-4)
    # Without the error nodes the replacement is something else: they carry real signal.
    no_error = rm.run(logits=True, mlp_offsets={m: -rm.errors[m] for m in range(rm.n_layers)})
    assert no_error.logits is not None
    assert (no_error.logits[0] - clean).abs().max() > 1e-3
    # BOS has no latents and no error node.
    assert all(float(z[0].abs().sum()) == 0 for z in rm.latents) and float(rm.errors[:, 0].abs().sum()) == 0


# ---- (b) edges equal interventions in the frozen replacement model --------------------------------


def _targets(rm: ReplacementModel, graph: AttributionGraph, run) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-activation of every feature node, logit − mean logit of every logit node) in a frozen run."""
    pre = []
    for layer, slot in enumerate(rm.slots):
        x = run.mlp_in[layer][0].to(slot.coder.w_enc.dtype)
        pre.append(slot.coder.pre_activations_at(slot.index, x))
    f = graph.features
    z = torch.stack([pre[layer][pos, lat] for layer, pos, lat in f.tolist()])
    logits = run.logits[0, -1]
    return z, logits[graph.logit_ids] - logits.mean()


def _check_column(rm, graph, column: int, base, new) -> None:
    z0, l0 = _targets(rm, graph, base)
    z1, l1 = _targets(rm, graph, new)
    layout = graph.layout
    torch.testing.assert_close(z1 - z0, graph.adjacency[: layout.n_features, column], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(l1 - l0, graph.adjacency[layout.logits, column], atol=2e-5, rtol=1e-3)


def test_edges_equal_interventions_in_the_frozen_replacement(case, tiny):
    dicts, graph = case
    rm = ReplacementModel(tiny, dicts, graph.input_ids)
    layout, a = graph.layout, graph.adjacency
    feats = graph.features
    base = rm.run(logits=True)
    with torch.no_grad():
        last_layer = feats[:, 0] == rm.n_layers - 1
        # Latent → latent two layers up, latent → logit, and a plain sample of latents.
        cross = a[: layout.n_features][last_layer][:, : layout.n_features].abs().sum(0) * (feats[:, 0] == 0)
        to_logit = a[layout.logits, : layout.n_features].abs().sum(0)
        sources = {int(cross.argmax()), int(to_logit.argmax()), 0, layout.n_features // 2}
    assert float(cross.max()) > 1e-3 and float(to_logit.max()) > 1e-4  # the chosen edges are real
    for s in sorted(sources):
        layer, pos, lat = feats[s].tolist()
        act = float(graph.activations[s])
        # Doubling the activation (δ = a) moves every target by exactly its edge weight (× δ/a = 1).
        new = rm.run(logits=True, mlp_offsets=rm.latent_offsets(layer, pos, lat, act))
        _check_column(rm, graph, s, base, new)
    # Token → latent: doubling a token's embedding; error → latent: doubling an error vector.
    token_col = layout.tokens.start + 3
    assert float(a[: layout.n_features, token_col].abs().max()) > 1e-3
    _check_column(rm, graph, token_col, base, rm.run(logits=True, embed_offset=embed_at(rm, 3)))
    m, p = 0, rm.n_tokens - 1
    offset = torch.zeros_like(rm.errors[m])
    offset[p] = rm.errors[m, p]
    _check_column(
        rm,
        graph,
        layout.errors.start + m * rm.n_tokens + p,
        base,
        rm.run(logits=True, mlp_offsets={m: offset}),
    )


def embed_at(rm: ReplacementModel, pos: int) -> torch.Tensor:
    out = torch.zeros_like(rm.clean.embeddings)
    out[pos] = rm.clean.embeddings[pos]
    return out


def test_rows_do_not_depend_on_batching_and_a_capped_graph_is_a_subgraph(tiny, threads):
    dicts = [clt(seed=3)]
    one = attribute(tiny, dicts, PROMPT, batch_size=1)
    many = attribute(tiny, dicts, PROMPT, batch_size=13)
    torch.testing.assert_close(one.adjacency, many.adjacency, atol=1e-6, rtol=1e-5)
    cap = 40
    small = attribute(tiny, dicts, PROMPT, batch_size=8, max_feature_nodes=cap)
    assert small.layout.n_features == cap and small.n_active == one.n_active > cap
    index = {tuple(f): i for i, f in enumerate(one.features.tolist())}
    rows = torch.tensor([index[tuple(f)] for f in small.features.tolist()])
    keep = torch.cat([rows, torch.arange(one.layout.n_features, one.layout.n_nodes)])
    torch.testing.assert_close(small.adjacency, one.adjacency[keep][:, keep], atol=1e-6, rtol=1e-5)


def test_top_logits_cover_the_probability():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    ids, probs = top_logits(logits, max_logits=10, probability=0.9)
    assert ids.tolist() == [0, 1, 2] and probs.sum() == pytest.approx(0.95)
    assert top_logits(logits, max_logits=2, probability=0.99)[0].tolist() == [0, 1]


# ---- (c) pruning on a hand-built graph (pure) -------------------------------------------------------

# Nodes f0 f1 f2 (features), e (error), t0 t1 (tokens), L (logit); rows are targets.
F0, F1, F2, E, T0, T1, LOGIT = range(7)
LAYOUT = NodeLayout(n_features=3, n_errors=1, n_tokens=2, n_logits=1)


def hand_graph() -> torch.Tensor:
    a = torch.zeros(7, 7)
    a[LOGIT, F0], a[LOGIT, F1], a[LOGIT, E] = 8.0, 1.5, -0.5  # normalised: .8, .15, .05
    a[F0, T0], a[F0, T1] = 3.0, -1.0  # .75, .25
    a[F1, T1], a[F1, T0] = 0.9, 0.1
    a[F2, T0] = 1.0  # f2 feeds nothing: no influence
    return a


def test_influence_is_the_path_sum_and_matches_the_matrix_inverse():
    a, seed = hand_graph(), logit_seed(LAYOUT, torch.tensor([1.0]))
    influence = node_influence(a, seed)
    want = torch.tensor([0.8, 0.15, 0.0, 0.05, 0.615, 0.335, 0.0])
    torch.testing.assert_close(influence, want)
    norm = normalize_rows(a)
    reference = seed @ (torch.linalg.inv(torch.eye(7) - norm) - torch.eye(7))  # the slow twin
    torch.testing.assert_close(influence, reference)


def test_prune_keeps_the_influential_nodes_and_edges():
    a, probs = hand_graph(), torch.tensor([1.0])
    kept = prune(a, LAYOUT, probs, node_threshold=0.8, edge_threshold=0.98)
    # Influence total 1.95; f0 (.8), t0 (.615), t1 (.335) hold 0.8; tokens and logits always stay.
    assert kept.node_mask.nonzero().squeeze(1).tolist() == [F0, T0, T1, LOGIT]
    assert {tuple(e) for e in kept.edge_mask.nonzero().tolist()} == {(LOGIT, F0), (F0, T0), (F0, T1)}
    # Keep more nodes but fewer edges: the error loses its only outgoing edge and f1 both incoming ones
    # (scores .135 and .015 < .15), so both go, and then f1's edge to the logit goes too.
    kept = prune(a, LAYOUT, probs, node_threshold=0.99, edge_threshold=0.85)
    assert kept.node_mask.nonzero().squeeze(1).tolist() == [F0, T0, T1, LOGIT]
    assert {tuple(e) for e in kept.edge_mask.nonzero().tolist()} == {(LOGIT, F0), (F0, T0), (F0, T1)}
    # Cumulative influence: f0 first (.8 / 1.95), then t0 ((.8 + .615) / 1.95).
    assert kept.cumulative[F0] == pytest.approx(0.8 / 1.95) and kept.cumulative[T0] == pytest.approx(
        1.415 / 1.95
    )
    with pytest.raises(OpenscopeError, match="node_threshold"):
        prune(a, LAYOUT, probs, node_threshold=1.5)


def test_replacement_and_completeness_scores():
    scores = graph_scores(hand_graph(), LAYOUT, torch.tensor([1.0]))
    assert scores.replacement == pytest.approx(0.95 / 1.0)  # tokens .95 of the .95 + .05 reaching sources
    # Only the logit takes input from the error (.05 of it); weights: influence + logit weight (2.95).
    assert scores.completeness == pytest.approx((1.95 + 0.95) / 2.95)


# ---- (d) the graph JSON ---------------------------------------------------------------------------


def test_graph_json_validates_round_trips_and_matches_the_adjacency(case, tiny, tmp_path):
    _, graph = case
    doc = graph_file(graph, model="tiny", tokenizer=tiny.tokenizer, slug="paris")
    path = save_graph(doc, tmp_path / "g.json")
    again = load_graph(path)
    assert again == doc
    assert GraphFile.model_validate(json.loads(path.read_text())) == doc
    raw = json.loads(path.read_text())
    assert set(raw) == {"metadata", "qParams", "nodes", "links"}
    for key in ("slug", "scan", "prompt_tokens", "prompt"):
        assert key in raw["metadata"]
    for node in raw["nodes"]:  # Neuronpedia's required node keys
        assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"} <= set(node)
    meta = doc.metadata.openscope
    assert meta is not None and meta.prompt_token_ids == graph.input_ids.tolist()
    assert doc.metadata.prompt_tokens[0] == "<bos>" and len(doc.metadata.prompt_tokens) == graph.n_tokens
    m = meta.metrics
    assert 0 < m.replacement_score <= 1 and 0 < m.completeness_score <= 1
    assert m.n_links == len(doc.links) and m.n_nodes == len(doc.nodes)
    # Every link is an adjacency entry; every feature node names its dictionary latent.
    index = _node_index(graph)
    for link in doc.links:
        assert link.weight == pytest.approx(float(graph.adjacency[index[link.target], index[link.source]]))
    widths = {d.name: d.width for d in meta.dictionaries}
    for node in doc.nodes:
        if node.feature_type == "cross layer transcoder":
            layer, latent_in_layer, pos = map(int, node.node_id.split("_"))
            slot = graph.slots[layer]
            assert (
                node.dictionary is not None
                and node.dictionary == slot.dictionary.name
                and node.ctx_idx == pos
            )
            assert node.latent == slot.index * widths[node.dictionary] + latent_in_layer
    logits = [n for n in doc.nodes if n.feature_type == "logit"]
    assert len(logits) == graph.layout.n_logits and logits[0].is_target_logit
    assert [n.token_id for n in logits] == graph.logit_ids.tolist()
    # Embedding and logit nodes are always there; kept nodes are the more influential ones.
    assert sum(n.feature_type == "embedding" for n in doc.nodes) == graph.n_tokens


def _node_index(graph: AttributionGraph) -> dict[str, int]:
    layout, t = graph.layout, graph.n_tokens
    out = {f"{layer}_{j}_{p}": i for i, (layer, p, j) in enumerate(graph.features.tolist())}
    for i in range(layout.n_errors):
        layer, pos = divmod(i, t)
        out[f"{layer}_-1_{pos}"] = layout.errors.start + i
    for pos, tid in enumerate(graph.input_ids.tolist()):
        out[f"E_{tid}_{pos}"] = layout.tokens.start + pos
    for r, tid in enumerate(graph.logit_ids.tolist()):
        out[f"{graph.n_layers + 1}_{tid}_{t - 1}"] = layout.logits.start + r
    return out


def test_foreign_and_broken_graph_files(tmp_path):
    minimal = {  # what circuit-tracer writes: no openscope block, extra keys kept
        "metadata": {
            "slug": "s",
            "scan": "gemma-2-2b",
            "prompt_tokens": ["<bos>", "Hi"],
            "prompt": "Hi",
            "transcoder_list": [],
            "feature_details": {"neuronpedia_source_set": "x"},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": [
            {
                "node_id": "E_1_0",
                "feature": 0,
                "layer": "E",
                "ctx_idx": 0,
                "feature_type": "embedding",
                "jsNodeId": "E_1-0",
                "clerp": "",
            }
        ],
        "links": [],
    }
    path = tmp_path / "ct.json"
    path.write_text(json.dumps(minimal))
    doc = load_graph(path)
    assert doc.metadata.openscope is None and doc.metadata.model_extra == {
        "feature_details": {"neuronpedia_source_set": "x"}
    }
    minimal["links"] = [{"source": "E_1_0", "target": "nowhere", "weight": 1.0}]
    path.write_text(json.dumps(minimal))
    with pytest.raises(OpenscopeError, match="not a graph file"):
        load_graph(path)
    with pytest.raises(OpenscopeError, match="no graph file"):
        load_graph(tmp_path / "missing.json")


# ---- clear errors ---------------------------------------------------------------------------------


def test_clear_errors_for_wrong_dictionaries_and_long_prompts(tiny, threads):
    sae = SparseCoder(CoderConfig(d_in=D, d_out=D, width=8))
    with pytest.raises(OpenscopeError, match="is an SAE"):
        attribute(tiny, [in_memory(sae, Site(0, "resid_post"))], PROMPT)
    with pytest.raises(OpenscopeError, match=r"no transcoder for layer 2 .* a cross-layer transcoder"):
        attribute(tiny, transcoders(tiny)[:2], PROMPT)
    wrong = in_memory(transcoder(0).coder, Site(0, "resid_post"), Site(0, "mlp_out"))  # type: ignore[arg-type]
    with pytest.raises(OpenscopeError, match=r"expected L.mlp_in -> L.mlp_out"):
        attribute(tiny, [wrong, *transcoders(tiny)[1:]], PROMPT)
    with pytest.raises(OpenscopeError, match="both replace site 0.mlp_out"):
        attribute(tiny, [clt(), transcoder(0)], PROMPT)
    with pytest.raises(OpenscopeError, match="more than max_tokens=4"):
        attribute(tiny, transcoders(tiny), PROMPT, max_tokens=4)
    with pytest.raises(OpenscopeError, match="prompt is empty"):
        attribute(tiny, transcoders(tiny), "")


# ---- (e) the CLI end to end ---------------------------------------------------------------------


def test_cli_attributes_and_intervenes_end_to_end(tiny, tiny_model_dir, tmp_path, threads):
    from openscope.cli import app

    tc_dir, clt_dir = save_dictionaries(tiny, tiny_model_dir, tmp_path / "dicts")
    out = tmp_path / "graphs" / "paris.json"
    runner = CliRunner()
    args = ["attribute", PROMPT, "--dictionaries", str(tc_dir), "--output", str(out), "--batch-size", "8"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "replacement score" in result.output and str(out) in result.output
    doc = load_graph(out)
    info = doc.metadata.openscope
    assert info is not None and doc.metadata.slug == "paris" and info.model == str(tiny_model_dir)
    assert [d.folder for d in info.dictionaries] == [str(tc_dir / f"layer_{i}") for i in range(3)]
    # The saved (folded) dictionaries give the in-memory graph's logit rows: folding rescales latents,
    # never what they write.
    mem = attribute(tiny, transcoders(tiny), PROMPT, batch_size=8)
    cfg = AttributeConfig(prompt=PROMPT, dictionaries=[tc_dir], output=tmp_path / "again.json", batch_size=8)
    disk = run_attribute(cfg, loaded=tiny, progress=False).graph
    torch.testing.assert_close(
        disk.adjacency[disk.layout.logits], mem.adjacency[mem.layout.logits], atol=1e-5, rtol=1e-4
    )

    feature = next(n for n in doc.nodes if n.feature_type == "cross layer transcoder")
    result = runner.invoke(
        app, ["intervene", str(out), "--zero", feature.node_id, "--top-k", "3"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "graph logit" in result.output and feature.node_id in result.output

    clt_out = tmp_path / "clt.json"
    args = [
        "attribute",
        PROMPT,
        "--dictionaries",
        str(clt_dir),
        "--output",
        str(clt_out),
        "--model",
        str(tiny_model_dir),
    ]
    assert runner.invoke(app, args).exit_code == 0
    assert [d.kind for d in load_graph(clt_out).metadata.openscope.dictionaries] == ["clt"]  # type: ignore[union-attr]
    # Bad input is a one-line OpenscopeError (main() prints it as `error: ...`).
    bad = runner.invoke(app, ["attribute", PROMPT, "--dictionaries", str(tc_dir / "layer_0")])
    assert isinstance(bad.exception, OpenscopeError) and "no transcoder for layers 1, 2" in str(bad.exception)
    sae = tmp_path / "dicts" / "sae"
    save_coder(
        SparseCoder(CoderConfig(d_in=D, d_out=D, width=8)),
        sae,
        hook_point_in="model.layers.0",
        model_name="x",
    )
    bad = runner.invoke(
        app, ["attribute", PROMPT, "--dictionaries", str(sae), "--model", str(tiny_model_dir)]
    )
    assert isinstance(bad.exception, OpenscopeError) and "is an SAE" in str(bad.exception)
    long = runner.invoke(app, ["attribute", PROMPT * 10, "--dictionaries", str(tc_dir), "--max-tokens", "16"])
    assert isinstance(long.exception, OpenscopeError) and "max_tokens=16" in str(long.exception)


# ---- (f) interventions from a graph ---------------------------------------------------------------


def _manual_logits(
    tiny: LoadedModel, ids: torch.Tensor, d: Dictionary, layer: int, pos: int, latent: int, change: float
) -> torch.Tensor:
    """Next-token logits with `change` × the latent's decoder row added by hand at every site it writes."""
    coder = d.coder
    first = d.site_out.layer
    i = layer - first
    writes = range(i, d.n_layers)

    def edit(m: int):
        row = coder.decoder_vectors(i, m, torch.tensor([latent]))[0].detach()

        def fn(y: torch.Tensor) -> torch.Tensor:
            y = y.clone()
            y[:, pos] += change * row
            return y

        return fn

    from contextlib import ExitStack

    with ExitStack() as stack, torch.no_grad():
        for m in writes:
            stack.enter_context(hook_site(tiny, Site(first + m, "mlp_out"), edit(m)))
        return tiny.model(input_ids=ids).logits[0, -1]


def test_zeroing_a_latent_equals_removing_it_by_hand(case, tiny):
    dicts, graph = case
    doc = graph_file(graph, model="tiny", tokenizer=tiny.tokenizer, node_threshold=1.0, edge_threshold=1.0)
    by_name = {d.name: d for d in dicts}
    ids = graph.input_ids[None]
    nodes = [n for n in doc.nodes if n.feature_type == "cross layer transcoder" and n.layer == "0"]
    node = max(nodes, key=lambda n: n.activation or 0.0)  # a strong layer-0 latent (a CLT: writes 3 layers)
    layer, latent_in_layer, pos = map(int, node.node_id.split("_"))
    a = float(node.activation or 0.0)
    for factor in (0.0, 3.0):
        result = intervene(tiny, doc, by_name, [LatentEdit(node_id=node.node_id, factor=factor)], top_k=5)
        want = _manual_logits(
            tiny, ids, by_name[node.dictionary or ""], layer, pos, latent_in_layer, (factor - 1) * a
        )
        for t in result.top_after:
            assert t.logit == pytest.approx(float(want[t.token_id]), abs=1e-5)
        for g in result.graph_logits:
            assert g.logit_after == pytest.approx(float(want[g.token_id]), abs=1e-5)
        assert result.edits[0].position == pos and result.edits[0].factor == factor
    # Before = the clean model.
    with torch.no_grad():
        clean = tiny.model(input_ids=ids).logits[0, -1]
    assert result.top_before[0].logit == pytest.approx(float(clean.max()), abs=1e-5)
    with pytest.raises(OpenscopeError, match="only feature"):
        intervene(tiny, doc, by_name, [LatentEdit(node_id=doc.nodes[-1].node_id)])
    with pytest.raises(OpenscopeError, match="no node"):
        intervene(tiny, doc, by_name, [LatentEdit(node_id="9_9_9")])


def test_steering_a_cross_layer_transcoder_during_generation(tiny, threads):
    """steer.py's CLT path also runs KV-cached generation: a large add changes the continuation, and
    multiply by 1 (the identity edit) leaves it as it was."""
    from openscope.interventions.steer import Intervention, generate

    d = clt()
    plain = generate(tiny, PROMPT, [], max_new_tokens=4)
    pushed = generate(tiny, PROMPT, [Intervention(d, 16 + 3, "add", 50.0)], max_new_tokens=4)
    assert pushed.steered_ids != plain.unsteered_ids and pushed.unsteered_ids == plain.unsteered_ids
    with pytest.raises(OpenscopeError, match="out of range"):
        generate(tiny, PROMPT, [Intervention(d, 3 * 16, "add", 1.0)], max_new_tokens=1)
    same = generate(tiny, PROMPT, [Intervention(d, 16 + 3, "multiply", 1.0)], max_new_tokens=4)
    assert same.steered_ids == plain.unsteered_ids


def test_edit_specs():
    assert node_id_of("3:5:120") == "3_120_5" and node_id_of(" 3_120_5 ") == "3_120_5"
    assert parse_edit("3:5:120=0.5") == LatentEdit(node_id="3_120_5", factor=0.5)
    assert parse_edit("3_120_5", 0.0).factor == 0.0
    with pytest.raises(OpenscopeError, match="NODE=FACTOR"):
        parse_edit("3_120_5")
    with pytest.raises(OpenscopeError, match="must be a number"):
        parse_edit("3_120_5=x")


def test_run_intervene_loads_what_the_graph_records(tiny, tiny_model_dir, tmp_path, threads):
    tc_dir, _ = save_dictionaries(tiny, tiny_model_dir, tmp_path / "dicts")
    cfg = AttributeConfig(prompt=PROMPT, dictionaries=[tc_dir], output=tmp_path / "g.json", batch_size=8)
    doc = run_attribute(cfg, loaded=tiny, progress=False).document
    node = next(n for n in doc.nodes if n.feature_type == "cross layer transcoder")
    out = tmp_path / "r.json"
    r = run_intervene(
        InterveneConfig(graph=tmp_path / "g.json", scale=[f"{node.node_id}=2"], output=out), loaded=tiny
    )
    assert r.edits[0].factor == 2.0 and json.loads(out.read_text())["edits"][0]["node_id"] == node.node_id


# ---- the real model ---------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_gemma_replacement_is_exact_and_edges_are_interventions(real_model):
    """Random transcoders on all 18 layers of the real Gemma 3 270M (q/k norms, sliding windows, big
    residual norms): the replacement reproduces the logits and a latent's column is its intervention."""
    d = real_model.d_model
    dicts = []
    for layer in range(real_model.n_layers):
        c = SparseCoder(CoderConfig(d_in=d, d_out=d, width=32, kind="transcoder", seed=layer))
        with torch.no_grad():
            c.b_enc.fill_(-0.5)
        dicts.append(in_memory(c.eval(), Site(layer, "mlp_in"), Site(layer, "mlp_out")))
    prompt = "The capital of France is"
    graph = attribute(real_model, dicts, prompt, batch_size=16, max_feature_nodes=48)
    rm = ReplacementModel(real_model, dicts, graph.input_ids)
    base = rm.run(logits=True)
    assert base.logits is not None
    with torch.no_grad():
        clean = real_model.model(input_ids=graph.input_ids[None]).logits[0]
    torch.testing.assert_close(base.logits[0], clean, atol=2e-3, rtol=1e-4)
    layout = graph.layout
    s = int(graph.adjacency[layout.logits, : layout.n_features].abs().sum(0).argmax())
    layer, pos, lat = graph.features[s].tolist()
    new = rm.run(logits=True, mlp_offsets=rm.latent_offsets(layer, pos, lat, float(graph.activations[s])))
    assert new.logits is not None
    change = (new.logits[0, -1] - new.logits[0, -1].mean()) - (base.logits[0, -1] - base.logits[0, -1].mean())
    torch.testing.assert_close(
        change[graph.logit_ids], graph.adjacency[layout.logits, s], atol=1e-3, rtol=1e-2
    )


# ---- memory, and circuit-tracer's colliding ids --------------------------------------------------


def test_memory_estimate_is_made_and_a_limit_refuses_before_the_run(tiny, threads):
    dicts = transcoders(tiny)
    graph = attribute(tiny, dicts, PROMPT, batch_size=8)
    m = graph.memory
    assert m is not None and m.baseline > 0 and m.forward > 0
    k, n, cols = graph.layout.n_logits, graph.n_active, graph.n_active + (graph.n_layers + 1) * graph.n_tokens
    assert m.rows == 4 * (k + n) * (cols + k) + 4 * (k + n) ** 2  # the store, and the ranking's square
    assert m.total >= m.baseline + m.rows + m.forward
    with pytest.raises(
        OpenscopeError, match=r"needs about .* GiB \(row store .*, more than --max-memory-gb 0\.01"
    ):
        attribute(tiny, dicts, PROMPT, max_memory_gb=0.01)
    with pytest.raises(OpenscopeError, match="max_memory_gb must be positive"):
        attribute(tiny, dicts, PROMPT, max_memory_gb=0)


def test_circuit_tracers_colliding_error_ids_are_settled(tmp_path):
    """circuit-tracer names the error node of layer 1 at position 2 `0_1_2`, like the feature of layer 0,
    latent 1, position 2; its links list each target's sources in node order, which settles them."""

    def node(node_id: str, kind: str, layer: str, pos: int) -> dict:
        return {"node_id": node_id, "feature": 0, "layer": layer, "ctx_idx": pos, "feature_type": kind,
                "jsNodeId": node_id, "clerp": ""}  # fmt: skip

    feature, error = "cross layer transcoder", "mlp reconstruction error"
    nodes = [
        node("0_1_2", feature, "0", 2),
        node("2_5_3", feature, "2", 3),
        node("0_1_2", error, "1", 2),
        node("E_7_2", "embedding", "E", 2),
        node("4_9_3", "logit", "4", 3),
    ]
    links = [  # target by target, sources in node order
        ("E_7_2", "0_1_2", 6.0),
        ("0_1_2", "2_5_3", 1.0),  # the feature (rank 0) ...
        ("0_1_2", "2_5_3", 2.0),  # ... then the error (rank 2)
        ("E_7_2", "2_5_3", 3.0),
        ("2_5_3", "4_9_3", 4.0),
        ("0_1_2", "4_9_3", 5.0),  # after rank 1: only the error fits
    ]
    raw = {
        "metadata": {
            "slug": "s",
            "scan": "x",
            "prompt_tokens": ["<bos>", "a", "b", "c"],
            "prompt": "<bos>abc",
        },
        "nodes": nodes,
        "links": [{"source": s, "target": t, "weight": w} for s, t, w in links],
    }
    path = tmp_path / "ct.json"
    path.write_text(json.dumps(raw))
    doc = load_graph(path)
    assert [n.node_id for n in doc.nodes] == ["0_1_2", "2_5_3", "1_-1_2", "E_7_2", "4_9_3"]
    assert [(x.source, x.target, x.weight) for x in doc.links] == [
        ("E_7_2", "0_1_2", 6.0),
        ("0_1_2", "2_5_3", 1.0),
        ("1_-1_2", "2_5_3", 2.0),
        ("E_7_2", "2_5_3", 3.0),
        ("2_5_3", "4_9_3", 4.0),
        ("1_-1_2", "4_9_3", 5.0),
    ]
