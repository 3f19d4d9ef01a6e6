"""Bad input, careless and hostile, for every command: one line, exit 2, and nothing around changed.

A small world of real files is built once: the tiny model, a text file, an activation store, a trained
dictionary, a feature database, an evaluation report, a user's own folder of files, files of the wrong
kind (binary "text", a foreign SQLite database, a pickle), damaged stores and models, and symbolic
links out of the world. Each case runs the command line in-process (`openscope.cli.run`) and asserts:

- exit status 2 and exactly one line on stderr, `error: ...`, naming the problem (no traceback);
- a snapshot of every file of the world (and of a folder outside it that links point to) is the
  same afterwards: nothing was written, replaced or deleted.

The safety properties that are not refusals (a replacement that fails midway keeps the old content, a
planted link is never written through, metrics stay consistent after a resume) have tests of their own
at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_store
from safetensors.torch import save_file

from openscope.activations import ActivationStore, HarvestConfig, harvest
from openscope.cli import run
from openscope.config import save_json
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate
from openscope.features import FeaturesConfig, compute_features
from openscope.models.load import LoadedModel
from openscope.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the world ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Paths of the world every case runs in (`root`; commands run in its folder `empty` unless a case
    says otherwise), the folder outside it links point to, and the tiny model."""

    root: Path
    outside: Path
    model: Path


