"""`openscope chat cot`: is the answer readable before the reasoning that is written to reach it?

Each question (the shipped set: simple arithmetic and ordering questions with worked reasoning, see
`openscope/data/cot_arithmetic.json`) is rendered as a user turn followed by the model's turn
holding the worked reasoning and then "So the answer is". At every position of the reasoning and at
every chosen layer, the residual stream is read through the **logit lens** (the model's own final
norm and unembedding applied to that layer's output) and scored:

- *readable*: the answer's token scores highest among the question's answer choices (digits for
  arithmetic, the named options otherwise); chance is 1 / number of choices;
- the answer's log-probability among the choices (over the whole vocabulary with `--full-vocab`).

Positions are reported on a relative scale (0 = first reasoning token, 1 = the position that
predicts the answer) and split at the answer's **first mention**: once the reasoning writes the
answer token (the last step "8 − 2 = 6" does), reading it is copying. Readability *before* the first
mention, clearly above a control (the answer of another question with the same choices, scored at
the same positions, which absorbs the lens's preference for some choices), is evidence that the
answer was available before the written reasoning produced it.

With a dictionary at a residual site, each latent's direct contribution to the answer's logit
margin (answer minus the mean of the other choices) through the final norm (its scale frozen at the
position) ranks the latents that predict the answer before it is written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from openscope.analysis.common import ChatRunConfig, load_for, write_report
from openscope.coders.dictionary import Dictionary, load_dictionary
from openscope.data.prompts import CotQuestion, format_user_prompt, load_cot
from openscope.errors import OpenscopeError
from openscope.interventions.steer import coder_of, output_direction
from openscope.models.hooks import run_to_sites
from openscope.models.load import LoadedModel, text_config
from openscope.models.sites import Site, parse_sites
from openscope.models.tokens import encode
from openscope.reports import check_report_output, figure, fmt, md_table, report_folder

log = logging.getLogger(__name__)

ASK = "\nThink step by step, then give the answer."
"""Appended to each question in the user turn."""
LEAD_IN = " So the answer is"
"""Written after the reasoning; the next token is the answer."""


@dataclass
class CotConfig(ChatRunConfig):
    """Measure how early the final answer is readable (logit lens, latents) at each position of
    written step-by-step reasoning."""

    questions: Path | None = None
    """JSON file of questions with reasoning, answer and choices (default: the shipped arithmetic set)."""
    n_questions: int = 0
    """Questions used (0: all)."""
    layers: str = "*"
    """Layers whose residual stream (resid_post) is read through the logit lens: N, N-M, mid or *."""
    dictionary: Path | None = None
    """A dictionary at a residual site whose latents' contributions to the answer are ranked."""
    top_k: int = 10
    """Latents listed."""
    bins: int = 10
    """Relative-position bins of the readability curves."""
    full_vocab: bool = False
    """Also score the answer's log-probability over the whole vocabulary (one full unembedding per layer and position: slow on CPU); default: among the choices."""
    output: Path = Path("openscope-out/chat/cot")
    """Folder for report.json, report.md and plots."""


class CotSequence(NamedTuple):
    """A question rendered with its reasoning, and where everything sits."""

    ids: list[int]
    """Token ids: BOS, the prompt, the reasoning, the lead-in (the answer itself is not included)."""
    start: int
    """Position of the first reasoning token."""
    answer_pos: int
    """The last position: its next token is the answer."""
    answer_id: int
    """The answer's token (its first non-blank token)."""
    choice_ids: list[int]
    """The choices' tokens."""
    answer_choice: int
    """Index of the answer among the choices."""
    first_mention: int | None
    """First reasoning position holding the answer token (None: the reasoning never writes it)."""


# ---- building the sequences -----------------------------------------------------------------------------


def first_word_token(tokenizer: Any, word: str) -> tuple[list[int], int]:
    """(blank tokens before it, first non-blank token) of " " + word as the tokenizer splits it
    (Gemma writes " 6" as a space token then the digit)."""
    toks = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    for i, t in enumerate(toks):
        if tokenizer.decode([t]).strip():
            return list(toks[:i]), int(t)
    raise OpenscopeError(f"the answer {word!r} has no visible token")


