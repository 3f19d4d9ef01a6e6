"""`openscope chat sweep`: measured steering — efficacy against coherence as the strength grows.

A target is a direction at a site (from a contrast run: strength s adds s·(μ_pos − μ_neg), so s = 1
moves a negative prompt's mean onto the positive mean) or a dictionary latent (s adds s times its
decoder direction, in the latent's own units, through `openscope.interventions.steer`). Every position is
steered, generated ones too. For each strength and prompt the model continues greedily, and then:

- **efficacy** — the target measure over the generated text:
  `projection`: the mean, over the generated tokens, of the position on the contrast axis (0 at the
  negative mean, 1 at the positive mean; the plain projection for a bare direction) or of the
  latent's activation, read by the *unsteered* model from that text, i.e. how much the text itself
  carries the concept; `tokens`: the mean probability the steered model gives the chosen target
  tokens at each generated position;
- **coherence** — the mean loss (cross-entropy) of the generated tokens under the unsteered model,
  and the repetition rate (share of the text's bigrams already seen earlier in it).

At strength 0 the coherence loss is the unsteered model's loss on its own greedy text.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from openscope.analysis import stats
from openscope.analysis.common import ChatRunConfig, load_for, write_report
from openscope.analysis.contrast import encode_prompts, load_direction
from openscope.coders.dictionary import Dictionary, load_dictionary
from openscope.data.prompts import load_prompts
from openscope.errors import OpenscopeError
from openscope.interventions.directions import DirectionEdit, direction_edits
from openscope.interventions.steer import Intervention, coder_of, generate_ids, steering
from openscope.models.hooks import reading
from openscope.models.load import LoadedModel
from openscope.models.sites import Site
from openscope.models.tokens import first_tokens
from openscope.reports import check_report_output, figure, fmt, md_table, report_folder

log = logging.getLogger(__name__)

Measure = Literal["projection", "tokens"]


@dataclass
class SweepConfig(ChatRunConfig):
    """Sweep the strength of a direction or latent added during generation; report efficacy (target
    measure over the generated text) against coherence (loss under the unsteered model, repetition)."""

    direction: Path | None = None
    """A contrast folder (or its directions.safetensors) whose direction to add; or use --dictionary and --latent."""
    site: str = ""
    """Site of the direction (e.g. 6.resid_post); empty: the contrast report's best site."""
    dictionary: Path | None = None
    """A dictionary folder whose latent to add (with --latent)."""
    latent: int = -1
    """Latent of --dictionary to add."""
    strengths: list[float] = field(default_factory=lambda: [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    """Strengths to sweep (a direction: multiples of μ_pos − μ_neg; a latent: its activation units); 0 is always added."""
    prompts: str = "sharegpt"
    """Prompts to continue (a set spec, as for contrast)."""
    n_prompts: int = 4
    """Prompts used per strength."""
    max_chars: int = 300
    """ShareGPT turns longer than this are skipped."""
    max_new_tokens: int = 24
    """Tokens generated per prompt and strength."""
    measure: str = "projection"
    """Efficacy measure: projection (the target read by the unsteered model on the generated text) or tokens (steered probability of --target-tokens)."""
    target_tokens: list[str] = field(default_factory=list)
    """Words whose tokens the `tokens` measure counts (each word's first token, with and without a leading space)."""
    repetition_n: int = 2
    """n of the n-grams the repetition rate counts."""
    output: Path = Path("openscope-out/chat/sweep")
    """Folder for report.json, report.md and plots."""


class SteerTarget(NamedTuple):
    """What a sweep adds: a direction at a site, or one latent of a dictionary."""

    label: str
    """For reports."""
    site: Site
    """Where the measure reads (the direction's site; a latent: its dictionary's input site)."""
    direction: Tensor | None = None
    """The direction added (times the strength); None for a latent."""
    dictionary: Dictionary | None = None
    """The dictionary of the latent; None for a direction."""
    latent: int = -1
    """The latent added."""
    origin: Tensor | None = None
    """For a contrast direction r = μ_pos − μ_neg: μ_neg. The projection measure is then the position on
    the contrast axis, (x − μ_neg)·r / ‖r‖² (0: the negative mean, 1: the positive mean)."""


class SweepPoint(NamedTuple):
    """Efficacy and coherence at one strength (means over prompts)."""

    strength: float
    """The strength."""
    efficacy: float
    """Mean target measure over the generated text."""
    efficacy_se: float
    """Its standard error over prompts."""
    loss: float
    """Mean loss of the generated tokens under the unsteered model."""
    loss_se: float
    """Its standard error over prompts."""
    repetition: float
    """Mean repetition rate of the generated text."""
    texts: list[str]
    """The generated text per prompt."""


class SweepResult(NamedTuple):
    """The sweep."""

    target: str
    """What was added."""
    measure: str
    """The efficacy measure."""
    points: list[SweepPoint]
    """One per strength, ascending."""
    output: Path | None
    """Report folder (None when not written)."""


# ---- steering and reading a target ---------------------------------------------------------------------


def steer_context(
    loaded: LoadedModel, target: SteerTarget, strength: float
) -> AbstractContextManager[object]:
    """Hooks that add the target at `strength` at every position while the block is open."""
    if target.direction is not None:
        return direction_edits(loaded, [DirectionEdit(target.site, target.direction, "add", strength)])
    if target.dictionary is None:
        raise OpenscopeError("a steering target needs a direction or a dictionary latent")
    return steering(loaded, [Intervention(target.dictionary, target.latent, "add", strength)])


def readout(target: SteerTarget, x: Tensor) -> Tensor:
    """The target measure [T] of activations x [T, d] at target.site: the position on the contrast axis
    (with an origin), else the projection on the unit direction; or the latent's activation."""
    if target.direction is not None:
        r = target.direction.double().to(x.device)
        if target.origin is not None:
            return (x.double() - target.origin.double().to(x.device)) @ r / (r @ r)
        return x.double() @ stats.unit(r).to(x.device)
    assert target.dictionary is not None
    coder = coder_of(target.dictionary)
    with torch.inference_mode():
        return coder.encode(x.to(coder.w_enc.device, coder.w_enc.dtype))[:, target.latent].double().cpu()


def token_nll(logits: Tensor, ids: Sequence[int], start: int) -> Tensor:
    """NLL [len(ids) − start] of tokens ids[start:] from the logits [T, vocab] of the whole sequence."""
    targets = torch.tensor(list(ids[start:]), dtype=torch.long, device=logits.device)
    logp = torch.log_softmax(logits[start - 1 : len(ids) - 1].double(), dim=-1)
    return -logp.gather(1, targets[:, None]).squeeze(1).cpu()


@torch.inference_mode()
def clean_read(loaded: LoadedModel, ids: Sequence[int], site: Site) -> tuple[Tensor, Tensor]:
    """One unsteered forward of ids: (logits [T, vocab], activation [T, d] at site)."""
    acts: dict[Site, Tensor] = {}
    with reading(loaded, {site: lambda x: acts.__setitem__(site, x[0].float())}, stop=False):
        logits = loaded.model(
            input_ids=torch.tensor([list(ids)], device=loaded.device), use_cache=False
        ).logits
    return logits[0].float(), acts[site]


@torch.inference_mode()
def steered_target_prob(
    loaded: LoadedModel,
    target: SteerTarget,
    strength: float,
    ids: Sequence[int],
    start: int,
    token_ids: Sequence[int],
) -> Tensor:
    """The steered model's probability of the target tokens [len(ids) − start] at each position that
    predicts a generated token."""
    with steer_context(loaded, target, strength):
        logits = loaded.model(
            input_ids=torch.tensor([list(ids)], device=loaded.device), use_cache=False
        ).logits[0]
    probs = torch.softmax(logits[start - 1 : len(ids) - 1].double(), dim=-1)
    return probs[:, list(token_ids)].sum(1).cpu()


class PromptPoint(NamedTuple):
    """One prompt at one strength."""

    efficacy: float
    """Target measure over the generated text."""
    loss: float
    """Mean loss of the generated tokens under the unsteered model."""
    repetition: float
    """Repetition rate of the generated tokens."""
    generated: list[int]
    """The generated token ids."""


def measure_prompt(
    loaded: LoadedModel,
    target: SteerTarget,
    strength: float,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    measure: Measure,
    token_ids: Sequence[int] = (),
    repetition_n: int = 2,
) -> PromptPoint:
    """Generate with the target added at strength, then measure efficacy and coherence of the text."""
    with steer_context(loaded, target, strength):
        gen = generate_ids(loaded, torch.tensor([list(prompt_ids)]), (), max_new_tokens)
    full = [*prompt_ids, *gen]
    start = len(prompt_ids)
    logits, x = clean_read(loaded, full, target.site)
    loss = float(token_nll(logits, full, start).mean())
    if measure == "projection":
        efficacy = float(readout(target, x[start:]).mean())
    elif measure == "tokens":
        if not token_ids:
            raise OpenscopeError("the tokens measure needs --target-tokens")
        efficacy = float(steered_target_prob(loaded, target, strength, full, start, token_ids).mean())
    else:
        raise OpenscopeError(f"unknown efficacy measure {measure!r}; choose projection or tokens")
    return PromptPoint(efficacy, loss, stats.repetition_rate(gen, repetition_n), gen)


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(xs), dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(xs))) if len(xs) > 1 else float("nan")
    return float(t.mean()), se


