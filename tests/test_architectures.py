"""Every architecture of the site table, on a tiny random model built from config: the sites are what the
table says (resid_post is HF's hidden state; mlp_in/mlp_out are the MLP's true input and output; the block
is the sum of its writes), a perfect dictionary spliced at any site kind leaves the logits unchanged, the
pipeline harvest → train → eval → features → attribute runs through the CLI on a saved model, and an
architecture openscope does not know is one line that says how to teach it (a site map file, tested)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import ARCHITECTURES, N_LAYERS, SPECIAL, Arch, D
from conftest import CORPUS, make_tokenizer
from test_eval import perfect_sae

from openscope.cli import run
from openscope.coders.dictionary import in_memory
from openscope.errors import OpenscopeError
from openscope.eval import spliced
from openscope.models import SITE_KINDS, Site, load_model, run_to_sites
from openscope.models.load import LoadedModel, check_attribution_support, find_architecture
from openscope.models.sites import SITE_MAP_FILE, locate, site_width

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = list(ARCHITECTURES)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, LoadedModel]:
    """Every architecture, built once per module (in memory, as load_model would hold it)."""
    out = {}
    for name, arch in ARCHITECTURES.items():
        model = arch.build(len(tokenizer))
        model.requires_grad_(False)
        out[name] = LoadedModel(name, model, tokenizer, find_architecture(model))
    return out


def _ids(loaded: LoadedModel, n: int = 2, t: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(loaded.tokenizer), (n, t), generator=g)
    ids[:, 0] = loaded.tokenizer.bos_token_id
    return ids


def _forward(loaded: LoadedModel, ids: torch.Tensor, **kw):
    with torch.no_grad():
        return loaded.model(input_ids=ids, use_cache=False, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_resid_sites_are_the_hidden_states(models, name):
    loaded = models[name]
    assert loaded.n_layers == N_LAYERS and loaded.d_model == D
    ids = _ids(loaded)
    sites = [Site(layer, kind) for layer in range(N_LAYERS) for kind in ("resid_pre", "resid_post")]
    acts = run_to_sites(loaded, ids, sites)
    hidden = _forward(loaded, ids, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    for layer in range(N_LAYERS):
        torch.testing.assert_close(acts[Site(layer, "resid_pre")], hidden[layer], rtol=0, atol=0)
    for layer in range(N_LAYERS - 1):
        torch.testing.assert_close(acts[Site(layer, "resid_post")], hidden[layer + 1], rtol=0, atol=0)
    # HF's last hidden state is after the final norm, which the site map finds.
    assert loaded.arch.final_norm is not None and loaded.arch.lm_head is not None
    last = acts[Site(N_LAYERS - 1, "resid_post")]
    torch.testing.assert_close(loaded.arch.final_norm(last), hidden[-1])


@pytest.mark.parametrize("name", NAMES)
def test_sites_are_the_blocks_true_reads_and_writes(models, name):
    """mlp_in/mlp_out are the MLP's true input and output (the MLP run on the captured input gives the
    captured output), mlp_in is the MLP's norm of the residual it reads (resid_pre + attention, or
    resid_pre alone in a parallel block), and resid_post = resid_pre + attention write + mlp_out."""
    loaded, arch = models[name], ARCHITECTURES[name]
    ids = _ids(loaded, seed=1)
    for layer in range(N_LAYERS):
        a = run_to_sites(loaded, ids, [Site(layer, k) for k in SITE_KINDS])
        block: Any = loaded.arch.layers[layer]
        with torch.no_grad():
            attn = arch.attn_write(block, a[Site(layer, "attn_out")])
            mlp = arch.mlp_write(block, a[Site(layer, "mlp_in")])
            mlp_in = arch.mlp_input(block, a[Site(layer, "resid_pre")], attn)
        torch.testing.assert_close(mlp, a[Site(layer, "mlp_out")], rtol=0, atol=0)
        torch.testing.assert_close(mlp_in, a[Site(layer, "mlp_in")], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            a[Site(layer, "resid_pre")] + attn + mlp, a[Site(layer, "resid_post")], rtol=1e-5, atol=1e-5
        )
    assert loaded.arch.site_map.parallel == (name == "gpt_neox")


@pytest.mark.parametrize("name", NAMES)
def test_perfect_dictionary_at_every_site_kind_leaves_logits_unchanged(models, name):
    loaded = models[name]
    ids = _ids(loaded, seed=2)
    clean = _forward(loaded, ids).logits
    for kind in SITE_KINDS:
        site = Site(1, kind)
        width = site_width(locate(loaded.arch.layers, loaded.arch.layers_path, site), loaded.d_model)
        with spliced(loaded, in_memory(perfect_sae(width), site)):
            out = _forward(loaded, ids).logits
        torch.testing.assert_close(out, clean, rtol=0, atol=1e-5, msg=f"{name} {site.name}")
    # Splicing does something: a dictionary that reconstructs badly moves the logits.
    broken = perfect_sae(D)
    with torch.no_grad():
        broken.w_dec.mul_(0.5)
    with spliced(loaded, in_memory(broken, Site(1, "mlp_out"))):
        assert (_forward(loaded, ids).logits - clean).abs().max() > 1e-4


def _cli(args: list[str], capsys) -> str:
    status = run(args)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"Document {i}: {CORPUS[i % 5]}"}) + "\n" for i in range(80)))
    return path


def _save(arch: Arch, tokenizer, folder: Path) -> Path:
    model: Any = arch.build(len(tokenizer))  # a PreTrainedModel
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_runs_through_the_cli(name, tokenizer, text: Path, tmp_path: Path, capsys):
    """harvest → train (per-layer transcoders) → eval → features → attribute, on a model saved to a folder."""
    arch = ARCHITECTURES[name]
    model = str(_save(arch, tokenizer, tmp_path / "model"))
    store, dicts = tmp_path / "store", tmp_path / "dicts"
    common = ["--device", "cpu"]
    assert "mlp_out" in _cli(["sites", "--model", model], capsys)
    harvest = ["harvest", "--model", model, "--source", str(text), "--sites", "*.mlp_in,*.mlp_out"]
    _cli([*harvest, "--tokens", "512", "--context-len", "32", "--output", str(store), *common], capsys)
    train = ["train", "--store", str(store), "--kind", "transcoder", "--width", "32", "--target-l0", "8"]
    _cli([*train, "--batch-size", "128", "--tokens", "512", "--output", str(dicts), *common], capsys)
    evaluate = ["eval", "--dictionaries", str(dicts), "--model", model, "--source", str(text)]
    _cli(
        [*evaluate, "--tokens", "128", "--context-len", "32", "--output", str(tmp_path / "report"), *common],
        capsys,
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["dictionaries"]) == N_LAYERS
    assert all(d["fvu"] == d["fvu"] and d["kl"] >= 0 for d in report["dictionaries"])  # finite, no NaN
    db = tmp_path / "features.db"
    _cli(
        [
            "features",
            "--dictionaries",
            str(dicts),
            "--store",
            str(store),
            "--tokens",
            "256",
            "--output",
            str(db),
        ],
        capsys,
    )
    assert db.is_file()
    graph = tmp_path / "graph.json"
    attribute = ["attribute", "The capital of France", "--dictionaries", str(dicts), "--model", model]
    argv = [*attribute, "--output", str(graph), "--batch-size", "8", *common]
    if arch.attribution:
        _cli(argv, capsys)
        info = json.loads(graph.read_text())["metadata"]["openscope"]
        assert [d["layers"] for d in info["dictionaries"]] == [[layer] for layer in range(N_LAYERS)]
        metrics = info["metrics"]
        assert metrics["n_error_nodes"] > 0 and 0 <= metrics["replacement_score"] <= 1
    else:
        assert run(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "attribution does not support" in err[0] and "llama" in err[0], err
        assert not graph.exists()


def test_attribution_reproduces_the_logits_on_every_supported_architecture(models):
    """With error nodes the replacement model is exact on each architecture attribution supports."""
    from attribution_helpers import transcoders

    from openscope.attribution.replacement import ReplacementModel

    for name, arch in ARCHITECTURES.items():
        loaded = models[name]
        ids = _ids(loaded, n=1, t=8, seed=3)
        if not arch.attribution:
            with pytest.raises(OpenscopeError, match="attribution does not support"):
                ReplacementModel(loaded, transcoders(loaded), ids)
            continue
        replacement = ReplacementModel(loaded, transcoders(loaded), ids)
        clean = _forward(loaded, ids).logits[0, -1]
        torch.testing.assert_close(replacement.clean.logits, clean, rtol=0, atol=1e-5)
        run_out = replacement.run(logits=True)
        assert run_out.logits is not None
        torch.testing.assert_close(run_out.logits[0, -1].float(), clean, rtol=1e-4, atol=1e-4, msg=name)


# ---- architectures openscope does not know ---------------------------------------------------------


def _tiny_gptj(tokenizer, folder: Path) -> Path:
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    config = GPTJConfig(
        vocab_size=len(tokenizer), n_embd=D, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, **SPECIAL
    )
    GPTJForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_unknown_architecture_is_one_line_and_a_site_map_file_teaches_it(tokenizer, tmp_path: Path):
    folder = _tiny_gptj(tokenizer, tmp_path / "gptj")
    with pytest.raises(OpenscopeError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert "\n" not in message
    assert "openscope does not know GPTJForCausalLM" in message
    assert "no site map for its GPTJBlock blocks at transformer.h" in message
    assert "llama (Llama, Mistral, Qwen2, Qwen3)" in message
    assert SITE_MAP_FILE in message and "docs/models.md" in message
    # GPT-J runs attention and MLP in parallel on ln_1 of the block's input.
    site_map = {
        "name": "gptj",
        "models": "GPT-J",
        "blocks": ["GPTJBlock"],
        "layers": ["transformer.h"],
        "final_norm": ["transformer.ln_f"],
        "points": {
            "resid_pre": ["", "input"],
            "attn_out": ["attn.out_proj", "input"],
            "mlp_in": ["mlp", "input"],
            "mlp_out": ["mlp", "output"],
            "resid_post": ["", "output"],
        },
        "parallel": True,
    }
    (folder / SITE_MAP_FILE).write_text(json.dumps(site_map))
    loaded = load_model(str(folder))
    assert loaded.arch.site_map.name == "gptj" and loaded.arch.site_map.parallel
    with pytest.raises(OpenscopeError, match="attribution does not support GPT-J"):
        check_attribution_support(loaded)  # a site map file claims no attribution support
    ids = _ids(loaded, seed=4)
    a = run_to_sites(loaded, ids, [Site(1, k) for k in SITE_KINDS])
    block: Any = loaded.arch.layers[1]
    with torch.no_grad():
        mlp = block.mlp(a[Site(1, "mlp_in")])
        attn = block.attn.out_proj(a[Site(1, "attn_out")])
        ln = block.ln_1(a[Site(1, "resid_pre")])
    torch.testing.assert_close(mlp, a[Site(1, "mlp_out")], rtol=0, atol=0)
    torch.testing.assert_close(ln, a[Site(1, "mlp_in")], rtol=0, atol=0)
    torch.testing.assert_close(
        a[Site(1, "resid_pre")] + attn + mlp, a[Site(1, "resid_post")], rtol=1e-5, atol=1e-5
    )
    hidden = _forward(loaded, ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(a[Site(1, "resid_pre")], hidden[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: {**m, "points": {"resid_pre": ["", "input"]}}, "no point for attn_out"),
        (lambda m: {**m, "colour": "red"}, "unknown field 'colour'"),
        (lambda m: {**m, "points": {**m["points"], "mlp_in": ["fc1", "inside"]}}, "not input or output"),
        (lambda m: [m], "must be a JSON object"),
    ],
)
def test_bad_site_map_files_are_one_line(edit, message, tmp_path: Path):
    from openscope.models.sites import site_map_from_json

    good = {
        "name": "x",
        "blocks": ["XBlock"],
        "layers": "model.layers",
        "points": {k: ["", "input"] for k in SITE_KINDS},
    }
    assert site_map_from_json(good, "f.json").layers == ("model.layers",)
    with pytest.raises(OpenscopeError, match=message):
        site_map_from_json(edit(good), "f.json")