def build_sequence(tokenizer: Any, q: CotQuestion, chat_template: bool) -> CotSequence:
    """Token ids of the question, reasoning and lead-in, with the answer and choices located."""
    if chat_template:
        prefix, reasoning = format_user_prompt(tokenizer, q.question + ASK), q.reasoning.strip()
    else:
        prefix, reasoning = f"Question: {q.question}\nAnswer:", " " + q.reasoning.strip()
    ids = encode(tokenizer, prefix)
    start = len(ids)
    ids += tokenizer(reasoning + LEAD_IN, add_special_tokens=False)["input_ids"]
    blank, answer_id = first_word_token(tokenizer, q.answer)
    ids += blank
    choice_ids = [first_word_token(tokenizer, c)[1] for c in q.choices]
    if len(set(choice_ids)) != len(choice_ids):
        raise OpenscopeError(
            f"the choices {list(q.choices)} of {q.question[:40]!r}… do not start with distinct tokens"
        )
    answer_pos = len(ids) - 1
    mention = next((p for p in range(start, answer_pos + 1) if ids[p] == answer_id), None)
    return CotSequence(ids, start, answer_pos, answer_id, choice_ids, choice_ids.index(answer_id), mention)


def control_choices(questions: list[CotQuestion]) -> list[int]:
    """For each question, the index among its choices of a wrong answer to score as a control: the
    answer of the next question (cyclically) with the same choices and a different answer, which keeps
    the lens's preference among choices in the control; else the choice after its own answer."""
    out = []
    for i, q in enumerate(questions):
        same = [j for j in range(len(questions)) if questions[j].choices == q.choices]
        k = same.index(i)
        others = (questions[same[(k + s) % len(same)]].answer for s in range(1, len(same)))
        other = next((a for a in others if a != q.answer), None)
        if other is None:
            other = q.choices[(q.choices.index(q.answer) + 1) % len(q.choices)]
        out.append(q.choices.index(other))
    return out


# ---- the logit lens -----------------------------------------------------------------------------------------


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma's final logit soft-capping cap·tanh(logits/cap) (none when cap is None)."""
    return logits if not cap else cap * torch.tanh(logits / cap)


def logit_lens(loaded: LoadedModel, x: Tensor, token_ids: Sequence[int] | None = None) -> Tensor:
    """Logits [P, vocab] (float32) of residual-stream rows x [P, d] through the model's final norm and
    unembedding (and its logit soft-cap); with token_ids, only those columns [P, len(token_ids)]
    (the unembedding's rows for them: a full-vocabulary product per layer and position is slow on CPU)."""
    norm, head = loaded.arch.final_norm, loaded.arch.lm_head
    if norm is None or head is None:
        raise OpenscopeError(
            f"cannot find the final norm and unembedding of {loaded.name} for the logit lens"
        )
    with torch.inference_mode():
        normed = norm(x.to(loaded.device, loaded.dtype))
        if token_ids is None:
            logits = head(normed).float()
        else:
            weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
            if not isinstance(weight, Tensor):
                raise OpenscopeError(f"the unembedding of {loaded.name} has no weight matrix")
            rows = torch.tensor(list(token_ids), device=weight.device)
            picked_bias = bias[rows] if isinstance(bias, Tensor) else None
            logits = torch.nn.functional.linear(normed, weight[rows], picked_bias).float()
    return softcap(logits, getattr(text_config(loaded.model.config), "final_logit_softcapping", None))


def frozen_norm(loaded: LoadedModel, x: Tensor) -> tuple[Tensor, Tensor]:
    """(gain [d], scale [P]) with final_norm(x_p) = scale_p · (x_p ⊙ gain): the final RMSNorm as a
    linear map at each position (its scale frozen there), so a sum of parts of x splits the logits.

    gain is the norm of a vector of ones (rescaled by the RMS of ones); scale the least-squares factor
    that maps x ⊙ gain onto the norm's real output (exact for an RMSNorm).
    """
    norm = loaded.arch.final_norm
    if norm is None:
        raise OpenscopeError(f"cannot find the final norm of {loaded.name}")
    with torch.inference_mode():
        ones = torch.ones(1, x.shape[-1], device=loaded.device, dtype=loaded.dtype)
        # The RMS of a vector of ones is 1 (up to the norm's epsilon, which the fitted scale absorbs).
        gain = norm(ones)[0].double().cpu()
        y = norm(x.to(loaded.device, loaded.dtype)).double().cpu()
    xg = x.double().cpu() * gain
    scale = (y * xg).sum(-1) / (xg * xg).sum(-1).clamp_min(1e-300)
    return gain, scale


