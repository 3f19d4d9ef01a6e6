"""A package others can install: `python -m build` makes an sdist and a wheel (the wheel built from the
sdist, so the sdist is complete), at the single-sourced version; the wheel holds every data file of
the package; installed into a fresh virtual environment it runs `openscope --version`, `--help` and
the demo on the tiny model (torch and the other dependencies come from this interpreter's
site-packages: the fresh environment sees them, and reads openscope itself from the wheel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import openscope

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.packaging


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_sdist_and_wheel_at_the_one_version(dist):
    version = openscope.__version__
    wheel = dist / f"openscope-{version}-py3-none-any.whl"
    sdist = dist / f"openscope-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"openscope-{version}.dist-info/METADATA").decode()
        entry_points = zf.read(f"openscope-{version}.dist-info/entry_points.txt").decode()
    assert f"Version: {version}" in metadata and "Provides-Extra: wandb" in metadata
    assert "openscope = openscope.cli:main" in entry_points
    # Every file of the package ships: modules and data (the explorer's front end, shipped JSON).
    package = ROOT / "openscope"
    files = {
        p.relative_to(ROOT).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith((".pyc", ".tmp"))
    }
    assert files - names == set()
    with tarfile.open(sdist) as tf:
        members = {m.name.partition("/")[2] for m in tf.getmembers()}
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "openscope/__init__.py"} <= members


def test_wheel_installs_and_runs_in_a_fresh_venv(dist, tmp_path, tiny_model_dir, text_file):
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    wheel = next(dist.glob("openscope-*.whl"))
    # openscope only (its dependencies are this interpreter's), never from an index.
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index"]
    subprocess.run([*pip, "--no-deps", "--ignore-installed", str(wheel)], check=True, timeout=300)
    where = subprocess.run(
        [str(python), "-c", "import openscope; print(openscope.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(venv)), where  # the wheel's copy, not this checkout's
    exe = venv / "bin" / "openscope"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENSCOPE_CACHE": str(tmp_path / "cache")}
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=env, check=True)
    assert version.stdout.strip() == f"openscope {openscope.__version__}"
    help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, check=True)
    assert "harvest" in help_text.stdout and "train" in help_text.stdout

    out = tmp_path / "demo"
    demo = [
        *(str(exe), "demo", "--no-serve", "--output", str(out), "--model", str(tiny_model_dir)),
        *("--source", f"{text_file}[:80]", "--eval-source", f"{text_file}[80:]", "--device", "cpu"),
        *("--harvest-tokens", "1024", "--train-tokens", "2048", "--batch-size", "256", "--width", "64"),
        *("--target-l0", "8", "--eval-tokens", "512", "--feature-tokens", "1024"),
    ]
    done = subprocess.run(demo, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = json.loads((out / "demo.json").read_text())["stages"]
    assert {k: v["done"] for k, v in stages.items()} == dict.fromkeys(
        ("harvest", "train", "eval", "features"), True
    )
    assert (out / "features.db").is_file()