def _binary(path: Path, n: int = 4096) -> None:
    path.write_bytes(bytes(range(256)) * (n // 256))


def _store_variant(root: Path, store: Path, name: str, edit) -> Path:
    """A copy of the store whose manifest `edit` changes (edit(manifest) -> manifest or raw text)."""
    copy = root / "stores" / name
    shutil.copytree(store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    out = edit(manifest)
    (copy / "manifest.json").write_text(out if isinstance(out, str) else json.dumps(out))
    return copy


@pytest.fixture(scope="module")
def world(tiny: LoadedModel, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("outside the world")

    (root / "st").mkdir()
    store = small_store(tiny, tiny_model_dir, root / "st", "1.resid_post", "The capital of France is Paris.")
    (root / "docs.jsonl").write_text((root / "st" / "docs.jsonl").read_text())
    train(
        TrainConfig(
            store=store,
            width=32,
            batch_size=128,
            tokens=512,
            target_l0=8,
            output=root / "dicts",
            device="cpu",
        ),
        progress=False,
    )
    dictionary = next((root / "dicts").glob("1_resid_post*"))
    evaluate(
        EvalConfig(
            dictionaries=[dictionary],
            model=str(tiny_model_dir),
            source=str(root / "docs.jsonl"),
            tokens=256,
            context_len=32,
            output=root / "report",
            loss_recovered=False,
            device="cpu",
        ),
        loaded=tiny,
        progress=False,
    )
    compute_features(
        FeaturesConfig(
            dictionaries=[dictionary], store=store, output=root / "features.db", tokens=512, device="cpu"
        ),
        loaded=tiny,
        progress=False,
    )

    user = root / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("a user's notes")
    (user / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (root / "afile").write_text("just a file")
    (root / "one_class.jsonl").write_text('{"text": "one", "label": "a"}\n{"text": "two", "label": "a"}\n')
    (root / "empty").mkdir()
    (root / "exports" / dictionary.name).mkdir(parents=True)  # an --export folder holding a user's file
    (root / "exports" / dictionary.name / "notes.txt").write_text("mine")
    _binary(root / "bin.jsonl")
    _binary(root / "bin.arrow")
    _binary(root / "bin.parquet")
    with sqlite3.connect(root / "other.sqlite") as conn:  # another program's database
        conn.execute("CREATE TABLE accounts(name TEXT, balance REAL)")
        conn.execute("INSERT INTO accounts VALUES ('alice', 10.0)")
    conn.close()

    # Models that transformers cannot load, each in its own way.
    for name in ("badcfg", "unknown", "noweights", "truncated"):
        shutil.copytree(tiny_model_dir, root / "models" / name)
    (root / "models" / "badcfg" / "config.json").write_text("{not json")
    cfg = json.loads((root / "models" / "unknown" / "config.json").read_text())
    (root / "models" / "unknown" / "config.json").write_text(json.dumps({**cfg, "model_type": "nonexistent"}))
    (root / "models" / "noweights" / "model.safetensors").unlink()
    weights = root / "models" / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    _unknown_architecture(root / "models" / "opt", tiny_model_dir)
    shutil.copytree(tiny_model_dir, root / "models" / "badmap")  # a site map file with a field SiteMap lacks
    (root / "models" / "badmap" / "openscope_sites.json").write_text(
        json.dumps({"name": "x", "colour": "red"})
    )

    # Dictionaries that must be refused: truncated weights; a Gemma Scope 1 npz holding a pickle.
    broken = root / "dictionaries" / "truncated"
    shutil.copytree(dictionary, broken)
    params = broken / "params.safetensors"
    params.write_bytes(params.read_bytes()[:300])
    pickled = root / "dictionaries" / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_9"
    pickled.mkdir(parents=True)
    np.savez(pickled / "params.npz", W_enc=np.array([{"run": "code"}], dtype=object))
    # Peers' folders that must be refused: a SAELens folder missing W_dec, a sparsify folder whose
    # weights do not match its cfg.json, a folder of pickles only, an ae.pt that would run code.
    peers = root / "peers"
    (peers / "saelens").mkdir(parents=True)
    save_json(peers / "saelens" / "cfg.json", {"architecture": "standard", "d_in": 4, "d_sae": 8})
    save_file(
        {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "b_dec": torch.zeros(4)},
        str(peers / "saelens" / "sae_weights.safetensors"),
    )
    (peers / "sparsify" / "layers.1").mkdir(parents=True)
    save_json(peers / "sparsify" / "layers.1" / "cfg.json", {"d_in": 4, "num_latents": 8, "k": 2})
    weights = {
        "encoder.weight": torch.zeros(6, 4),
        "encoder.bias": torch.zeros(8),
        "W_dec": torch.zeros(8, 4),
        "b_dec": torch.zeros(4),
    }
    save_file(weights, str(peers / "sparsify" / "layers.1" / "sae.safetensors"))
    (peers / "pickles").mkdir()
    (peers / "pickles" / "sae_weights.pt").write_bytes(pickle.dumps({"W_enc": [1.0]}))
    (peers / "evil").mkdir()
    evil = pickle.dumps(os.system)  # unpickling it would hand over os.system: refused by weights_only
    (peers / "evil" / "ae.pt").write_bytes(evil)

    # Stores with damaged manifests or shards, and one whose harvest never finished.
    _store_variant(root, store, "list", lambda m: "[1, 2, 3]")
    _store_variant(root, store, "nokeys", lambda m: {"format": m["format"]})
    _store_variant(root, store, "badjson", lambda m: '{"format": "openscope-activations", ')
    _store_variant(root, store, "escape", lambda m: {**m, "shards": [{**m["shards"][0], "file": "../../x"}]})
    _store_variant(root, store, "incomplete", lambda m: {**m, "complete": False})
    # A store two torchrun ranks were harvesting when they stopped: only rank manifests, no manifest.json.
    ranks2 = _store_variant(
        root, store, "ranks2", lambda m: {**m, "complete": False, "rank": 0, "world_size": 2}
    )
    (ranks2 / "manifest.json").rename(ranks2 / "manifest.rank0.json")
    corrupt = _store_variant(root, store, "corrupt", lambda m: m)
    shard = corrupt / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))

    (root / "links").mkdir()
    os.symlink(store, root / "links" / "store")
    os.symlink(outside, root / "links" / "outside")
    _suite_files(root, tiny_model_dir)
    return World(root, outside, tiny_model_dir)


def _unknown_architecture(folder: Path, tiny: Path) -> None:
    """A tiny OPT (no site map: its blocks sit at model.decoder.layers) with the tiny tokenizer."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny)
    config = OPTConfig(
        vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
        word_embed_proj_dim=16, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    OPTForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def _suite_files(root: Path, model: Path) -> None:
    """Suite plans with one mistake each (plans/), and a suite folder of another plan (suites/other)."""
    from openscope.suite.plan import DataSettings, SuiteItem, SuitePlan
    from openscope.suite.planfile import plan_text

    item = SuiteItem("resid_post/layer_1_width_32_l0_small", "sae", "1.resid_post", 32, 4, 512)
    data = DataSettings(source=str(root / "docs.jsonl"), context_len=32, batch_size=128)
    good = plan_text(SuitePlan(str(model), [item], data))
    (root / "plans").mkdir()
    for name, text in (
        ("good", good),
        ("typo", good.replace("width: 32", "widht: 32")),
        ("width0", good.replace("width: 32", "width: 0")),
        ("l0neg", good.replace("target_l0: 4", "target_l0: -5")),
        ("reserved", good.replace("name: resid_post/", "name: runs/")),
    ):
        (root / "plans" / f"{name}.yaml").write_text(text)
    other = root / "suites" / "other"
    other.mkdir(parents=True)
    plan = {"model": "gemma-3-270m", "items": [{"name": "clt/width_262k_l0_medium"}]}
    save_json(other / "suite.json", {"format": "openscope-suite", "version": 1, "plan": plan, "items": {}})
    entry = {"name": "clt/width_262k_l0_medium", "folder": "clt/width_262k_l0_medium", "status": "pending"}
    save_json(other / "catalogue.json", {"format": "openscope-suite-catalogue", "items": [entry]})


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under the roots: links by target, folders, files by size, mtime and content hash."""
    seen: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):  # never follows links
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                key = str(path)
                if path.is_symlink():
                    seen[key] = ("link", os.readlink(path))
                elif path.is_dir():
                    seen[key] = ("dir",)
                else:
                    stat = path.stat()
                    seen[key] = (
                        "file",
                        stat.st_size,
                        stat.st_mtime_ns,
                        hashlib.sha1(path.read_bytes()).hexdigest(),
                    )
    return seen


def refused(world: World, args: list[str], expect: str, cwd: Path | None, capsys, monkeypatch) -> None:
    """Run the CLI; it must exit 2 with one `error:` line holding `expect`, and change no file."""
    before = snapshot(world.root, world.outside, world.model)
    monkeypatch.chdir(cwd or world.root / "empty")
    status = run(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err
    assert status == 2, err
    assert len(errors) == 1, err
    assert expect in errors[0], errors[0]
    after = snapshot(world.root, world.outside, world.model)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{args} changed {changed}"


# ---- the table -------------------------------------------------------------------------------------------

W = "{w}"
"""Stands for the world's root in a case's arguments."""
M = "{m}"
"""Stands for the tiny model's folder."""
DICT = "{w}/dicts/1_resid_post_sae_jumprelu_w32"
STORE = "{w}/st/s"
HARVEST = ["harvest", "--model", M, "--source", f"{W}/docs.jsonl", "--context-len", "32", "--tokens", "256"]
TRAIN = ["train", "--store", STORE, "--width", "32", "--batch-size", "128", "--tokens", "256"]
FTUNE = ["train", "--model", M, "--source", f"{W}/docs.jsonl", "--context-len", "32", "--finetune", "kl"]
FTDICT = ["--init-from", f"{W}/dicts", "--batch-size", "64", "--tokens", "64"]
EVAL = ["eval", "--dictionaries", DICT, "--model", M, "--source", f"{W}/docs.jsonl", "--tokens", "64"]
FEATURES = ["features", "--dictionaries", DICT, "--store", STORE, "--tokens", "256"]
CHAT = ["--model", M, "--positive", f"{W}/docs.jsonl", "--negative", f"{W}/docs.jsonl"]
SUITE = ["suite", "plan", "--preset", "minimal", "--output", f"{W}/p.yaml"]
RUN = ["suite", "run", f"{W}/plans/good.yaml", "--output"]

CASES: list[tuple[str, list[str], str, str | None]] = [
    # (id, arguments, text the error names, working folder below the world: None = the world itself)
    # harvest: never empty a folder that is not a store, whatever --overwrite says
    ("harvest-dot", [*HARVEST, "--output", "."], "holds notes.txt, sub/", "user"),
    (
        "harvest-dot-overwrite",
        [*HARVEST, "--output", ".", "--overwrite"],
        "which openscope did not write",
        "user",
    ),
    ("harvest-user-overwrite", [*HARVEST, "--output", f"{W}/user", "--overwrite"], "holds notes.txt", None),
    ("harvest-world-overwrite", [*HARVEST, "--output", W, "--overwrite"], "which this command reads", None),
    ("harvest-output-file", [*HARVEST, "--output", f"{W}/afile"], "exists and is not a folder", None),
    ("harvest-output-link", [*HARVEST, "--output", f"{W}/links/store"], "is a symbolic link", None),
    (
        "harvest-other-store",
        [*HARVEST, "--output", STORE, "--sites", "0.mlp_out"],
        "holds a different store",
        None,
    ),
    ("harvest-corrupt-store", [*HARVEST, "--output", f"{W}/stores/corrupt"], "holds a different store", None),
    ("harvest-binary-jsonl", [*HARVEST[:4], f"{W}/bin.jsonl", "--output", f"{W}/n"], "not UTF-8 text", None),
    (
        "harvest-binary-arrow",
        [*HARVEST[:4], f"{W}/bin.arrow", "--output", f"{W}/n"],
        "not an Arrow file",
        None,
    ),
    ("harvest-binary-parquet", [*HARVEST[:4], f"{W}/bin.parquet", "--output", f"{W}/n"], "cannot read", None),
    (
        "harvest-no-source",
        [*HARVEST[:4], f"{W}/missing.txt", "--output", f"{W}/n"],
        "unknown text source",
        None,
    ),
    (
        "harvest-slice",
        [*HARVEST[:4], f"{W}/docs.jsonl[5:5]", "--output", f"{W}/n"],
        "selects no documents",
        None,
    ),
    ("harvest-roles", [*HARVEST, "--roles", "model", "--output", f"{W}/n"], "needs a chat source", None),
    ("harvest-cuda", [*HARVEST, "--device", "cuda", "--output", f"{W}/n"], "CUDA is not available", None),
    ("harvest-banana", [*HARVEST, "--device", "banana", "--output", f"{W}/n"], "unknown device", None),
    ("harvest-tokens-0", [*HARVEST, "--tokens", "0", "--output", f"{W}/n"], "must be positive", None),
    ("harvest-tokens-abc", [*HARVEST, "--tokens", "abc", "--output", f"{W}/n"], "--tokens", None),
    ("harvest-context-1", [*HARVEST, "--context-len", "1", "--output", f"{W}/n"], "context_len", None),
    ("harvest-shard-mb-0", [*HARVEST, "--shard-mb", "0", "--output", f"{W}/n"], "must be positive", None),
    ("harvest-layer", [*HARVEST, "--sites", "99.resid_post", "--output", f"{W}/n"], "out of range", None),
    ("harvest-kind", [*HARVEST, "--sites", "1.banana", "--output", f"{W}/n"], "unknown site", None),
    ("harvest-dtype", [*HARVEST, "--dtype", "float8", "--output", f"{W}/n"], "unknown dtype", None),
    ("harvest-flag", [*HARVEST, "--bogus"], "No such option", None),
    # harvest into an object store (fsspec URL): unwritable, a filesystem whose package is missing, another world size
    (
        "harvest-url-unwritable",
        [*HARVEST, "--output", "file:///proc/openscope-acts"],
        "cannot write to store URL file:///proc/openscope-acts",
        None,
    ),
    (
        "harvest-url-package",
        [*HARVEST, "--output", "gs://bucket/acts"],
        "store URL gs://bucket/acts needs gcsfs",
        None,
    ),
    (
        "harvest-ranks-resume",
        [*HARVEST, "--output", f"{W}/stores/ranks2"],
        "harvested by 2 process(es), but this run has 1",
        None,
    ),
    (
        "harvest-ranks-other-sites",
        [*HARVEST, "--sites", "0.attn_out", "--output", f"{W}/stores/ranks2"],
        "harvested by 2 process(es)",
        None,
    ),
    (
        "show-url-missing",
        ["show", "memory://nothing/here"],
        "memory://nothing/here is not an activation store",
        None,
    ),
    ("show-url-unreachable", ["show", "http://127.0.0.1:9/acts"], "store URL http://127.0.0.1:9/acts", None),
    (
        "show-url-secret",
        ["show", "memory://me:hunter2@bucket/x"],
        "memory://***@bucket/x is not an activation store",
        None,
    ),
    # any model that cannot be loaded
    ("model-badcfg", ["sites", "--model", f"{W}/models/badcfg"], "cannot load the model", None),
    ("model-unknown-type", ["sites", "--model", f"{W}/models/unknown"], "cannot load the model", None),
    ("model-no-weights", ["sites", "--model", f"{W}/models/noweights"], "cannot load the model", None),
    ("model-truncated", ["sites", "--model", f"{W}/models/truncated"], "cannot load the model", None),
    ("model-not-a-model", ["sites", "--model", f"{W}/user"], "not a Hugging Face model directory", None),
    ("model-unknown-name", ["sites", "--model", "no-such-model"], "unknown model", None),
    (
        "model-unknown-architecture",
        ["sites", "--model", f"{W}/models/opt"],
        "openscope does not know OPTForCausalLM (model_type 'opt'): no site map for its OPTDecoderLayer",
        None,
    ),
    ("model-bad-site-map", ["sites", "--model", f"{W}/models/badmap"], "unknown field 'colour'", None),
    # --device cuda where CUDA is not available: one line, whatever the command
    ("eval-cuda", [*EVAL, "--device", "cuda", "--output", f"{W}/n"], "CUDA is not available", None),
    (
        "features-cuda",
        [*FEATURES, "--device", "cuda", "--output", f"{W}/n.db"],
        "CUDA is not available",
        None,
    ),
    (
        "attribute-cuda",
        ["attribute", "hi", "--dictionaries", DICT, "--device", "cuda", "--output", f"{W}/g.json"],
        "CUDA is not available",
        None,
    ),
    ("serve-cuda", ["serve", "--db", f"{W}/features.db", "--device", "cuda"], "CUDA is not available", None),
    (
        "chat-cuda",
        ["chat", "contrast", *CHAT, "--device", "cuda", "--output", f"{W}/n"],
        "CUDA is not available",
        None,
    ),
    ("suite-run-cuda", [*RUN, f"{W}/n", "--device", "cuda"], "CUDA is not available", None),
    # train: a run folder is replaced only with --overwrite, and only if openscope trained into it
    ("train-again", [*TRAIN, "--output", f"{W}/dicts"], "already holds a run's checkpoint", None),
    ("train-user-overwrite", [*TRAIN, "--output", f"{W}/user", "--overwrite"], "holds notes.txt", None),
    ("train-dot-overwrite", [*TRAIN, "--output", ".", "--overwrite"], "openscope did not write", "user"),
    ("train-output-file", [*TRAIN, "--output", f"{W}/afile"], "exists and is not a folder", None),
    ("train-resume-nothing", [*TRAIN, "--output", f"{W}/empty", "--resume"], "no checkpoint", None),
    (
        "train-store-user",
        ["train", "--store", f"{W}/user", "--output", f"{W}/n"],
        "not an activation store",
        None,
    ),
    (
        "train-store-missing",
        ["train", "--store", f"{W}/nope", "--output", f"{W}/n"],
        "not an activation store",
        None,
    ),
    (
        "train-incomplete",
        ["train", "--store", f"{W}/stores/incomplete", "--output", f"{W}/n"],
        "incomplete",
        None,
    ),
    (
        "train-corrupt-shard",
        ["train", "--store", f"{W}/stores/corrupt", "--output", f"{W}/n"],
        "corrupt",
        None,
    ),
    ("train-site", [*TRAIN, "--sites", "9.resid_post", "--output", f"{W}/n"], "holds no site", None),
    ("train-site-pattern", [*TRAIN, "--sites", "*.mlp_out", "--output", f"{W}/n"], "matches no site", None),
    (
        "train-checkpoint-0",
        [*TRAIN, "--checkpoint-every", "0", "--output", f"{W}/n"],
        "--checkpoint-every",
        None,
    ),
    ("train-log-0", [*TRAIN, "--log-every", "0", "--output", f"{W}/n"], "--log-every must be positive", None),
    ("train-matryoshka", [*TRAIN, "--matryoshka", "a,b", "--output", f"{W}/n"], "--matryoshka", None),
    ("train-width-0", [*TRAIN, "--width", "0", "--output", f"{W}/n"], "--width must be positive", None),
    ("train-lr-nan", [*TRAIN, "--lr", "nan", "--output", f"{W}/n"], "--lr must be a finite number", None),
    ("train-lr-inf", [*TRAIN, "--lr", "inf", "--output", f"{W}/n"], "--lr must be a finite number", None),
    (
        "train-target-l0",
        [*TRAIN, "--target-l0", "-1", "--output", f"{W}/n"],
        "--target-l0 must be positive",
        None,
    ),
    ("train-fire-rate", [*TRAIN, "--max-fire-rate", "2", "--output", f"{W}/n"], "between 0 and 1", None),
    # several widths and targets per run
    (
        "train-width-list-0",
        [*TRAIN, "--width", "0,8", "--output", f"{W}/n"],
        "--width must be comma-separated positive integers, got '0,8'",
        None,
    ),
    ("train-width-twice", [*TRAIN, "--width", "8,8", "--output", f"{W}/n"], "--width lists 8 twice", None),
    ("train-log-unknown", [*TRAIN, "--log", "mlflow", "--output", f"{W}/n"], "--log takes wandb or", None),
    ("train-eval-every", [*TRAIN, "--eval-every", "-1", "--output", f"{W}/n"], "--eval-every must be", None),
    (
        "train-eval-tokens",
        [*TRAIN, "--eval-every", "5", "--eval-tokens", "1000000", "--output", f"{W}/n"],
        "hold out at most a fifth",
        None,
    ),
    (
        "train-eval-live",
        ["train", "--model", M, "--source", f"{W}/docs.jsonl", "--eval-every", "5", "--output", f"{W}/n"],
        "a live run (--model) has no store",
        None,
    ),
    # --finetune kl: a live model, trained dictionaries of this run's sites and width, β >= 0
    (
        "train-finetune-store",
        [*TRAIN, "--finetune", "kl", "--init-from", f"{W}/dicts", "--output", f"{W}/n"],
        "pass --model",
        None,
    ),
    ("train-finetune-no-init", [*FTUNE, "--output", f"{W}/n"], "pass --init-from", None),
    (
        "train-finetune-beta",
        [*FTUNE, *FTDICT, "--beta", "-1", "--output", f"{W}/n"],
        "--beta must be zero or more",
        None,
    ),
    ("train-beta-alone", [*TRAIN, "--beta", "1", "--output", f"{W}/n"], "pass --finetune kl too", None),
    ("train-finetune-kind", [*FTUNE, *FTDICT, "--kind", "clt", "--output", f"{W}/n"], "not --kind clt", None),
    (
        "train-finetune-word",
        [*TRAIN, "--finetune", "mse", "--output", f"{W}/n"],
        "unknown --finetune 'mse'",
        None,
    ),
    (
        "train-finetune-site",
        [*FTUNE, *FTDICT, "--sites", "0.resid_post", "--output", f"{W}/n"],
        "has no dictionary for 0.resid_post",
        None,
    ),
    (
        "train-finetune-width",
        [*FTUNE, *FTDICT, "--sites", "1.resid_post", "--width", "16", "--output", f"{W}/n"],
        "the saved dictionary has width 32, this run 16",
        None,
    ),
    (
        "train-target-l0-word",
        [*TRAIN, "--target-l0", "a", "--output", f"{W}/n"],
        "--target-l0 must be comma-separated positive numbers, got 'a'",
        None,
    ),
    (
        "train-target-l0-list-inf",
        [*TRAIN, "--target-l0", "10,inf", "--output", f"{W}/n"],
        "--target-l0 must be comma-separated positive numbers",
        None,
    ),
    (
        "train-clt-width-list",
        [*TRAIN, "--kind", "clt", "--width", "8,16", "--output", f"{W}/n"],
        "--width takes one value for --kind clt",
        None,
    ),
    (
        "train-clt-target-list",
        [*TRAIN, "--kind", "skip_clt", "--target-l0", "5,10", "--output", f"{W}/n"],
        "--target-l0 takes one value for --kind skip_clt",
        None,
    ),
    # crosscoders: one site kind at chosen layers, each held by the store
    (
        "train-crosscoder-two-kinds",
        [*TRAIN, "--kind", "crosscoder", "--sites", "1.resid_post,1.mlp_out", "--output", f"{W}/n"],
        "a crosscoder reads one site kind at chosen layers; --sites 1.resid_post,1.mlp_out names mlp_out and resid_post",
        None,
    ),
    (
        "train-crosscoder-missing-site",
        [*TRAIN, "--kind", "crosscoder", "--sites", "0,1.resid_post", "--output", f"{W}/n"],
        "a crosscoder on 0.resid_post needs that site, which the data does not hold (it has 1.resid_post)",
        None,
    ),
    (
        "train-crosscoder-live-all",
        ["train", "--model", M, "--kind", "crosscoder", "--output", f"{W}/n"],
        "a live crosscoder needs its sites named",
        None,
    ),
    ("train-cuda", [*TRAIN, "--device", "cuda", "--output", f"{W}/n"], "CUDA is not available", None),
    ("train-tf32-cpu", [*TRAIN, "--precision", "tf32", "--output", f"{W}/n"], "tf32 needs a CUDA", None),
    ("train-precision", [*TRAIN, "--precision", "fp8", "--output", f"{W}/n"], "unknown --precision", None),
    (
        "train-data-parallel-world",
        [*TRAIN, "--data-parallel", "2", "--output", f"{W}/n"],
        "--data-parallel 2 does not divide the 1 process of this run; choose one of 1",
        None,
    ),
    # eval
    ("eval-output-file", [*EVAL, "--output", f"{W}/afile"], "exists and is not a folder", None),
    ("eval-output-user", [*EVAL, "--output", f"{W}/user", "--overwrite"], "holds notes.txt", None),
    ("eval-output-dot", [*EVAL, "--output", "."], "holds notes.txt", "user"),
    ("eval-into-cwd", [*EVAL, "--output", ".", "--overwrite"], "is the current folder", "report"),
    ("eval-again", [*EVAL, "--output", f"{W}/report"], "holds a report already", None),
    (
        "eval-no-dictionary",
        ["eval", "--dictionaries", f"{W}/nope", "--output", f"{W}/n"],
        "no dictionary folder",
        None,
    ),
    (
        "eval-user-dictionary",
        ["eval", "--dictionaries", f"{W}/user", "--output", f"{W}/n"],
        "holds no dictionary",
        None,
    ),
    (
        "eval-truncated",
        ["eval", "--dictionaries", f"{W}/dictionaries/truncated", "--output", f"{W}/n"],
        "truncated or corrupt",
        None,
    ),
    (
        "eval-pickle",
        ["eval", "--dictionaries", f"{W}/dictionaries/gemma-scope-2b-pt-res", "--output", f"{W}/n"],
        "unpickling",
        None,
    ),
    ("eval-tokens-0", [*EVAL, "--tokens", "0", "--output", f"{W}/n"], "must be positive", None),
    ("eval-roles", [*EVAL, "--roles", "model", "--output", f"{W}/n"], "needs a chat source", None),
    # SAEBench's evals: the format, the labelled sets of --probing, --absorption's word count
    (
        "eval-format",
        [*EVAL, "--format", "csv", "--output", f"{W}/n"],
        "--format must be openscope or saebench",
        None,
    ),
    (
        "eval-probing-one-class",
        [*EVAL, "--probing", "--probing-tasks", f"{W}/one_class.jsonl", "--output", f"{W}/n"],
        "has 1 class (a): probing needs at least two",
        None,
    ),
    (
        "eval-probing-unlabelled",
        [*EVAL, "--probing", "--probing-tasks", f"{W}/docs.jsonl", "--output", f"{W}/n"],
        "not an object with a text and a label",
        None,
    ),
    (
        "eval-probing-unknown",
        [*EVAL, "--probing", "--probing-tasks", "nope", "--output", f"{W}/n"],
        "unknown labelled set 'nope'",
        None,
    ),
    (
        "eval-probing-truncated",
        [
            "eval",
            "--dictionaries",
            f"{W}/dictionaries/truncated",
            "--probing",
            "--probing-tasks",
            "language",
            "--output",
            f"{W}/n",
        ],
        "truncated or corrupt",
        None,
    ),
    (
        "eval-absorption-words",
        [*EVAL, "--absorption", "--absorption-words", "3", "--output", f"{W}/n"],
        "--absorption-words must be at least 10",
        None,
    ),
    # features: never write into a file that is not our database
    (
        "features-foreign-sqlite",
        [*FEATURES, "--output", f"{W}/other.sqlite"],
        "not an openscope feature database",
        None,
    ),
    ("features-not-sqlite", [*FEATURES, "--output", f"{W}/afile"], "not an openscope feature database", None),
    ("features-folder", [*FEATURES, "--output", f"{W}/user"], "is a folder", None),
    (
        "features-store-user",
        ["features", "--dictionaries", DICT, "--store", f"{W}/user", "--output", f"{W}/n.db"],
        "not an activation store",
        None,
    ),
    (
        "features-export-user",
        [*FEATURES, "--output", f"{W}/features.db", "--export", f"{W}/exports"],
        "holds notes.txt",
        None,
    ),
    (
        "features-tokens-0",
        [*FEATURES, "--tokens", "0", "--output", f"{W}/n.db"],
        "tokens must be at least 1",
        None,
    ),
    # export: never delete a folder holding its own inputs, the current folder, or a user's files
    (
        "export-dot",
        ["export", DICT, "--to", "saelens", "--out", ".", "--overwrite"],
        "which this command reads",
        "dicts",
    ),
    (
        "export-parent",
        ["export", DICT, "--to", "saelens", "--out", f"{W}/dicts", "--overwrite"],
        "which this command reads",
        None,
    ),
    (
        "export-user",
        ["export", DICT, "--to", "saelens", "--out", f"{W}/user", "--overwrite"],
        "holds notes.txt",
        None,
    ),
    (
        "export-link",
        ["export", DICT, "--to", "saelens", "--out", f"{W}/links/outside"],
        "is a symbolic link",
        None,
    ),
    ("export-format", ["export", DICT, "--to", "banana", "--out", f"{W}/n"], "unknown export format", None),
    ("export-missing", ["export", f"{W}/nope", "--to", "saelens", "--out", f"{W}/n"], "no folder at", None),
    (
        "export-pickle",
        ["export", f"{W}/dictionaries/gemma-scope-2b-pt-res", "--to", "saelens", "--out", f"{W}/n"],
        "unpickling",
        None,
    ),
    # export from a Hub name with a typo, or from peers' damaged folders
    (
        "export-hub-typo",
        [
            "export",
            "hf://google/gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_meduim",
            "--to",
            "saelens",
            "--out",
            f"{W}/n",
        ],
        "nearest: resid_post/layer_9_width_16k_l0_medium",
        None,
    ),
    (
        "export-release-typo",
        [
            "export",
            "gemma-scope-2-270m-pt-rse:layer_9_width_16k_l0_medium",
            "--to",
            "saelens",
            "--out",
            f"{W}/n",
        ],
        "unknown release 'gemma-scope-2-270m-pt-rse'; nearest: gemma-scope-2-270m-pt-res",
        None,
    ),
    (
        "export-peer-keys",
        ["export", f"{W}/peers/saelens", "--to", "gemma-scope", "--out", f"{W}/n"],
        "is missing W_dec",
        None,
    ),
    (
        "export-peer-shape",
        ["export", f"{W}/peers/sparsify", "--to", "gemma-scope", "--out", f"{W}/n"],
        "but cfg.json",
        None,
    ),
    (
        "export-peer-pickles",
        ["export", f"{W}/peers/pickles", "--to", "saelens", "--out", f"{W}/n"],
        "never unpickles",
        None,
    ),
    (
        "export-peer-evil",
        ["export", f"{W}/peers/evil", "--to", "saelens", "--out", f"{W}/n"],
        "refusing to unpickle",
        None,
    ),
    (
        "export-from-wrong",
        ["export", DICT, "--from", "saelens", "--to", "saelens", "--out", f"{W}/n"],
        "--from saelens, but",
        None,
    ),
    # show: damaged manifests
    ("show-user", ["show", f"{W}/user"], "not an activation store", None),
    ("show-list", ["show", f"{W}/stores/list"], "not an openscope activation store manifest", None),
    ("show-nokeys", ["show", f"{W}/stores/nokeys"], "is damaged", None),
    ("show-badjson", ["show", f"{W}/stores/badjson"], "is corrupt", None),
    ("show-escape", ["show", f"{W}/stores/escape"], "is damaged: shard entry 0 names '../../x'", None),
    # serve: settings refused before anything starts
    ("serve-port", ["serve", "--db", f"{W}/features.db", "--port", "99999"], "--port must be between", None),
    (
        "serve-db-foreign",
        ["serve", "--db", f"{W}/other.sqlite", "--dictionaries", DICT],
        "not an openscope feature database",
        None,
    ),
    ("serve-db-missing", ["serve", "--db", f"{W}/none.db"], "no feature database", None),
    (
        "serve-max-tokens",
        ["serve", "--db", f"{W}/features.db", "--max-new-tokens", "0"],
        "must be positive",
        None,
    ),
    # attribution: a graph file is replaced only if it is a graph, and only with --overwrite
    (
        "attribute-output-file",
        ["attribute", "hi", "--dictionaries", DICT, "--output", f"{W}/afile"],
        "not a graph file",
        None,
    ),
    (
        "attribute-output-dir",
        ["attribute", "hi", "--dictionaries", DICT, "--output", f"{W}/user"],
        "is a folder",
        None,
    ),
    (
        "attribute-user",
        ["attribute", "hi", "--dictionaries", f"{W}/user", "--output", f"{W}/g.json"],
        "holds no dictionary",
        None,
    ),
    (
        "attribute-memory-limit",
        ["attribute", "hi", "--dictionaries", DICT, "--max-memory-gb", "0", "--output", f"{W}/g.json"],
        "max_memory_gb must be positive",
        None,
    ),
    ("intervene-not-graph", ["intervene", f"{W}/afile", "--zero", "1_2_3"], "afile", None),
    ("intervene-missing", ["intervene", f"{W}/none.json", "--zero", "1_2_3"], "no graph file", None),
    # chat: reports go only where a report may go
    (
        "chat-contrast-user",
        ["chat", "contrast", *CHAT, "--output", f"{W}/user", "--overwrite"],
        "holds notes.txt",
        None,
    ),
    ("chat-contrast-dot", ["chat", "contrast", *CHAT, "--output", "."], "holds notes.txt", "user"),
    (
        "chat-contrast-nan",
        ["chat", "contrast", *CHAT, "--alpha", "nan", "--output", f"{W}/n"],
        "finite number",
        None,
    ),
    ("chat-ablate-user", ["chat", "ablate", "--model", M, "--output", f"{W}/user"], "holds notes.txt", None),
    (
        "chat-ablate-judge-tokens",
        ["chat", "ablate", "--model", M, "--judge", "--max-new-tokens", "0", "--output", f"{W}/n"],
        "--max-new-tokens must be positive",
        None,
    ),
    (
        "chat-jailbreak-judge-tokens",
        ["chat", "jailbreak", "--model", M, "--judge", "--max-new-tokens", "0", "--output", f"{W}/n"],
        "--max-new-tokens must be positive",
        None,
    ),
    (
        "chat-jailbreak-report",
        ["chat", "jailbreak", "--model", M, "--output", f"{W}/report"],
        "holds a report already",
        None,
    ),
    (
        "chat-sweep-file",
        ["chat", "sweep", "--model", M, "--output", f"{W}/afile"],
        "exists and is not a folder",
        None,
    ),
    ("chat-cot-dot", ["chat", "cot", "--model", M, "--output", "."], "holds notes.txt", "user"),
    (
        "chat-cot-questions",
        ["chat", "cot", "--model", M, "--questions", f"{W}/bin.jsonl", "--output", f"{W}/n"],
        "bin.jsonl",
        None,
    ),
    (
        "chat-diff-user",
        ["chat", "diff", "--dictionary", DICT, "--model-a", M, "--model-b", M, "--output", f"{W}/user"],
        "holds notes.txt",
        None,
    ),
    (
        "chat-tokens-binary",
        ["chat", "tokens", "--model", M, "--source", f"chat:{W}/bin.jsonl"],
        "not UTF-8",
        None,
    ),
    (
        "chat-tokens-output",
        ["chat", "tokens", "--model", M, "--source", f"chat:{W}/docs.jsonl", "--output", f"{W}/afile"],
        "not a role count",
        None,
    ),
    (
        "chat-roles-output",
        [
            "chat",
            "roles",
            "--dictionary",
            DICT,
            "--model",
            M,
            "--source",
            f"chat:{W}/docs.jsonl",
            "--output",
            f"{W}/user",
        ],
        "holds notes.txt",
        None,
    ),
    # suite: a plan file replaces only a plan; every setting is checked before anything is written
    ("suite-preset", [*SUITE, "--preset", "gemma-scope-3"], "unknown --preset 'gemma-scope-3'", None),
    ("suite-scale-0", [*SUITE, "--scale", "0"], "--scale must be a positive number", None),
    ("suite-scale-nan", [*SUITE, "--scale", "nan"], "--scale must be a finite number", None),
    ("suite-tokens-0", [*SUITE, "--tokens", "0"], "--tokens must be positive", None),
    (
        "suite-model",
        ["suite", "plan", "--model", "gemma-7", "--output", f"{W}/p.yaml"],
        "unknown model",
        None,
    ),
    ("suite-model-badcfg", ["suite", "plan", "--model", f"{W}/models/badcfg"], "cannot read", None),
    ("suite-accelerator", [*SUITE, "--accelerator", "tpu"], "unknown --accelerator 'tpu'", None),
    (
        "suite-output-file",
        ["suite", "plan", "--output", f"{W}/afile"],
        "is not a suite plan openscope wrote",
        None,
    ),
    ("suite-output-overwrite", ["suite", "plan", "--output", f"{W}/afile", "--overwrite"], "refusing", None),
    ("suite-output-folder", ["suite", "plan", "--output", f"{W}/user"], "is a folder", None),
    ("suite-output-link", ["suite", "plan", "--output", f"{W}/links/store"], "is a symbolic link", None),
    ("suite-cost-missing", ["suite", "cost", f"{W}/nope.yaml"], "not a plan file (no such file)", None),
    ("suite-cost-folder", ["suite", "cost", f"{W}/user"], "not a plan file (a folder)", None),
    ("suite-cost-text", ["suite", "cost", f"{W}/afile"], "a plan must be a mapping", None),
    ("suite-cost-binary", ["suite", "cost", f"{W}/bin.jsonl"], "binary file", None),
    ("suite-cost-store", ["suite", "cost", f"{STORE}/manifest.json"], "not 'openscope-suite-plan'", None),
    ("suite-cost-accelerator", ["suite", "cost", f"{W}/afile", "--accelerator", "v100"], "unknown", None),
    # suite run: the plan is checked whole, and the output folder too, before anything is harvested
    ("suite-run-typo", ["suite", "run", f"{W}/plans/typo.yaml"], "typo.yaml:19: unknown key 'widht'", None),
    (
        "suite-run-width-0",
        ["suite", "run", f"{W}/plans/width0.yaml"],
        "width must be a positive integer",
        None,
    ),
    ("suite-run-l0", ["suite", "run", f"{W}/plans/l0neg.yaml"], "target_l0 must be a positive number", None),
    ("suite-run-reserved", ["suite", "run", f"{W}/plans/reserved.yaml"], "keeps its own 'runs'", None),
    ("suite-run-missing", ["suite", "run", f"{W}/plans/none.yaml"], "not a plan file (no such file)", None),
    ("suite-run-other-plan", [*RUN, f"{W}/suites/other"], "holds the suite of another plan", None),
    ("suite-run-user", [*RUN, f"{W}/user", "--overwrite"], "holds notes.txt", None),
    ("suite-run-store", [*RUN, STORE, "--overwrite"], "which openscope did not write as a suite", None),
    ("suite-run-file", [*RUN, f"{W}/afile"], "exists and is not a folder", None),
    ("suite-run-link", [*RUN, f"{W}/links/outside"], "is a symbolic link", None),
    ("suite-run-device", [*RUN, f"{W}/n", "--device", "tpu"], "unknown device 'tpu'", None),
    ("eval-catalogue-user", ["eval", "--catalogue", f"{W}/user"], "holds no catalogue.json", None),
    ("eval-catalogue-file", ["eval", "--catalogue", f"{W}/afile"], "is not a folder", None),
    ("eval-catalogue-pending", ["eval", "--catalogue", f"{W}/suites/other"], "no finished dictionary", None),
    (
        "serve-suite-user",
        ["serve", "--db", f"{W}/features.db", "--suite", f"{W}/user"],
        "holds no catalogue",
        None,
    ),
    # releases: a release name with a typo gets the nearest names
    (
        "releases-typo",
        ["releases", "gemma-scope-2-270m-pt-resx"],
        "unknown release 'gemma-scope-2-270m-pt-resx'; nearest: gemma-scope-2-270m-pt-res",
        None,
    ),
    # push: a repository id, dictionaries to publish, and a --out that is not a user's folder (--dry-run:
    # no token needed; the missing token is its own test below)
    ("push-no-repo", ["push", DICT, "--dry-run", "--out", f"{W}/n"], "push needs --repo OWNER/NAME", None),
    (
        "push-bad-repo",
        ["push", DICT, "--repo", "a/b/c", "--dry-run", "--out", f"{W}/n"],
        "not a Hub repository id",
        None,
    ),
    (
        "push-nothing",
        ["push", f"{W}/user", "--repo", "me/x", "--dry-run", "--out", f"{W}/n"],
        "no dictionaries found",
        None,
    ),
    (
        "push-missing",
        ["push", f"{W}/nope", "--repo", "me/x", "--dry-run", "--out", f"{W}/n"],
        "no folder at",
        None,
    ),
    (
        "push-out-user",
        ["push", DICT, "--repo", "me/x", "--dry-run", "--out", f"{W}/user", "--overwrite"],
        "holds notes.txt",
        None,
    ),
    (
        "push-eval-none",
        ["push", DICT, "--repo", "me/x", "--dry-run", "--eval", f"{W}/user", "--out", f"{W}/n"],
        "holds no report.json",
        None,
    ),
    # autointerp: a feature database, and an http(s) endpoint checked before any call (a database without
    # the dictionary, a missing key and failing endpoints: tests/test_autointerp.py; reading a WAL database
    # leaves SQLite's -shm/-wal files beside it, which this table's snapshot would count as a change)
    (
        "autointerp-foreign-db",
        ["autointerp", f"{W}/other.sqlite", "--dictionary", "x", "--base-url", "http://127.0.0.1:9/v1"],
        "not an openscope feature database",
        None,
    ),
    (
        "autointerp-no-db",
        ["autointerp", f"{W}/none.db", "--dictionary", "x", "--base-url", "http://127.0.0.1:9/v1"],
        "no feature database",
        None,
    ),
    (
        "autointerp-url",
        ["autointerp", f"{W}/features.db", "--dictionary", "x", "--base-url", "ftp://h"],
        "http(s) URL",
        None,
    ),
]


@pytest.mark.parametrize(("args", "expect", "cwd"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(
    world: World, args: list[str], expect: str, cwd: str | None, capsys, monkeypatch
) -> None:
    argv = [a.replace(W, str(world.root)).replace(M, str(world.model)) for a in args]
    if argv[0] in ("harvest", "train", "eval", "features"):
        argv += ["--device", "cpu"] if "--device" not in argv else []
    refused(world, argv, expect, world.root / cwd if cwd else None, capsys, monkeypatch)


def test_push_without_a_token_is_one_line_and_changes_nothing(world: World, capsys, monkeypatch) -> None:
    """No HF_TOKEN and no stored login: refused before anything is written (`--dry-run` needs none)."""
    import huggingface_hub

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(world.outside / "no-token"))
    argv = ["push", DICT.replace(W, str(world.root)), "--repo", "me/x", "--out", str(world.root / "n")]
    refused(world, argv, "push needs a Hugging Face token", None, capsys, monkeypatch)


@pytest.mark.parametrize(
    ("world_size", "args", "expect"),
    [
        (
            "3",
            [*TRAIN, "--output", f"{W}/n"],
            "--batch-size 128 does not split evenly over 3 data-parallel replicas (3 processes): choose "
            "--batch-size 126 or 129, or --data-parallel 1",
        ),
        ("4", [*TRAIN, "--data-parallel", "3", "--output", f"{W}/n"], "choose one of 1, 2, 4 (or 0: auto)"),
        ("2", [*TRAIN, "--data-parallel", "1", "--output", f"{W}/n"], "so some would idle; choose one of 2"),
        (
            "2",
            [*TRAIN, "--output", f"{W}/dicts", "--resume"],
            "was written by 1 process, this run is 2 processes (1 dictionary group x 2 data-parallel "
            "replicas); resume it with one process",
        ),
    ],
    ids=["train-ranks-batch", "train-ranks-data-parallel", "train-ranks-idle", "train-resume-other-world"],
)
def test_a_torchrun_layout_that_cannot_work_fails_before_any_rank_waits(
    world: World, world_size: str, args: list[str], expect: str, capsys, monkeypatch
) -> None:
    """Under torchrun's environment (this process its rank 0): refused before the process group is
    joined, so every rank fails alike and none waits for another."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    argv = [a.replace(W, str(world.root)) for a in args] + ["--device", "cpu"]
    refused(world, argv, expect, None, capsys, monkeypatch)


def test_the_table_covers_every_command() -> None:
    from openscope.cli import app, chat_app

    commands = {c.name for c in app.registered_commands} | {
        f"chat {c.name}" for c in chat_app.registered_commands
    }
    tried = {c[1][0] if c[1][0] != "chat" else f"chat {c[1][1]}" for c in CASES}
    # `models` reads nothing a user gives; the demo writes only its own folder (tests/test_demo.py).
    assert commands - tried <= {"models", "demo"}


# ---- safety that is not a refusal ------------------------------------------------------------------------


def _harvest_cfg(world: World, out: Path, **kw) -> HarvestConfig:
    base = dict(
        model=str(world.model),
        sites="*.resid_post,*.mlp_out",
        source=str(world.root / "docs.jsonl"),
        tokens=2000,
        context_len=32,
        batch_size=4,
        output=out,
        shard_mb=1,
        device="cpu",
    )
    return HarvestConfig(**{**base, **kw})  # type: ignore[arg-type]


def _bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_a_planted_link_is_never_written_through(world: World, tiny: LoadedModel, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    harvest(_harvest_cfg(world, clean), loaded=tiny, progress=False)
    n = len(ActivationStore(clean).shards)
    assert n >= 3
    # An interrupted store: its last two shards missing, and links planted where the resumed harvest
    # writes its temporary files (shards and manifest), pointing at a file outside the store.
    store = tmp_path / "s"
    shutil.copytree(clean, store)
    manifest = json.loads((store / "manifest.json").read_text())
    for shard in manifest["shards"][-2:]:
        (store / shard["file"]).unlink()
    manifest.update(shards=manifest["shards"][:-2], complete=False)
    save_json(store / "manifest.json", manifest)
    (store / "stats.safetensors").unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("must stay")
    for name in (f"shard_{n - 2:05d}.safetensors.tmp", "manifest.json.tmp", "stats.safetensors.tmp"):
        os.symlink(victim, store / name)
    harvest(_harvest_cfg(world, store), loaded=tiny, progress=False)
    assert victim.read_text() == "must stay"
    assert not [p for p in store.iterdir() if p.is_symlink()]
    assert _bytes(store) == _bytes(clean)  # resumed equals uninterrupted, byte for byte


def test_a_replacement_that_fails_midway_keeps_the_old_store(
    world: World, tiny: LoadedModel, tmp_path: Path, monkeypatch
) -> None:
    import importlib

    h = importlib.import_module("openscope.activations.harvest")  # the module, not the function

    store = tmp_path / "s"
    harvest(_harvest_cfg(world, store, sites="1.resid_post"), loaded=tiny, progress=False)
    before = snapshot(tmp_path)
    real, calls = h.harvest_shard, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(h, "harvest_shard", failing)
    replacement = _harvest_cfg(world, store, overwrite=True)  # other sites, three shards
    with pytest.raises(OSError, match="No space left"):
        harvest(replacement, loaded=tiny, progress=False)
    staged = tmp_path / ".s.openscope-new"
    assert {k: v for k, v in snapshot(tmp_path).items() if ".s.openscope-new" not in k} == before
    assert staged.is_dir()  # the replacement so far, kept to resume
    monkeypatch.setattr(h, "harvest_shard", real)
    result = harvest(replacement, loaded=tiny, progress=False)
    assert result.resumed_shards == 1  # the replacement resumed where it stopped
    assert len(ActivationStore(store).sites) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staged or old folder left


def test_a_swap_cut_between_its_renames_is_finished(world: World, tiny: LoadedModel, tmp_path: Path) -> None:
    from openscope.files import recover

    store = tmp_path / "s"
    harvest(_harvest_cfg(world, store, sites="1.resid_post"), loaded=tiny, progress=False)
    expected = _bytes(store)
    # kill -9 after the old store was moved aside and before the new one was moved in:
    store.rename(tmp_path / ".s.openscope-old")
    shutil.copytree(tmp_path / ".s.openscope-old", tmp_path / ".s.openscope-new")
    recover(store)
    assert _bytes(store) == expected and sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    # ... or before the new one was whole: the old one goes back.
    store.rename(tmp_path / ".s.openscope-old")
    recover(store)
    assert _bytes(store) == expected and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def _train_cfg(world: World, out: Path, **kw) -> TrainConfig:
    base = dict(
        store=world.root / "st" / "s",
        width=32,
        batch_size=64,
        tokens=64 * 12,
        lr=3e-3,
        target_l0=8,
        output=out,
        checkpoint_every=4,
        log_every=1,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_train_replaces_a_run_only_with_overwrite(world: World, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_train_cfg(world, out), progress=False)
    fresh_metrics = (out / "metrics.jsonl").read_text()
    (out / "checkpoint.pt").unlink()  # what used to let a second run replace the first silently
    before = snapshot(tmp_path)
    with pytest.raises(OpenscopeError, match="holds a training run already; pass --overwrite"):
        train(_train_cfg(world, out, seed=1), progress=False)
    assert snapshot(tmp_path) == before
    train(_train_cfg(world, out, overwrite=True), progress=False)
    assert (out / "metrics.jsonl").read_text() == fresh_metrics  # replaced, not appended to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_metrics_match_the_checkpoint_after_a_kill(world: World, tmp_path: Path, monkeypatch) -> None:
    import openscope.train.trainer as trainer  # where the trainer looks up save_checkpoint

    whole = tmp_path / "whole"
    train(_train_cfg(world, whole), progress=False)
    killed = tmp_path / "killed"
    real = trainer.save_checkpoint

    def kill_at_step_8(path, step, *args, **kwargs):
        if step == 8:  # metrics rows of steps 4-7 are on disk; the checkpoint of step 8 never is
            raise KeyboardInterrupt
        return real(path, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", kill_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(_train_cfg(world, killed), progress=False)
    rows = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows][-1] == 7
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    train(_train_cfg(world, killed, resume=True), progress=False)
    assert (killed / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()


def test_a_dictionary_named_dotdot_exports_inside_the_export_folder(
    world: World, tiny: LoadedModel, tmp_path: Path
) -> None:
    folder = tmp_path / "d"
    shutil.copytree(world.root / "dicts" / "1_resid_post_sae_jumprelu_w32", folder)
    (folder / "sub").mkdir()
    exports = tmp_path / "a" / "exports"
    cfg = FeaturesConfig(
        dictionaries=[folder / "sub" / ".."],  # the dictionary's name is now ".."
        store=world.root / "st" / "s",
        output=tmp_path / "f.db",
        tokens=256,
        export=exports,
        export_latents="0-2",
        device="cpu",
    )
    result = compute_features(cfg, loaded=tiny, progress=False)
    assert result.exported and all(p.resolve().is_relative_to(exports.resolve()) for p in result.exported)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["exports"]  # nothing above it


def test_of_two_writers_of_one_name_exactly_one_wins(tmp_path: Path) -> None:
    import threading

    from openscope.files import write_new

    target = tmp_path / "graph.json"
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        barrier.wait()
        wins.append(write_new(target, f"writer {i}".encode()))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == 1 and target.read_text().startswith("writer ")
    assert [p.name for p in tmp_path.iterdir()] == ["graph.json"]  # no temporary files left


def test_stores_reject_a_damaged_manifest_before_reading_shards(world: World) -> None:
    with pytest.raises(OpenscopeError, match="names '../../x'"):
        ActivationStore(world.root / "stores" / "escape")
