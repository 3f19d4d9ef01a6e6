"""`openscope chat ablate`: remove the contrast direction (or its top latents) and add it back, and
measure what changes in the next-token distributions and the generated text.

Edits of the residual stream along a direction r (an `DirectionEdit`, applied by forward hooks
through `openscope.models.hooks.hook_site`, at every position, generated ones too):

- **ablate**: x ← x − (x·r̂) r̂, the directional ablation of Arditi et al. (2024). Applied at the
  input of the first block and the output of every block, so no block reads a residual stream with
  any component along r. On Gemma this can wreck the model: its residual stream carries a large
  component shared by all prompts, which a difference-of-means direction overlaps; so the command
  also reports **mean ablation**, the projection set at every layer to the negative set's mean
  projection there (a `set` edit), which removes only what distinguishes the prompts;
- **add**: x ← x + s·r at one site (activation addition; with r = μ_pos − μ_neg and s = 1 this moves
  a negative prompt's mean onto the positive mean);
- **set**: x ← x − (x·r̂) r̂ + c r̂, the projection set to c (a number, or a [batch, seq] tensor such as
  the projections recorded in a clean run, which restores the clean forward exactly).

Latents go through `openscope.interventions.steer`: ablating clamps them to 0, adding clamps them to their mean
activation on the positive prompts.

On the positive prompts the command ablates (direction: to zero and to the mean; latents) and, as a check, ablates then
restores the clean projections (its KL must be ≈ 0); on the negative prompts it adds. For each
condition: KL(clean ‖ edited) of the next-token distribution at the last prompt token, the
probability of a few watched first tokens (default I / Sorry / Sure / Here) before and after, and
greedy continuations of a few prompts side by side. With `--judge`, every prompt is also answered
greedily, clean and edited: the refusal rate of each (the string judge of `openscope.analysis.refusal`)
and the coherence of the answers (their mean per-token loss under the unedited model), which is what
shows on a refusing chat model that ablation removes refusals and addition induces them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.analysis.common import (
    ChatRunConfig,
    last_token_activations,
    load_for,
    next_token_logits,
    write_report,
)
from openscope.analysis.contrast import (
    SiteDirection,
    encode_latents,
    encode_prompts,
    load_direction,
    load_directions,
    top_latents_from_report,
)
from openscope.analysis.refusal import EditFactory, Judged, answer_nll, judge_answers, mean_finite, no_edit
from openscope.coders.dictionary import Dictionary, load_dictionary
from openscope.data.prompts import load_prompts
from openscope.errors import OpenscopeError
from openscope.eval.metrics import next_token_kl
from openscope.interventions.directions import DirectionEdit, direction_edits, unit
from openscope.interventions.steer import Intervention, generate_ids, steering
from openscope.models.hooks import hook_site
from openscope.models.load import LoadedModel
from openscope.models.sites import Site, parse_sites
from openscope.models.tokens import first_tokens
from openscope.reports import check_report_output, figure, fmt, md_table, report_folder

log = logging.getLogger(__name__)


def residual_sites(loaded: LoadedModel, layers: str = "*") -> list[Site]:
    """Every place the residual stream is read between blocks: block 0's input, then every block's
    output; `layers` (N, N-M, mid, *) keeps the outputs of those blocks (and block 0's input with 0)."""
    chosen = [s.layer for s in parse_sites(f"{layers}.resid_post", loaded.n_layers)]
    return [
        *([Site(0, "resid_pre")] if 0 in chosen else []),
        *(Site(layer, "resid_post") for layer in chosen),
    ]


def ablation_edits(loaded: LoadedModel, direction: Tensor, layers: str = "*") -> list[DirectionEdit]:
    """Directional ablation of r at every residual site (of the chosen layers)."""
    return [DirectionEdit(s, direction, "ablate") for s in residual_sites(loaded, layers)]


def mean_ablation_edits(direction: Tensor, means: dict[Site, Tensor]) -> list[DirectionEdit]:
    """At every site with a reference mean μ (e.g. the negative set's, per layer), the projection on r̂
    set to μ·r̂: the component along r is replaced by its typical value instead of zero.

    Gemma's residual stream carries a large component shared by all prompts; a difference-of-means
    direction overlaps it, and zeroing the projection removes that shared part too.
    """
    u = unit(direction)
    return [
        DirectionEdit(s, direction, "set", float(m.double() @ u))
        for s, m in sorted(means.items(), key=lambda kv: kv[0].order)
    ]


@torch.inference_mode()
def clean_projections(
    loaded: LoadedModel, ids: Tensor, sites: Sequence[Site], direction: Tensor
) -> dict[Site, Tensor]:
    """x·r̂ [batch, seq] at each site in a clean forward of ids (what `set` edits write back to restore it)."""
    u = unit(direction)
    out: dict[Site, Tensor] = {}
    with ExitStack() as stack:
        for s in sites:
            stack.enter_context(
                hook_site(loaded, s, lambda x, s=s: out.__setitem__(s, (x.double() @ u.to(x.device)).float()))
            )
        loaded.model(input_ids=ids.to(loaded.device), use_cache=False)
    return out


def restore_edits(loaded: LoadedModel, ids: Tensor, direction: Tensor) -> list[DirectionEdit]:
    """Ablation at every residual site, each followed by writing back the clean projection there."""
    sites = residual_sites(loaded)
    clean = clean_projections(loaded, ids, sites, direction)
    return [
        e
        for s in sites
        for e in (DirectionEdit(s, direction, "ablate"), DirectionEdit(s, direction, "set", clean[s]))
    ]


def kl(clean_logits: Tensor, logits: Tensor) -> float:
    """KL(P_clean ‖ P) of two next-token distributions [vocab]."""
    return float(next_token_kl(clean_logits[None, None], logits[None, None])[0, 0])


# ---- the command -------------------------------------------------------------------------------------


@dataclass
class AblateConfig(ChatRunConfig):
    """Ablate the contrast direction (and top latents) on positive prompts, add it on negative ones, and
    report the change in next-token distributions and generated text."""

    contrast: Path = Path("openscope-out/chat/contrast")
    """Folder written by `openscope chat contrast` (its directions.safetensors and report.json)."""
    site: str = ""
    """Site of the direction to use (e.g. 6.resid_post); empty: the contrast report's best site."""
    positive: str = "advbench[-64:]"
    """Prompts to ablate on (default: AdvBench's last 64, which a default contrast run did not use)."""
    negative: str = "sharegpt"
    """Prompts to add the direction to."""
    n: int = 16
    """Prompts of each set measured (one forward per prompt and condition)."""
    max_chars: int = 300
    """ShareGPT turns longer than this are skipped."""
    ablate_layers: str = "*"
    """Layers whose residual stream the direction is ablated from (N, N-M, mid, *); * also covers block 0's input."""
    add_strength: float = 1.0
    """Multiple of μ_pos − μ_neg added at the direction's site on the negative prompts."""
    dictionary: Path | None = None
    """A dictionary folder whose top latents to ablate and add as well."""
    latents: list[int] = field(default_factory=list)
    """Latents of --dictionary to edit; none given: the contrast report's top latents (positive effect) for it."""
    n_latents: int = 5
    """How many of the report's top latents to take."""
    watch: list[str] = field(default_factory=lambda: ["I", "Sorry", "Sure", "Here"])
    """Words whose first token's probability as the model's first answer token is reported."""
    n_generate: int = 3
    """Prompts of each set to continue greedily, clean and edited, in the report."""
    max_new_tokens: int = 24
    """Tokens per continuation."""
    judge: bool = False
    """Also answer every prompt greedily (--max-new-tokens), clean and edited: the refusal rate of each (a string judge) and its coherence (the answers' mean per-token loss under the unedited model)."""
    output: Path = Path("openscope-out/chat/ablate")
    """Folder for report.json, report.md and plots."""


class Condition(NamedTuple):
    """The effect of one edit on one prompt set."""

    name: str
    """e.g. "ablate direction"."""
    prompts: str
    """Which set it ran on (positive / negative)."""
    kl: float
    """Mean KL(clean ‖ edited) of the next-token distribution at the last prompt token."""
    watch_clean: float
    """Mean probability of the watched first tokens, clean."""
    watch_edited: float
    """Mean probability of the watched first tokens, edited."""
    top1_same: float
    """Fraction of prompts whose most likely next token is unchanged."""
    samples: list[dict[str, str]]
    """Greedy continuations: prompt, clean, edited (with --judge: every prompt's, with clean_refused and edited_refused)."""
    refusal_clean: float | None = None
    """Share of clean answers judged refusals (None: not judged, --judge off)."""
    refusal_edited: float | None = None
    """Share of edited answers judged refusals."""
    nll_clean: float | None = None
    """Coherence: mean per-token loss of the clean answers under the unedited model."""
    nll_edited: float | None = None
    """Coherence: mean per-token loss of the edited answers under the unedited model."""


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def measure_condition(
    loaded: LoadedModel,
    name: str,
    which: str,
    prompts: Sequence[str],
    seqs: Sequence[Sequence[int]],
    make_edit: EditFactory,
    watch: Sequence[int],
    n_generate: int,
    max_new_tokens: int,
) -> Condition:
    """Run every prompt clean and edited (one forward each) and continue the first n_generate greedily."""
    kls, wc, we, same, samples = [], [], [], [], []
    watch_ids = list(watch)
    for i, seq in enumerate(seqs):
        ids = torch.tensor([list(seq)], dtype=torch.long)
        clean = next_token_logits(loaded, seq)
        with make_edit(ids):
            edited = next_token_logits(loaded, seq)
        kls.append(kl(clean, edited))
        pc, pe = torch.softmax(clean.double(), -1), torch.softmax(edited.double(), -1)
        wc.append(float(pc[watch_ids].sum()) if watch_ids else 0.0)
        we.append(float(pe[watch_ids].sum()) if watch_ids else 0.0)
        same.append(float(clean.argmax() == edited.argmax()))
        if i < n_generate:
            decode = loaded.tokenizer.decode
            plain = generate_ids(loaded, ids, (), max_new_tokens)
            with make_edit(ids):
                changed = generate_ids(loaded, ids, (), max_new_tokens)
            samples.append(
                {
                    "prompt": prompts[i],
                    "clean": decode(plain, skip_special_tokens=True),
                    "edited": decode(changed, skip_special_tokens=True),
                }
            )
    return Condition(name, which, _mean(kls), _mean(wc), _mean(we), _mean(same), samples)


class AblateResult(NamedTuple):
    """What `ablate` measured."""

    site: Site
    """Site of the direction."""
    conditions: list[Condition]
    """One per edit and prompt set."""
    latents: list[int]
    """Latents edited (empty without a dictionary)."""
    output: Path | None
    """Report folder (None when not written)."""


class PromptSet(NamedTuple):
    """One prompt set of the command, as text and as token ids."""

    which: str
    """positive or negative."""
    prompts: list[str]
    """The prompts."""
    seqs: list[list[int]]
    """Their token ids (BOS + rendered prompt)."""
    clean: dict[str, Judged]
    """The clean answers once judged (--judge), kept so every condition on the set reuses them."""


def _measure(
    cfg: AblateConfig,
    loaded: LoadedModel,
    name: str,
    ps: PromptSet,
    make_edit: EditFactory,
    watch: Sequence[int],
    generate: bool = True,
) -> Condition:
    """`measure_condition` on one prompt set (continuations only when `generate`). With --judge every
    prompt is answered clean and edited, and the samples are those answers (all of them, with verdicts)."""
    judge = cfg.judge and generate
    n_generate, max_new = (cfg.n_generate, cfg.max_new_tokens) if generate and not judge else (0, 0)
    c = measure_condition(loaded, name, ps.which, ps.prompts, ps.seqs, make_edit, watch, n_generate, max_new)
    if not judge:
        return c
    if "answers" not in ps.clean:
        ps.clean["answers"] = judge_answers(loaded, ps.seqs, no_edit, cfg.max_new_tokens)
    clean = ps.clean["answers"]
    edited = judge_answers(loaded, ps.seqs, make_edit, cfg.max_new_tokens)
    nll = [  # coherence: each answer read by the unedited model
        mean_finite([answer_nll(loaded, s, a) for s, a in zip(ps.seqs, j.ids, strict=True)])
        for j in (clean, edited)
    ]
    samples = [
        {"prompt": p, "clean": a, "edited": b, "clean_refused": str(ra), "edited_refused": str(rb)}
        for p, a, b, ra, rb in zip(
            ps.prompts, clean.answers, edited.answers, clean.refused, edited.refused, strict=True
        )
    ]
    return c._replace(
        samples=samples,
        refusal_clean=clean.rate,
        refusal_edited=edited.rate,
        nll_clean=nll[0],
        nll_edited=nll[1],
    )


def direction_conditions(
    cfg: AblateConfig,
    loaded: LoadedModel,
    sd: SiteDirection,
    pos: PromptSet,
    neg: PromptSet,
    watch: Sequence[int],
) -> list[Condition]:
    """The direction's edits: ablation (projection to zero, to the negative mean) and the restore check
    on the positive prompts, addition at its site on the negative prompts."""
    direction = sd.direction.double()

    def ablate(_ids: Tensor) -> AbstractContextManager[object]:
        return direction_edits(loaded, ablation_edits(loaded, direction, cfg.ablate_layers))

    # The negative set's mean projection at every residual site the contrast measured.
    neg_means = {
        s: d.mean_neg
        for s, d in load_directions(cfg.contrast).items()
        if s in residual_sites(loaded, cfg.ablate_layers)
    }

    def to_mean(_ids: Tensor) -> AbstractContextManager[object]:
        return direction_edits(loaded, mean_ablation_edits(direction, neg_means))

    def restore(ids: Tensor) -> AbstractContextManager[object]:
        return direction_edits(loaded, restore_edits(loaded, ids, direction))

    def add(_ids: Tensor) -> AbstractContextManager[object]:
        return direction_edits(loaded, [DirectionEdit(sd.site, direction, "add", cfg.add_strength)])

    layers = cfg.ablate_layers
    return [
        _measure(cfg, loaded, f"ablate direction (projection to 0, layers {layers})", pos, ablate, watch),
        _measure(
            cfg,
            loaded,
            f"ablate direction (projection to the negative mean, layers {layers})",
            pos,
            to_mean,
            watch,
        ),
        _measure(
            cfg, loaded, "ablate + restore clean projection (check: KL ≈ 0)", pos, restore, watch, False
        ),
        _measure(cfg, loaded, f"add {cfg.add_strength:g}×direction at {sd.site.name}", neg, add, watch),
    ]


def latent_conditions(
    cfg: AblateConfig,
    loaded: LoadedModel,
    dictionary: Dictionary,
    pos: PromptSet,
    neg: PromptSet,
    watch: Sequence[int],
) -> tuple[list[int], list[Condition]]:
    """(latents edited, conditions): the latents clamped to 0 on the positive prompts and to their mean
    positive activation on the negative prompts (--latents, else the contrast report's top latents)."""
    latents = list(cfg.latents) or top_latents_from_report(cfg.contrast, dictionary.name, cfg.n_latents)
    if not latents:
        log.warning(
            "the contrast report lists no significant latents for %s: no latent edits", dictionary.name
        )
        return [], []
    # Target of "adding the latents": their mean activation at the last token of the positive prompts.
    x = last_token_activations(loaded, pos.seqs, [dictionary.site_in], cfg.batch_size)[dictionary.site_in]
    means = encode_latents(dictionary, x)[:, latents].mean(0).tolist()
    zero = [Intervention(dictionary, j, "clamp", 0.0) for j in latents]
    to_pos = [Intervention(dictionary, j, "clamp", m) for j, m in zip(latents, means, strict=True)]
    return latents, [
        _measure(cfg, loaded, f"ablate latents {latents}", pos, lambda _i: steering(loaded, zero), watch),
        _measure(
            cfg,
            loaded,
            f"clamp latents {latents} to their positive mean",
            neg,
            lambda _i: steering(loaded, to_pos),
            watch,
        ),
    ]


def run_ablate(
    cfg: AblateConfig,
    loaded: LoadedModel | None = None,
    dictionary: Dictionary | None = None,
    *,
    write: bool = True,
) -> AblateResult:
    """Ablate / add the contrast direction (and top latents); writes the report unless write=False."""
    if write:
        check_report_output(cfg.output, cfg.overwrite)  # a bad --output is refused before the work
    if cfg.judge and cfg.max_new_tokens < 1:
        raise OpenscopeError(f"--max-new-tokens must be positive to judge answers, got {cfg.max_new_tokens}")
    sd = load_direction(cfg.contrast, cfg.site)
    positive = load_prompts(cfg.positive, cfg.n, cfg.max_chars)
    negative = load_prompts(cfg.negative, cfg.n, cfg.max_chars)
    loaded = load_for(cfg, loaded)
    if sd.direction.numel() != loaded.d_model:
        raise OpenscopeError(
            f"the direction at {sd.site.name} has width {sd.direction.numel()}, the model's residual stream {loaded.d_model}"
        )
    if dictionary is None and cfg.dictionary is not None:
        dictionary = load_dictionary(cfg.dictionary, loaded, device=str(loaded.device))
    pos = PromptSet("positive", positive, encode_prompts(loaded, positive, cfg.chat_template), {})
    neg = PromptSet("negative", negative, encode_prompts(loaded, negative, cfg.chat_template), {})
    watch = first_tokens(loaded.tokenizer, cfg.watch)
    conditions = direction_conditions(cfg, loaded, sd, pos, neg, watch)
    latents: list[int] = []
    if dictionary is not None:
        latents, edited = latent_conditions(cfg, loaded, dictionary, pos, neg, watch)
        conditions += edited
    result = AblateResult(sd.site, conditions, latents, None)
    if write:
        result = result._replace(output=write_ablate(cfg, loaded, result))
    return result


def _plot_ablate(path: Path, result: AblateResult, watch: Sequence[str]) -> None:
    """KL per condition, and the watched tokens' probability clean and edited."""
    with figure(path, 8.0, 4.0) as fig:
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        labels = [f"{c.name[:28]}\n({c.prompts})" for c in result.conditions]
        ys = range(len(labels))
        ax1.barh(list(ys), [c.kl for c in result.conditions])
        ax1.set_yticks(list(ys), labels, fontsize=7)
        ax1.set_xlabel("KL(clean ‖ edited), last prompt token")
        ax1.invert_yaxis()
        w = 0.4
        ax2.barh([y - w / 2 for y in ys], [c.watch_clean for c in result.conditions], w, label="clean")
        ax2.barh([y + w / 2 for y in ys], [c.watch_edited for c in result.conditions], w, label="edited")
        ax2.set_yticks(list(ys), [""] * len(labels))
        ax2.set_xlabel(f"P(first token in {', '.join(watch)})")
        ax2.invert_yaxis()
        ax2.legend(fontsize=7)


def write_ablate(cfg: AblateConfig, loaded: LoadedModel, result: AblateResult) -> Path:
    """The report folder: report.json, report.md and ablate.png."""
    with report_folder(cfg.output, cfg.overwrite) as out:
        rows = [c._asdict() for c in result.conditions]
        _plot_ablate(out / "ablate.png", result, cfg.watch)
        md = [
            f"# Ablation and addition of the contrast direction at {result.site.name} on {loaded.name}",
            "",
            f"Direction from {cfg.contrast}; ablation removes it (or sets it to the negative mean) in the "
            f"residual stream of layers {cfg.ablate_layers}; addition adds "
            f"{cfg.add_strength:g}×(μ_pos − μ_neg) at {result.site.name}, at every position.",
            "",
            *md_table(
                ["condition", "prompts", "KL", "P(watch) clean", "P(watch) edited", "top-1 unchanged"],
                [
                    [
                        c.name,
                        c.prompts,
                        fmt(c.kl, ".4f"),
                        fmt(c.watch_clean, ".3f"),
                        fmt(c.watch_edited, ".3f"),
                        fmt(c.top1_same, ".0%"),
                    ]
                    for c in result.conditions
                ],
            ),
        ]
        if cfg.judge:
            md += [
                "",
                f"Refusals judged on every prompt's greedy answer ({cfg.max_new_tokens} tokens, string judge of "
                "openscope.analysis.refusal); coherence = the answers' mean per-token loss under the unedited model.",
                "",
                *md_table(
                    ["condition", "prompts", "refusal clean", "refusal edited", "loss clean", "loss edited"],
                    [
                        [
                            c.name,
                            c.prompts,
                            fmt(c.refusal_clean, ".0%"),
                            fmt(c.refusal_edited, ".0%"),
                            fmt(c.nll_clean, ".2f"),
                            fmt(c.nll_edited, ".2f"),
                        ]
                        for c in result.conditions
                        if c.refusal_clean is not None
                    ],
                ),
            ]
        for c in result.conditions:
            for s in c.samples[: cfg.n_generate]:
                md += [
                    "",
                    f"**{c.name}** — {s['prompt'][:120]!r}",
                    "",
                    f"- clean: {s['clean']!r}",
                    f"- edited: {s['edited']!r}",
                ]
        notes = []
        if not getattr(loaded.tokenizer, "chat_template", None):
            notes.append(
                "Base checkpoint: it does not refuse, so ablating a 'harmful' direction cannot remove refusals here; "
                "the KL and the continuations show how much the direction matters to the next token, nothing more."
            )
        restore = next(c for c in result.conditions if c.name.startswith("ablate + restore"))
        if restore.kl > 1e-4:
            notes.append(
                f"The restore check left KL {restore.kl:.2e} (expected ≈ 0): numerical noise in the edited forward."
            )
        results = {"site": result.site.name, "latents": result.latents, "conditions": rows}
        write_report(out, "ablate", cfg, loaded.name, results, md, ["ablate.png"], notes)
    return cfg.output
