"""Base vs chat diffing: one dictionary applied to two checkpoints of one architecture on the same data.

Gemma Scope 2 trained its chat-model dictionaries by fine-tuning base-model ones; before doing that,
one wants to know how far the base dictionary carries over. `chat_diff` runs the dictionary on model A
(e.g. the base) and model B (e.g. a chat fine-tune) over the same conversations and reports:

- per latent, its firing frequency and mean activation on each model, and the change
  log10(f_B / f_A) (each frequency smoothed as (n + 1) / (N + 1), so a latent that never fires on one
  model has a finite change); the latents that change most, up and down, among those that fired at
  least `min_fired` times on either model; per role too when the data is chat;
- how well the dictionary reconstructs each model (`openscope.eval.evaluate`): L0, FVU, and the delta
  LM loss and KL with the reconstruction spliced in. The dictionary is trained on A, so B's numbers
  against A's say how much of B it still explains.

The two checkpoints must share the architecture (hidden size, layers, heads, vocabulary...):
anything else is an OpenscopeError naming the first difference; their tokenizers must have the same
size (each model reads the data through its own). Writes report.json, report.md and diff.png (the
`openscope.analysis.common` report format), and each model's full evaluation under eval_a/ and eval_b/.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from openscope.analysis.common import write_report
from openscope.analysis.roles import one_dictionary
from openscope.coders.dictionary import Dictionary, validate_dictionary
from openscope.data.chat import ROLES, role_ids
from openscope.data.sources import is_chat_source
from openscope.errors import OpenscopeError
from openscope.eval.evaluate import EvalConfig, evaluate
from openscope.features.roles import RoleStats, measure_roles
from openscope.models.load import DEFAULT_MODEL, LoadedModel, load_model, resolve_device, text_config
from openscope.reports import REPORT_MD, check_report_output, figure, fmt, md_table, report_folder

log = logging.getLogger(__name__)

ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
"""Config fields two checkpoints must share for one dictionary to apply to both."""


@dataclass
class DiffConfig:
    """Which dictionary, which two checkpoints, which data, and where to write the report."""

    dictionary: Path = Path("openscope-out/dictionaries")
    """A dictionary folder (or a folder holding exactly one), trained on model A."""
    model_a: str = DEFAULT_MODEL
    """Checkpoint A (e.g. the base model): a known name, a local Hugging Face directory or a hub id."""
    model_b: str = ""
    """Checkpoint B (e.g. a chat fine-tune of A): same architecture as A."""
    source: str = "sharegpt[:200]"
    """Data both models see: a chat source (sharegpt, chat:PATH) or any text source."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet, saved dataset) holding the text of a plain-text source."""
    roles: str = ""
    """Chat sources: measure only tokens of these roles, e.g. `model` (of template, system, user, model); empty: all."""
    tokens: int = 16_384
    """Token budget per model (context positions)."""
    context_len: int = 256
    """Tokens per packed context."""
    batch_size: int = 4
    """Contexts per forward (the evaluation keeps two logits tensors of batch x context x vocabulary)."""
    top: int = 20
    """Latents listed per direction of change."""
    min_fired: int = 5
    """A latent is ranked only if it fired at least this often on one of the models."""
    output: Path = Path("openscope-out/chat-diff")
    """Folder for report.json, report.md, diff.png, and eval_a/, eval_b/."""
    overwrite: bool = False
    """Replace the report already in --output (only a report openscope wrote is ever replaced)."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""


class ModelSide(NamedTuple):
    """The dictionary on one checkpoint."""

    model: str
    """The checkpoint."""
    n_tokens: int
    """Tokens measured."""
    l0: float
    """Mean active latents per token."""
    fvu: float
    """Fraction of variance unexplained."""
    delta_loss: float
    """CE with the reconstruction spliced in minus the clean CE (nats)."""
    kl: float
    """KL(clean ‖ spliced) of the next-token distributions (nats)."""
    ce_clean: float
    """The checkpoint's own CE on the data (nats)."""
    alive: int
    """Latents that fired at least once."""


class LatentChange(NamedTuple):
    """One latent on both checkpoints."""

    latent: int
    """Latent index."""
    frequency_a: float
    """Firing frequency on A."""
    frequency_b: float
    """Firing frequency on B."""
    mean_a: float
    """Mean activation over its firings on A (0 if it never fired)."""
    mean_b: float
    """Mean activation over its firings on B."""
    log10_change: float
    """log10 of the smoothed frequency ratio B / A (module docstring)."""
    by_role: dict[str, tuple[float, float]]
    """Chat data: per role, (frequency on A, frequency on B)."""


