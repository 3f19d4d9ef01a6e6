"""circuit-tracer itself against openscope, on the tiny random Gemma 3 saved as a Hugging Face folder and
transcoders exported by `openscope export --to circuit-tracer`: the adjacency matrices are equal on every
block but token sources, whose ratio is √d_model (circuit-tracer's nnsight backend multiplies the
gradient at Gemma's scaled embedding output by the unscaled embedding rows); skip-transcoders agree under
the default BOS convention (skip live at BOS) and differ at BOS under the other; circuit-tracer's own graph
JSON (its error ids that collide with feature ids, its scan, its `<bos>` prompt) loads, shows in the
explorer's list, and can be intervened on with the transcoders it came from.

circuit-tracer runs in its own environment (`make circuit-tracer-venv`; `make test` points
$OPENSCOPE_CIRCUIT_TRACER_PYTHON at it) through scripts/circuit_tracer_peer.py; without it these tests
skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from attribution_helpers import transcoder
from safetensors.torch import load_file
from typer.testing import CliRunner

from openscope.attribution import attribute, graph_file, intervene, load_graph, save_graph
from openscope.attribution.commands import InterveneConfig, run_intervene
from openscope.attribution.schema import LatentEdit
from openscope.coders.dictionary import load_dictionary
from openscope.coders.io import save_coder
from openscope.models.load import LoadedModel
from openscope.models.sites import Site, locate
from openscope.models.tokens import prompt_ids

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "scripts" / "circuit_tracer_peer.py"
PROMPT = "The capital of France is"


def peer_python() -> str:
    python = os.environ.get("OPENSCOPE_CIRCUIT_TRACER_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip(
            "circuit-tracer's environment is not set up ($OPENSCOPE_CIRCUIT_TRACER_PYTHON; make circuit-tracer-venv)"
        )
    return python


@pytest.fixture(scope="module")
def peer_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder as circuit-tracer's transformers (< 5) reads it: the tokenizer class named
    by its older name."""
    folder = tmp_path_factory.mktemp("tiny-peer") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.write_text(json.dumps(data))
    return folder