def sweep(
    loaded: LoadedModel,
    target: SteerTarget,
    seqs: Sequence[Sequence[int]],
    strengths: Sequence[float],
    max_new_tokens: int = 24,
    measure: Measure = "projection",
    token_ids: Sequence[int] = (),
    repetition_n: int = 2,
) -> list[SweepPoint]:
    """Efficacy and coherence at each strength (0 included), ascending."""
    if not seqs:
        raise OpenscopeError("the sweep needs at least one prompt")
    if any(not math.isfinite(s) for s in strengths):
        raise OpenscopeError("sweep strengths must be finite numbers")
    points = []
    for s in sorted({0.0, *map(float, strengths)}):
        per = [
            measure_prompt(loaded, target, s, q, max_new_tokens, measure, token_ids, repetition_n)
            for q in seqs
        ]
        eff, eff_se = _mean_se([p.efficacy for p in per])
        loss, loss_se = _mean_se([p.loss for p in per])
        rep = sum(p.repetition for p in per) / len(per)
        texts = [loaded.tokenizer.decode(p.generated, skip_special_tokens=True) for p in per]
        points.append(SweepPoint(s, eff, eff_se, loss, loss_se, rep, texts))
        log.info("strength %g: efficacy %.4g, loss %.3f, repetition %.2f", s, eff, loss, rep)
    return points