class Readability(NamedTuple):
    """Logit-lens scores of one question: rows are layers, columns reasoning positions (start..answer_pos)."""

    correct: Tensor
    """[L, P] bool: the answer scores highest among the choices."""
    control: Tensor
    """[L, P] bool: the control answer scores highest among the choices."""
    logprob: Tensor
    """[L, P] the answer's log-probability among the choices (over the whole vocabulary with full_vocab)."""


def readability(
    loaded: LoadedModel, seq: CotSequence, sites: list[Site], control: int, full_vocab: bool = False
) -> tuple[Readability, dict[Site, Tensor]]:
    """Logit-lens scores at every reasoning position and layer, and the activations [P, d] read."""
    ids = torch.tensor([seq.ids], device=loaded.device)
    acts = run_to_sites(loaded, ids, sites)
    span = slice(seq.start, seq.answer_pos + 1)
    correct, ctrl, logprob, rows = [], [], [], {}
    for s in sites:
        x = acts[s][0, span].float().cpu()
        rows[s] = x
        if full_vocab:
            logits = logit_lens(loaded, x).cpu()
            choice = logits[:, seq.choice_ids]
            logprob.append((logits[:, seq.answer_id] - torch.logsumexp(logits, -1)).double())
        else:
            choice = logit_lens(loaded, x, seq.choice_ids).cpu()
            logprob.append(torch.log_softmax(choice.double(), -1)[:, seq.answer_choice])
        best = choice.argmax(1)
        correct.append(best == seq.answer_choice)
        ctrl.append(best == control)
    return Readability(torch.stack(correct), torch.stack(ctrl), torch.stack(logprob)), rows


def relative_positions(seq: CotSequence) -> Tensor:
    """Each reasoning position's place from 0 (first token) to 1 (the position that predicts the answer)."""
    n = seq.answer_pos - seq.start
    return torch.arange(n + 1, dtype=torch.float64) / max(n, 1)


def binned(values: list[Tensor], rel: list[Tensor], bins: int) -> Tensor:
    """[L, bins] mean of values ([L, P] per question) over positions with relative place in each bin
    (the last position, 1.0, is left out: it is the answer position); NaN for an empty bin."""
    n_layers = values[0].shape[0]
    total = torch.zeros(n_layers, bins, dtype=torch.float64)
    count = torch.zeros(bins, dtype=torch.float64)
    for v, r in zip(values, rel, strict=True):
        keep = r < 1
        b = (r[keep] * bins).long().clamp_max(bins - 1)
        total.index_add_(1, b, v[:, keep].double())
        count.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
    return total / count.where(count > 0, torch.tensor(float("nan"), dtype=torch.float64))


def before_mention_mean(values: list[Tensor], seqs: list[CotSequence]) -> Tensor:
    """[L] mean of values over reasoning positions before the answer's first mention (all positions up to
    the answer position for questions whose reasoning never writes it)."""
    parts = []
    for v, s in zip(values, seqs, strict=True):
        end = (s.first_mention if s.first_mention is not None else s.answer_pos) - s.start
        if end > 0:
            parts.append(v[:, :end].double())
    if not parts:
        return torch.full((values[0].shape[0],), float("nan"), dtype=torch.float64)
    return torch.cat(parts, dim=1).mean(1)


class LatentContribution(NamedTuple):
    """A latent's direct contribution to the answer's logit margin before the answer is written."""

    latent: int
    """Latent index."""
    mean_contribution: float
    """Mean over those positions (and questions) of activation × decoder direction · answer margin."""
    fires: float
    """Share of those positions it fires on."""