class DiffReport(NamedTuple):
    """The result of `chat_diff`."""

    a: ModelSide
    """The dictionary on checkpoint A."""
    b: ModelSide
    """The dictionary on checkpoint B."""
    frequency_correlation: float
    """Pearson correlation of log10 smoothed frequencies over the latents alive on either model."""
    changed_2x: int
    """Ranked latents whose frequency changed by more than a factor of two."""
    up: list[LatentChange]
    """Latents firing most more often on B, largest change first."""
    down: list[LatentChange]
    """Latents firing most less often on B."""
    files: list[Path]
    """Files written."""


# ---- pure parts ---------------------------------------------------------------------------------------


def architecture_differences(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """(field, A's value, B's value) for every ARCHITECTURE_FIELDS entry where two configs differ."""
    ca, cb = text_config(a), text_config(b)
    out = []
    for name in ARCHITECTURE_FIELDS:
        va, vb = getattr(ca, name, None), getattr(cb, name, None)
        if va != vb:
            out.append((name, va, vb))
    return out


def check_same_architecture(a: LoadedModel, b: LoadedModel) -> None:
    """OpenscopeError unless two checkpoints share the architecture (and so every site's width)."""
    differ = architecture_differences(a.model.config, b.model.config)
    if a.n_layers != b.n_layers and not any(k == "num_hidden_layers" for k, _, _ in differ):
        differ.insert(0, ("layers", a.n_layers, b.n_layers))
    if differ:
        k, va, vb = differ[0]
        raise OpenscopeError(
            f"{b.name} is not the architecture of {a.name} ({k}: {vb!r} there, {va!r} in A); "
            "diffing applies one dictionary to two checkpoints of one architecture"
        )
    if len(a.tokenizer) != len(b.tokenizer):
        raise OpenscopeError(
            f"{a.name} and {b.name} have different tokenizers ({len(a.tokenizer)} vs {len(b.tokenizer)} tokens)"
        )


def smoothed_frequency(n_fired: Tensor, n_tokens: int) -> Tensor:
    """(n + 1) / (N + 1): a frequency that is never zero, so ratios stay finite."""
    return (n_fired.double() + 1) / (n_tokens + 1)


def frequency_change(a: RoleStats, b: RoleStats) -> Tensor:
    """[F] log10 of the smoothed frequency ratio B / A over all tokens."""
    fa = smoothed_frequency(a.n_fired.sum(0), int(a.n_tokens.sum()))
    fb = smoothed_frequency(b.n_fired.sum(0), int(b.n_tokens.sum()))
    return torch.log10(fb / fa)


def _overall(stats: RoleStats) -> tuple[Tensor, Tensor]:
    """(frequency [F], mean activation [F]) over all tokens."""
    fired, total = stats.n_fired.sum(0), int(stats.n_tokens.sum())
    return fired.double() / max(total, 1), stats.act_sum.sum(0) / fired.clamp(min=1).double()


def rank_changes(
    a: RoleStats, b: RoleStats, top: int, min_fired: int, chat: bool
) -> tuple[list[LatentChange], list[LatentChange], float, int]:
    """(latents up, latents down, correlation of log frequencies, latents changed > 2x); see DiffReport."""
    change = frequency_change(a, b)
    fired_a, fired_b = a.n_fired.sum(0), b.n_fired.sum(0)
    ranked = (torch.maximum(fired_a, fired_b) >= max(min_fired, 1)).nonzero().squeeze(1)
    freq_a, mean_a = _overall(a)
    freq_b, mean_b = _overall(b)
    present = [i for i, _ in enumerate(ROLES) if chat and int(a.n_tokens[i] + b.n_tokens[i]) > 0]

    def row(j: int) -> LatentChange:
        by_role = {ROLES[i]: (float(a.frequency[i, j]), float(b.frequency[i, j])) for i in present}
        return LatentChange(
            j,
            float(freq_a[j]),
            float(freq_b[j]),
            float(mean_a[j]),
            float(mean_b[j]),
            float(change[j]),
            by_role,
        )

    order = ranked[torch.argsort(change[ranked], descending=True, stable=True)]
    up = [row(j) for j in order[:top].tolist() if change[j] > 0]
    down = [row(j) for j in order.flip(0)[:top].tolist() if change[j] < 0]
    alive = ((fired_a > 0) | (fired_b > 0)).nonzero().squeeze(1)
    la = torch.log10(smoothed_frequency(fired_a, int(a.n_tokens.sum())))[alive]
    lb = torch.log10(smoothed_frequency(fired_b, int(b.n_tokens.sum())))[alive]
    corr = float(torch.corrcoef(torch.stack([la, lb]))[0, 1]) if len(alive) > 1 else math.nan
    changed = int((change[ranked].abs() > math.log10(2)).sum())
    return up, down, corr, changed


# ---- the run ------------------------------------------------------------------------------------------


def _side(loaded: LoadedModel, d: Dictionary, cfg: DiffConfig, stats: RoleStats, folder: Path) -> ModelSide:
    ecfg = EvalConfig(
        dictionaries=[],
        source=cfg.source,
        text_field=cfg.text_field,
        roles=cfg.roles,
        tokens=cfg.tokens,
        context_len=cfg.context_len,
        batch_size=cfg.batch_size,
        loss_recovered=False,
        output=folder,
        device=cfg.device,
    )
    report = evaluate(ecfg, loaded=loaded, dictionaries=[d], progress=False)
    r = report.dictionaries[0]
    alive = int((stats.n_fired.sum(0) > 0).sum())
    return ModelSide(
        loaded.name, r.recon.n_tokens, r.recon.l0, r.recon.fvu, r.lm.delta_loss, r.lm.kl, r.lm.ce_clean, alive
    )


def chat_diff(
    cfg: DiffConfig,
    model_a: LoadedModel | None = None,
    model_b: LoadedModel | None = None,
    dictionary: Dictionary | None = None,
) -> DiffReport:
    """Apply one dictionary to two checkpoints on the same data and write the comparison (module docstring)."""
    if not cfg.model_b and model_b is None:
        raise OpenscopeError("--model-b is required: the checkpoint to compare with --model-a")
    wanted = role_ids(cfg.roles)
    chat = is_chat_source(cfg.source)
    if wanted and not chat:
        raise OpenscopeError(f"--roles needs a chat source (sharegpt or chat:PATH), not {cfg.source!r}")
    device = resolve_device(cfg.device)
    check_report_output(cfg.output, cfg.overwrite)
    a = model_a or load_model(cfg.model_a, device=device, cache_dir=cfg.cache_dir)
    b = model_b or load_model(cfg.model_b, device=device, cache_dir=cfg.cache_dir)
    check_same_architecture(a, b)
    d = dictionary or one_dictionary(cfg.dictionary, a)
    validate_dictionary(d, a)
    d.coder.to(a.device).eval()
    measured = {}
    sides = {}
    with report_folder(cfg.output, cfg.overwrite) as output:
        for key, loaded in (("a", a), ("b", b)):
            log.info("diff: measuring %s on %s", d.name, loaded.name)
            d.coder.to(loaded.device)
            measured[key] = measure_roles(
                loaded, d, cfg.source, cfg.text_field, cfg.context_len, cfg.tokens, cfg.batch_size, wanted
            )
            sides[key] = _side(loaded, d, cfg, measured[key], output / f"eval_{key}")
        up, down, corr, changed = rank_changes(measured["a"], measured["b"], cfg.top, cfg.min_fired, chat)
        files = _write(cfg, d, sides["a"], sides["b"], measured, up, down, corr, changed, output)
    files = [Path(cfg.output) / f.relative_to(output) for f in files]
    return DiffReport(sides["a"], sides["b"], corr, changed, up, down, files)


def _plot_diff(
    path: Path,
    d: Dictionary,
    a: ModelSide,
    b: ModelSide,
    measured: dict[str, RoleStats],
    up: list[LatentChange],
    down: list[LatentChange],
    corr: float,
) -> None:
    """Each latent's frequency on A against B (the most changed in colour), and the splice metrics."""
    sa, sb = measured["a"], measured["b"]
    fa = smoothed_frequency(sa.n_fired.sum(0), int(sa.n_tokens.sum()))
    fb = smoothed_frequency(sb.n_fired.sum(0), int(sb.n_tokens.sum()))
    alive = (sa.n_fired.sum(0) > 0) | (sb.n_fired.sum(0) > 0)
    with figure(path, 10.0, 4.2) as fig:
        ax = fig.add_subplot(1, 2, 1)
        ax.scatter(fa[alive].numpy(), fb[alive].numpy(), s=4, alpha=0.5, color="#888888")
        for rows, colour in ((up, "#d62728"), (down, "#1f77b4")):
            idx = [r.latent for r in rows]
            ax.scatter(fa[idx].numpy(), fb[idx].numpy(), s=10, color=colour)
        lo = float(min(fa[alive].min(), fb[alive].min())) if bool(alive.any()) else 1e-6
        ax.plot([lo, 1], [lo, 1], color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"firing frequency on A ({_short(a.model)})")
        ax.set_ylabel(f"firing frequency on B ({_short(b.model)})")
        ax.set_title(f"{int(alive.sum())} live latents; r(log f) = {corr:.3f}")
        ax2 = fig.add_subplot(1, 2, 2)
        names = ["FVU", "delta loss (nats)", "KL (nats)"]
        x = torch.arange(len(names)).numpy()
        ax2.bar(x - 0.2, [a.fvu, a.delta_loss, a.kl], width=0.4, label="A")
        ax2.bar(x + 0.2, [b.fvu, b.delta_loss, b.kl], width=0.4, label="B")
        ax2.set_xticks(x, names)
        ax2.set_title(f"{d.name} spliced into each model")
        ax2.legend()


def _diff_markdown(
    cfg: DiffConfig,
    d: Dictionary,
    a: ModelSide,
    b: ModelSide,
    up: list[LatentChange],
    down: list[LatentChange],
    corr: float,
    changed: int,
) -> list[str]:
    """The report's Markdown: both sides, then the latents firing more and less on B."""
    side_rows = [
        [
            label,
            s.model,
            s.n_tokens,
            fmt(s.l0, ".1f"),
            fmt(s.fvu),
            fmt(s.delta_loss, ".4f"),
            fmt(s.kl, ".4f"),
            fmt(s.ce_clean),
            s.alive,
        ]
        for label, s in (("A", a), ("B", b))
    ]
    roles_shown = list(up[0].by_role) if up else list(down[0].by_role) if down else []

    def change_rows(rows: list[LatentChange]) -> list[list[Any]]:
        return [
            [
                r.latent,
                fmt(r.log10_change, "+.2f"),
                fmt(r.frequency_a, ".2e"),
                fmt(r.frequency_b, ".2e"),
                fmt(r.mean_a, ".3g"),
                fmt(r.mean_b, ".3g"),
                *(f"{fmt(r.by_role[k][0], '.1e')} → {fmt(r.by_role[k][1], '.1e')}" for k in roles_shown),
            ]
            for r in rows
        ]

    header = ["latent", "log10 f_B/f_A", "freq A", "freq B", "mean A", "mean B", *roles_shown]
    return [
        f"# {d.name} on two checkpoints",
        "",
        f"A = `{a.model}`, B = `{b.model}`; source `{cfg.source}`"
        + (f", roles `{cfg.roles}`" if cfg.roles else "")
        + ".",
        "",
        *md_table(["", "model", "tokens", "L0", "FVU", "delta loss", "KL", "CE clean", "alive"], side_rows),
        "",
        f"Correlation of log frequencies: {fmt(corr)}; latents whose frequency changed more than 2x: {changed}.",
        "",
        "## Firing more on B",
        "",
        *md_table(header, change_rows(up)),
        "",
        "## Firing less on B",
        "",
        *md_table(header, change_rows(down)),
    ]


def _write(
    cfg: DiffConfig,
    d: Dictionary,
    a: ModelSide,
    b: ModelSide,
    measured: dict[str, RoleStats],
    up: list[LatentChange],
    down: list[LatentChange],
    corr: float,
    changed: int,
    output: Path,
) -> list[Path]:
    """report.json, report.md and diff.png into the report folder; returns their paths."""
    _plot_diff(output / "diff.png", d, a, b, measured, up, down, corr)
    md = _diff_markdown(cfg, d, a, b, up, down, corr, changed)
    notes = [
        "Frequencies are smoothed as (n + 1) / (N + 1) for the change, so latents dead on one model rank finitely.",
        "The dictionary was trained on A; B's FVU and delta loss against A's measure how well it carries over.",
    ]
    results = {
        "dictionary": d.name,
        "site": d.site_in.name,
        "source": cfg.source,
        "a": a._asdict(),
        "b": b._asdict(),
        "frequency_correlation": corr,
        "changed_2x": changed,
        "up": [r._asdict() for r in up],
        "down": [r._asdict() for r in down],
    }
    report = write_report(output, "diff", cfg, f"{a.model} vs {b.model}", results, md, ["diff.png"], notes)
    return [report, output / REPORT_MD, output / "diff.png"]


def _short(name: str) -> str:
    return Path(name).name or name