# ---- the command --------------------------------------------------------------------------------------


def target_of(cfg: SweepConfig, loaded: LoadedModel) -> SteerTarget:
    """The target a config names: a contrast direction, or a dictionary latent (exactly one)."""
    if (cfg.direction is None) == (cfg.dictionary is None):
        raise OpenscopeError(
            "name exactly one target: --direction (a contrast folder) or --dictionary with --latent"
        )
    if cfg.direction is not None:
        sd = load_direction(cfg.direction, cfg.site)
        if sd.direction.numel() != loaded.d_model:
            raise OpenscopeError(
                f"the direction has width {sd.direction.numel()}, the model {loaded.d_model}"
            )
        return SteerTarget(
            f"direction at {sd.site.name}", sd.site, sd.direction.double(), origin=sd.mean_neg.double()
        )
    assert cfg.dictionary is not None
    d = load_dictionary(cfg.dictionary, loaded, device=str(loaded.device))
    width = coder_of(d).cfg.width
    if not 0 <= cfg.latent < width:
        raise OpenscopeError(f"--latent {cfg.latent} is out of range for {d.name} (width {width})")
    return SteerTarget(f"latent {cfg.latent} of {d.name}", d.site_in, None, d, cfg.latent)


def run_sweep(
    cfg: SweepConfig,
    loaded: LoadedModel | None = None,
    target: SteerTarget | None = None,
    *,
    write: bool = True,
) -> SweepResult:
    """Run the sweep a config describes (a target may be passed in); writes the report unless write=False."""
    if write:
        check_report_output(cfg.output, cfg.overwrite)  # a bad --output is refused before the work
    if cfg.measure not in ("projection", "tokens"):
        raise OpenscopeError(f"unknown efficacy measure {cfg.measure!r}; choose projection or tokens")
    prompts = load_prompts(cfg.prompts, cfg.n_prompts, cfg.max_chars)
    loaded = load_for(cfg, loaded)
    target = target or target_of(cfg, loaded)
    token_ids = first_tokens(loaded.tokenizer, cfg.target_tokens, spaced=True)
    seqs = encode_prompts(loaded, prompts, cfg.chat_template)
    measure: Measure = "tokens" if cfg.measure == "tokens" else "projection"
    points = sweep(
        loaded, target, seqs, cfg.strengths, cfg.max_new_tokens, measure, token_ids, cfg.repetition_n
    )
    result = SweepResult(target.label, cfg.measure, points, None)
    if write:
        result = result._replace(output=write_sweep(cfg, loaded, result, prompts))
    return result