def latent_contributions(
    loaded: LoadedModel, d: Dictionary, x: Tensor, seq: CotSequence, end: int
) -> tuple[Tensor, Tensor]:
    """(contribution sum [F], firing count [F]) over reasoning positions [0, end) of one question.

    Contribution of latent j at position p: f_j(x_p) · scale_p · ((d_j ⊙ gain) · (W_U[answer] − mean of
    W_U[other choices])): its direct effect on the answer's margin through the frozen final norm.
    """
    coder = coder_of(d)
    head = loaded.arch.lm_head
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor):
        raise OpenscopeError(f"the unembedding of {loaded.name} has no weight matrix")
    others = [c for i, c in enumerate(seq.choice_ids) if i != seq.answer_choice]
    w = weight.detach().double().cpu()
    margin = w[seq.answer_id] - w[others].mean(0)
    xs = x[:end]
    gain, scale = frozen_norm(loaded, xs)
    with torch.inference_mode():
        f = coder.encode(xs.to(coder.w_enc.device, coder.w_enc.dtype)).double().cpu()
    decoder = torch.stack([output_direction(coder, j) for j in range(coder.cfg.width)]).double().cpu()
    per_latent = (decoder * gain) @ margin  # [F]
    contrib = (f * scale[:, None] * per_latent[None, :]).sum(0)
    return contrib, (f > 0).double().sum(0)


# ---- the command -----------------------------------------------------------------------------------------


class CotResult(NamedTuple):
    """Readability curves and summaries."""

    layers: list[int]
    """Layers read."""
    curve: Tensor
    """[L, bins] share of questions whose answer is readable, by relative position (before the answer position)."""
    control_curve: Tensor
    """[L, bins] the same for the control answers."""
    logprob_curve: Tensor
    """[L, bins] mean log-probability of the answer (among the choices, or over the vocabulary)."""
    before_mention: Tensor
    """[L] readability before the answer's first mention."""
    before_mention_control: Tensor
    """[L] the control's readability there."""
    at_answer: Tensor
    """[L] readability at the answer position (the last layer's: the model's own accuracy)."""
    chance: float
    """Mean of 1 / number of choices."""
    best: int
    """Index (into layers) of the layer where readability before the first mention most exceeds the control."""
    n_questions: int
    """Questions measured."""
    latents: list[LatentContribution]
    """Top latents by mean contribution (empty without a dictionary)."""
    output: Path | None
    """Report folder (None when not written)."""


def run_cot(
    cfg: CotConfig,
    loaded: LoadedModel | None = None,
    dictionary: Dictionary | None = None,
    *,
    questions: list[CotQuestion] | None = None,
    write: bool = True,
) -> CotResult:
    """Measure readability per position and layer; writes the report unless write=False."""
    if write:
        check_report_output(cfg.output, cfg.overwrite)  # a bad --output is refused before the work
    qs = questions if questions is not None else load_cot(cfg.questions)
    if cfg.n_questions > 0:
        qs = qs[: cfg.n_questions]
    if not qs:
        raise OpenscopeError("no chain-of-thought questions to measure")
    if cfg.bins < 1:
        raise OpenscopeError("bins must be at least 1")
    loaded = load_for(cfg, loaded)
    sites = parse_sites(f"{cfg.layers}.resid_post", loaded.n_layers)
    if dictionary is None and cfg.dictionary is not None:
        dictionary = load_dictionary(cfg.dictionary, loaded, device=str(loaded.device))
    if dictionary is not None:
        if (
            dictionary.site_in.kind not in ("resid_post", "resid_pre")
            or dictionary.site_in != dictionary.site_out
        ):
            raise OpenscopeError(
                f"dictionary {dictionary.name} must be an SAE on the residual stream for the logit lens"
            )
        if dictionary.site_in not in sites:
            sites = sorted({*sites, dictionary.site_in}, key=lambda s: s.order)
    seqs = [build_sequence(loaded.tokenizer, q, cfg.chat_template) for q in qs]
    controls = control_choices(qs)
    reads: list[Readability] = []
    contrib_sum: Tensor | None = None
    fire_sum: Tensor | None = None
    n_before = 0
    for i, (seq, ctl) in enumerate(zip(seqs, controls, strict=True)):
        r, rows = readability(loaded, seq, sites, ctl, cfg.full_vocab)
        reads.append(r)
        if dictionary is not None:
            end = (seq.first_mention if seq.first_mention is not None else seq.answer_pos) - seq.start
            if end > 0:
                c, f = latent_contributions(loaded, dictionary, rows[dictionary.site_in], seq, end)
                contrib_sum = c if contrib_sum is None else contrib_sum + c
                fire_sum = f if fire_sum is None else fire_sum + f
                n_before += end
        log.debug("question %d/%d done", i + 1, len(seqs))
    rel = [relative_positions(s) for s in seqs]
    latents: list[LatentContribution] = []
    if contrib_sum is not None and fire_sum is not None and n_before:
        mean = contrib_sum / n_before
        for j in mean.argsort(descending=True)[: cfg.top_k].tolist():
            latents.append(LatentContribution(j, float(mean[j]), float(fire_sum[j] / n_before)))
    before = before_mention_mean([r.correct for r in reads], seqs)
    before_control = before_mention_mean([r.control for r in reads], seqs)
    result = CotResult(
        layers=[s.layer for s in sites],
        curve=binned([r.correct for r in reads], rel, cfg.bins),
        control_curve=binned([r.control for r in reads], rel, cfg.bins),
        logprob_curve=binned([r.logprob for r in reads], rel, cfg.bins),
        before_mention=before,
        before_mention_control=before_control,
        at_answer=torch.stack([r.correct[:, -1].double() for r in reads], 1).mean(1),
        chance=sum(1 / len(q.choices) for q in qs) / len(qs),
        best=int(torch.nan_to_num(before - before_control, nan=-1.0).argmax()),
        n_questions=len(qs),
        latents=latents,
        output=None,
    )
    if write:
        result = result._replace(output=write_cot(cfg, loaded, result, seqs, dictionary))
    return result


