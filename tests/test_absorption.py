"""Feature absorption: a dictionary built so that one word's letter is absorbed into a token-specific latent
is detected (that word fully absorbed, none else); the same dictionary without the absorption is not; the
per-word scores follow SAEBench's rules; the first-letter task runs through the tiny model."""

from __future__ import annotations

import json
import math

import torch

from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import in_memory
from openscope.eval import EvalConfig, evaluate
from openscope.eval.absorption import (
    LETTERS,
    SpellingSet,
    absorption_fraction,
    absorption_from_activations,
    alpha_words,
    is_full_absorption,
    spelling_prompt,
)
from openscope.models.sites import Site

D = 128
N_TRAIN, N_TEST = 30, 10


def _world(absorb: bool):
    """Activations x = p_letter + e_token of 'a' and 'b' words (orthonormal directions), and an SAE with a
    main latent per letter and a latent for the absorbed test word W (the first 'a' test word). With
    `absorb`, W's letter moves into its own latent: the 'a' latent is switched off on W and W's latent
    decodes to p_a + e_W; without, the 'a' latent fires on W too and W's latent decodes to e_W alone."""
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))
    p_a, p_b, tokens = q[0], q[1], q[2:]
    letters = [0, 1] * (N_TRAIN + N_TEST)
    xs = torch.stack([(p_a if c == 0 else p_b) + tokens[i] for i, c in enumerate(letters)])
    cut = 2 * N_TRAIN
    w_index = cut  # first test word, letter a
    e_w = tokens[w_index]
    names = [f"w{i}" for i in range(len(letters))]

    def split(lo: int, hi: int) -> SpellingSet:
        return SpellingSet(
            names[lo:hi], torch.tensor([LETTERS.index("ab"[c]) for c in letters[lo:hi]]), xs[lo:hi]
        )

    coder = SparseCoder(CoderConfig(d_in=D, d_out=D, width=3, activation="relu", pre_encoder_bias=False))
    with torch.no_grad():
        enc_a = p_a - 2 * e_w if absorb else p_a
        dec_w = (p_a + e_w) / math.sqrt(2) if absorb else e_w
        coder.w_enc.copy_(torch.stack([enc_a, p_b, e_w], dim=1))
        coder.w_dec.copy_(torch.stack([p_a, p_b, dec_w]))
        coder.b_enc.zero_()
        coder.b_dec.zero_()
    return in_memory(coder, Site(1, "resid_post"), name="synthetic"), split(0, cut), split(cut, len(letters))


def test_a_dictionary_that_absorbs_one_word_is_detected():
    d, train, test = _world(absorb=True)
    report = absorption_from_activations(d, train, test)
    by_letter = {r.first_letter: r for r in report.letters}
    assert set(by_letter) == {"a", "b"}
    a = by_letter["a"]
    assert a.main_latents == [0] and a.num_split_features == 1
    assert a.num_probe_true_positives == N_TEST and a.num_full_absorption == 1
    assert math.isclose(a.full_absorption_rate, 1 / N_TEST) and math.isclose(
        a.mean_absorption_fraction, 1 / N_TEST
    )
    assert by_letter["b"].num_full_absorption == 0 and by_letter["b"].mean_absorption_fraction == 0
    assert math.isclose(report.mean_full_absorption_score, 0.5 / N_TEST)
    assert not report.enough_letters  # two letters: SAEBench would not publish this one


def test_the_same_dictionary_without_absorption_is_not_flagged():
    d, train, test = _world(absorb=False)
    report = absorption_from_activations(d, train, test)
    assert [r.first_letter for r in report.letters] == ["a", "b"]
    assert all(r.num_full_absorption == 0 and r.mean_absorption_fraction == 0 for r in report.letters)
    assert report.mean_absorption_fraction_score == 0 and report.mean_full_absorption_score == 0


def test_partial_absorption_fraction_follows_saebench_rules():
    cos = torch.tensor([0.9, 0.5, 0.05, 0.6])
    # main latent 0 carries 0.3 of x·p = 1; latent 1 carries 0.5 (aligned), latent 2 is not aligned enough.
    proj = torch.tensor([0.3, 0.5, 0.4, 0.0])
    assert math.isclose(absorption_fraction(1.0, proj, cos, [0]), 0.5 / 0.8, rel_tol=1e-6)
    # the absorbers carry less than 40% of x·p: no absorption
    assert absorption_fraction(1.0, torch.tensor([0.3, 0.3, 0.4, 0.0]), cos, [0]) == 0.0
    # main latents carry it all: none
    assert absorption_fraction(1.0, torch.tensor([1.2, 0.5, 0.0, 0.0]), cos, [0]) == 0.0
    latents = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert is_full_absorption(1.0, latents, torch.tensor([0.0, 0.5, 0.1, 0.0]), cos, [0])
    assert not is_full_absorption(1.0, latents, torch.tensor([0.0, 0.3, 0.1, 0.0]), cos, [0])
    assert not is_full_absorption(
        1.0, torch.tensor([0.1, 1.0, 0, 0]), torch.tensor([0.05, 0.5, 0, 0]), cos, [0]
    )


def test_the_first_letter_task_runs_through_the_model(tiny, text_file, tmp_path, one_thread):
    words = alpha_words(tiny.tokenizer)
    assert words and all(w.strip().isalpha() for _, w in words)
    head, tail = spelling_prompt(" cat", [" dog", "Paris"])
    assert (
        head.endswith("\n cat")
        and tail == " has the first letter:"
        and "Paris has the first letter: P" in head
    )
    coder = SparseCoder(CoderConfig(d_in=64, d_out=64, width=96, activation="relu", seed=1))
    cfg = EvalConfig(
        source=str(text_file),
        tokens=64,
        context_len=32,
        output=tmp_path / "eval",
        device="cpu",
        absorption=True,
        absorption_words=200,
        format="saebench",
    )
    report = evaluate(cfg, tiny, [in_memory(coder, Site(1, "resid_post"), name="rand")], progress=False)
    result = report.dictionaries[0].absorption
    assert result is not None and result.n_train_words + result.n_test_words > 20
    data = json.loads(
        (cfg.output / "saebench" / "absorption_first_letter" / "rand_eval_results.json").read_text()
    )
    assert data["eval_type_id"] == "absorption_first_letter" and set(data["eval_result_metrics"]) == {"mean"}