def _plot_sweep(path: Path, cfg: SweepConfig, result: SweepResult) -> None:
    """Efficacy, coherence (loss and repetition) and their trade-off against the strength."""
    s = [p.strength for p in result.points]
    eff_label = f"{result.target}: read on the text"
    if result.measure == "tokens":
        eff_label = "P(target tokens) under steering"
    elif cfg.direction is not None:
        eff_label += " (axis: 0 = μ_neg, 1 = μ_pos)"
    with figure(path, 12.0, 3.8) as fig:
        ax1, ax2, ax3 = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
        ax1.errorbar(
            s,
            [p.efficacy for p in result.points],
            yerr=[_nan0(p.efficacy_se) for p in result.points],
            marker="o",
        )
        ax1.set_xlabel("strength")
        ax1.set_ylabel("efficacy")
        ax1.set_title(textwrap.fill(eff_label, 48), fontsize=8)
        ax2.errorbar(
            s,
            [p.loss for p in result.points],
            yerr=[_nan0(p.loss_se) for p in result.points],
            marker="o",
            color="C1",
        )
        ax2.set_xlabel("strength")
        ax2.set_ylabel("loss under the unsteered model", color="C1")
        twin = ax2.twinx()
        twin.plot(s, [p.repetition for p in result.points], marker="s", color="C2")
        twin.set_ylabel("repetition rate", color="C2")
        twin.set_ylim(-0.02, 1.02)
        ax2.set_title("coherence", fontsize=9)
        ax3.plot([p.loss for p in result.points], [p.efficacy for p in result.points], marker="o", color="C3")
        for p in result.points:
            ax3.annotate(f"{p.strength:g}", (p.loss, p.efficacy), fontsize=7)
        ax3.set_xlabel("loss (lower: more coherent)")
        ax3.set_ylabel("efficacy")
        ax3.set_title("trade-off", fontsize=9)


def write_sweep(cfg: SweepConfig, loaded: LoadedModel, result: SweepResult, prompts: list[str]) -> Path:
    """The report folder: report.json, report.md and sweep.png."""
    with report_folder(cfg.output, cfg.overwrite) as out:
        _plot_sweep(out / "sweep.png", cfg, result)
        md = [
            f"# Steering sweep on {loaded.name}: {result.target}",
            "",
            f"Efficacy: {result.measure}; coherence: loss of the generated text under the unsteered model, "
            f"repetition rate ({cfg.repetition_n}-grams). {len(prompts)} prompts, {cfg.max_new_tokens} new tokens each.",
            "",
            *md_table(
                ["strength", "efficacy", "± se", "loss", "± se", "repetition", "first continuation"],
                [
                    [
                        f"{p.strength:g}",
                        fmt(p.efficacy, ".4g"),
                        fmt(p.efficacy_se, ".2g"),
                        fmt(p.loss, ".3f"),
                        fmt(p.loss_se, ".2f"),
                        fmt(p.repetition, ".2f"),
                        repr(p.texts[0][:80]),
                    ]
                    for p in result.points
                ],
            ),
        ]
        notes = []
        base = next(p for p in result.points if p.strength == 0)
        steered = [p for p in result.points if p.strength != 0]
        if steered:
            top = max(steered, key=lambda p: abs(p.efficacy - base.efficacy))
            change = top.efficacy - base.efficacy
            if abs(change) <= 2 * max(_nan0(base.efficacy_se), _nan0(top.efficacy_se), 1e-12):
                notes.append(
                    "Efficacy does not move beyond its noise over the swept strengths: the target has little "
                    "effect on this model's text here."
                )
            else:
                notes.append(
                    f"The largest change of efficacy ({change:+.3g} at strength {top.strength:g}) comes with a loss of "
                    f"{top.loss:.2f} against {base.loss:.2f} unsteered and repetition {top.repetition:.2f}: read the "
                    "curves together, a change bought with incoherent text is not steering."
                )
        results = {
            "target": result.target,
            "measure": result.measure,
            "prompts": prompts,
            "points": [p._asdict() for p in result.points],
        }
        write_report(out, "sweep", cfg, loaded.name, results, md, ["sweep.png"], notes)
    return cfg.output


def _nan0(x: float) -> float:
    return 0.0 if math.isnan(x) else x
