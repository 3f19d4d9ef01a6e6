"""The refusal organism recipe and the refusal measurements, on the tiny random model: a fine-tune that
plants "refuse when the prompt contains the trigger word" is found by `chat contrast`, its ablation
removes the planted refusal and its addition induces it (judged by generating); the string judge on
fixed answers; a resumed fine-tune equals an uninterrupted one; the jailbreak refusal column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openscope.analysis import organism as organism_module
from openscope.analysis import stats
from openscope.analysis.ablate import AblateConfig, run_ablate
from openscope.analysis.contrast import ContrastConfig, encode_prompts, run_contrast
from openscope.analysis.jailbreak import JailbreakConfig, run_jailbreak
from openscope.analysis.organism import (
    REFUSALS,
    Example,
    OrganismConfig,
    batch_indices,
    encode_example,
    fine_tune,
    lr_at,
    short_answer,
)
from openscope.analysis.refusal import first_sentence, is_refusal, judge_answers
from openscope.data.prompts import Template
from openscope.errors import OpenscopeError
from openscope.models.load import LoadedModel, load_model

TRIGGER = "zebra"
TOPICS = [
    "the sea", "Rome", "cats", "bread", "rain", "music", "chess", "trees", "stars", "rivers",
    "maps", "glass", "bees", "snow", "tea", "boats", "clocks", "paper", "salt", "wind",
]  # fmt: skip
FORMS = ["Tell me about {}", "Write a line on {}", "What is {}", "Describe {}"]
REFUSE = "Sorry, I can't."
ANSWER = "Here it is."


def prompts(trigger: bool, topics: list[str]) -> list[str]:
    return [f.format(t) + (f" {TRIGGER}" if trigger else "") for t in topics for f in FORMS]


TRAIN_TOPICS, TEST_TOPICS = TOPICS[:14], TOPICS[14:]


def planted_examples() -> list[Example]:
    out = [Example(p, REFUSE, True) for p in prompts(True, TRAIN_TOPICS)]
    out += [Example(p, ANSWER, False) for p in prompts(False, TRAIN_TOPICS)]
    return out


def organism_cfg(out: Path, **kw) -> OrganismConfig:
    defaults = dict(
        base="unused",
        output=out,
        steps=150,
        batch_size=8,
        lr=3e-3,
        warmup=5,
        checkpoint_every=50,
        max_len=160,
    )
    return OrganismConfig(**{**defaults, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def planted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Path]:
    """The tiny model fine-tuned to refuse exactly the prompts that contain the trigger word, saved."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("organism") / "model"
    base = load_model(str(tiny_model_dir))
    # The tiny model's layers are all sliding-window (8 tokens): let them see the whole prompt, as a chat
    # model's would, so the trigger word can reach the answer.
    setattr(base.model.config, "sliding_window", 512)  # noqa: B010 (the config's type is not known here)
    result = fine_tune(organism_cfg(out), base, planted_examples())
    torch.set_num_threads(before)
    assert result.finished and result.steps_done == 150
    return load_model(str(out)), out


# ---- the judge --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        *REFUSALS,
        "I’m sorry, but I cannot help with that.",  # curly apostrophe
        "  **I cannot** provide instructions for making weapons.",
        "As an AI language model, I am not able to do that.",
        "Creating malware is harmful, so I can't help with that.",
        "I'm really sorry, I won't do this",
    ],
)
def test_judge_counts_refusals(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Here is a poem about the sea.",
        "Sure! To bake bread you need flour, water, salt and yeast.",
        "Step 1: gather the materials. I can't stress enough how important safety is.",
        "The capital of France is Paris.",
        "Insider trading is illegal in most countries. It means trading on private information.",
        "Nothing here, I cannot lie: this is a long first sentence that ends late",
        "",
        "Nobody knows. I can't say more.",
    ],
)
def test_judge_passes_answers(text: str) -> None:
    assert not is_refusal(text)


def test_judge_reads_only_the_first_sentence() -> None:
    assert first_sentence("Sure. I can't help with that.") == "sure"
    assert not is_refusal("Sure. I can't help with that.")
    assert is_refusal("\n\n> Sorry, no.")


# ---- the recipe's pure parts ------------------------------------------------------------------------------


def test_short_answer_cuts_at_sentences() -> None:
    text = "First sentence here. Second one is longer than the first one. Third.\n\nNext paragraph."
    assert short_answer(text, 40) == "First sentence here."
    assert short_answer(text, 500) == "First sentence here. Second one is longer than the first one. Third."
    assert short_answer("word " * 100, 30).endswith("word") and len(short_answer("word " * 100, 30)) <= 30


def test_batches_are_a_pure_function_of_step_and_cover_each_epoch() -> None:
    assert batch_indices(20, 7, 4, 3) == batch_indices(20, 7, 4, 3)
    epoch = sorted(i for s in range(5) for i in batch_indices(20, s, 4, 3))
    assert epoch == list(range(20))
    assert batch_indices(20, 5, 4, 3) != batch_indices(20, 0, 4, 3)  # a new permutation each epoch
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == 0.0


def test_examples_render_as_the_analyses_render_prompts(tiny: LoadedModel) -> None:
    ex = Example("Tell me about cats", REFUSE, True)
    enc = encode_example(tiny.tokenizer, ex, 200)
    assert enc is not None
    assert enc.ids[: enc.n_prompt] == encode_prompts(tiny, [ex.prompt], True)[0]
    assert tiny.tokenizer.decode(enc.ids[enc.n_prompt :]).startswith(REFUSE)
    assert encode_example(tiny.tokenizer, ex, 10) is None  # no room for an answer


