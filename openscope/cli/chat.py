"""`openscope chat ...`: chat data with a role per token, and the chat-behaviour analyses.

Each analysis's config is its command (flags and help from the dataclass); each writes report.json,
report.md and PNG plots, and prints a headline here.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from openscope.analysis.ablate import AblateConfig, run_ablate
from openscope.analysis.contrast import ContrastConfig, run_contrast
from openscope.analysis.cot import CotConfig, run_cot
from openscope.analysis.diff import DiffConfig, chat_diff
from openscope.analysis.jailbreak import JailbreakConfig, run_jailbreak
from openscope.analysis.roles import RolesConfig, role_report
from openscope.analysis.sweep import SweepConfig, run_sweep
from openscope.cli.app import chat_app, config_command, console
from openscope.config import save_json
from openscope.data.chat import ROLES, render_many
from openscope.data.conversations import ChatSource, count_roles
from openscope.files import check_file_output, json_with
from openscope.models.load import load_model

_ROLE_STYLE = {"template": "dim", "system": "magenta", "user": "cyan", "model": "green"}


@chat_app.command("tokens")
def chat_tokens_command(
    source: str = typer.Option(
        "sharegpt[:200]", help="Chat source: sharegpt or chat:PATH, sliced by conversation."
    ),
    model: str = typer.Option(
        "gemma-3-270m", help="Model whose tokenizer and chat template render the data."
    ),
    show: int = typer.Option(0, help="Print the first N conversations token by token, coloured by role."),
    output: Optional[Path] = typer.Option(None, help="Also write the counts to this JSON file."),  # noqa: UP045
    overwrite: bool = typer.Option(False, help="Replace the counts file already at --output."),
    cache_dir: Optional[Path] = typer.Option(None, help="Model cache folder."),  # noqa: UP045
) -> None:
    """Render chat data with the model's chat template and count its tokens per role (template, system, user, model); --show prints conversations with every token coloured by its role."""

    if output is not None:
        output = check_file_output(
            output, "a role count", json_with(("source", "model", "tokens")), overwrite=overwrite
        )
    tok = load_model(model, cache_dir=cache_dir).tokenizer
    for r in render_many(tok, list(itertools.islice(ChatSource(source).conversations(), show))):
        text = Text()
        for piece, role in zip(tok.convert_ids_to_tokens(r.input_ids), r.roles, strict=True):
            text.append(tok.convert_tokens_to_string([piece]), style=_ROLE_STYLE[ROLES[role]])
        console.print(text)
        console.print("legend: " + ", ".join(f"[{s}]{n}[/]" for n, s in _ROLE_STYLE.items()))
    counts = count_roles(source, tok)
    table = Table(title=f"{counts.conversations} conversations of {source!r} rendered for {model}")
    for col in ("role", "tokens", "share", "turns"):
        table.add_column(col)
    for role, n in counts.tokens.items():
        table.add_row(role, str(n), f"{n / max(counts.total, 1):.1%}", str(counts.turns.get(role, "")))
    table.add_row("all", str(counts.total), "100%", str(sum(counts.turns.values())))
    console.print(table)
    if output is not None:
        save_json(output, {"source": source, "model": model, **counts._asdict(), "total": counts.total})
        console.print(f"counts: {output}")


def _run_chat_roles(cfg: Any) -> None:
    result = role_report(cfg)
    for role, rows in result.ranked.items():
        shown = ", ".join(f"#{r.latent} ({r.specificity:.2f})" for r in rows[:8]) or "none"
        console.print(f"most specific to {role}: {shown}")
    console.print(f"report: {result.files[1]} (and report.json, roles.png)")


