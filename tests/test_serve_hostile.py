"""The explorer under hostile requests: every bad request is a 4xx with a one-line `detail`, never a
500, and no request reads a file outside the folders the server serves.

Two parts: a table of the attacks a new user's probes found (lone UTF-16 surrogates, numbers beyond
int64 or float range, NaN, paths out of the report folder, a trailing newline in a graph name, a
foreign Host header), and a property-based fuzz (Hypothesis) that sends every route of the app's
OpenAPI schema hostile values in every parameter and body field. A canary file sits outside the
served folders, with links and report entries pointing at it; an audit hook records every file the
process opens during a request, and no response may carry the canary or open anything outside.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import NAME, explorer_files, write_suite

from openscope.models.load import LoadedModel
from openscope.serve import ServeConfig
from openscope.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

CANARY = "CANARY-7f3a9-outside-the-served-folders"

# ---- every file opened while a request runs ----------------------------------------------------------

_OPENED: list[str] = []
_RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if _RECORDING[0] and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # (audit hooks cannot be removed; this one records only inside `request`)


class Site:
    """The served app, its folders, and the canary outside them."""

    def __init__(self, client: TestClient, outside: Path) -> None:
        self.client, self.outside = client, outside

    def request(self, method: str, url: str, **kw: Any) -> Any:
        _OPENED.clear()
        _RECORDING[0] = True
        try:
            resp = self.client.request(method, url, **kw)
        finally:
            _RECORDING[0] = False
        outside = [p for p in _OPENED if Path(p).resolve().is_relative_to(self.outside.resolve())]
        assert not outside, f"{method} {url} opened {outside}"
        assert resp.status_code < 500, f"{method} {url} {kw}: {resp.status_code} {resp.text[:300]}"
        assert CANARY.encode() not in resp.content, f"{method} {url} served the canary"
        if resp.status_code >= 400 and resp.headers.get("content-type", "").startswith("application/json"):
            detail = resp.json().get("detail")
            assert isinstance(detail, str) and "\n" not in detail and detail, resp.text
        return resp


@pytest.fixture(scope="module")
def site(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("served")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text(CANARY)
    (outside / "secret.png").write_text(CANARY)
    (outside / "report.json").write_text(
        json.dumps({"kind": "contrast", "figures": ["secret.png"], "x": CANARY})
    )
    db, _ = explorer_files(tiny, root)
    reports = root / "chat"
    (reports / "contrast").mkdir(parents=True)
    (reports / "contrast" / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    hostile = [
        "ok.png",
        "../../../../../../etc/passwd",
        "/etc/hostname",
        str(outside / "secret.png"),
        "../../outside/secret.png",
        "link.png",
    ]
    os.symlink(outside / "secret.png", reports / "contrast" / "link.png")
    (reports / "contrast" / "report.json").write_text(json.dumps({"kind": "contrast", "figures": hostile}))
    os.symlink(outside, reports / "evil")  # a report folder that is a link out of the root
    (reports / "half").mkdir()
    os.symlink(outside / "report.json", reports / "half" / "report.json")
    graphs = root / "graphs"
    graphs.mkdir()
    os.symlink(outside / "secret.txt", graphs / "leak.json")
    suite = write_suite(root / "dicts", tiny.name, hostile)  # the same hostile figure names
    os.symlink(outside / "secret.png", suite / "eval" / "link.png")
    app = create_app(ServeConfig(db=db, chat_reports=reports, graphs=graphs, suite=suite), loaded=tiny)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield Site(client, outside)


# ---- the table -------------------------------------------------------------------------------------------

SURROGATE = "\ud800"
BIG = 2**70

HOSTILE: list[tuple[str, str, str, dict[str, Any]]] = [
    # (id, method, url, request keyword arguments)
    ("surrogate-inspect", "POST", "/api/inspect", {"json": {"text": f"a{SURROGATE}", "dictionary": NAME}}),
    ("surrogate-steer", "POST", "/api/steer", {"json": {"prompt": f"a{SURROGATE}"}}),
    ("surrogate-search", "POST", "/api/search/text", {"json": {"text": SURROGATE}}),
    ("surrogate-graph", "POST", "/api/graphs", {"json": {"prompt": SURROGATE}}),
    ("surrogate-key", "POST", "/api/steer", {"json": {"prompt": "a", SURROGATE: 1}}),
    ("surrogate-edit", "POST", "/api/graphs/g/intervene", {"json": {"edits": [{"node_id": SURROGATE}]}}),
    (
        "surrogate-dictionary",
        "POST",
        "/api/steer",
        {"json": {"prompt": "a", "interventions": [{"dictionary": SURROGATE, "latent": 1, "value": 1}]}},
    ),
    ("tiny-temperature", "POST", "/api/steer", {"json": {"prompt": "a", "temperature": 1e-300}}),
    ("huge-temperature", "POST", "/api/steer", {"json": {"prompt": "a", "temperature": 1e300}}),
    ("seed-2^64", "POST", "/api/steer", {"json": {"prompt": "a", "seed": 2**64}}),
    ("negative-seed", "POST", "/api/steer", {"json": {"prompt": "a", "seed": -1}}),
    (
        "huge-position",
        "POST",
        "/api/steer",
        {
            "json": {
                "prompt": "a",
                "interventions": [{"dictionary": NAME, "latent": 1, "value": 1, "positions": [BIG]}],
            }
        },
    ),
    (
        "huge-latent",
        "POST",
        "/api/steer",
        {"json": {"prompt": "a", "interventions": [{"dictionary": NAME, "latent": BIG, "value": 1}]}},
    ),
    (
        "nan-value",
        "POST",
        "/api/steer",
        {"content": '{"prompt": "a", "interventions": [{"dictionary": "x", "latent": 1, "value": NaN}]}'},
    ),
    ("huge-offset", "GET", "/api/features", {"params": {"dictionary": NAME, "offset": BIG}}),
    ("huge-limit", "GET", "/api/features", {"params": {"dictionary": NAME, "limit": BIG}}),
    ("huge-latent-get", "GET", "/api/feature", {"params": {"dictionary": NAME, "latent": BIG}}),
    ("negative-latent", "GET", "/api/feature", {"params": {"dictionary": NAME, "latent": -1}}),
    (
        "nan-factor",
        "POST",
        "/api/graphs/g/intervene",
        {"content": '{"edits": [{"node_id": "1_2_3", "factor": NaN}]}'},
    ),
    (
        "inf-factor",
        "POST",
        "/api/graphs/g/intervene",
        {"content": '{"edits": [{"node_id": "1_2_3", "factor": Infinity}]}'},
    ),
    ("huge-top-k", "POST", "/api/graphs/g/intervene", {"json": {"edits": [], "top_k": BIG}}),
    (
        "figure-passwd",
        "GET",
        "/api/chat/figure",
        {"params": {"name": "contrast", "file": "../../../../../../etc/passwd"}},
    ),
    ("figure-absolute", "GET", "/api/chat/figure", {"params": {"name": "contrast", "file": "/etc/hostname"}}),
    (
        "figure-outside",
        "GET",
        "/api/chat/figure",
        {"params": {"name": "contrast", "file": "../../outside/secret.png"}},
    ),
    ("figure-link", "GET", "/api/chat/figure", {"params": {"name": "contrast", "file": "link.png"}}),
    ("report-link-folder", "GET", "/api/chat/report", {"params": {"name": "evil"}}),
    ("report-link-file", "GET", "/api/chat/report", {"params": {"name": "half"}}),
    ("report-dotdot", "GET", "/api/chat/report", {"params": {"name": ".."}}),
    ("suite-figure-passwd", "GET", "/api/suite/figure", {"params": {"file": "../../../../../../etc/passwd"}}),
    ("suite-figure-outside", "GET", "/api/suite/figure", {"params": {"file": "../../outside/secret.png"}}),
    ("suite-figure-link", "GET", "/api/suite/figure", {"params": {"file": "link.png"}}),
    ("suite-figure-unlisted", "GET", "/api/suite/figure", {"params": {"file": "catalogue.json"}}),
    ("suite-unknown-parameter", "GET", "/api/suite", {"params": {"family": "clt", "folder": "/etc"}}),
    ("suite-bad-status", "GET", "/api/suite", {"params": {"status": "everything"}}),
    ("graph-newline", "GET", "/api/graphs/x%0A", {}),
    ("graph-link", "GET", "/api/graphs/leak", {}),
    ("graph-dotdot", "GET", "/api/graphs/..%2F..%2Fetc%2Fpasswd", {}),
    ("graph-slug-newline", "POST", "/api/graphs", {"json": {"prompt": "a", "slug": "name\n"}}),
    ("static-dotdot", "GET", "/static/../../../../etc/passwd", {}),
    ("static-encoded", "GET", "/static/%2e%2e/%2e%2e/etc/passwd", {}),
    ("export-name", "GET", "/api/feature/export", {"params": {"dictionary": "../../x", "latent": 1}}),
    ("host-rebinding", "GET", "/api/info", {"headers": {"host": "evil.example"}}),
    ("host-rebinding-port", "GET", "/api/info", {"headers": {"host": "attacker.test:8000"}}),
    ("host-empty", "GET", "/api/info", {"headers": {"host": ""}}),
    ("bad-json", "POST", "/api/steer", {"content": b"\xff\xfe{not json"}),
    ("wrong-type", "POST", "/api/inspect", {"json": ["a", "list"]}),
]


@pytest.mark.parametrize(("method", "url", "kw"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_a_hostile_request_is_a_4xx(site: Site, method: str, url: str, kw: dict[str, Any]) -> None:
    if "json" in kw:  # sent as escaped JSON text: a client library would refuse to encode a surrogate
        kw = {"content": json.dumps(kw.pop("json")), **kw}
    if "content" in kw:
        kw = {**kw, "headers": {"content-type": "application/json"}}
    resp = site.request(method, url, **kw)
    assert 400 <= resp.status_code < 500, resp.text


def test_loopback_names_are_answered(site: Site) -> None:
    for host in ("127.0.0.1", "127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
        assert site.request("GET", "/api/info", headers={"host": host}).status_code == 200, host
    figure = site.request("GET", "/api/chat/figure", params={"name": "contrast", "file": "ok.png"})
    assert figure.status_code == 200  # the one figure really inside the report folder
    assert [r["name"] for r in site.request("GET", "/api/chat/reports").json()] == ["contrast"]
    suite = site.request("GET", "/api/suite/figure", params={"file": "ok.png"})
    assert suite.status_code == 200  # the one suite figure really inside the suite folder


def test_host_names_follow_the_configuration(tiny: LoadedModel, tmp_path: Path) -> None:
    db, _ = explorer_files(tiny, tmp_path)
    for host, allowed, name, status in (
        ("127.0.0.1", [], "openscope.example", 400),
        ("127.0.0.1", ["openscope.example"], "openscope.example", 200),
        ("127.0.0.1", ["*"], "anything.example", 200),
        ("10.1.2.3", [], "10.1.2.3", 200),
    ):
        app = create_app(ServeConfig(db=db, host=host, allowed_hosts=allowed), loaded=tiny, dictionaries=[])
        with TestClient(app, base_url=f"http://{name}") as client:
            assert client.get("/api/info").status_code == status, (host, allowed, name)


# ---- the fuzz ---------------------------------------------------------------------------------------------

TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=40),  # surrogates included
    st.just(NAME),
    st.sampled_from(
        [
            NAME,
            "0_resid_post_gone",
            "contrast",
            "ok.png",
            "..",
            "../../../../etc/passwd",
            "/etc/hostname",
            "leak",
            "x\n",
            "",
            " ",
            "a" * 3000,
            "%00",
            "link.png",
            "../../outside/secret.txt",
            "evil",
            "half",
        ]
    ),
)
NUMBER = st.one_of(
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 1e-300, 1e300]),
)
SCALAR = st.one_of(TEXT, NUMBER, st.booleans(), st.none())
VALUE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=6,
)


def _typed(schema: dict[str, Any], schemas: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped like a JSON schema (so requests get past the shape checks to the code behind
    them), with hostile leaves: any text, numbers beyond every range, NaN."""
    if "$ref" in schema and depth < 3:
        ref = schemas[schema["$ref"].rsplit("/", 1)[-1]]
        props, required = ref.get("properties", {}), set(ref.get("required", []))
        return st.fixed_dictionaries(
            {k: _loose(v, schemas, depth + 1) for k, v in props.items() if k in required},
            optional={k: _loose(v, schemas, depth + 1) for k, v in props.items() if k not in required},
        )
    if "anyOf" in schema:
        return st.one_of([_typed(option, schemas, depth) for option in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return TEXT
    if kind == "integer":
        return st.one_of(st.integers(-3, 40), st.integers(-(2**80), 2**80))
    if kind == "number":
        return NUMBER
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(_loose(schema.get("items", {}), schemas, depth + 1), max_size=3)
    if kind == "null":
        return st.none()
    return VALUE


def _loose(schema: dict[str, Any], schemas: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Mostly well-typed, sometimes anything at all."""
    typed = _typed(schema, schemas, depth)
    return st.one_of(*[typed] * 9, VALUE)


def _routes(client: TestClient) -> list[tuple[str, str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(method, path, path param schemas, query param schemas, body schema) of every route."""
    spec = client.app.openapi()  # type: ignore[attr-defined]
    out = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            params = op.get("parameters", [])
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            out.append(
                (
                    method.upper(),
                    path,
                    {p["name"]: p.get("schema", {}) for p in params if p["in"] == "path"},
                    {p["name"]: p.get("schema", {}) for p in params if p["in"] == "query"},
                    body,
                )
            )
    return out


def _json_text(value: Any) -> str:
    return json.dumps(value, allow_nan=True)  # NaN and Infinity go out as JSON parsers accept them


def _text(value: Any) -> str:
    """A value as a URL parameter (what cannot be sent as UTF-8 becomes U+FFFD)."""
    return str(value).encode("utf-8", "surrogatepass").decode("utf-8", "replace")


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    derandomize=True,
)
@given(data=st.data())
def test_fuzzed_requests_never_fail_the_server(site: Site, data: st.DataObject) -> None:
    spec = site.client.app.openapi()  # type: ignore[attr-defined]
    schemas = spec.get("components", {}).get("schemas", {})
    method, path, path_params, query, body_schema = data.draw(
        st.sampled_from(_routes(site.client)), label="route"
    )
    url = path
    for name, schema in path_params.items():
        value = _text(data.draw(_loose(schema, schemas), label=name))
        url = url.replace("{" + name + "}", urllib.parse.quote(value, safe=""))
    params = {
        name: _text(data.draw(_loose(schema, schemas), label=name))
        for name, schema in query.items()
        if data.draw(st.booleans())
    }
    kw: dict[str, Any] = {"params": params}
    if method == "POST":
        body = data.draw(_loose(body_schema, schemas), label="body")
        if isinstance(body, dict) and data.draw(st.integers(0, 9)) == 0:
            body[data.draw(TEXT, label="extra key")] = data.draw(VALUE, label="extra value")
        kw["content"] = _json_text(body)
        kw["headers"] = {"content-type": "application/json"}
    site.request(method, url, **kw)
