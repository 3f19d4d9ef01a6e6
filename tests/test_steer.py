"""Steering on the tiny model: edits are exactly what they claim, and generation is deterministic."""

from __future__ import annotations

import pytest
import torch

from openscope.coders.clt import CLTConfig, CrossLayerCoder
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory
from openscope.errors import OpenscopeError
from openscope.features.schema import SteerIntervention, SteerRequest
from openscope.interventions.steer import (
    Intervention,
    StepState,
    generate,
    generate_ids,
    output_direction,
    steer_request,
    steering,
    top_latents,
)
from openscope.models.hooks import run_to_sites
from openscope.models.sites import SITE_KINDS, Site
from openscope.models.tokens import prompt_ids

SITE = Site(1, "resid_post")
PROMPT = "The capital of France is"


def coder(width: int = 32, kind: str = "sae", seed: int = 0, scale_out: float = 1.0) -> SparseCoder:
    c = SparseCoder(CoderConfig(d_in=64, d_out=64, width=width, kind=kind, activation="relu", seed=seed))  # type: ignore[arg-type]
    with torch.no_grad():
        c.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    c.set_scales(1.0, scale_out)
    return c.eval()


@pytest.fixture(scope="module")
def sae() -> Dictionary:
    return in_memory(coder(scale_out=2.0), SITE, name="sae")


@pytest.fixture(scope="module")
def transcoder() -> Dictionary:
    return in_memory(coder(24, "transcoder", seed=3), Site(2, "mlp_in"), Site(2, "mlp_out"), name="tc")


def all_sites(n_layers: int) -> list[Site]:
    return [Site(layer, kind) for layer in range(n_layers) for kind in SITE_KINDS]


def run_all(tiny, ids, interventions=()) -> dict[Site, torch.Tensor]:
    """Every site's activation in one forward, read after the steering hooks."""
    with steering(tiny, interventions):
        return run_to_sites(tiny, ids, all_sites(tiny.n_layers))


def test_add_changes_the_site_by_exactly_s_times_the_direction_and_nothing_before(tiny, sae):
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    clean = run_all(tiny, ids)
    s, pos = 3.5, 4
    steered = run_all(tiny, ids, [Intervention(sae, 7, "add", s, (pos,))])
    delta = steered[SITE] - clean[SITE]
    want = torch.zeros_like(delta)
    want[0, pos] = s * sae.coder.w_dec[7].detach() * 2.0  # × C_out: the latent's output direction
    assert torch.allclose(delta, want, atol=1e-5)
    assert torch.allclose(output_direction(sae.coder, 7), sae.coder.w_dec[7].detach() * 2.0)  # type: ignore[arg-type]
    for site in all_sites(tiny.n_layers):
        if site.order < SITE.order:
            assert torch.equal(steered[site], clean[site]), site
    assert not torch.allclose(steered[Site(2, "resid_post")][0, pos:], clean[Site(2, "resid_post")][0, pos:])
    # Positions before the edited one never see it (causal attention).
    assert torch.allclose(
        steered[Site(2, "resid_post")][0, :pos], clean[Site(2, "resid_post")][0, :pos], atol=1e-5
    )


def test_add_at_every_position(tiny, sae):
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    clean = run_all(tiny, ids)[SITE]
    steered = run_all(tiny, ids, [Intervention(sae, 2, "add", -1.25)])[SITE]
    want = -1.25 * output_direction(sae.coder, 2)  # type: ignore[arg-type]
    assert torch.allclose(steered - clean, want.expand_as(clean), atol=1e-5)


