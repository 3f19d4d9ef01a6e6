"""Suite plans on paper: Gemma Scope 2's catalogue by its rules, costs by hand, plan files, bad plans.

No model weights: the Gemma 3 sizes are data, and a local model is only its config.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from openscope.cli import run
from openscope.errors import OpenscopeError
from openscope.models.catalog import GEMMA_3, MULTIMODAL_LAYERS, TEXT_LAYERS, dims_of
from openscope.suite.costs import EFFICIENCY, PEAK_FLOPS, Throughput, coder_shape, suite_cost
from openscope.suite.plan import (
    DataSettings,
    SuiteItem,
    SuitePlan,
    check_plan,
    item_layer_width,
    item_sites,
    train_config,
)
from openscope.suite.planfile import plan_text, read_plan, write_plan
from openscope.suite.presets import (
    GEMMA_SCOPE_2,
    build_plan,
    folder_name,
    kind_of,
    parse_name,
    sweep_layers,
)

M270 = dims_of("gemma-3-270m")


def _plan_270m(**kw) -> SuitePlan:
    return build_plan("gemma-3-270m", M270, "gemma-scope-2", **kw)


# ---- the catalogue ------------------------------------------------------------------------------------------


def test_the_270m_catalogue_has_exactly_the_items_of_the_rules() -> None:
    plan = _plan_270m()
    sweep, n = (5, 9, 12, 15), 18
    # Sweep layers: resid_post at 4 widths, attn_out, mlp_out, transcoder and transcoder+affine at 3, x 3 L0.
    expected = {
        "resid_post": len(sweep) * 4 * 3,
        "attn_out": len(sweep) * 3 * 3,
        "mlp_out": len(sweep) * 3 * 3,
        "transcoder": len(sweep) * 2 * 3 * 3,
        # All layers: 2 widths x 2 L0 targets, transcoders with and without the affine skip.
        "resid_post_all": n * 2 * 2,
        "attn_out_all": n * 2 * 2,
        "mlp_out_all": n * 2 * 2,
        "transcoder_all": n * 2 * 2 * 2,
        "clt": 2,
        "crosscoder": 1,
    }
    assert Counter(i.name.split("/")[0] for i in plan.items) == expected
    kinds = Counter(i.kind for i in plan.items)
    assert kinds == {
        "sae": len(sweep) * (12 + 9 + 9) + n * 3 * 4,
        "transcoder": len(sweep) * 9 + n * 4,
        "skip_transcoder": len(sweep) * 9 + n * 4,
        "clt": 1,
        "skip_clt": 1,
        "crosscoder": 1,
    }
    names = {i.name for i in plan.items}
    for name in (
        "resid_post/layer_9_width_16k_l0_medium",
        "resid_post/layer_15_width_1m_l0_big",
        "transcoder/layer_9_width_65k_l0_big_affine",
        "transcoder_all/layer_3_width_16k_l0_small_affine",
        "clt/width_262k_l0_medium",
        "clt/width_262k_l0_medium_affine",
        "crosscoder/layer_5_9_12_15_width_65k_l0_medium",
    ):
        assert name in names, name
    check_plan(plan, M270)


def test_names_parse_back_into_what_each_item_is() -> None:
    for item in _plan_270m().items:
        parsed = parse_name(item.name)
        assert folder_name(parsed.family, parsed.layers, parsed.width, parsed.l0, parsed.affine) == item.name
        assert kind_of(parsed.family, parsed.affine) == item.kind
        assert parsed.width == item.width
        layers = tuple(s.layer for s in item_sites(item, 18))
        assert parsed.layers == (() if item.kind in ("clt", "skip_clt") else layers)
        assert item.target_l0 == {"small": 10, "medium": 50, "big": 150}[parsed.l0] or "_all/" in item.name
    assert parse_name("clt/width_262k_l0_medium") == ("clt", (), 262_144, "262k", "medium", False)
    with pytest.raises(OpenscopeError, match="not a Gemma Scope 2 folder name"):
        parse_name("resid_post/layer_9_width_16k_l0_huge")


def test_multi_layer_widths_are_totals_split_per_layer() -> None:
    items = {i.name: i for i in _plan_270m().items}
    clt = items["clt/width_262k_l0_medium"]
    assert (clt.kind, clt.sites, clt.width) == ("clt", "0-17.mlp_in", 262_144)
    assert item_layer_width(clt, 18) == 14_560 and 18 * 14_560 == 262_080 <= 262_144
    crosscoder = items["crosscoder/layer_5_9_12_15_width_65k_l0_medium"]
    assert crosscoder.sites == "5,9,12,15.resid_post"
    assert [s.name for s in item_sites(crosscoder, 18)] == [f"{n}.resid_post" for n in (5, 9, 12, 15)]
    assert item_layer_width(crosscoder, 18) == 16_384  # 65,536 over four layers
    one_b = {i.name: i for i in build_plan("gemma-3-1b", dims_of("gemma-3-1b"), "gemma-scope-2").items}
    assert item_layer_width(one_b["crosscoder/layer_7_13_17_22_width_262k_l0_medium"], 26) == 65_536


def test_all_layer_targets_ramp_with_depth() -> None:
    items = {i.name: i for i in _plan_270m().items}
    small = [items[f"transcoder_all/layer_{n}_width_16k_l0_small"].target_l0 for n in range(18)]
    big = [items[f"resid_post_all/layer_{n}_width_262k_l0_big"].target_l0 for n in range(18)]
    assert (small[0], small[-1], big[0], big[-1]) == (10, 20, 60, 120)
    assert small == sorted(small) and big == sorted(big)
    assert items["transcoder_all/layer_3_width_16k_l0_small_affine"].kind == "skip_transcoder"


def test_sweep_layers_and_the_catalogue_of_each_size() -> None:
    for name, dims in GEMMA_3.items():
        assert sweep_layers(dims.n_layers) == GEMMA_SCOPE_2[name].sweep  # the rule reproduces the release
    big = build_plan("gemma-3-4b", dims_of("google/gemma-3-4b-it"), "gemma-scope-2")
    assert not [i for i in big.items if i.kind in ("clt", "skip_clt")]  # CLTs: 270M and 1B only
    assert dims_of("google/gemma-3-4b-pt").layers_path == MULTIMODAL_LAYERS
    assert dims_of("gemma-3-1b").layers_path == TEXT_LAYERS


def test_the_27b_catalogue_is_on_gemma_scope_2s_scale() -> None:
    dims = dims_of("gemma-3-27b")
    plan = build_plan("gemma-3-27b", dims, "gemma-scope-2")
    cost = suite_cost(plan, dims, Throughput({}, 1e11), "h100")
    assert cost.total.parameters > 1e11  # Gemma Scope 2: over 1T over all sizes, pt and it


def test_scale_shrinks_widths_to_powers_of_two_and_tokens() -> None:
    plan = _plan_270m(scale=1 / 512)
    assert len(plan.items) == len(_plan_270m().items)
    for item in plan.items:
        per_layer = item_layer_width(item, 18)
        assert per_layer >= 32 and item.width & (item.width - 1) == 0
        assert parse_name(item.name).width == item.width
        assert item.tokens == round(4e9 / 512)
    assert "resid_post/layer_9_width_32_l0_medium" in {i.name for i in plan.items}  # 16k / 512
    assert build_plan("gemma-3-270m", M270, "minimal", tokens=1000).items[0].tokens == 1000


def test_a_local_model_folder_gives_its_dimensions(tmp_path: Path) -> None:
    text = {"hidden_size": 96, "num_hidden_layers": 7, "num_attention_heads": 3, "head_dim": 40}
    text |= {
        "num_key_value_heads": 1,
        "intermediate_size": 200,
        "vocab_size": 500,
        "model_type": "gemma3_text",
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    dims = dims_of(str(tmp_path))
    assert (dims.d_model, dims.n_layers, dims.attn_width, dims.d_mlp) == (96, 7, 120, 200)
    assert dims.layers_path == MULTIMODAL_LAYERS and dims.gated_mlp
    plan = build_plan(str(tmp_path), dims, "gemma-scope-2", scale=1 / 64)
    assert "crosscoder/layer_2_4_5_6_width_1k_l0_medium" in {i.name for i in plan.items}
    check_plan(plan, dims)
    with pytest.raises(OpenscopeError, match="unknown model 'gemma-7'"):
        dims_of("gemma-7")


# ---- costs by hand --------------------------------------------------------------------------------------------


def test_the_cost_of_one_item_is_the_hand_computation() -> None:
    tokens = 10 * 4096 + 100  # 11 steps of 4096
    item = SuiteItem(
        "transcoder/layer_9_width_16k_l0_medium_affine", "skip_transcoder", "9.mlp_in", 16384, 50, tokens
    )
    data = DataSettings(context_len=1024, batch_size=4096, activations="stored", dtype="bfloat16")
    plan = SuitePlan("gemma-3-270m", [item], data)
    cost = suite_cost(plan, M270, Throughput({}, 1e11), "h100")
    row = cost.items[0]

    d, f = 640, 16384
    enc, dec, skip, biases = d * f, f * d, d * d, f + f + d  # b_enc, threshold, b_dec
    assert row.parameters == enc + dec + skip + biases
    # Training: encoder forward + its weight gradient, decoder forward + weight and latent gradients,
    # skip forward + weight gradient, 2 FLOPs a multiply-add, for 11 full batches.
    assert row.train_flops == 11 * 4096 * (2 * 2 * enc + 3 * 2 * dec + 2 * 2 * skip)
    # Harvest: blocks 0-9; per block q (4 heads x 256), k and v (1 head), o, three MLP matrices, and
    # attention over a mean causal span of 512 (QK^T and AV).
    block = 2 * (640 * 1024 + 2 * 640 * 256 + 1024 * 640 + 3 * 640 * 2048) + 2 * 2 * 1024 * 512
    assert row.harvest_flops == tokens * 10 * block
    assert row.storage_bytes == tokens * (640 + 640) * 2  # mlp_in and mlp_out in bfloat16
    state = 4 * row.parameters  # weights, gradients, Adam's two moments
    assert row.peak_memory_bytes == 4 * (state + 4096 * (640 + 640) + 4096 * 4 * f)
    assert math.isclose(row.seconds_here, (row.harvest_flops + row.train_flops) / 1e11)
    on_h100 = (row.harvest_flops + row.train_flops) / (989e12 * 0.4)
    assert math.isclose(row.seconds_accelerator, on_h100) and PEAK_FLOPS["h100"] * EFFICIENCY == 989e12 * 0.4
    assert cost.total == row._replace(label="total")  # one item: the shared totals are its own


def test_clt_shapes_and_shared_totals() -> None:
    clt = next(i for i in _plan_270m().items if i.name == "clt/width_262k_l0_medium_affine")
    shape = coder_shape(clt, M270)
    f, d = 14_560, 640
    assert shape.encoder == 18 * d * f  # a latent reads its own layer
    assert shape.decoder == f * d * (18 * 19 // 2)  # ... and writes to it and every later one
    assert shape.skip == 18 * d * d and shape.latents == 262_080
    # Two items on the same site: stored once, for the larger budget; one forward to the deepest layer.
    t = 4096
    items = [
        SuiteItem("resid_post/layer_3_width_32_l0_small", "sae", "3.resid_post", 32, 10, 2 * t),
        SuiteItem("resid_post/layer_9_width_32_l0_small", "sae", "9.resid_post", 32, 10, t),
        SuiteItem("resid_post/layer_9_width_64_l0_small", "sae", "9.resid_post", 64, 10, t),
    ]
    plan = SuitePlan("gemma-3-270m", items, DataSettings(context_len=8, dtype="float32"))
    cost = suite_cost(plan, M270, Throughput({}, 1e11), "cpu")
    per_block = cost.items[0].harvest_flops / (2 * t * 4)
    assert math.isclose(cost.total.harvest_flops, per_block * (t * 4 + t * 10))  # 2t to layer 3, t on to 9
    assert cost.total.storage_bytes == (2 * t + t) * 640 * 4
    assert cost.separate_storage_bytes == (2 * t + t + t) * 640 * 4
    assert cost.total.seconds_accelerator == cost.total.seconds_here  # cpu: this machine's speed


# ---- plan files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_plan_file_round_trips(tmp_path: Path, suffix: str) -> None:
    plan = _plan_270m(scale=1 / 256)
    plan.items[0].options = {"lr": 5e-4, "seed": 3}
    plan.defaults["lr"] = 7e-5
    path = write_plan(plan, tmp_path / f"plan{suffix}", overwrite=False)
    again, _ = read_plan(path)
    assert again == plan
    assert plan_text(again, as_json=suffix == ".json") == path.read_text()
    with pytest.raises(OpenscopeError, match="pass --overwrite"):
        write_plan(plan, path, overwrite=False)
    write_plan(plan, path, overwrite=True)


def _edited(tmp_path: Path, old: str, new: str, nth: int = 0) -> tuple[Path, int]:
    """A written 270M plan with the `nth` occurrence of `old` replaced; the path and the line edited."""
    path = write_plan(_plan_270m(scale=1 / 256), tmp_path / "plan.yaml", overwrite=False)
    lines = path.read_text().splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if old in line]
    lines[hits[nth]] = lines[hits[nth]].replace(old, new, 1)
    path.write_text("".join(lines))
    return path, hits[nth] + 1


@pytest.mark.parametrize(
    ("old", "new", "key", "hint"),
    [
        ("width: ", "widht: ", "'widht'", "did you mean 'width'?"),
        ("context_len:", "context_length:", "'context_length'", "did you mean 'context_len'?"),
        ("defaults:", "defualts:", "'defualts'", "did you mean 'defaults'?"),
        ("sparsity:", "sparsty:", "'sparsty'", "did you mean 'sparsity'?"),
    ],
)
def test_a_typo_in_a_key_names_the_key_and_its_line(
    tmp_path: Path, old: str, new: str, key: str, hint: str
) -> None:
    path, line = _edited(tmp_path, old, new, nth=3 if old == "width: " else 0)
    with pytest.raises(OpenscopeError) as exc:
        plan, loc = read_plan(path)
        check_plan(plan, dims_of(plan.model), loc.at)
    message = str(exc.value)
    assert message.startswith(f"{path}:{line}: unknown key {key}") and hint in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("width: 64,", "width: 0,", "width must be a positive integer, got 0"),
        ("target_l0: 10.0", "target_l0: -5", "target_l0 must be a positive number, got -5"),
        ("tokens: 15625000", "tokens: many", "tokens must be a positive integer, got 'many'"),
        ("kind: sae", "kind: saes", "unknown kind 'saes'"),
        ("sites: 9.resid_post", "sites: 20.resid_post", "layer 20 is out of range: the model has 18 layers"),
        ("sites: 9.resid_post", "sites: 9.resid_mid", "kind 'resid_mid' is not one of"),
        ("sites: 9.mlp_in", "sites: 9.mlp_out", "a transcoder reads mlp_in sites"),
        ("activations: stored", "activations: disk", "activations must be stored or live"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_item_and_line(
    tmp_path: Path, old: str, new: str, says: str
) -> None:
    path, line = _edited(tmp_path, old, new)
    plan, loc = read_plan(path)
    with pytest.raises(OpenscopeError) as exc:
        check_plan(plan, dims_of(plan.model), loc.at)
    message = str(exc.value)
    assert message.startswith(f"{path}:{line}: ") and says in message and "\n" not in message


def test_a_plan_for_a_model_without_a_layer_is_refused() -> None:
    plan = build_plan("gemma-3-1b", dims_of("gemma-3-1b"), "gemma-scope-2", scale=1 / 256)
    plan.model = "gemma-3-270m"  # 18 layers: the 1B's sweep layer 22 is not there
    with pytest.raises(OpenscopeError, match=r"item 'resid_post/layer_22_.*out of range: the model has 18"):
        check_plan(plan, M270)


def test_unknown_presets_and_non_positive_settings_are_refused() -> None:
    with pytest.raises(
        OpenscopeError, match="unknown preset 'gemma-scope-3'; choose one of gemma-scope-2, minimal"
    ):
        build_plan("gemma-3-270m", M270, "gemma-scope-3")
    with pytest.raises(OpenscopeError, match="--scale must be a positive number"):
        build_plan("gemma-3-270m", M270, "minimal", scale=0)
    plan = build_plan("gemma-3-270m", M270, "minimal")
    plan.items[0] = dataclasses.replace(plan.items[0], target_l0=0)
    with pytest.raises(OpenscopeError, match="target_l0 must be a positive number, got 0"):
        check_plan(plan, M270)


# ---- from a plan to training ----------------------------------------------------------------------------------


def test_an_item_maps_onto_the_train_config_that_trains_it(tmp_path: Path) -> None:
    plan = _plan_270m()
    plan.defaults["lr"] = 1e-4
    items = {i.name: i for i in plan.items}
    item = items["transcoder_all/layer_3_width_16k_l0_small_affine"]
    item.options = {"seed": 7}
    cfg = train_config(item, plan, tmp_path)
    assert (cfg.kind, cfg.sites, cfg.width, cfg.target_l0, cfg.tokens) == (
        "skip_transcoder",
        "3.mlp_in",
        16384,
        item.target_l0,
        4_000_000_000,
    )
    assert (cfg.model, cfg.source, cfg.context_len, cfg.batch_size) == ("gemma-3-270m", "wiki", 1024, 4096)
    assert (cfg.lr, cfg.seed, cfg.activation, cfg.output) == (1e-4, 7, "jumprelu", tmp_path / item.name)
    clt = train_config(
        items["clt/width_262k_l0_medium"], plan, tmp_path, n_layers=18, store=tmp_path / "acts"
    )
    assert (clt.kind, clt.sites, clt.width, clt.model, clt.store) == (
        "clt",
        "0-17.mlp_in",
        14_560,
        "",
        tmp_path / "acts",
    )
    cross = train_config(items["crosscoder/layer_5_9_12_15_width_65k_l0_medium"], plan, tmp_path, n_layers=18)
    assert (cross.kind, cross.width, cross.target_l0) == ("crosscoder", 16_384, 50.0)


# ---- the command line -----------------------------------------------------------------------------------------


def test_suite_plan_and_cost_on_the_command_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan.yaml"
    args = ["suite", "plan", "--preset", "minimal", "--scale", "0.02", "--output", str(out)]
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "resid_post_all" in printed and "total" in printed and out.is_file()
    plan, _ = read_plan(out)
    assert len(plan.items) == 18 and plan.items[0].width == 64
    assert run(["suite", "cost", str(out), "--accelerator", "a100", "--per-item"]) == 0
    assert "resid_post_all/layer_17_width_64_l0_medium" in capsys.readouterr().out
    assert run(args) == 2  # an existing plan is replaced only with --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert run([*args, "--overwrite"]) == 0