def _run_chat_diff(cfg: Any) -> None:
    result = chat_diff(cfg)
    table = Table(
        title=f"one dictionary on two checkpoints (r of log frequencies {result.frequency_correlation:.3f})"
    )
    for col in ("", "model", "L0", "FVU", "delta loss", "KL", "alive"):
        table.add_column(col)
    for label, s in (("A", result.a), ("B", result.b)):
        table.add_row(
            label, s.model, f"{s.l0:.1f}", f"{s.fvu:.3f}", f"{s.delta_loss:.4f}", f"{s.kl:.4f}", str(s.alive)
        )
    console.print(table)
    console.print(f"report: {result.files[1]} (and report.json, diff.png)")


chat_app.command(
    "roles",
    help="Per-role firing frequency and mean activation of a dictionary's latents on chat data, and the "
    "latents most specific to template, system, user and model tokens.",
)(config_command(RolesConfig, _run_chat_roles))
chat_app.command(
    "diff",
    help="Apply one dictionary to two checkpoints of one architecture (base vs chat) on the same data: "
    "which latents' frequencies change most, and its FVU and delta loss on each model.",
)(config_command(DiffConfig, _run_chat_diff))


def _chat_done(kind: str, output: Path | None, headline: str) -> None:
    console.print(headline)
    console.print(f"{kind} report: {output / 'report.md' if output else '-'} (and report.json, plots)")


def _run_chat_contrast(cfg: Any) -> None:
    r = run_contrast(cfg)
    b = r.best.auroc
    _chat_done(
        "contrast",
        r.output,
        f"best site {r.best.site.name}: held-out AUROC {b.auc:.3f} [{b.low:.3f}, {b.high:.3f}]",
    )


def _run_chat_ablate(cfg: Any) -> None:
    r = run_ablate(cfg)
    lines = [
        f"{c.name} ({c.prompts}): KL {c.kl:.4f}, P(watch) {c.watch_clean:.3f} -> {c.watch_edited:.3f}"
        + (
            f", refusals {c.refusal_clean:.0%} -> {c.refusal_edited:.0%}"
            if c.refusal_clean is not None and c.refusal_edited is not None
            else ""
        )
        for c in r.conditions
    ]
    _chat_done("ablate", r.output, "\n".join(lines))


def _run_chat_jailbreak(cfg: Any) -> None:
    r = run_jailbreak(cfg)
    top = ", ".join(f"{t.name} ({t.shift:+.2f})" for t in r.templates[:3])
    judged = (
        f"; refusals: plain {r.plain_refusal:.0%}, Pearson r (refusal vs shift) {r.correlation['pearson']:.2f}"
        if r.plain_refusal is not None and r.correlation is not None
        else ""
    )
    _chat_done(
        "jailbreak",
        r.output,
        f"plain requests at {r.plain_position:.2f}; most harmless-looking: {top}{judged}",
    )


def _run_chat_sweep(cfg: Any) -> None:
    r = run_sweep(cfg)
    pts = "; ".join(f"{p.strength:g}: eff {p.efficacy:.3g}, loss {p.loss:.2f}" for p in r.points)
    _chat_done("sweep", r.output, f"{r.target}: {pts}")


def _run_chat_cot(cfg: Any) -> None:
    r = run_cot(cfg)
    i = r.best
    _chat_done(
        "cot",
        r.output,
        f"model accuracy {float(r.at_answer[-1]):.0%} (chance {r.chance:.0%}); best layer {r.layers[i]}: readable "
        f"before written {float(r.before_mention[i]):.0%} vs control {float(r.before_mention_control[i]):.0%}",
    )


# Help text: each config's class docstring, on one line.
for _name, _cls, _run in (
    ("contrast", ContrastConfig, _run_chat_contrast),
    ("ablate", AblateConfig, _run_chat_ablate),
    ("jailbreak", JailbreakConfig, _run_chat_jailbreak),
    ("sweep", SweepConfig, _run_chat_sweep),
    ("cot", CotConfig, _run_chat_cot),
):
    chat_app.command(_name, help=" ".join((_cls.__doc__ or "").split()))(config_command(_cls, _run))
