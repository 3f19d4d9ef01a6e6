"""Released dictionaries by name: Hub references (`hf://OWNER/REPO[@REV]/FOLDER`) and release names
(`RELEASE:ID`) resolve through a Hugging Face cache laid out as huggingface_hub lays it out
(`models--OWNER--REPO/{blobs,snapshots/COMMIT,refs/BRANCH}`), with the network off (HF_HUB_OFFLINE=1
and any socket connection failing); names with typos fail before huggingface_hub is even called,
with the nearest known names; a download asks for the one folder only.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from openscope.cli import app
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import dictionary_folders, load_dictionary
from openscope.coders.hub import HubRef, expand, parse_reference, releases
from openscope.coders.io import save_coder
from openscope.errors import OpenscopeError

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = "google/gemma-scope-2-270m-pt"
FOLDER = "resid_post/layer_9_width_16k_l0_medium"
MAIN, V1 = "a" * 40, "b" * 40


def gemma_scope_files(tmp: Path, seed: int) -> tuple[dict[str, bytes], SparseCoder]:
    """The files of a Gemma Scope 2 folder (params.safetensors + config.json) with random weights."""
    coder = SparseCoder(CoderConfig(d_in=16, d_out=16, width=8, seed=seed))
    with torch.no_grad():
        coder.b_enc.add_(torch.randn(8) * 0.1)
    folder = save_coder(
        coder, tmp / f"src{seed}", hook_point_in="model.layers.9.output", model_name="google/gemma-3-270m"
    )
    return {p.name: p.read_bytes() for p in folder.iterdir()}, coder.fold()


def put_in_cache(cache: Path, repo: str, commit: str, ref: str | None, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: blobs named by hash, snapshot files linking to them, refs/BRANCH."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for path, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(path).parts) + 1), "blobs", blob.name))
    if ref is not None:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, SparseCoder, SparseCoder]:
    """A cache with FOLDER at main and at tag v1 (other weights); HF_HUB_OFFLINE=1; no socket may connect."""
    cache = tmp_path / "hf" / "hub"
    main_files, main_coder = gemma_scope_files(tmp_path, 0)
    v1_files, v1_coder = gemma_scope_files(tmp_path, 1)
    put_in_cache(cache, REPO, MAIN, "main", {f"{FOLDER}/{k}": v for k, v in main_files.items()})
    put_in_cache(cache, REPO, V1, "v1", {f"{FOLDER}/{k}": v for k, v in v1_files.items()})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache, main_coder, v1_coder


def _same(d, coder: SparseCoder) -> None:
    x = torch.randn(12, 16)
    with torch.no_grad():
        torch.testing.assert_close(d.coder.encode(x), coder.encode(x))


@pytest.mark.parametrize(
    "name",
    [
        f"hf://{REPO}/{FOLDER}",
        f"hf:/{REPO}/{FOLDER}",  # what pathlib.Path makes of it (the CLI's --dictionaries are Paths)
        "gemma-scope-2-270m-pt-res:layer_9_width_16k_l0_medium",
        "gemma-scope-2-270m-pt-res/layer_9_width_16k_l0_medium",
    ],
)
def test_load_by_name_offline(offline_cache, name: str) -> None:
    _, main_coder, _ = offline_cache
    d = load_dictionary(name)
    _same(d, main_coder)
    assert d.site_in.name == "9.resid_post" and d.name == "layer_9_width_16k_l0_medium"
    assert dictionary_folders([Path(name)]) == [d.folder]


def test_revisions(offline_cache) -> None:
    _, main_coder, v1_coder = offline_cache
    _same(load_dictionary(f"hf://{REPO}@v1/{FOLDER}"), v1_coder)
    _same(load_dictionary(f"hf://{REPO}/{FOLDER}@v1"), v1_coder)
    _same(load_dictionary(f"hf://{REPO}@{MAIN}/{FOLDER}"), main_coder)
    _same(load_dictionary("gemma-scope-2-270m-pt-res:layer_9_width_16k_l0_medium@v1"), v1_coder)
    with pytest.raises(OpenscopeError, match=f"revision nope of {REPO} is not in the Hugging Face cache"):
        load_dictionary(f"hf://{REPO}@nope/{FOLDER}")


def test_not_cached_offline_names_repo_and_folder(offline_cache) -> None:
    with pytest.raises(
        OpenscopeError, match=f"resid_post/layer_5_width_16k_l0_small of {REPO} is not in the"
    ):
        load_dictionary("gemma-scope-2-270m-pt-res:layer_5_width_16k_l0_small")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (f"hf://{REPO}/resid_post/layer_9_width_16k_l0_meduim", f"nearest: {FOLDER}"),
        (
            "hf://google/gemma-scope-2-270m-tp/x",
            "unknown Gemma Scope repository .* nearest: google/gemma-scope-2-270m-pt",
        ),
        (
            "gemma-scope-2-270m-pt-rse:layer_9_width_16k_l0_medium",
            "unknown release .* nearest: gemma-scope-2-270m-pt-res",
        ),
        (
            "gemma-scope-2-270m-pt-res:layer_9_width_16k_l0_meduim",
            "has no id .* nearest: layer_9_width_16k_l0_medium",
        ),
        ("hf://google", "hf://OWNER/REPO/FOLDER"),
    ],
)
def test_typos_fail_before_any_download(monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> None:
    import huggingface_hub

    def never(*args, **kwargs):
        raise AssertionError("huggingface_hub was called for a bad name")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    with pytest.raises(OpenscopeError, match=message):
        load_dictionary(name)


def test_download_asks_for_one_folder_and_maps_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    files, coder = gemma_scope_files(tmp_path, 2)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake(
        repo_id, *, revision=None, cache_dir: str = "", allow_patterns=None, local_files_only=False, **kw
    ):
        calls.append((repo_id, revision, local_files_only, list(allow_patterns or [])))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        if revision == "nope":
            err = RevisionNotFoundError.__new__(RevisionNotFoundError)
            Exception.__init__(err, "404 revision not found")
            raise err
        put_in_cache(Path(cache_dir), repo_id, MAIN, "main", {f"{FOLDER}/{k}": v for k, v in files.items()})
        return str(Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / MAIN)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    _same(load_dictionary("gemma-scope-2-270m-pt-res:layer_9_width_16k_l0_medium"), coder)
    assert [c[2] for c in calls] == [True, False]  # the cache first, then the Hub
    assert all(p.startswith(f"{FOLDER}/") for p in calls[1][3]) and not any(
        ".bin" in p or ".pkl" in p for p in calls[1][3]
    )
    with pytest.raises(OpenscopeError, match=f"{REPO} has no revision 'nope'"):
        load_dictionary(f"hf://{REPO}@nope/{FOLDER}")


def test_registry_covers_gemma_scope_1_and_2() -> None:
    known = releases()
    for size in ("270m", "1b", "4b", "12b", "27b"):
        for variant in ("pt", "it"):
            assert f"gemma-scope-2-{size}-{variant}-res" in known
            assert (
                known[f"gemma-scope-2-{size}-{variant}-res"].repo == f"google/gemma-scope-2-{size}-{variant}"
            )
    res = known["gemma-scope-2-270m-pt-res"]
    assert res.folders["layer_9_width_16k_l0_medium"] == FOLDER and res.model == "google/gemma-3-270m"
    canonical = known["gemma-scope-2b-pt-res-canonical"]
    assert canonical.repo == "google/gemma-scope-2b-pt-res"
    assert canonical.folders["layer_0/width_16k/canonical"].startswith("layer_0/width_16k/average_l0_")
    assert (
        known["gemma-scope-2b-pt-res"].folders["layer_12/width_16k/average_l0_82"]
        == "layer_12/width_16k/average_l0_82"
    )
    assert expand("a_{1,2}_b_{x,y}") == ["a_1_b_x", "a_1_b_y", "a_2_b_x", "a_2_b_y"]
    assert parse_reference("gemma-scope-2b-pt-res-canonical/layer_0/width_16k/canonical") == HubRef(
        "google/gemma-scope-2b-pt-res", canonical.folders["layer_0/width_16k/canonical"]
    )
    # A well-formed folder the registry does not list is still accepted (the registry follows SAELens).
    assert parse_reference(f"hf://{REPO}/transcoder/layer_3_width_65k_l0_big_affine") is not None


def test_cli_export_and_releases_offline(offline_cache, tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(
        app, ["export", f"hf://{REPO}/{FOLDER}", "--to", "saelens", "--out", str(tmp_path / "sl")]
    )
    assert done.exit_code == 0, done.output
    assert (tmp_path / "sl" / "sae_weights.safetensors").is_file()
    done = runner.invoke(app, ["releases", "--cached"], env={"COLUMNS": "200"})
    assert done.exit_code == 0 and "gemma-scope-2-270m-pt-res" in done.output, done.output
    done = runner.invoke(app, ["releases", "gemma-scope-2-270m-pt-res", "--cached"], env={"COLUMNS": "200"})
    assert "layer_9_width_16k_l0_medium" in done.output and "layer_5_width_16k_l0_small" not in done.output
