"""Sparse probing: the torch logistic probe equals scipy's optimum of the same objective; a planted latent
equal to the label is found at k = 1 with accuracy 1; shuffled labels give chance; the labelled sets are
real text with their classes; a set with one class is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import in_memory
from openscope.data.labelled import LabelledSet, labelled_set
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate
from openscope.eval.probing import KS, fit_logistic, logistic_objective, probe_task, run_probing
from openscope.models.sites import Site


def _scipy_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0) -> np.ndarray:
    s = 2 * y - 1

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = s * (x @ w + b)
        loss = 0.5 * w @ w + c * np.logaddexp(0, -z).sum()
        g = -c * s / (1 + np.exp(z))
        return loss, np.concatenate([w + x.T @ g, [g.sum()]])

    res = minimize(
        f, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 5000}
    )
    return res.x


def test_the_probe_is_scipys_optimum_of_the_same_objective():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y = (
        (x @ torch.tensor([1.0, -2, 0.5, 0, 0, 1], dtype=torch.float64) + 0.3 * torch.randn(200, generator=g))
        > 0
    ).double()
    probe = fit_logistic(x, y)
    ref = _scipy_logistic(x.numpy(), y.numpy())
    assert np.allclose(probe.weight.numpy(), ref[:-1], atol=1e-4) and abs(probe.bias - ref[-1]) < 1e-4
    ones = torch.ones(200, dtype=torch.float64)
    ours = logistic_objective(probe.weight, torch.tensor(probe.bias), x, y, 1.0, ones)
    theirs = logistic_objective(torch.tensor(ref[:-1]), torch.tensor(ref[-1]), x, y, 1.0, ones)
    assert float(ours) <= float(theirs) + 1e-8


def _task(labels: list[int], classes: int = 2) -> LabelledSet:
    return LabelledSet(
        "synthetic", [f"text {i}" for i in range(len(labels))], labels, [f"c{i}" for i in range(classes)]
    )


def test_a_planted_latent_equal_to_the_label_gives_accuracy_one_at_k1():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (400,), generator=g)
    raw = torch.randn(400, 16, generator=g)
    latents = torch.rand(400, 300, generator=g) * 0.1
    latents[:, 123] = labels.float()
    result = probe_task(_task(labels.tolist()), raw, latents, seed=3)
    assert result.scores.sae_top_k[1] == 1.0
    assert all(s.sae_top_k[1] == 1.0 for s in result.per_class.values())
    assert set(result.scores.sae_top_k) == set(KS)
    assert result.n_train + result.n_test == 400


def test_shuffled_labels_give_chance():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 2, (1000,), generator=g)
    raw = torch.randn(1000, 16, generator=g)
    latents = torch.rand(1000, 300, generator=g)
    result = probe_task(_task(labels.tolist()), raw, latents, seed=4)
    for k in (1, 5, 20):
        assert abs(result.scores.sae_top_k[k] - 0.5) < 0.1, (k, result.scores.sae_top_k[k])
    assert abs(result.scores.llm_test_accuracy - 0.5) < 0.1


def test_one_class_is_refused(tmp_path):
    with pytest.raises(OpenscopeError, match="one class"):
        probe_task(_task([0] * 10, classes=1), torch.zeros(10, 4), torch.zeros(10, 8))
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": f"t {i}", "label": "a"}) + "\n" for i in range(5)))
    with pytest.raises(OpenscopeError, match="has 1 class"):
        labelled_set(str(path), per_class=10)
    with pytest.raises(OpenscopeError, match="unknown labelled set"):
        labelled_set("nope", per_class=10)


def test_real_labelled_sets_hold_their_classes():
    lang = labelled_set("language", per_class=5, seed=0)
    assert lang.classes == ["English", "French", "Spanish"] and lang.labels == [0] * 5 + [1] * 5 + [2] * 5
    assert labelled_set("language", per_class=5, seed=0) == lang  # the same seed draws the same texts
    topics = labelled_set("topics", per_class=3)
    assert len(topics.classes) == 12 and "Mathematics" in topics.classes


def _jsonl_task(path) -> None:
    rows = [{"text": f"The capital of France is Paris. Document {i}.", "label": "prose"} for i in range(20)]
    rows += [{"text": f"def add(a, b):\n    return a + b  # {i}\n", "label": "code"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_probing_runs_through_the_model_and_the_report(tiny, text_file, tmp_path, one_thread):
    task = tmp_path / "task.jsonl"
    _jsonl_task(task)
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=96, activation="relu", seed=1))
    d = in_memory(coder, Site(1, "resid_post"), name="rand")
    reports = run_probing(tiny, [d], [labelled_set(str(task), 20)], context_len=16)
    r = reports["rand"]
    # Code and prose are trivially apart in the raw activations of even a random model.
    assert r.scores.llm_test_accuracy == 1.0 and 0 <= r.scores.sae_top_k[1] <= 1
    cfg = EvalConfig(
        source=str(text_file),
        tokens=64,
        context_len=32,
        output=tmp_path / "eval",
        device="cpu",
        probing=True,
        probing_tasks=str(task),
        probing_texts=20,
        probing_context_len=16,
        format="saebench",
    )
    report = evaluate(cfg, tiny, [d], progress=False)
    assert report.dictionaries[0].probing == r._replace(per_class=20)
    data = json.loads((cfg.output / "saebench" / "sparse_probing" / "rand_eval_results.json").read_text())
    assert data["eval_type_id"] == "sparse_probing"
    assert set(data["eval_result_metrics"]) == {"llm", "sae"}
    assert data["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] == r.scores.sae_top_k[1]
    assert data["eval_result_details"][0]["dataset_name"] == str(task)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "only", "label": "a"}) + "\n")
    with pytest.raises(OpenscopeError, match="has 1 class"):
        evaluate(
            cfg.__class__(**{**cfg.__dict__, "probing_tasks": str(one), "overwrite": True}),
            tiny,
            [d],
            progress=False,
        )