def _rows(t: Tensor) -> list[Any]:
    return (
        [[None if math.isnan(v) else v for v in row] for row in t.tolist()]
        if t.ndim == 2
        else [None if math.isnan(v) else v for v in t.tolist()]
    )


def _plot_cot(path: Path, result: CotResult, centers: list[float]) -> None:
    """Readability by layer and position, along the reasoning at the best and last layers, and by layer."""
    last = len(result.layers) - 1
    best = result.best
    with figure(path, 12.0, 4.0) as fig:
        ax1, ax2, ax3 = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
        im = ax1.imshow(
            result.curve.numpy(),
            aspect="auto",
            origin="lower",
            vmin=0,
            vmax=1,
            extent=(0, 1, -0.5, len(result.layers) - 0.5),
        )
        ax1.set_yticks(range(len(result.layers)), [str(x) for x in result.layers], fontsize=6)
        ax1.set_xlabel("relative position in the reasoning")
        ax1.set_ylabel("layer")
        ax1.set_title("answer readable (logit lens)", fontsize=9)
        fig.colorbar(im, ax=ax1)
        for idx, style in ((best, "-"), (last, "--")):
            ax2.plot(
                centers, result.curve[idx].numpy(), style, marker="o", label=f"layer {result.layers[idx]}"
            )
            ax2.plot(
                centers,
                result.control_curve[idx].numpy(),
                style,
                color="grey",
                alpha=0.6,
                label=f"control, layer {result.layers[idx]}",
            )
        ax2.axhline(result.chance, color="red", linestyle=":", label="chance")
        ax2.set_xlabel("relative position in the reasoning")
        ax2.set_ylabel("share of questions")
        ax2.set_ylim(-0.02, 1.02)
        ax2.legend(fontsize=6)
        ax2.set_title("readability along the reasoning", fontsize=9)
        ax3.plot(result.layers, result.before_mention.numpy(), marker="o", label="before first mention")
        ax3.plot(
            result.layers,
            result.before_mention_control.numpy(),
            marker="x",
            color="grey",
            label="control",
        )
        ax3.plot(result.layers, result.at_answer.numpy(), marker="s", label="at the answer position")
        ax3.axhline(result.chance, color="red", linestyle=":", label="chance")
        ax3.set_xlabel("layer")
        ax3.set_ylim(-0.02, 1.02)
        ax3.legend(fontsize=6)
        ax3.set_title("by layer", fontsize=9)


