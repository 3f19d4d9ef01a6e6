"""Peers' folders written by the peers themselves: sparsify and dictionary_learning build coders with
random weights, save them with their own code, and compute their own latents and outputs on fixed
inputs; openscope's readers must load those folders and give the same numbers.

tests/test_peer_formats.py writes these formats by hand from their documented layouts; this file checks
the documentation against the libraries (as it does for SAELens there). Each library runs in-process
when importable, else in its own virtual environment ($OPENSCOPE_SPARSIFY_PYTHON from `make
sparsify-venv`, $OPENSCOPE_DICTIONARY_LEARNING_PYTHON from `make dictionary-learning-venv`); the test
skips with a reason when neither is there. The peer side is a script (a string: the libraries are not
openscope's dependencies) that writes the folders, the inputs and the peer's outputs under one folder.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import find_dictionaries, load_dictionary
from openscope.errors import OpenscopeError
from openscope.models.sites import Site

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, K = 16, 24, 4
SIZES = json.dumps({"D": D, "F": F, "K": K})


def _run_peer(module: str, env_var: str, script: str, *args: str) -> str:
    """Run a peer's script: in-process when `module` imports here, else with the Python in $env_var."""
    try:
        importlib.import_module(module)
    except ImportError:
        python = os.environ.get(env_var)
        if not python:
            pytest.skip(f"{module} is not importable and {env_var} is not set")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [python, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout
    argv, printed = sys.argv, io.StringIO()
    try:
        sys.argv = [module, *args]
        with contextlib.redirect_stdout(printed):
            exec(compile(script, f"{module}_writer", "exec"), {"__name__": f"{module}_writer"})
    finally:
        sys.argv = argv
    return printed.getvalue()


def _written(stdout: str) -> list[str]:
    """The case names a script reports ("case NAME" lines; the libraries print notes of their own)."""
    return [line.split()[1] for line in stdout.splitlines() if line.startswith("case ")]


def _load(path: Path) -> dict[str, Tensor]:
    """The script's tensors (torch.save of plain tensors: the dictionary_learning environment has no
    safetensors)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _check(folder: Path, x: Tensor, ref: dict[str, Tensor]) -> tuple[Site, Site]:
    """openscope's coder for `folder` gives the peer's latents and outputs on x; returns its sites."""
    d = load_dictionary(folder)
    assert isinstance(d.coder, SparseCoder)
    with torch.no_grad():
        f = d.coder.encode(x)
        y = d.coder.decode(f, x)
    torch.testing.assert_close(f, ref["f"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref["y"], rtol=1e-5, atol=1e-5)
    assert bool((ref["f"] != 0).any()) and bool((ref["f"] == 0).any())  # the cases are not degenerate
    return d.site_in, d.site_out


# ---- sparsify ------------------------------------------------------------------------------------------

SPARSIFY_CASES = [
    # (name, hook point, SparseCoderConfig fields beyond num_latents and k)
    ("sae", "layers.3", {}),
    ("sae_expansion", "layers.1", {"num_latents": 0, "expansion_factor": 2}),
    ("sae_multi_topk", "layers.1", {"multi_topk": True, "normalize_decoder": False}),
    ("sae_skip", "layers.1", {"skip_connection": True}),
    ("transcoder", "layers.2.mlp", {"transcode": True}),
    ("skip_transcoder", "layers.2.mlp", {"transcode": True, "skip_connection": True}),
    ("groupmax", "layers.0", {"activation": "groupmax"}),
]

# A run folder as sparsify's Trainer leaves it: one folder per hook point from SparseCoder.save_to_disk,
# beside the run's config.json (TrainConfig.save_json) and its training-state pickles. The reference is
# the coder read back by SparseCoder.load_from_disk: its encode (TopK values and indices, made dense
# here) and its forward's sae_out (the decoder, plus the skip connection when there is one), except
# with multi_topk (below).
_SPARSIFY_WRITER = """
import json, sys, torch
from sparsify import SparseCoder, SparseCoderConfig, TrainConfig
out, sizes, cases = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
D, F, K = sizes["D"], sizes["F"], sizes["K"]
gen = torch.Generator().manual_seed(0)
x = torch.randn(40, D, generator=gen) * 3
torch.save({"x": x}, f"{out}/x.pt")
for name, hookpoint, extra in cases:
    cfg = SparseCoderConfig(**{"num_latents": F, "k": K, **extra})
    coder = SparseCoder(D, cfg)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    run = f"{out}/{name}"
    coder.save_to_disk(f"{run}/{hookpoint}")
    TrainConfig(cfg, hookpoints=[hookpoint]).save_json(f"{run}/config.json")
    torch.save({"global_step": 1}, f"{run}/state.pt")
    back = SparseCoder.load_from_disk(f"{run}/{hookpoint}")
    with torch.no_grad():
        top_acts, top_indices, _ = back.encode(x)
        f = torch.zeros(x.shape[0], back.num_latents).scatter_(-1, top_indices, top_acts)
        # With multi_topk, forward's sae_out is the training loss's reconstruction from the top 4k
        # latents; encode (k latents) then decode is the coder's inference output.
        y = back.decode(top_acts, top_indices) if cfg.multi_topk else back(x).sae_out
        torch.save({"f": f, "y": y}, f"{out}/{name}.out.pt")
    print("case", name, back.num_latents)
"""


@pytest.fixture(scope="module")
def sparsify_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sparsify")
    stdout = _run_peer(
        "sparsify", "OPENSCOPE_SPARSIFY_PYTHON", _SPARSIFY_WRITER, str(out), SIZES, json.dumps(SPARSIFY_CASES)
    )
    assert _written(stdout) == [c[0] for c in SPARSIFY_CASES]
    return out


SPARSIFY_SITES = {
    "layers.3": (Site(3, "resid_post"), Site(3, "resid_post")),
    "layers.1": (Site(1, "resid_post"), Site(1, "resid_post")),
    "layers.2.mlp": (Site(2, "mlp_in"), Site(2, "mlp_out")),
}


@pytest.mark.parametrize("case", SPARSIFY_CASES[:-1], ids=[c[0] for c in SPARSIFY_CASES[:-1]])
def test_sparsify_folder_equals_sparsify(sparsify_runs: Path, case: tuple) -> None:
    name, hookpoint, extra = case
    # find_dictionaries sees the hook point's folder in the run, not the run's own config.json and pickles.
    [folder] = find_dictionaries(sparsify_runs / name)
    assert folder == sparsify_runs / name / hookpoint
    x = _load(sparsify_runs / "x.pt")["x"]
    ref = _load(sparsify_runs / f"{name}.out.pt")
    assert _check(folder, x, ref) == SPARSIFY_SITES[hookpoint]
    d = load_dictionary(folder)
    assert isinstance(d.coder, SparseCoder)
    assert d.coder.cfg.width == (D * 2 if name == "sae_expansion" else F)
    skip = bool(extra.get("skip_connection"))
    assert d.coder.cfg.kind == (
        "skip_transcoder" if skip else "transcoder" if extra.get("transcode") else "sae"
    )


def test_sparsify_groupmax_is_refused(sparsify_runs: Path) -> None:
    with pytest.raises(OpenscopeError, match="groupmax"):
        load_dictionary(sparsify_runs / "groupmax" / "layers.0")


# ---- dictionary_learning -------------------------------------------------------------------------------

DL_CASES = [
    # (name, trainer class or None, trainer arguments beyond the common ones, threshold buffer or None)
    ("standard", "StandardTrainer", {}, None),
    ("standard_april", "StandardTrainerAprilUpdate", {}, None),
    ("gated", "GatedSAETrainer", {}, None),
    ("jumprelu", "JumpReluTrainer", {}, None),
    ("topk", "TopKTrainer", {"k": K}, None),
    ("batch_topk", "BatchTopKTrainer", {"k": K}, 1.0),
    ("batch_topk_untrained", "BatchTopKTrainer", {"k": K}, None),  # threshold still -1: plain ReLU
    ("matryoshka", "MatryoshkaBatchTopKTrainer", {"k": K, "group_fractions": [0.25, 0.75]}, 1.0),
    ("autoencoder_new", None, {}, None),  # no trainer of 0.1.0 writes it; its loader reads it
]

# Each trainer is built as dictionary_learning's training loop builds it, its dictionary given random
# weights, and saved as that loop saves: trainer_<i>/config.json = {"trainer": trainer.config, "buffer":
# ...} and trainer_<i>/ae.pt = the dictionary's state dict on the CPU. The reference is the dictionary
# read back the way dictionary_learning.utils.load_dictionary does (each class's from_pretrained, with k
# from the config), then its encode and decode. utils itself imports datasets and nnsight, and the
# package __init__ imports the activation buffer (nnsight): where those are missing (the Makefile's
# environment installs none of them), the modules are loaded without running that __init__.
_DL_WRITER = """
import importlib.util, json, os, sys, types, torch
try:
    import dictionary_learning
except ImportError:
    sys.modules.pop("dictionary_learning", None)
    spec = importlib.util.find_spec("dictionary_learning")
    package = types.ModuleType("dictionary_learning")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["dictionary_learning"] = package
from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerAprilUpdate
from dictionary_learning.trainers.gdm import GatedSAETrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer
from dictionary_learning.trainers.top_k import TopKTrainer, AutoEncoderTopK
from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer, BatchTopKSAE
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer, MatryoshkaBatchTopKSAE
out, sizes, cases = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
D, F, K = sizes["D"], sizes["F"], sizes["K"]
trainers = {c.__name__: c for c in (StandardTrainer, StandardTrainerAprilUpdate, GatedSAETrainer,
            JumpReluTrainer, TopKTrainer, BatchTopKTrainer, MatryoshkaBatchTopKTrainer)}
loaders = {"AutoEncoder": AutoEncoder, "AutoEncoderNew": AutoEncoderNew, "GatedAutoEncoder": GatedAutoEncoder,
           "JumpReluAutoEncoder": JumpReluAutoEncoder, "AutoEncoderTopK": AutoEncoderTopK,
           "BatchTopKSAE": BatchTopKSAE, "MatryoshkaBatchTopKSAE": MatryoshkaBatchTopKSAE}
common = dict(activation_dim=D, dict_size=F, layer=4, lm_name="google/gemma-3-270m",
              submodule_name="resid_post_layer_4", device="cpu", seed=0)
buffer = {"d_submodule": D, "io": "out", "n_ctxs": 8, "ctx_len": 16, "refresh_batch_size": 4,
          "out_batch_size": 32, "device": "cpu"}
gen = torch.Generator().manual_seed(0)
x = torch.randn(40, D, generator=gen) * 3
torch.save({"x": x}, f"{out}/x.pt")
for name, trainer_name, extra, threshold in cases:
    if trainer_name is None:
        ae = AutoEncoderNew(D, F)
        trainer_config = {"dict_class": "AutoEncoderNew", "trainer_class": "StandardTrainerAprilUpdate",
                          **{k: v for k, v in common.items() if k != "device"}}
    else:
        trainer = trainers[trainer_name](steps=10_000, **common, **extra)
        ae, trainer_config = trainer.ae, trainer.config
    with torch.no_grad():
        for pname, p in ae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if pname == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5)
        if threshold is not None:
            ae.threshold.fill_(threshold)
    folder = f"{out}/{name}/trainer_0"
    os.makedirs(folder)
    with open(f"{folder}/config.json", "w") as fh:
        json.dump({"trainer": trainer_config, "buffer": buffer}, fh, indent=4)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, f"{folder}/ae.pt")
    cls = trainer_config["dict_class"]
    path = f"{folder}/ae.pt"
    if cls in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        back = loaders[cls].from_pretrained(path, k=trainer_config["k"], device="cpu")
    else:
        back = loaders[cls].from_pretrained(path, device="cpu")
    with torch.no_grad():
        f = back.encode(x)
        torch.save({"f": f, "y": back.decode(f)}, f"{out}/{name}.out.pt")
    print("case", name, cls)
"""


@pytest.fixture(scope="module")
def dictionary_learning_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dictionary_learning")
    stdout = _run_peer(
        "dictionary_learning",
        "OPENSCOPE_DICTIONARY_LEARNING_PYTHON",
        _DL_WRITER,
        str(out),
        SIZES,
        json.dumps(DL_CASES),
    )
    assert _written(stdout) == [c[0] for c in DL_CASES]
    return out


@pytest.mark.parametrize("case", DL_CASES, ids=[c[0] for c in DL_CASES])
def test_dictionary_learning_folder_equals_dictionary_learning(
    dictionary_learning_runs: Path, case: tuple
) -> None:
    name = case[0]
    [folder] = find_dictionaries(dictionary_learning_runs / name)
    assert folder == dictionary_learning_runs / name / "trainer_0"
    x = _load(dictionary_learning_runs / "x.pt")["x"]
    ref = _load(dictionary_learning_runs / f"{name}.out.pt")
    assert _check(folder, x, ref) == (Site(4, "resid_post"), Site(4, "resid_post"))
    d = load_dictionary(folder)
    assert d.config is not None and d.config["model_name"] == "google/gemma-3-270m"