def test_clamp_changes_only_that_latent(tiny, sae):
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    x = run_all(tiny, ids)[SITE][0]
    c = sae.coder
    with torch.no_grad():
        f = c.encode(x)
    steered = run_all(tiny, ids, [Intervention(sae, 5, "clamp", 4.0, (2, 3))])[SITE][0]
    # encode → set the latent → decode, plus the reconstruction error of the unedited input.
    f_edit = f.clone()
    f_edit[[2, 3], 5] = 4.0
    want = c.decode(f_edit) + (x - c.decode(f))
    assert torch.allclose(steered, want, atol=1e-4)
    assert torch.equal(steered[[0, 1, 4, 5]], x[[0, 1, 4, 5]])  # other positions untouched
    # Clamping a latent to its own value is no edit at all.
    same = run_all(tiny, ids, [Intervention(sae, 5, "clamp", float(f[3, 5].detach()), (3,))])[SITE][0]
    assert torch.allclose(same, x, atol=1e-5)


def test_clamps_of_one_dictionary_share_one_encoding(tiny, sae):
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    x = run_all(tiny, ids)[SITE][0]
    c = sae.coder
    f = c.encode(x)
    ivs = [Intervention(sae, 1, "clamp", 0.0), Intervention(sae, 9, "clamp", 2.0)]
    steered = run_all(tiny, ids, ivs)[SITE][0]
    f_edit = f.clone()
    f_edit[:, 1], f_edit[:, 9] = 0.0, 2.0
    assert torch.allclose(steered, c.decode(f_edit) + (x - c.decode(f)), atol=1e-4)


def test_transcoder_clamp_reads_its_input_site_and_edits_its_output_site(tiny, transcoder):
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    clean = run_all(tiny, ids)
    steered = run_all(tiny, ids, [Intervention(transcoder, 4, "clamp", 1.5)])
    c = transcoder.coder
    f = c.encode(clean[Site(2, "mlp_in")][0])
    want = clean[Site(2, "mlp_out")][0] + (1.5 - f[:, 4:5]) * output_direction(c, 4)  # type: ignore[arg-type]
    assert torch.allclose(steered[Site(2, "mlp_out")][0], want, atol=1e-4)
    assert torch.equal(steered[Site(2, "mlp_in")], clean[Site(2, "mlp_in")])


def test_a_one_layer_clt_steers_exactly_like_its_transcoder(tiny, transcoder):
    """One steering class for every coder: the same weights as a CLT give the same edits, bit for bit."""
    c = transcoder.coder
    clt = CrossLayerCoder(CLTConfig(n_layers=1, d_in=64, d_out=64, width=24, activation="relu"))
    with torch.no_grad():
        clt.w_enc[0].copy_(c.w_enc)
        clt.b_enc[0].copy_(c.b_enc)
        clt.w_dec[0][:, 0].copy_(c.w_dec)
        clt.b_dec[0].copy_(c.b_dec)
    as_clt = Dictionary(clt.eval(), transcoder.site_in, transcoder.site_out, "clt")
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    edits = [
        ("add", 2, 1.5, (3,)),
        ("clamp", 4, 0.5, None),
        ("multiply", 7, 0.0, (1, 2)),
        ("add", 4, -2.0, None),
    ]
    want = run_all(tiny, ids, [Intervention(transcoder, j, mode, v, pos) for mode, j, v, pos in edits])  # type: ignore[arg-type]
    got = run_all(tiny, ids, [Intervention(as_clt, j, mode, v, pos) for mode, j, v, pos in edits])  # type: ignore[arg-type]
    assert not torch.equal(want[transcoder.site_out], run_all(tiny, ids)[transcoder.site_out])
    for site in want:
        assert torch.equal(got[site], want[site]), site


def test_generation_is_deterministic_and_unsteered_is_plain_greedy(tiny, sae):
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    ivs = [Intervention(sae, 3, "add", 8.0)]
    a = generate(tiny, PROMPT, ivs, max_new_tokens=8)
    b = generate(tiny, PROMPT, ivs, max_new_tokens=8)
    assert a == b
    assert a.unsteered_ids != a.steered_ids
    assert a.interventions[0].dictionary == "sae" and a.interventions[0].value == 8.0
    with torch.no_grad():
        hf = tiny.model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert a.unsteered_ids == hf[0, ids.shape[1] :].tolist()[: len(a.unsteered_ids)]
    # Seeded sampling: the same seed gives the same text, another seed (usually) another one.
    s1 = generate(tiny, PROMPT, ivs, max_new_tokens=8, temperature=1.0, seed=1)
    assert s1 == generate(tiny, PROMPT, ivs, max_new_tokens=8, temperature=1.0, seed=1)


