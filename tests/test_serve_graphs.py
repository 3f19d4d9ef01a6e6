"""Attribution graphs in the explorer, on the tiny random Gemma 3 with random per-layer transcoders.

The API (`/api/graphs`): a graph written by `openscope attribute` is listed and served as a valid
`GraphFile` whose feature nodes open real dashboards; a graph run from the explorer equals the CLI's;
an intervention through the API equals `openscope.attribution.intervene`; every user error is a 4xx
with a one-line message. Then the graph page in a real headless Chromium (skipped without chromium or
playwright, like test_browser.py): nodes drawn, hover shows top logits, a click opens the node's
panel and its link the feature page, a new graph runs from the browser, an intervention shows logits.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from attribution_helpers import clt, save_dictionaries, transcoders
from fastapi.testclient import TestClient
from serve_helpers import explorer_files, served
from typer.testing import CliRunner

from openscope.attribution import intervene, load_graph, run_attribute, save_graph
from openscope.attribution.commands import AttributeConfig
from openscope.attribution.schema import GraphFile, LatentEdit
from openscope.coders.dictionary import load_dictionary
from openscope.features import FeaturesConfig, compute_features
from openscope.models.load import LoadedModel
from openscope.serve import ServeConfig
from openscope.serve.app import create_app
from openscope.serve.graphs import (
    check_slug,
    explorer_names,
    graphs_folder,
    rename_dictionaries,
    replacement_set,
    slug_for,
)
from openscope.serve.state import BadInput, NotFound

PROMPT = "The capital of France is"
SLUG = "paris"

pytestmark = pytest.mark.usefixtures("one_thread")


class Explorer(NamedTuple):
    """Files of a served explorer with transcoders for every layer."""

    db: Path
    """Feature database indexing the three transcoders."""
    graphs: Path
    """Graph folder holding `paris.json`, written by `run_attribute`."""
    dictionaries: Path
    """Folder holding the transcoders (layer_0, layer_1, layer_2)."""
    document: GraphFile
    """The saved graph."""


@pytest.fixture(scope="module")
def explorer(tiny: LoadedModel, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Explorer:
    from conftest import CORPUS

    root = tmp_path_factory.mktemp("graph-explorer")
    tc_dir, _ = save_dictionaries(tiny, tiny_model_dir, root / "dicts")
    corpus = root / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"{i}: {CORPUS[i % len(CORPUS)]}"}) for i in range(40)))
    db = root / "features.db"
    cfg = FeaturesConfig(
        dictionaries=[tc_dir],
        output=db,
        source=str(corpus),
        tokens=1024,
        context_len=32,
        batch_tokens=256,
        device="cpu",
    )
    compute_features(cfg, tiny, progress=False)
    graphs = root / "graphs"
    attr = AttributeConfig(
        prompt=PROMPT, dictionaries=[tc_dir], output=graphs / f"{SLUG}.json", batch_size=16
    )
    document = run_attribute(attr, loaded=tiny, progress=False).document
    return Explorer(db, graphs, tc_dir, document)


@pytest.fixture(scope="module")
def client(tiny: LoadedModel, explorer: Explorer) -> Iterator[TestClient]:
    # Dictionaries load from the folders the database records, as `openscope serve` does.
    app = create_app(ServeConfig(db=explorer.db, graphs=explorer.graphs), loaded=tiny)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def ok(resp: Any, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp.json()


def error(resp: Any, status: int) -> str:
    """The one-line detail of a 4xx answer."""
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


def feature_nodes(doc: GraphFile) -> list[Any]:
    return [n for n in doc.nodes if n.feature_type == "cross layer transcoder"]


# ---- listing and serving -----------------------------------------------------------------------------


def test_saved_graph_is_listed_and_served_as_a_valid_graph_file(
    client: TestClient, explorer: Explorer
) -> None:
    doc = explorer.document
    index = ok(client.get("/api/graphs"))
    assert index["folder"] == str(explorer.graphs) and index["can_run"] and index["max_tokens"] == 32
    assert index["run_dictionaries"] == ["layer_0", "layer_1", "layer_2"]
    entry = next(g for g in index["graphs"] if g["slug"] == SLUG)
    metrics = doc.metadata.openscope.metrics  # type: ignore[union-attr]
    assert entry["prompt"] == PROMPT and entry["error"] is None
    assert (entry["n_nodes"], entry["n_links"]) == (len(doc.nodes), len(doc.links))
    assert entry["n_features"] == len(feature_nodes(doc)) > 0
    assert entry["replacement_score"] == pytest.approx(metrics.replacement_score)

    served = GraphFile.model_validate(ok(client.get(f"/api/graphs/{SLUG}")))
    assert served.model_dump() == doc.model_dump()  # the explorer's names are the file's here
    # Every feature node's feature page exists: its dictionary has dashboards, and the latent is in range.
    names = {d["name"] for d in ok(client.get("/api/dictionaries"))}
    page = served.metadata.openscope.feature_page  # type: ignore[union-attr]
    for node in feature_nodes(served):
        assert node.dictionary in names
        assert page.format(dictionary=node.dictionary, latent=node.latent).startswith("#/feature/layer_")
    node = max(feature_nodes(served), key=lambda n: n.activation or 0.0)
    detail = ok(client.get("/api/feature", params={"dictionary": node.dictionary, "latent": node.latent}))
    assert detail["latent"] == node.latent and detail["top_logits"]


def test_dictionaries_are_renamed_to_the_explorers_names_by_folder(
    client: TestClient, explorer: Explorer
) -> None:
    doc = explorer.document
    old = {d.name: f"old-{d.name}" for d in doc.metadata.openscope.dictionaries}  # type: ignore[union-attr]
    renamed = rename_dictionaries(doc, old)
    assert {n.dictionary for n in feature_nodes(renamed)} == set(old.values())
    assert renamed.metadata.transcoder_list == [old[n] for n in doc.metadata.transcoder_list]
    path = save_graph(
        renamed.model_copy(update={"metadata": renamed.metadata.model_copy(update={"slug": "renamed"})}),
        explorer.graphs / "renamed.json",
    )
    try:
        served = GraphFile.model_validate(ok(client.get("/api/graphs/renamed")))
        # Same folders, so the explorer's names come back: the feature page links resolve.
        assert [n.dictionary for n in served.nodes] == [n.dictionary for n in doc.nodes]
        assert explorer_names(renamed, [("x", "/elsewhere")]) == {v: v for v in old.values()}
        # The intervention still finds the loaded dictionaries by folder.
        node = feature_nodes(renamed)[0]
        body = {"edits": [{"node_id": node.node_id, "factor": 0.0}], "top_k": 3}
        assert (
            ok(client.post("/api/graphs/renamed/intervene", json=body))["edits"][0]["dictionary"]
            == node.dictionary
        )
    finally:
        path.unlink()


# ---- running a graph and intervening -----------------------------------------------------------------


def test_a_graph_run_from_the_explorer_equals_the_cli_graph(client: TestClient, explorer: Explorer) -> None:
    made = ok(client.post("/api/graphs", json={"prompt": PROMPT, "slug": "again"}), 201)
    assert made["slug"] == "again" and made["prompt"] == PROMPT
    assert "again" in [g["slug"] for g in ok(client.get("/api/graphs"))["graphs"]]
    again = load_graph(explorer.graphs / "again.json")  # saved in the folder, and valid
    cli = explorer.document
    # Same model, dictionaries, thresholds: the same nodes and edges (rows do not depend on batching).
    assert [n.node_id for n in again.nodes] == [n.node_id for n in cli.nodes]
    assert [(x.source, x.target) for x in again.links] == [(x.source, x.target) for x in cli.links]
    for a, b in zip(again.links, cli.links, strict=True):
        assert a.weight == pytest.approx(b.weight, rel=1e-4, abs=1e-5)
    assert [d.folder for d in again.metadata.openscope.dictionaries] == [  # type: ignore[union-attr]
        str(explorer.dictionaries / f"layer_{i}") for i in range(3)
    ]
    # Without a slug, one is made from the prompt; a taken slug is refused.
    auto = ok(
        client.post("/api/graphs", json={"prompt": PROMPT, "max_feature_nodes": 4, "node_threshold": 0.5}),
        201,
    )
    assert auto["slug"] == "the-capital-of-france-is" and auto["n_features"] <= 4
    assert "exists already" in error(
        client.post("/api/graphs", json={"prompt": PROMPT, "slug": "again"}), 409
    )
    assert "at most 32" in error(client.post("/api/graphs", json={"prompt": PROMPT * 10}), 400)
    assert "empty" in error(client.post("/api/graphs", json={"prompt": "  "}), 400)
    assert "bad graph name" in error(client.post("/api/graphs", json={"prompt": PROMPT, "slug": "../x"}), 400)
    assert "node_threshold" in error(
        client.post("/api/graphs", json={"prompt": PROMPT, "node_threshold": 2}), 422
    )
    for slug in ("again", "the-capital-of-france-is"):
        (explorer.graphs / f"{slug}.json").unlink()


def test_intervention_through_the_api_equals_the_library(
    client: TestClient, tiny: LoadedModel, explorer: Explorer
) -> None:
    doc = explorer.document
    node = max(feature_nodes(doc), key=lambda n: n.activation or 0.0)
    dicts = {f"layer_{i}": load_dictionary(explorer.dictionaries / f"layer_{i}", tiny) for i in range(3)}
    for factor in (0.0, 3.0):
        body = {"edits": [{"node_id": node.node_id, "factor": factor}], "top_k": 5}
        got = ok(client.post(f"/api/graphs/{SLUG}/intervene", json=body))
        want = intervene(tiny, doc, dicts, [LatentEdit(node_id=node.node_id, factor=factor)], top_k=5)
        assert [t["token_id"] for t in got["top_after"]] == [t.token_id for t in want.top_after]
        for g, w in zip(got["graph_logits"], want.graph_logits, strict=True):
            assert g["logit_after"] == pytest.approx(w.logit_after, abs=1e-4)
        assert got["edits"][0]["factor"] == factor and got["edits"][0]["latent"] == node.latent
    logit = next(n for n in doc.nodes if n.feature_type == "logit")
    body = {"edits": [{"node_id": logit.node_id, "factor": 0.0}]}
    assert "only feature" in error(client.post(f"/api/graphs/{SLUG}/intervene", json=body), 400)
    assert "no node" in error(
        client.post(f"/api/graphs/{SLUG}/intervene", json={"edits": [{"node_id": "9_9_9"}]}), 400
    )
    assert "no edits" in error(client.post(f"/api/graphs/{SLUG}/intervene", json={"edits": []}), 400)
    assert "no graph" in error(
        client.post("/api/graphs/nope/intervene", json={"edits": [{"node_id": node.node_id}]}), 404
    )


# ---- clear errors --------------------------------------------------------------------------------------


def test_missing_and_corrupt_graphs_are_clear_errors(client: TestClient, explorer: Explorer) -> None:
    missing = error(client.get("/api/graphs/nope"), 404)
    assert "no graph 'nope'" in missing and SLUG in missing  # names the graphs there are
    assert "no graph" in error(client.get("/api/graphs/..secret"), 404)  # no slug: never a file name
    broken = explorer.graphs / "broken.json"
    broken.write_text("{not json")
    dangling = explorer.graphs / "dangling.json"
    data = explorer.document.model_dump(mode="json")
    data["links"].append({"source": "nowhere", "target": data["nodes"][0]["node_id"], "weight": 1.0})
    dangling.write_text(json.dumps(data))
    try:
        assert "Invalid JSON" in error(client.get("/api/graphs/broken"), 422)
        assert "names a node that is not in the graph" in error(client.get("/api/graphs/dangling"), 422)
        listed = {g["slug"]: g for g in ok(client.get("/api/graphs"))["graphs"]}
        assert "Invalid JSON" in listed["broken"]["error"] and listed[SLUG]["error"] is None
        body = {"edits": [{"node_id": "0_1_1"}]}
        assert "is not a graph file" in error(client.post("/api/graphs/broken/intervene", json=body), 422)
    finally:
        broken.unlink()
        dangling.unlink()


def test_a_server_without_transcoders_lists_graphs_but_cannot_run_or_edit_them(
    tiny: LoadedModel, explorer: Explorer, tmp_path: Path
) -> None:
    db, _ = explorer_files(tiny, tmp_path)  # an SAE on 1.resid_post: no replacement model
    (tmp_path / "graphs").mkdir()
    shutil.copy(explorer.graphs / f"{SLUG}.json", tmp_path / "graphs" / f"{SLUG}.json")
    app = create_app(ServeConfig(db=db), loaded=tiny)  # graphs: the default folder next to the database
    with TestClient(app, base_url="http://127.0.0.1") as c:
        index = ok(c.get("/api/graphs"))
        assert index["folder"] == str(tmp_path / "graphs") and not index["can_run"]
        assert (
            "cannot form a replacement model" in index["run_hint"] and "layers 0, 1, 2" in index["run_hint"]
        )
        assert [g["slug"] for g in index["graphs"]] == [SLUG]
        GraphFile.model_validate(ok(c.get(f"/api/graphs/{SLUG}")))  # still served
        assert "cannot form a replacement model" in error(c.post("/api/graphs", json={"prompt": PROMPT}), 400)
        node = feature_nodes(explorer.document)[0]
        body = {"edits": [{"node_id": node.node_id}]}
        assert "not loaded" in error(c.post(f"/api/graphs/{SLUG}/intervene", json=body), 409)


# ---- pure helpers and the CLI --------------------------------------------------------------------------


def test_slugs_folders_and_the_replacement_set(tiny: LoadedModel) -> None:
    assert graphs_folder(ServeConfig(db=Path("out/features.db"))) == Path("out/graphs")
    assert graphs_folder(ServeConfig(graphs=Path("g"))) == Path("g")
    assert slug_for("The capital of France is", set()) == "the-capital-of-france-is"
    assert slug_for("Hi!", {"hi"}) == "hi-2" and slug_for("???", set()) == "graph"
    assert check_slug("a.b_c-1") == "a.b_c-1"
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(BadInput):
            check_slug(bad)
    tcs = {d.name: d for d in transcoders(tiny)}
    assert [d.name for d in replacement_set(tcs, 3)] == ["tc0", "tc1", "tc2"]
    # A CLT over every layer is a replacement model alone; it wins over per-layer transcoders.
    assert [d.name for d in replacement_set({**tcs, "my-clt": clt()}, 3)] == ["my-clt"]
    assert [d.name for d in replacement_set({**tcs, "my-clt": clt()}, 3, ["tc0", "tc1", "tc2"])] == [
        "tc0",
        "tc1",
        "tc2",
    ]
    with pytest.raises(BadInput, match="for layer 1;"):
        replacement_set({k: v for k, v in tcs.items() if k != "tc1"}, 3)
    with pytest.raises(NotFound, match="not loaded"):
        replacement_set(tcs, 3, ["nope"])


def test_serve_cli_has_the_graph_flags() -> None:
    from openscope.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--graphs" in result.output and "--max-graph-tokens" in result.output


# ---- the graph page in a real browser ---------------------------------------------------------------------

CHROMIUM = (
    os.environ.get("OPENSCOPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)


@pytest.fixture(scope="module")
def base_url(tiny: LoadedModel, explorer: Explorer) -> Iterator[str]:
    """The explorer with the graph folder, served by uvicorn in a thread on a free local port."""
    with served(create_app(ServeConfig(db=explorer.db, graphs=explorer.graphs), loaded=tiny)) as url:
        yield url


@pytest.fixture
def page(base_url: str) -> Iterator[Any]:
    """A fresh page of headless Chromium; any uncaught JavaScript error fails the test."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, base_url=base_url)
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $OPENSCOPE_ARTIFACTS when set (as in test_browser.py), else a tmp folder."""
    target = os.environ.get("OPENSCOPE_ARTIFACTS")
    folder = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def snap(page: Any, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def set_range(page: Any, selector: str, value: float) -> None:
    """Move a range slider as a user does (Playwright cannot `fill` one)."""
    page.locator(selector).evaluate(
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }", value
    )


@pytest.mark.browser
def test_graph_page_draws_nodes_and_a_node_click_opens_its_feature_page(
    page: Any, explorer: Explorer, shots: Path
) -> None:
    doc = explorer.document
    page.goto("/#/graphs")
    page.locator(f"#graph-list a[href='#/graph/{SLUG}']").click()
    page.locator("#graph-svg .gnode").first.wait_for()
    # Every saved node is drawn at first (the slider starts at the largest influence).
    assert page.locator("#graph-svg .gnode").count() == len(doc.nodes)
    assert page.locator("#graph-svg .gnode.k-token").count() == len(doc.metadata.prompt_tokens)
    assert page.locator("#graph-svg .glink").count() > 0
    labels = page.locator("#graph-svg .col-label").all_inner_texts()
    assert len(labels) == len(doc.metadata.prompt_tokens)
    # The strongest feature node: hover shows its top logits (from its dashboard), click opens the panel.
    node = max(feature_nodes(doc), key=lambda n: n.activation or 0.0)
    target = page.locator(f"#graph-svg .gnode[data-id='{node.node_id}']")
    target.hover()
    tip = page.locator("#graph-tooltip")
    tip.wait_for()
    page.wait_for_function("document.querySelector('#graph-tooltip')?.textContent.includes('top logits:')")
    assert node.node_id in tip.inner_text()
    target.click()
    panel = page.locator("#graph-node")
    link = panel.locator("#graph-feature-link")
    link.wait_for()
    assert link.get_attribute("href") == f"#/feature/{node.dictionary}/{node.latent}"
    assert panel.locator(".edge-row").count() > 0  # incoming and outgoing edges listed
    snap(page, shots, "graph")
    # Slider: a lower threshold hides nodes.
    set_range(page, "#graph-threshold", 0.3)
    kept = [n for n in doc.nodes if n.feature_type in ("embedding", "logit") or (n.influence or 0.0) <= 0.3]
    page.wait_for_function(f"document.querySelectorAll('#graph-svg .gnode').length === {len(kept)}")
    assert len(kept) < len(doc.nodes)
    # Intervention: zero the node, see the top tokens before and after.
    set_range(page, "#graph-threshold", 1.0)
    page.wait_for_function(f"document.querySelectorAll('#graph-svg .gnode').length === {len(doc.nodes)}")
    page.locator(f"#graph-svg .gnode[data-id='{node.node_id}']").click()
    page.locator("#graph-add-edit").click()
    page.locator("#graph-zero").click()
    out = page.locator("#graph-intervention-out table")
    out.first.wait_for()
    assert "before" in page.inner_text("#graph-intervention-out")
    snap(page, shots, "graph-intervention")
    link = page.locator("#graph-feature-link")
    link.click()
    page.wait_for_function(
        f"document.querySelector('#feature-title')?.textContent === 'Latent #{node.latent}'"
    )


@pytest.mark.browser
def test_a_new_graph_runs_from_the_browser(page: Any, explorer: Explorer, shots: Path) -> None:
    page.goto("/#/graphs")
    page.locator("#graph-prompt").fill("Paris is in")
    page.locator("#graph-run").click()
    page.wait_for_function("location.hash === '#/graph/paris-is-in'")
    page.locator("#graph-svg .gnode.k-logit").first.wait_for()
    assert "Paris is in" in page.inner_text("#graph-title")
    snap(page, shots, "graph-new")
    page.goto("/#/graphs")
    page.fill("#graph-prompt", "   ")
    page.click("#graph-run")
    assert "empty" in page.locator("#graph-run-out .error").inner_text()
    (explorer.graphs / "paris-is-in.json").unlink()