def export_set(tiny: LoadedModel, model_dir: Path, root: Path, skip: bool) -> tuple[Path, Path]:
    """Random (skip-)transcoders saved as openscope folders under root/tc and exported with the CLI to
    root/ct; returns both."""
    from openscope.cli import app

    for layer in range(tiny.n_layers):
        d = transcoder(layer, seed=layer, skip=skip)

        def hook(kind: str, layer: int = layer) -> str:
            return locate(tiny.arch.layers, tiny.arch.layers_path, Site(layer, kind)).hook_point

        save_coder(
            d.coder,  # type: ignore[arg-type]
            root / "tc" / f"layer_{layer}",
            hook_point_in=hook("mlp_in"),
            hook_point_out=hook("mlp_out"),
            model_name=str(model_dir),
        )
    args = ["export", str(root / "tc"), "--to", "circuit-tracer", "--out", str(root / "ct")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "tc", root / "ct"


def run_peer(model_dir: Path, export: Path, ids: list[int], out: Path) -> dict[str, torch.Tensor]:
    """circuit-tracer's graph of the prompt (all features; its graph JSON kept whole as out/g.json)."""
    args = ["--model", str(model_dir), "--transcoders", str(export), "--prompt-ids", ",".join(map(str, ids))]
    args += ["--out", str(out), "--json", "g", "--node-threshold", "1.0", "--edge-threshold", "1.0"]
    args += ["--batch-size", "64", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [peer_python(), str(PEER), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out / "graph.safetensors"))


def assert_circuit_tracer_reads(path: Path, n_nodes: int, n_links: int) -> None:
    """circuit-tracer's `frontend.graph_models.Model` (pydantic, in its own environment) validates the
    graph file, with every node and link."""
    code = (
        "import json, sys; from circuit_tracer.frontend.graph_models import Model; "
        "m = Model.model_validate(json.load(open(sys.argv[1]))); print(len(m.nodes), len(m.links))"
    )
    done = subprocess.run([peer_python(), "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(n_nodes), str(n_links)]


def check_adjacency(ours, theirs: dict[str, torch.Tensor], d_model: int, bos_equal: bool) -> None:
    """Equal but for token columns, which are √d_model times circuit-tracer's (BOS's: equal only when
    the skip conventions agree)."""
    assert torch.equal(ours.features, theirs["active_features"][theirs["selected_features"]])
    assert ours.logit_ids.tolist() == theirs["logit_ids"].tolist()
    a, b = ours.adjacency, theirs["adjacency"]
    assert a.shape == b.shape
    tok = ours.layout.tokens
    rest = torch.ones_like(a, dtype=torch.bool)
    rest[:, tok] = False
    scale = float(b.abs().max())
    torch.testing.assert_close(a[rest], b[rest], atol=2e-6 * scale, rtol=1e-4)
    scaled = b[:, tok] * d_model**0.5
    torch.testing.assert_close(a[:, tok][:, 1:], scaled[:, 1:], atol=2e-6 * scale, rtol=1e-4)
    bos_close = torch.allclose(a[:, tok][:, 0], scaled[:, 0], atol=2e-6 * scale, rtol=1e-4)
    assert bos_close == bos_equal


def _index(graph) -> dict[str, int]:
    """openscope node id -> adjacency index of an unpruned graph."""
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


def test_circuit_tracer_agrees_and_its_files_round_trip(tiny, peer_model_dir, tmp_path, one_thread):
    ids = prompt_ids(tiny.tokenizer, PROMPT)[0].tolist()
    tc, ct = export_set(tiny, peer_model_dir, tmp_path / "plain", skip=False)
    theirs = run_peer(peer_model_dir, ct, ids, tmp_path / "plain" / "out")
    dicts = [load_dictionary(tc / f"layer_{i}", tiny) for i in range(tiny.n_layers)]
    ours = attribute(tiny, dicts, torch.tensor(ids), batch_size=16)
    check_adjacency(ours, theirs, tiny.d_model, bos_equal=True)

    # Its graph JSON: ids made unique, every link the same edge as ours, scan and <bos> prompt read.
    raw = json.loads((tmp_path / "plain" / "out" / "g.json").read_text())
    raw_ids = [n["node_id"] for n in raw["nodes"]]
    assert len(set(raw_ids)) < len(raw_ids), "the fixture should hold circuit-tracer's colliding ids"
    doc = load_graph(tmp_path / "plain" / "out" / "g.json")
    assert doc.metadata.openscope is None and doc.metadata.scan == str(ct.resolve())
    assert doc.metadata.prompt.startswith("<bos>") and len(doc.metadata.prompt_tokens) == len(ids)
    assert len({n.node_id for n in doc.nodes}) == len(doc.nodes)
    index = _index(ours)
    assert len(doc.links) == len(raw["links"])
    for link in doc.links:
        want = float(ours.adjacency[index[link.target], index[link.source]])
        if link.source.startswith("E_"):
            want /= tiny.d_model**0.5
        assert link.weight == pytest.approx(want, rel=1e-4, abs=1e-6), (link.source, link.target)

    # openscope writes scan and prompt the way circuit-tracer does.
    mine = graph_file(ours, model=str(peer_model_dir), tokenizer=tiny.tokenizer)
    assert mine.metadata.prompt == raw["metadata"]["prompt"]
    assert mine.metadata.scan == str(tc.resolve())
    # ... and circuit-tracer's own graph model (what its viewer's server reads) accepts the file.
    save_graph(mine, tmp_path / "plain" / "mine.json")
    assert_circuit_tracer_reads(tmp_path / "plain" / "mine.json", len(mine.nodes), len(mine.links))

    # The explorer lists it; interventions on it equal those on openscope's own graph of the prompt.
    from openscope.serve.graphs import GraphStore, summary_of

    store = GraphStore(tmp_path / "plain" / "out")
    summary = summary_of("g", store.load("g"))
    assert summary.prompt == PROMPT and summary.model == str(ct.resolve()) and summary.n_features > 0
    full = graph_file(ours, model="tiny", tokenizer=tiny.tokenizer, node_threshold=1.0, edge_threshold=1.0)
    node = max(
        (n for n in doc.nodes if n.feature_type == "cross layer transcoder"), key=lambda n: n.activation or 0
    )
    by_name = {d.name: d for d in dicts}
    edit = [LatentEdit(node_id=node.node_id, factor=0.0)]
    on_theirs, on_ours = intervene(tiny, doc, by_name, edit), intervene(tiny, full, by_name, edit)
    assert on_theirs.top_after == on_ours.top_after and on_theirs.prompt == PROMPT
    assert on_theirs.edits[0].latent == on_ours.edits[0].latent
    # From the command: the transcoders are found through the scan (an openscope export lists them).
    result = run_intervene(
        InterveneConfig(graph=tmp_path / "plain" / "out" / "g.json", zero=[node.node_id]), tiny
    )
    assert result.top_after == on_ours.top_after


def test_skip_transcoders_agree_under_the_default_bos_convention(tiny, peer_model_dir, tmp_path, one_thread):
    ids = prompt_ids(tiny.tokenizer, PROMPT)[0].tolist()
    tc, ct = export_set(tiny, peer_model_dir, tmp_path, skip=True)
    theirs = run_peer(peer_model_dir, ct, ids, tmp_path / "out")
    dicts = [load_dictionary(tc / f"layer_{i}", tiny) for i in range(tiny.n_layers)]
    live = attribute(tiny, dicts, torch.tensor(ids), batch_size=16)
    check_adjacency(live, theirs, tiny.d_model, bos_equal=True)
    frozen = attribute(tiny, dicts, torch.tensor(ids), batch_size=16, freeze_skip_at_bos=True)
    check_adjacency(frozen, theirs, tiny.d_model, bos_equal=False)