def test_cached_steps_edit_the_same_positions_as_a_full_forward(tiny, sae):
    """With a KV cache each step sees one token; positions must still be absolute."""
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    ivs = [Intervention(sae, 3, "add", 6.0, (ids.shape[1] + 1,))]  # the second generated token
    cached = generate_ids(tiny, ids, ivs, max_new_tokens=5)
    # The same tokens, fed whole, with the same edit: the last logits pick the same next token.
    full = torch.cat([ids, torch.tensor([cached[:4]])], 1)
    with steering(tiny, ivs), torch.no_grad():
        logits = tiny.model(input_ids=full).logits
    assert int(logits[0, -1].argmax()) == cached[4]
    assert [int(t) for t in logits[0, ids.shape[1] - 1 : -1].argmax(-1)] == cached[:4]


def test_top_latents_are_the_largest_activations_per_token(tiny, sae):
    result = top_latents(tiny, sae, PROMPT, k=3)
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    x = run_to_sites(tiny, ids, [SITE])[SITE][0]
    with torch.no_grad():
        f = sae.coder.encode(x)
    assert [t.token_id for t in result.tokens] == ids[0].tolist()
    assert "".join(t.token for t in result.tokens[1:]) == PROMPT
    assert result.tokens[0].latents == []  # BOS
    for t in result.tokens[1:]:
        want = f[t.position].topk(3)
        got = [(a.latent, a.activation) for a in t.latents]
        expected = [(int(j), float(v)) for v, j in zip(want.values, want.indices, strict=True) if v > 0]
        assert [g[0] for g in got] == [e[0] for e in expected]
        assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], rel=1e-5)


def test_steer_request_and_errors(tiny, sae):
    req = SteerRequest(
        prompt=PROMPT,
        interventions=[SteerIntervention(dictionary="sae", latent=3, mode="add", value=8.0)],
        max_new_tokens=4,
    )
    res = steer_request(tiny, {"sae": sae}, req)
    assert res == generate(tiny, PROMPT, [Intervention(sae, 3, "add", 8.0)], max_new_tokens=4)
    with pytest.raises(OpenscopeError, match="no dictionary 'nope'"):
        steer_request(
            tiny,
            {"sae": sae},
            req.model_copy(
                update={"interventions": [req.interventions[0].model_copy(update={"dictionary": "nope"})]}
            ),
        )
    with pytest.raises(OpenscopeError, match="out of range"):
        generate(tiny, PROMPT, [Intervention(sae, 32, "add", 1.0)], max_new_tokens=2)
    with pytest.raises(OpenscopeError, match="unknown steering mode"):
        generate(tiny, PROMPT, [Intervention(sae, 1, "scale", 1.0)], max_new_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(OpenscopeError, match="does not fit"):
        wide = in_memory(SparseCoder(CoderConfig(d_in=32, d_out=32, width=8)), SITE, name="wide")
        generate(tiny, PROMPT, [Intervention(wide, 1, "add", 1.0)], max_new_tokens=2)


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_steering(tiny, sae):
    ids = prompt_ids(tiny.tokenizer, PROMPT)
    before = run_to_sites(tiny, ids, [Site(2, "resid_post")])
    n_hooks = hook_count(tiny.model)
    with steering(tiny, [Intervention(sae, 1, "add", 5.0)]) as state:
        assert isinstance(state, StepState)
        assert hook_count(tiny.model) > n_hooks
    assert hook_count(tiny.model) == n_hooks
    with pytest.raises(RuntimeError, match="boom"), steering(tiny, [Intervention(sae, 1, "add", 5.0)]):
        raise RuntimeError("boom")
    assert hook_count(tiny.model) == n_hooks
    after = run_to_sites(tiny, ids, [Site(2, "resid_post")])
    assert torch.equal(before[Site(2, "resid_post")], after[Site(2, "resid_post")])
