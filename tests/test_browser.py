"""The explorer end to end in a real headless Chromium: the pages a researcher clicks through.

A uvicorn server runs in a thread on a free local port with the tiny random Gemma 3 and the small
feature database of `serve_helpers`; Playwright drives Debian's `chromium` (the system browser, via
`executable_path`: Playwright's own browser downloads are never used). Screenshots of every page are
saved under the test's tmp folder and, when $OPENSCOPE_ARTIFACTS is set, copied there.

Marked `browser`; skipped with a reason when no chromium binary or no playwright is installed
(`apt-get install chromium`, `pip install playwright`). Run alone with `pytest -m browser`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import NAME, SUITE_ITEMS, TEXT, explorer_files, served, write_suite

from openscope.models.load import LoadedModel
from openscope.serve import ServeConfig
from openscope.serve.app import create_app

CHROMIUM = (
    os.environ.get("OPENSCOPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)


@pytest.fixture(scope="module")
def base_url(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The explorer on a free local port, served by uvicorn in a thread for this module."""
    db, d = explorer_files(tiny, tmp_path_factory.mktemp("explorer"))
    assert d.folder is not None
    # The Suite page: the test dictionary is the first item of a small suite.
    suite = write_suite(d.folder.parent, tiny.name, [])
    with served(create_app(ServeConfig(db=db, suite=suite), loaded=tiny)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(base_url: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The screenshot folder; copied to $OPENSCOPE_ARTIFACTS (if set) when the module is done."""
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    if target := os.environ.get("OPENSCOPE_ARTIFACTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy2(png, Path(target) / png.name)


@pytest.fixture
def page(browser: Any, base_url: str) -> Iterator[Any]:
    """A fresh page; any uncaught JavaScript error fails the test."""
    page = browser.new_page(viewport={"width": 1280, "height": 900}, base_url=base_url)
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert not errors, f"JavaScript errors: {errors}"


def snap(page: Any, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def background(locator: Any) -> str:
    return str(locator.evaluate("el => getComputedStyle(el).backgroundColor"))


def test_home_lists_dictionaries_and_searches(page: Any, shots: Path) -> None:
    page.goto("/")
    cards = page.locator(".dict-card")
    cards.first.wait_for()
    assert cards.count() == 2 and NAME in page.locator("#dictionaries").inner_text()
    snap(page, shots, "home")
    page.select_option("#search-mode", "token")
    page.fill("#search-input", "ar")
    page.click("#search-go")
    page.locator("#search-results .result-row").first.wait_for()
    assert page.locator("#search-results .latent-link").first.inner_text() == "#3"
    snap(page, shots, "search-token")
    page.select_option("#search-mode", "text")
    page.fill("#search-input", TEXT)
    page.click("#search-go")
    # The token search's results stay on the page until the hash change re-renders it: wait for the text
    # search's own answer (its hash, its spinner gone, its heading) before counting rows.
    page.wait_for_function(
        "() => location.hash.includes('by=text') && !document.querySelector('#search-results .spinner')"
        " && document.querySelector('#search-results h2')"
    )
    assert page.locator("#search-results .result-row").count() > 0
    snap(page, shots, "search-text")


def test_feature_page_shows_examples_histogram_logits_and_links(page: Any, shots: Path) -> None:
    page.goto(f"/#/?by=logit&q=ar&dict={NAME}")
    page.locator("#search-results .latent-link").first.click()
    page.wait_for_selector("#feature-title")
    assert page.inner_text("#feature-title") == "Latent #3"
    examples = page.locator("#top-examples .example")
    assert examples.count() == 3
    peak = examples.first.locator(".tok.max")
    assert peak.inner_text() == "ar" and background(peak) != "rgba(0, 0, 0, 0)"  # heat on the max token
    assert page.locator("#histogram svg rect.b").count() == 5
    assert "ar" in page.locator(".logits").first.inner_text()
    snap(page, shots, "feature")
    with page.expect_download() as info:
        page.click("#export-link")
    download = info.value
    assert download.suggested_filename == f"{NAME}-3.neuronpedia.json"
    doc = json.loads(Path(download.path()).read_text())
    assert doc["index"] == "3" and doc["activations"]
    page.locator("#neighbours a", has_text="#5").click()
    page.wait_for_function("document.querySelector('#feature-title')?.textContent === 'Latent #5'")


def test_inspector_colours_tokens_and_links_latents(page: Any, shots: Path) -> None:
    page.goto(f"/#/inspect?dict={NAME}")
    page.fill("#inspect-text", TEXT)
    page.click("#inspect-go")
    tokens = page.locator("#inspect-tokens .tok")
    tokens.first.wait_for()
    assert "".join(tokens.all_inner_texts()).endswith(TEXT)
    coloured = [i for i in range(tokens.count()) if background(tokens.nth(i)) != "rgba(0, 0, 0, 0)"]
    assert coloured, "no token is coloured by activation"
    tokens.nth(coloured[0]).click()
    page.locator("#token-latents .latent-link").first.wait_for()
    snap(page, shots, "inspect")
    first = page.locator("#text-latents .latent-link").first
    latent = first.locator("span").first.inner_text()  # "#N"
    first.click()
    page.wait_for_function(f"document.querySelector('#feature-title')?.textContent === 'Latent {latent}'")
    snap(page, shots, "inspect-to-feature")


def test_inspector_shows_the_servers_message_for_bad_input(page: Any, shots: Path) -> None:
    page.goto(f"/#/inspect?dict={NAME}")
    page.fill("#inspect-text", "   ")
    page.click("#inspect-go")
    error = page.locator("#inspect-out .error")
    error.wait_for()
    assert "400" in error.inner_text() and "empty" in error.inner_text()
    snap(page, shots, "inspect-error")


def test_steering_shows_both_texts_side_by_side(page: Any, shots: Path) -> None:
    page.goto(f"/#/steer?dict={NAME}&latent=3")
    page.fill("#steer-prompt", "The capital of France is")
    page.fill("#interventions .iv-value", "40")
    page.fill("#steer-max", "6")
    page.click("#steer-go")
    page.locator("#steered").wait_for()
    unsteered, steered = page.inner_text("#unsteered"), page.inner_text("#steered")
    assert unsteered.startswith("The capital of France is") and steered.startswith("The capital of France is")
    assert len(unsteered) > len("The capital of France is")
    assert f"{NAME} #3" in page.inner_text("#steer-out")
    snap(page, shots, "steer")


def test_suite_page_places_items_by_layer_and_site_and_links_dashboards(page: Any, shots: Path) -> None:
    page.goto("/#/suite")
    page.locator("#suite-grid").wait_for()
    assert [page.locator("#suite-grid thead th").nth(i).inner_text() for i in range(4)] == [
        "layer",
        "resid_post",
        "transcoder",
        "clt",
    ]
    assert page.locator("#suite-grid tbody th").all_inner_texts() == ["1", "multi-layer"]
    assert page.locator("#suite-items tbody tr").count() == len(SUITE_ITEMS)
    assert "lower --lr" in page.locator("#suite-items tr[data-status=failed]").inner_text()
    snap(page, shots, "suite")
    page.select_option("#suite-status", "failed")
    page.wait_for_function("document.querySelectorAll('#suite-items tbody tr').length === 1")
    assert "status=failed" in page.evaluate("location.hash")
    page.goto("/#/suite")
    page.locator(f"#suite-grid a.suite-chip[data-name='{NAME}']").click()  # the one with dashboards
    page.wait_for_function(f"location.hash === '#/dict/{NAME}'")
    page.locator("h1", has_text=NAME).wait_for()
