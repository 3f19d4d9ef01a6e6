"""Loading, the site table, and hooks: captures mean what the site table says they mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openscope.errors import OpenscopeError
from openscope.models import SITE_KINDS, Site, capture, load_model, parse_sites, run_to_sites
from openscope.models.hooks import StopForward
from openscope.models.load import LoadedModel, find_architecture


def _ids(loaded, n=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, loaded.model.config.vocab_size, (n, t), generator=g)
    ids[:, 0] = loaded.tokenizer.bos_token_id
    return ids


def test_resid_post_equals_hidden_states(tiny):
    ids = _ids(tiny)
    sites = parse_sites("*.resid_post", tiny.n_layers)
    acts = run_to_sites(tiny, ids, sites)
    with torch.no_grad():
        hidden = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(tiny.n_layers - 1):
        torch.testing.assert_close(acts[Site(layer, "resid_post")], hidden[layer + 1], rtol=0, atol=0)
    # HF's last hidden state is after the final norm.
    last = acts[Site(tiny.n_layers - 1, "resid_post")]
    assert tiny.arch.final_norm is not None
    torch.testing.assert_close(tiny.arch.final_norm(last), hidden[-1])
    for layer in range(tiny.n_layers):
        pre = run_to_sites(tiny, ids, [Site(layer, "resid_pre")])[Site(layer, "resid_pre")]
        torch.testing.assert_close(pre, hidden[layer], rtol=0, atol=0)


def test_truncated_forward_equals_full_forward(tiny):
    ids = _ids(tiny, seed=1)
    for kind in SITE_KINDS:
        for layer in range(tiny.n_layers):
            site = Site(layer, kind)
            truncated = run_to_sites(tiny, ids, [site])[site]
            with capture(tiny, [site], stop=False) as acts, torch.no_grad():
                tiny.model(input_ids=ids)
            torch.testing.assert_close(truncated, acts[site], rtol=0, atol=0)


def test_truncated_forward_runs_no_later_layer_and_no_head(tiny):
    ran: list[str] = []
    handles = [
        layer.register_forward_hook(lambda *_a, i=i: ran.append(f"layer{i}"))
        for i, layer in enumerate(tiny.arch.layers)
    ]
    assert tiny.arch.lm_head is not None
    handles.append(tiny.arch.lm_head.register_forward_hook(lambda *_a: ran.append("head")))
    try:
        run_to_sites(tiny, _ids(tiny), [Site(0, "mlp_out"), Site(1, "attn_out")])
    finally:
        for h in handles:
            h.remove()
    assert ran == ["layer0"]  # layer 1 stopped inside its attention; nothing after it ran


def test_sites_decompose_the_block(tiny):
    """resid_post = resid_pre + post_attention_norm(o_proj(attn_out)) + mlp_out, and mlp_out = post_ff_norm(mlp(mlp_in))."""
    ids = _ids(tiny, seed=2)
    layer = 1
    sites = [Site(layer, k) for k in SITE_KINDS]
    a = run_to_sites(tiny, ids, sites)
    block = tiny.arch.layers[layer]
    with torch.no_grad():
        attn = block.post_attention_layernorm(block.self_attn.o_proj(a[Site(layer, "attn_out")]))
        mlp = block.post_feedforward_layernorm(block.mlp(a[Site(layer, "mlp_in")]))
    torch.testing.assert_close(mlp, a[Site(layer, "mlp_out")])
    torch.testing.assert_close(a[Site(layer, "resid_pre")] + attn + mlp, a[Site(layer, "resid_post")])
    assert a[Site(layer, "attn_out")].shape[-1] == 4 * 16  # heads x head_dim, before W_O


def test_parse_sites_patterns():
    assert parse_sites("6.resid_post", 18) == [Site(6, "resid_post")]
    assert parse_sites("layer 6 resid_post", 18) == [Site(6, "resid_post")]
    assert parse_sites("*.mlp_out", 18) == [Site(i, "mlp_out") for i in range(18)]
    assert parse_sites("mlp_out", 4) == [Site(i, "mlp_out") for i in range(4)]
    assert parse_sites("1-2.attn_out, 0.resid_pre", 4) == [
        Site(0, "resid_pre"),
        Site(1, "attn_out"),
        Site(2, "attn_out"),
    ]
    assert parse_sites("3.*", 4) == [Site(3, k) for k in SITE_KINDS]
    assert (
        parse_sites("mid.resid_post", 18)
        == parse_sites("layer mid resid_post", 18)
        == [Site(9, "resid_post")]
    )
    assert Site.from_name("6.resid_post") == Site(6, "resid_post")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("6.resid_mid", "not one of resid_pre, attn_out, mlp_in, mlp_out, resid_post"),
        ("18.resid_post", "layer 18 is out of range: the model has 18 layers (0-17)"),
        ("x.mlp_out", "bad layer selector"),
        ("", "no sites given"),
    ],
)
def test_parse_sites_errors(spec, message):
    with pytest.raises(OpenscopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_sites(spec, 18)


def test_load_errors(tmp_path: Path):
    with pytest.raises(OpenscopeError, match="unknown model 'no-such-model'.*gemma-3-270m"):
        load_model("no-such-model")
    with pytest.raises(OpenscopeError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path))


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_stop_forward_is_swallowed_only_by_run_to_sites(tiny):
    n_hooks = hook_count(tiny.model)
    with capture(tiny, [Site(0, "resid_post")]), pytest.raises(StopForward), torch.no_grad():
        assert hook_count(tiny.model) == n_hooks + 1
        tiny.model(input_ids=_ids(tiny))
    assert hook_count(tiny.model) == n_hooks  # removed although the forward ended in an exception
    run_to_sites(tiny, _ids(tiny), [Site(0, "attn_out"), Site(1, "mlp_in")])
    assert hook_count(tiny.model) == n_hooks


def test_multimodal_gemma3_layers_are_found(tiny):
    """Gemma 3 4B+ checkpoints wrap the text model: layers sit under model.language_model.layers."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = tiny.model.config.to_dict()
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config).eval()
    arch = find_architecture(model)
    assert arch.layers_path == "model.language_model.layers"
    assert len(arch.layers) == tiny.n_layers
    wrapped = LoadedModel("tiny-multimodal", model, tiny.tokenizer, arch)
    ids = _ids(tiny, seed=3)
    acts = run_to_sites(wrapped, ids, [Site(0, "resid_post"), Site(1, "mlp_in")])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[Site(0, "resid_post")], hidden[1], rtol=0, atol=0)
    assert wrapped.d_model == 64
