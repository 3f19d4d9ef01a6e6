"""The real Gemma 3 270M from its PyPI package (marked `real_model`; one load shared by the session)."""

from __future__ import annotations

import pytest
import torch

from openscope.activations import ActivationStore, HarvestConfig, harvest
from openscope.models import Site, capture, run_to_sites
from openscope.models.load import converted_dir, is_cached

pytestmark = pytest.mark.real_model


def test_loads_from_package_and_knows_paris(real_model):
    assert is_cached("gemma-3-270m") and (converted_dir("gemma-3-270m") / "model.safetensors").is_file()
    assert (real_model.n_layers, real_model.d_model) == (18, 640)
    assert real_model.arch.layers_path == "model.layers"
    tok = real_model.tokenizer
    inputs = tok("The capital of France is", return_tensors="pt")
    out = real_model.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in text or "France" in text, text


def test_real_sites_match_hidden_states_and_full_forward(real_model):
    ids = real_model.tokenizer(["Sparse dictionaries read the residual stream."], return_tensors="pt")[
        "input_ids"
    ]
    sites = [Site(5, "resid_post"), Site(5, "attn_out"), Site(9, "mlp_in"), Site(9, "mlp_out")]
    truncated = run_to_sites(real_model, ids, sites)
    with capture(real_model, sites, stop=False) as full, torch.no_grad():
        hidden = real_model.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(truncated[Site(5, "resid_post")], hidden[6], rtol=0, atol=0)
    for s in sites:
        torch.testing.assert_close(truncated[s], full[s], rtol=0, atol=0)
    assert truncated[Site(5, "attn_out")].shape[-1] == 4 * 256


def test_real_harvest_of_wiki_text(real_model, tmp_path):
    cfg = HarvestConfig(
        sites="5.resid_post,5.mlp_out", tokens=256, context_len=64, batch_size=2, output=tmp_path / "s"
    )
    result = harvest(cfg, loaded=real_model, progress=False)
    store = ActivationStore(result.output)
    assert store.n_rows > 200  # 4 contexts x 63 text tokens, fewer where a document starts
    stats = store.stats("5.resid_post")
    assert 10 < stats.norm_scale < 1e5  # Gemma residual norms are large: that is why we normalise
    batch = next(store.batches(["5.resid_post"], batch_size=32))
    assert torch.isfinite(batch.acts["5.resid_post"]).all()
    assert real_model.tokenizer.decode(
        store.read_shard(0, ["contexts"])["contexts"][0, 1:10].tolist()
    ).strip()
