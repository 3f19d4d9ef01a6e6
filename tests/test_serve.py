"""The explorer's web app through FastAPI's TestClient: every route, the bad-input cases (4xx with a
message, never 500), and model calls under concurrent requests.

Runs on the tiny random Gemma 3 and a small feature database written by `serve_helpers` (latent 3 of
the test dictionary peaks on the token "ar" and promotes it; latent 5 is its neighbour).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from serve_helpers import GONE, NAME, SUITE_ITEMS, TEXT, WIDTH, explorer_files, write_suite

from openscope.coders.dictionary import Dictionary
from openscope.errors import OpenscopeError
from openscope.features.db import FeatureDB
from openscope.features.schema import FeatureDetail, FeatureSummary, InspectResult, LatentActivation
from openscope.features.schema import InspectToken as Tok
from openscope.models.load import LoadedModel
from openscope.serve import ServeConfig
from openscope.serve.app import create_app, export_filename, validation_message
from openscope.serve.state import check_prompt, latents_on_text, name_dictionaries

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dictionary]:
    return explorer_files(tiny, tmp_path_factory.mktemp("explorer"))


@pytest.fixture(scope="module")
def client(tiny: LoadedModel, files: tuple[Path, Dictionary]) -> Iterator[TestClient]:
    # No dictionaries passed: the app loads them from the folders the database records.
    app = create_app(ServeConfig(db=files[0]), loaded=tiny)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def ok(resp: Any) -> Any:
    assert resp.status_code == 200, resp.text
    return resp.json()


# ---- pages and documentation -----------------------------------------------------------------------


def test_front_end_is_served(client: TestClient) -> None:
    html = client.get("/")
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert "/static/app.js" in html.text and "/static/style.css" in html.text
    for name in ("app.js", "style.css", "index.html"):
        assert client.get(f"/static/{name}").status_code == 200


def test_openapi_documents_every_route_with_the_shared_schemas(client: TestClient) -> None:
    spec = ok(client.get("/openapi.json"))
    paths = set(spec["paths"])
    assert {
        "/api/info",
        "/api/dictionaries",
        "/api/features",
        "/api/feature",
        "/api/feature/export",
        "/api/search/token",
        "/api/search/logit",
        "/api/search/text",
        "/api/inspect",
        "/api/steer",
    } <= paths
    schemas = set(spec["components"]["schemas"])
    assert {
        "FeatureDetail",
        "FeatureSummary",
        "DictionaryInfo",
        "InspectResult",
        "SteerRequest",
        "SteerResult",
    } <= schemas
    assert client.get("/docs").status_code == 200


# ---- dashboards ----------------------------------------------------------------------------------


def test_info_and_dictionaries(client: TestClient, tiny: LoadedModel) -> None:
    info = ok(client.get("/api/info"))
    assert info["model"] == tiny.name and info["loaded"] == [NAME]
    assert info["max_prompt_chars"] == 512
    dicts = {d["name"]: d for d in ok(client.get("/api/dictionaries"))}
    assert set(dicts) == {NAME, GONE}
    assert dicts[NAME]["width"] == WIDTH and dicts[NAME]["site"] == "1.resid_post" and dicts[NAME]["complete"]


def test_feature_table_pages_in_order(client: TestClient) -> None:
    rows = ok(client.get("/api/features", params={"dictionary": NAME, "order": "frequency", "limit": 5}))
    assert [r["latent"] for r in rows] == [31, 30, 29, 28, 27]
    page2 = ok(
        client.get("/api/features", params={"dictionary": NAME, "order": "latent", "offset": 5, "limit": 3})
    )
    assert [r["latent"] for r in page2] == [5, 6, 7]


def test_feature_dashboard_has_everything_the_page_draws(client: TestClient) -> None:
    f = FeatureDetail.model_validate(ok(client.get("/api/feature", params={"dictionary": NAME, "latent": 3})))
    assert (f.dictionary, f.latent, f.site) == (NAME, 3, "1.resid_post")
    assert len(f.top_examples) == 3
    for e in f.top_examples:
        assert len(e.tokens) == len(e.activations) == len(e.token_ids)
        assert e.tokens[e.max_index] == "ar" and e.activations[e.max_index] == pytest.approx(e.max_activation)
    assert [e.max_activation for e in f.top_examples] == sorted(
        (e.max_activation for e in f.top_examples), reverse=True
    )
    assert len(f.quantiles) == 2 and all(g.examples for g in f.quantiles)
    assert len(f.histogram.edges) == len(f.histogram.counts) + 1 == 6
    assert f.top_logits[0].token == "ar" and f.bottom_logits[0].value < 0
    assert f.neighbours[0].latent == 5 and f.frequency == pytest.approx(0.04)


def test_export_is_a_neuronpedia_json_download(client: TestClient) -> None:
    resp = client.get("/api/feature/export", params={"dictionary": NAME, "latent": 3})
    assert resp.status_code == 200
    assert resp.headers["content-disposition"] == f'attachment; filename="{NAME}-3.neuronpedia.json"'
    doc = resp.json()
    assert doc["index"] == "3" and doc["pos_str"][0] == "ar" and doc["topkCosSimIndices"][0] == 5
    assert (
        len(doc["activations"]) == 3 + 2
        and doc["activations"][0]["tokens"][doc["activations"][0]["maxValueTokenIndex"]] == "ar"
    )
    # The openscope export is exactly the dashboard document.
    same = ok(
        client.get("/api/feature/export", params={"dictionary": NAME, "latent": 3, "format": "openscope"})
    )
    assert same == ok(client.get("/api/feature", params={"dictionary": NAME, "latent": 3}))


# ---- search --------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["token", "logit"])
def test_search_by_token_and_by_logit_finds_the_latent(client: TestClient, route: str) -> None:
    hits = [
        FeatureSummary.model_validate(r) for r in ok(client.get(f"/api/search/{route}", params={"q": "AR "}))
    ]
    assert {(h.dictionary, h.latent) for h in hits} == {(NAME, 3), (GONE, 3)}
    assert all(h.score is not None and h.score > 0 for h in hits)
    only = ok(client.get(f"/api/search/{route}", params={"q": "ar", "dictionary": GONE}))
    assert {(r["dictionary"], r["latent"]) for r in only} == {(GONE, 3)}
    assert ok(client.get(f"/api/search/{route}", params={"q": "zzz-not-a-token"})) == []


def test_search_by_text_lists_the_latents_that_fire(client: TestClient) -> None:
    hits = [
        FeatureSummary.model_validate(r) for r in ok(client.post("/api/search/text", json={"text": TEXT}))
    ]
    assert hits and all(h.dictionary == NAME and 0 <= h.latent < WIDTH for h in hits)
    scores = [h.score or 0.0 for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    # Each hit's score is its largest activation on the text, as the inspector reports it.
    result = InspectResult.model_validate(
        ok(client.post("/api/inspect", json={"text": TEXT, "dictionary": NAME, "k": 32}))
    )
    best = dict(latents_on_text(result))
    assert all(h.score == pytest.approx(best[h.latent]) for h in hits)
    # Latents indexed in the database come with their dashboard numbers.
    assert hits[0].frequency == pytest.approx(0.01 * (hits[0].latent + 1))


# ---- the model: inspector and steering --------------------------------------------------------------


def test_inspector_returns_top_latents_per_token(client: TestClient) -> None:
    result = InspectResult.model_validate(
        ok(client.post("/api/inspect", json={"text": TEXT, "dictionary": NAME, "k": 3}))
    )
    assert result.dictionary == NAME
    assert TEXT in "".join(t.token for t in result.tokens)
    assert any(t.latents for t in result.tokens)
    for t in result.tokens:
        acts = [la.activation for la in t.latents]
        assert len(acts) <= 3 and acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
        assert all(0 <= la.latent < WIDTH for la in t.latents)


def test_steering_returns_both_texts(client: TestClient) -> None:
    def steer(value: float) -> Any:
        body = {
            "prompt": "The capital of France is",
            "interventions": [{"dictionary": NAME, "latent": 3, "mode": "add", "value": value}],
            "max_new_tokens": 4,
        }
        r = ok(client.post("/api/steer", json=body))
        assert r["prompt"] == body["prompt"] and r["interventions"][0]["latent"] == 3
        return r

    # Greedy decoding: strength 0 changes nothing; a high strength changes the continuation.
    off, on = steer(0.0), steer(200.0)
    assert off["steered"] == off["unsteered"] and off["steered_ids"] == off["unsteered_ids"]
    assert on["unsteered"] == off["unsteered"]
    assert on["steered"] != on["unsteered"] and on["steered_ids"] != on["unsteered_ids"]


# ---- bad input: 4xx with a message, never 500 -------------------------------------------------------

STEER = {
    "prompt": "Hello",
    "interventions": [{"dictionary": NAME, "latent": 3, "value": 4.0}],
    "max_new_tokens": 4,
}


def with_iv(**edit: Any) -> dict[str, Any]:
    """The STEER request with its intervention changed."""
    return {**STEER, "interventions": [{**STEER["interventions"][0], **edit}]}


BAD: list[tuple[str, str, dict[str, Any], int, str]] = [
    # (method, path, params or json body, status, words the message must contain)
    ("GET", "/api/feature", {"dictionary": "nope", "latent": 0}, 404, "unknown dictionary 'nope'"),
    ("GET", "/api/feature", {"dictionary": NAME, "latent": WIDTH}, 404, "out of range"),
    ("GET", "/api/feature", {"dictionary": NAME, "latent": -1}, 404, "out of range"),
    ("GET", "/api/feature", {"dictionary": NAME, "latent": "abc"}, 422, "latent"),
    ("GET", "/api/feature", {}, 422, "dictionary"),
    ("GET", "/api/features", {"dictionary": "nope"}, 404, "unknown dictionary"),
    ("GET", "/api/features", {"dictionary": NAME, "order": "bogus"}, 422, "order"),
    ("GET", "/api/features", {"dictionary": NAME, "limit": 0}, 422, "limit"),
    ("GET", "/api/feature/export", {"dictionary": "nope", "latent": 0}, 404, "unknown dictionary"),
    ("GET", "/api/feature/export", {"dictionary": NAME, "latent": 0, "format": "xml"}, 422, "format"),
    ("GET", "/api/search/token", {"q": ""}, 422, "q"),
    ("GET", "/api/search/token", {"q": "ar", "dictionary": "nope"}, 404, "unknown dictionary"),
    ("GET", "/api/search/logit", {"q": "ar", "dictionary": "nope"}, 404, "unknown dictionary"),
    ("POST", "/api/search/text", {"text": ""}, 400, "empty"),
    ("POST", "/api/search/text", {"text": "hi", "dictionary": "nope"}, 404, "unknown dictionary"),
    ("POST", "/api/search/text", {"text": "hi", "dictionary": GONE}, 409, "not loaded"),
    ("POST", "/api/inspect", {"text": "", "dictionary": NAME}, 400, "empty"),
    ("POST", "/api/inspect", {"text": "   \n", "dictionary": NAME}, 400, "empty"),
    ("POST", "/api/inspect", {"text": "x" * 513, "dictionary": NAME}, 400, "at most 512"),
    ("POST", "/api/inspect", {"text": "hi", "dictionary": "nope"}, 404, "unknown dictionary"),
    ("POST", "/api/inspect", {"text": "hi", "dictionary": GONE}, 409, "not loaded"),
    ("POST", "/api/inspect", {"text": "hi", "dictionary": NAME, "k": 0}, 400, "k must be"),
    ("POST", "/api/inspect", {"text": "hi", "dictionary": NAME, "k": 1000}, 400, "k must be"),
    ("POST", "/api/inspect", {"text": "hi", "dictionary": NAME, "colour": "red"}, 422, "colour"),
    ("POST", "/api/inspect", {"dictionary": NAME}, 422, "text"),
    ("POST", "/api/steer", {**STEER, "prompt": ""}, 400, "empty"),
    ("POST", "/api/steer", {**STEER, "prompt": "y" * 600}, 400, "at most 512"),
    ("POST", "/api/steer", {**STEER, "max_new_tokens": 65}, 400, "limit of 64"),
    ("POST", "/api/steer", {**STEER, "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("POST", "/api/steer", with_iv(value="strong"), 422, "value"),
    ("POST", "/api/steer", with_iv(latent=99), 404, "out of range"),
    ("POST", "/api/steer", with_iv(dictionary="nope"), 404, "unknown"),
    ("POST", "/api/steer", with_iv(dictionary=GONE), 409, "not loaded"),
    ("POST", "/api/steer", with_iv(mode="x"), 422, "mode"),
    ("POST", "/api/steer", {**STEER, "temperature": -1}, 422, "temperature"),
]


@pytest.mark.parametrize(
    ("method", "path", "args", "status", "words"), BAD, ids=[f"{b[0]} {b[1]} {b[4]}" for b in BAD]
)
def test_bad_input_is_a_4xx_with_a_clear_message(
    client: TestClient, method: str, path: str, args: dict[str, Any], status: int, words: str
) -> None:
    resp = client.get(path, params=args) if method == "GET" else client.post(path, json=args)
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and words in detail


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (json.dumps(with_iv(value=float("nan"))), "finite"),  # json.dumps writes NaN, as some clients do
        (json.dumps(with_iv(value=float("inf"))), "finite"),
        ('{"prompt": "Hi", ', "JSON"),
        ("[1, 2]", "body"),
    ],
)
def test_malformed_bodies_are_4xx(client: TestClient, body: str, words: str) -> None:
    resp = client.post("/api/steer", content=body, headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500, resp.text
    assert words in resp.json()["detail"]


# ---- concurrency -------------------------------------------------------------------------------------


def test_concurrent_inspector_requests_are_serialised_and_all_succeed(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openscope.serve.state as state_module

    real = state_module.top_latents
    active, most = [0], [0]
    count_lock = threading.Lock()

    def counting(*args: Any, **kwargs: Any) -> Any:
        with count_lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.002)  # widen the window in which two unserialised calls would overlap
            return real(*args, **kwargs)
        finally:
            with count_lock:
                active[0] -= 1

    monkeypatch.setattr(state_module, "top_latents", counting)
    results: list[Any] = [None] * 30

    def call(i: int) -> None:
        resp = client.post("/api/inspect", json={"text": TEXT, "dictionary": NAME, "k": 4})
        results[i] = (resp.status_code, resp.json())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r[0] == 200 for r in results), [
        r for r in results if r is None or r[0] != 200
    ][:2]
    assert all(r[1] == results[0][1] for r in results)  # same text, same answer: no cross-talk of hooks
    assert most[0] == 1  # the model lock let one call in at a time
    assert ok(client.get("/api/info"))["loaded"] == [NAME]


def test_dashboards_answer_while_the_model_is_busy(client: TestClient) -> None:
    state = client.app.state.openscope  # type: ignore[attr-defined]
    done: list[int] = []
    with state.lock:  # as if a long generation held the model
        worker = threading.Thread(
            target=lambda: done.append(
                client.post("/api/inspect", json={"text": "hi", "dictionary": NAME}).status_code
            )
        )
        worker.start()
        assert ok(client.get("/api/feature", params={"dictionary": NAME, "latent": 0}))["latent"] == 0
        assert ok(client.get("/api/search/token", params={"q": "ar"}))
        assert not done  # the inspector waits for the model
    worker.join(timeout=60)
    assert done == [200]


# ---- set-ups --------------------------------------------------------------------------------------


def test_dashboards_only_server(files: tuple[Path, Dictionary]) -> None:
    app = create_app(ServeConfig(db=files[0]), db=FeatureDB(files[0]), dictionaries={})
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert ok(c.get("/api/info"))["model"] is None
        assert ok(c.get("/api/feature", params={"dictionary": NAME, "latent": 1}))["latent"] == 1
        resp = c.post("/api/inspect", json={"text": "hi", "dictionary": NAME})
        assert resp.status_code == 409 and "not loaded" in resp.json()["detail"]


def test_the_suite_page_lists_the_catalogue_linked_to_dashboards(
    tiny: LoadedModel, files: tuple[Path, Dictionary], client: TestClient, tmp_path: Path
) -> None:
    db, d = files
    assert d.folder is not None
    folder = write_suite(d.folder.parent, tiny.name, ["ok.png", "../ok.png"])
    app = create_app(ServeConfig(db=db, suite=folder), loaded=tiny)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        info = ok(c.get("/api/suite"))
        assert [e["name"] for e in info["items"]] == list(SUITE_ITEMS)
        assert [e["dictionary"] for e in info["items"]] == [NAME, None, None]  # only the one with dashboards
        done, failed, pending = info["items"]
        assert (done["l0"], done["delta_loss"], done["measured_on"]) == (8.1, 0.05, "evaluation")
        assert failed["status"] == "failed" and "lower --lr" in failed["reason"] and pending["l0"] is None
        assert info["counts"] == {"pending": 1, "running": 0, "done": 1, "failed": 1}
        assert ok(c.get("/api/suite", params={"status": "failed"}))["items"] == [failed]
        assert ok(c.get("/api/suite", params={"family": "clt"}))["items"] == [pending]
        assert info["figures"] == ["ok.png", "../ok.png"]
        assert c.get("/api/suite/figure", params={"file": "ok.png"}).status_code == 200
        outside = c.get("/api/suite/figure", params={"file": "../ok.png"})
        assert outside.status_code == 404  # listed by the report, but not inside its folder
        assert c.get("/api/suite", params={"status": "lost"}).status_code == 422
        assert c.get("/api/suite", params={"sort": "l0"}).status_code == 422  # unknown parameters too
    resp = client.get("/api/suite")  # a server started without one says how to show one
    assert resp.status_code == 404 and "--suite DIR" in resp.json()["detail"]
    # A database in a suite folder (`openscope features ... --output DIR/features.db`) brings its suite.
    shutil.copy(db, folder / "features.db")
    app = create_app(ServeConfig(db=folder / "features.db"), loaded=tiny, dictionaries={})
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert ok(c.get("/api/suite"))["folder"] == str(folder)
    with pytest.raises(OpenscopeError, match="holds no catalogue.json"):
        create_app(ServeConfig(db=db, suite=tmp_path), loaded=tiny)


def test_loaded_dictionary_without_dashboards_is_listed_and_runs(
    tiny: LoadedModel, files: tuple[Path, Dictionary]
) -> None:
    extra = files[1]._replace(name="fresh", folder=None)
    app = create_app(ServeConfig(db=files[0]), loaded=tiny, dictionaries=[files[1], extra])
    with TestClient(app, base_url="http://127.0.0.1") as c:
        names = {d["name"]: d for d in ok(c.get("/api/dictionaries"))}
        assert names["fresh"]["complete"] is False and names["fresh"]["width"] == WIDTH
        assert ok(c.post("/api/inspect", json={"text": "hi", "dictionary": "fresh"}))["dictionary"] == "fresh"
        resp = c.get("/api/feature", params={"dictionary": "fresh", "latent": 0})
        assert resp.status_code == 404 and "no dashboards" in resp.json()["detail"]


def test_startup_errors_are_one_line(
    tmp_path: Path, tiny: LoadedModel, files: tuple[Path, Dictionary]
) -> None:
    with pytest.raises(OpenscopeError, match="no feature database"):
        create_app(ServeConfig(db=tmp_path / "none.db"), loaded=tiny)
    with pytest.raises(OpenscopeError, match="must be positive"):
        create_app(ServeConfig(db=files[0], max_prompt_chars=0), loaded=tiny)


def test_cli_serve_flags_come_from_the_config() -> None:
    from typer.testing import CliRunner

    from openscope.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    for flag in (
        "--db",
        "--dictionaries",
        "--model",
        "--host",
        "--port",
        "--max-prompt-chars",
        "--max-new-tokens",
        "--device",
    ):
        assert flag in out


# ---- pure helpers ----------------------------------------------------------------------------------


def test_check_prompt() -> None:
    assert check_prompt("hi", 2) == "hi"
    for bad, words in (("", "empty"), (" \t", "empty"), ("abc", "at most 2")):
        with pytest.raises(OpenscopeError, match=words):
            check_prompt(bad, 2)


def test_latents_on_text_takes_each_latents_maximum() -> None:
    def tok(*pairs: tuple[int, float]) -> Tok:
        return Tok(
            token="t",
            token_id=0,
            position=0,
            latents=[LatentActivation(latent=la, activation=a) for la, a in pairs],
        )

    result = InspectResult(dictionary="d", text="", tokens=[tok((1, 0.5), (2, 0.2)), tok((2, 0.9)), tok()])
    assert latents_on_text(result) == [(2, 0.9), (1, 0.5)]


def test_dictionaries_are_named_as_the_database_names_them(files: tuple[Path, Dictionary]) -> None:
    d = files[1]
    info = FeatureDB(files[0]).dictionary(NAME)
    renamed = info.model_copy(update={"name": "from-db"})
    named = name_dictionaries([d, d._replace(folder=None)], [renamed])
    assert list(named) == ["from-db", d.name]
    assert list(name_dictionaries([d._replace(folder=None)] * 2, [])) == [d.name, f"{d.name}#2"]


def test_validation_message_and_export_filename() -> None:
    errors = [{"loc": ("body", "interventions", 0, "value"), "msg": "Input should be a valid number"}]
    assert validation_message(errors) == "body.interventions.0.value: Input should be a valid number"
    assert export_filename("res/layer 9", 4, "neuronpedia") == "res_layer_9-4.neuronpedia.json"
    assert export_filename("", 0, "openscope") == "dictionary-0.openscope.json"