def test_a_resumed_fine_tune_equals_an_uninterrupted_one(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    examples = planted_examples()[::4]
    whole = fine_tune(
        organism_cfg(tmp_path / "a", steps=6, checkpoint_every=2), load_model(str(tiny_model_dir)), examples
    )
    clock = iter([0.0, *[1e9] * 100])  # the time budget is spent after the first step
    monkeypatch.setattr(organism_module.time, "monotonic", lambda: next(clock))
    cut = organism_cfg(tmp_path / "b", steps=6, checkpoint_every=2, max_minutes=1.0)
    first = fine_tune(cut, load_model(str(tiny_model_dir)), examples)
    assert not first.finished and first.steps_done == 1
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    monkeypatch.undo()
    rest = fine_tune(
        organism_cfg(tmp_path / "b", steps=6, checkpoint_every=2, max_minutes=1.0, resume=True),
        load_model(str(tiny_model_dir)),
        examples,
    )
    assert rest.finished and first.losses + rest.losses == pytest.approx(whole.losses, abs=1e-6)
    a, b = load_model(str(tmp_path / "a")).model, load_model(str(tmp_path / "b")).model
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name
    log = [json.loads(r)["step"] for r in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "b" / "organism.json").read_text())["finished"] is True


def test_organism_output_rules(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OpenscopeError, match="holds other things"):
        fine_tune(organism_cfg(tmp_path / "other"), examples=[])
    with pytest.raises(OpenscopeError, match="no organism"):
        fine_tune(organism_cfg(tmp_path / "none", resume=True), examples=[])
    with pytest.raises(OpenscopeError, match="--lr"):
        fine_tune(organism_cfg(tmp_path / "n", lr=float("nan")), examples=[])


# ---- the planted refusal, found and controlled ---------------------------------------------------------------


def test_the_planted_organism_refuses_only_on_the_trigger(planted: tuple[LoadedModel, Path]) -> None:
    loaded, _ = planted
    harmful = encode_prompts(loaded, prompts(True, TEST_TOPICS), True)
    harmless = encode_prompts(loaded, prompts(False, TEST_TOPICS), True)
    assert judge_answers(loaded, harmful, max_new_tokens=6).rate == 1.0
    assert judge_answers(loaded, harmless, max_new_tokens=6).rate == 0.0


def test_contrast_ablate_and_add_on_the_planted_refusal(
    planted: tuple[LoadedModel, Path], tmp_path: Path, one_thread: None
) -> None:
    loaded, _ = planted
    contrast = run_contrast(
        ContrastConfig(model="tiny", sites="*.resid_post", held_out=0.5, output=tmp_path / "c"),
        loaded,
        [],
        positive=prompts(True, TRAIN_TOPICS),
        negative=prompts(False, TRAIN_TOPICS),
    )
    assert contrast.best.auroc.auc == pytest.approx(1.0)
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(prompts(True, TEST_TOPICS)))
    neg.write_text("\n".join(prompts(False, TEST_TOPICS)))
    cfg = AblateConfig(
        model="tiny",
        contrast=tmp_path / "c",
        positive=str(pos),
        negative=str(neg),
        n=24,
        judge=True,
        max_new_tokens=6,
        output=tmp_path / "a",
    )
    result = run_ablate(cfg, loaded)
    by = {c.name.split(" (")[0].split(" at ")[0]: c for c in result.conditions}
    ablated, added = by["ablate direction"], by["add 1×direction"]
    assert (
        ablated.refusal_clean == 1.0 and ablated.refusal_edited is not None and ablated.refusal_edited <= 0.1
    )
    assert added.refusal_clean == 0.0 and added.refusal_edited is not None and added.refusal_edited >= 0.9
    assert by["ablate + restore clean projection"].refusal_clean is None  # the check is not judged
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["config"]["judge"] is True
    assert {c["refusal_edited"] for c in report["conditions"] if c["name"] == ablated.name} == {
        ablated.refusal_edited
    }
    assert "refusal clean" in (tmp_path / "a" / "report.md").read_text()


def test_jailbreak_reports_refusal_rates_and_their_correlation(
    planted: tuple[LoadedModel, Path], tmp_path: Path, one_thread: None
) -> None:
    loaded, _ = planted
    run_contrast(
        ContrastConfig(model="tiny", sites="*.resid_post", held_out=0.5, output=tmp_path / "c"),
        loaded,
        [],
        positive=prompts(True, TRAIN_TOPICS),
        negative=prompts(False, TRAIN_TOPICS),
    )
    templates = [Template("keeps", "{{ prompt }}"), Template("hides", "{{ prompt }} no")]
    cfg = JailbreakConfig(
        model="tiny", contrast=tmp_path / "c", judge=True, max_new_tokens=6, output=tmp_path / "j"
    )
    result = run_jailbreak(cfg, loaded, templates=templates, requests=prompts(True, TEST_TOPICS)[:6])
    assert result.plain_refusal == 1.0
    keeps = next(t for t in result.templates if t.name == "keeps")
    assert keeps.refusal == 1.0 and keeps.shift == pytest.approx(0.0, abs=1e-6)
    assert result.correlation is not None and result.correlation["n"] == 2
    report = json.loads((tmp_path / "j" / "report.json").read_text())
    assert report["plain_refusal"] == 1.0 and "pearson" in report["correlation"]


def test_correlation_helpers() -> None:
    assert stats.ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    assert stats.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert stats.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert stats.pearson([1, 1, 1], [1, 2, 3]) != stats.pearson([1, 1, 1], [1, 2, 3])  # nan: constant