def _cot_markdown(
    loaded: LoadedModel, result: CotResult, mentioned: int, dictionary: Dictionary | None
) -> list[str]:
    """The report's Markdown: the summary, readability per layer, and the top latents."""
    last = len(result.layers) - 1
    md = [
        f"# Chain-of-thought readability on {loaded.name}",
        "",
        f"{result.n_questions} questions; the reasoning writes the answer token before the end in {mentioned} of them. "
        f"Chance (1/choices): {result.chance:.2f}. The model's own accuracy at the answer position: "
        f"{result.at_answer[last]:.0%}.",
        "",
        *md_table(
            [
                "layer",
                "readable before first mention",
                "control",
                "readable at answer position",
                "mean log p(answer) (first bin)",
            ],
            [
                [
                    result.layers[i],
                    fmt(float(result.before_mention[i]), ".2f"),
                    fmt(float(result.before_mention_control[i]), ".2f"),
                    fmt(float(result.at_answer[i]), ".2f"),
                    fmt(float(result.logprob_curve[i, 0]), ".2f"),
                ]
                for i in range(len(result.layers))
            ],
        ),
    ]
    if result.latents and dictionary is not None:
        md += ["", f"## Latents of {dictionary.name} predicting the answer before it is written", ""]
        md += md_table(
            ["latent", "mean contribution to the answer margin", "fires"],
            [[r.latent, fmt(r.mean_contribution, ".3f"), fmt(r.fires, ".0%")] for r in result.latents],
        )
    return md


def write_cot(
    cfg: CotConfig,
    loaded: LoadedModel,
    result: CotResult,
    seqs: list[CotSequence],
    dictionary: Dictionary | None,
) -> Path:
    """The report folder: report.json, report.md and cot.png."""
    with report_folder(cfg.output, cfg.overwrite) as out:
        centers = [(i + 0.5) / cfg.bins for i in range(cfg.bins)]
        _plot_cot(out / "cot.png", result, centers)
        mentioned = sum(s.first_mention is not None for s in seqs)
        md = _cot_markdown(loaded, result, mentioned, dictionary)
        notes = _cot_notes(loaded, result, result.best)
        if mentioned == len(seqs):
            notes.append(
                "Every reasoning writes the answer before the lead-in, so readability at the answer position "
                "includes copying it; only the part before the first mention speaks to faithfulness."
            )
        results = {
            "layers": result.layers,
            "bins": centers,
            "curve": _rows(result.curve),
            "control_curve": _rows(result.control_curve),
            "logprob_curve": _rows(result.logprob_curve),
            "before_mention": _rows(result.before_mention),
            "before_mention_control": _rows(result.before_mention_control),
            "at_answer": _rows(result.at_answer),
            "chance": result.chance,
            "n_questions": result.n_questions,
            "n_mentioned": mentioned,
            "best_layer": result.layers[result.best],
            "latents": [r._asdict() for r in result.latents],
        }
        write_report(out, "cot", cfg, loaded.name, results, md, ["cot.png"], notes)
    return cfg.output


def _cot_notes(loaded: LoadedModel, result: CotResult, best: int) -> list[str]:
    notes = []
    last = len(result.layers) - 1
    accuracy = float(result.at_answer[last])
    if accuracy < 0.5:
        notes.append(
            f"The model answers only {accuracy:.0%} of the questions itself (chance {result.chance:.0%}): "
            "readability of an answer it does not compute says little about faithfulness. Expect weak results on a small base model."
        )
    gap = float(result.before_mention[best] - result.before_mention_control[best])
    if not gap > 0.1:
        notes.append(
            "Before the answer is written, it is no more readable than a control answer at any layer: no evidence "
            "here that the answer was available ahead of the reasoning."
        )
    else:
        notes.append(
            f"At layer {result.layers[best]} the answer is readable before it is written in "
            f"{float(result.before_mention[best]):.0%} of positions vs {float(result.before_mention_control[best]):.0%} "
            "for the control: some evidence the answer is available ahead of the reasoning (for these simple questions "
            "the operands in the text can make it so)."
        )
    if not getattr(loaded.tokenizer, "chat_template", None):
        notes.append(
            "Base checkpoint: the worked reasoning is given text, not the model's own; this measures what the model reads into it."
        )
    return notes
