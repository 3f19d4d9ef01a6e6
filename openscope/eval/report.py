"""Write an evaluation report: report.json, report.md, frequencies.safetensors and PNG plots.

Plots (matplotlib, Agg backend, no display needed):
- l0_vs_fvu.png, l0_vs_delta_loss.png: the sparsity / quality trade-off across dictionaries, with
  the Pareto frontier (no other dictionary is both sparser and better) marked.
- depth.png: L0, FVU and delta loss against layer, when the dictionaries span several layers.
- frequencies.png: histograms of log10 latent firing frequency, one panel per dictionary.
- prefix_quality.png: FVU and delta loss against Matryoshka prefix size (log x), one line per
  dictionary with a prefix-quality curve (`openscope eval --prefixes`).
The folder is staged (`openscope.reports.report_folder`): it appears whole in one rename, and an
earlier report is replaced only with --overwrite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from openscope.activations.store import write_tensors
from openscope.config import save_json, to_jsonable
from openscope.eval.metrics import ReconstructionMetrics, pareto_front
from openscope.eval.results import DictionaryReport, EvalConfig, EvalReport, LMMetrics
from openscope.eval.saebench import absorption_parts, probing_parts
from openscope.files import atomic_file, write_text
from openscope.models.sites import Site
from openscope.reports import REPORT_JSON, REPORT_MD, finite_or_none, report_folder

FREQUENCIES = "frequencies.safetensors"
COLUMNS = (
    "name",
    "site",
    "width",
    "L0",
    "FVU",
    "1-FVU",
    "MSE",
    "dead",
    "dense",
    "CE clean",
    "delta loss",
    "KL",
    "loss recovered",
)
_MAX_PANELS = 36
"""Frequency histograms drawn at most (one panel each); the rest are in report.json."""


def site_label(d: DictionaryReport) -> str:
    """`6.resid_post` for an SAE, `6.mlp_in->6.mlp_out` for a transcoder, `0-17.mlp_in->mlp_out` for a CLT,
    `5,9,12,15.resid_post` for a crosscoder (over layers that are not consecutive)."""
    if d.n_layers > 1:
        first, kind_in = d.site_in.split(".")
        kind_out = d.site_out.split(".")[1]
        layers = _model_layers(d)
        if layers == list(range(layers[0], layers[0] + d.n_layers)):
            return f"{first}-{int(first) + d.n_layers - 1}.{kind_in}->{kind_out}"
        sites = kind_in if kind_in == kind_out else f"{kind_in}->{kind_out}"
        return f"{','.join(map(str, layers))}.{sites}"
    return d.site_in if d.site_in == d.site_out else f"{d.site_in}->{d.site_out}"


def _model_layers(d: DictionaryReport) -> list[int]:
    """The model layer of each of a dictionary's layers (consecutive from site_in's unless listed)."""
    first = int(d.site_in.split(".")[0])
    return list(d.model_layers) or list(range(first, first + d.n_layers))


def _fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def summary_rows(report: EvalReport) -> list[list[str]]:
    """One row of formatted cells per dictionary, in COLUMNS order (report.md and the CLI table)."""
    rows = []
    for d in report.dictionaries:
        r, lm = d.recon, d.lm
        rows.append(
            [
                d.name,
                site_label(d),
                str(d.width),
                _fmt(r.l0, ".1f"),
                _fmt(r.fvu, ".4f"),
                _fmt(1 - r.fvu, ".4f"),
                _fmt(r.mse, ".4g"),
                str(r.dead),
                str(r.dense),
                _fmt(lm.ce_clean, ".4f"),
                _fmt(lm.delta_loss, ".4f"),
                _fmt(lm.kl, ".4f"),
                _fmt(lm.loss_recovered, ".4f"),
            ]
        )
    return rows


def report_json(report: EvalReport, cfg: EvalConfig | None = None) -> dict[str, Any]:
    """The report as plain JSON types (per-latent frequencies go to frequencies.safetensors)."""
    dicts = []
    for d in report.dictionaries:
        r = d.recon
        dicts.append(
            {
                "name": d.name,
                "site_in": d.site_in,
                "site_out": d.site_out,
                "kind": d.kind,
                "n_layers": d.n_layers,
                "width": d.width,
                "folder": d.folder,
                "n_tokens": r.n_tokens,
                "l0": r.l0,
                "fvu": r.fvu,
                "explained_variance": 1 - r.fvu,
                "mse": r.mse,
                "dead": r.dead,
                "dense": r.dense,
                **d.lm._asdict(),
                "frequency_histogram": d.histogram._asdict(),
                "layers": [_layer_json(d, i, lr) for i, lr in enumerate(d.layers)],
                "prefixes": [p._asdict() for p in d.prefixes],
                **saebench_json(d),
            }
        )
    data = {
        "model": report.model,
        "source": report.source,
        "n_contexts": report.n_contexts,
        "n_tokens": report.n_tokens,
        "n_ce_positions": report.n_ce_positions,
        "seconds": report.seconds,
        "tokens_per_s": report.tokens_per_s,
        "dictionaries": dicts,
        "joint": report.joint._asdict() if report.joint is not None else None,
        "config": to_jsonable(cfg) if cfg is not None else None,
    }
    return finite_or_none(data)


def saebench_json(d: DictionaryReport) -> dict[str, Any]:
    """SAEBench's core metric categories and, when run, sparse probing and absorption, under SAEBench's
    names (the report.json keys `saebench`, `sparse_probing`, `absorption`)."""
    out: dict[str, Any] = {"saebench": d.saebench}
    if d.probing is not None:
        metrics, details, per_class = probing_parts(d.probing)
        out["sparse_probing"] = {"metrics": metrics, "tasks": details, "per_class": per_class}
    if d.absorption is not None:
        metrics, details, unstructured = absorption_parts(d.absorption)
        out["absorption"] = {"metrics": metrics, "letters": details, **unstructured}
    return out


def _layer_sites(d: DictionaryReport, i: int) -> tuple[str, str]:
    """(site_in, site_out) of a CLT's (or crosscoder's) i-th layer."""
    kind_in, kind_out = d.site_in.split(".")[1], d.site_out.split(".")[1]
    layer = _model_layers(d)[i]
    return f"{layer}.{kind_in}", f"{layer}.{kind_out}"


def _layer_json(d: DictionaryReport, i: int, r: ReconstructionMetrics) -> dict[str, Any]:
    site_in, site_out = _layer_sites(d, i)
    return {
        "layer": int(site_in.split(".")[0]),
        "site_in": site_in,
        "site_out": site_out,
        "l0": r.l0,
        "fvu": r.fvu,
        "explained_variance": 1 - r.fvu,
        "mse": r.mse,
        "dead": r.dead,
        "dense": r.dense,
    }


def layer_rows(d: DictionaryReport) -> list[list[str]]:
    """A CLT's or crosscoder's per-layer table (layer, sites, L0, FVU, 1-FVU, MSE, dead, dense); [] for
    a single-layer dictionary."""
    rows = []
    for i, r in enumerate(d.layers):
        site_in, site_out = _layer_sites(d, i)
        rows.append(
            [
                site_in.split(".")[0],
                f"{site_in}->{site_out}",
                _fmt(r.l0, ".1f"),
                _fmt(r.fvu, ".4f"),
                _fmt(1 - r.fvu, ".4f"),
                _fmt(r.mse, ".4g"),
                str(r.dead),
                str(r.dense),
            ]
        )
    return rows


LAYER_COLUMNS = ("layer", "sites", "L0", "FVU", "1-FVU", "MSE", "dead", "dense")


def _joint_line(joint: LMMetrics) -> str:
    return (
        f"All dictionaries spliced at once: CE clean {_fmt(joint.ce_clean, '.4f')}, "
        f"CE spliced {_fmt(joint.ce_spliced, '.4f')}, delta loss {_fmt(joint.delta_loss, '.4f')}, "
        f"KL {_fmt(joint.kl, '.4f')}, loss recovered {_fmt(joint.loss_recovered, '.4f')}."
    )


def report_markdown(report: EvalReport) -> str:
    """report.md: what was measured, then one table row per dictionary."""
    lines = [
        "# openscope evaluation",
        "",
        f"Model `{report.model}`, text `{report.source}`: {report.n_contexts} contexts, "
        f"{report.n_tokens} tokens measured (BOS/EOS/pad excluded), "
        f"{report.n_ce_positions} next-token positions.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += [
        "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in summary_rows(report)
    ]
    if report.joint is not None:
        lines += ["", _joint_line(report.joint)]
    for d in report.dictionaries:
        if not d.layers:
            continue
        lines += [
            "",
            f"## {d.name}: per layer",
            "",
            f"{'Crosscoder' if d.kind == 'crosscoder' else 'Cross-layer transcoder'}, "
            f"{d.width // d.n_layers} latents per layer; L0 counts one layer's latents, "
            f"FVU is of that layer's output. With all {d.n_layers} layers spliced at once: delta loss "
            f"{_fmt(d.lm.delta_loss, '.4f')}, KL {_fmt(d.lm.kl, '.4f')}.",
            "",
            "| " + " | ".join(LAYER_COLUMNS) + " |",
            "|" + "|".join("---" if i < 2 else "---:" for i in range(len(LAYER_COLUMNS))) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in layer_rows(d)]
    lines += prefix_markdown(report.dictionaries)
    lines += [
        "",
        "L0: mean active latents per token. FVU: E|y - y_hat|^2 / E|y - mean y|^2. MSE: per element. "
        "Dead: latents firing on no token; dense: on more than 10% of tokens. Delta loss: CE with the "
        "reconstruction spliced in minus clean CE (nats). KL(clean || spliced) of next-token "
        "distributions. Loss recovered: (CE_zero - CE_spliced) / (CE_zero - CE_clean), site zero-ablated.",
        "",
    ]
    return "\n".join(lines)


PREFIX_COLUMNS = ("prefix", "L0", "FVU", "delta loss", "KL", "loss recovered")


def prefix_markdown(dicts: Sequence[DictionaryReport]) -> list[str]:
    """report.md's prefix-quality tables: one per dictionary with a curve."""
    lines: list[str] = []
    for d in dicts:
        if not d.prefixes:
            continue
        per = " per layer" if d.n_layers > 1 else ""
        lines += [
            "",
            f"## {d.name}: Matryoshka prefixes",
            "",
            f"The dictionary with only its first p latents{per} (later latents zeroed before decoding).",
            "",
            "| " + " | ".join(PREFIX_COLUMNS) + " |",
            "|" + "|".join("---:" for _ in PREFIX_COLUMNS) + "|",
        ]
        lines += [
            f"| {p.size} | {_fmt(p.l0, '.2f')} | {_fmt(p.fvu, '.4f')} | {_fmt(p.delta_loss, '.4f')} "
            f"| {_fmt(p.kl, '.4f')} | {_fmt(p.loss_recovered, '.4f')} |"
            for p in d.prefixes
        ]
    return lines


# ---- plots -------------------------------------------------------------------------------------


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt  # matplotlib is slow to import: only when plots are drawn

    with atomic_file(path, sync=False) as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _tradeoff_plot(
    dicts: Sequence[DictionaryReport], y_of: Callable[[DictionaryReport], float], ylabel: str, path: Path
) -> None:
    import matplotlib.pyplot as plt  # matplotlib is slow to import: only when plots are drawn

    xs = [d.recon.l0 for d in dicts]
    ys = [y_of(d) for d in dicts]
    front = pareto_front(xs, ys)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.scatter(xs, ys, color="tab:blue", label="dictionaries")
    if front:
        ax.plot(
            [xs[i] for i in front], [ys[i] for i in front], "o-", color="tab:red", label="Pareto frontier"
        )
    if len(dicts) <= 20:
        for d, x, y in zip(dicts, xs, ys, strict=True):
            ax.annotate(d.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if xs and all(x > 0 for x in xs if math.isfinite(x)) and len({x for x in xs if math.isfinite(x)}) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"L0 vs {ylabel} (lower is better on both)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def _depth_plot(dicts: Sequence[DictionaryReport], path: Path) -> None:
    import matplotlib.pyplot as plt  # matplotlib is slow to import: only when plots are drawn
    from matplotlib.ticker import MaxNLocator

    groups: dict[str, list[tuple[int, DictionaryReport]]] = {}
    for d in dicts:
        if d.n_layers > 1:
            continue  # a CLT spans the depth axis itself
        out = Site.from_name(d.site_out)
        sites = out.kind if d.site_in == d.site_out else f"{Site.from_name(d.site_in).kind}->{out.kind}"
        # One line per family of a sweep: same kind, sites and width across layers.
        label = f"{d.kind} {sites} w{d.width}"
        groups.setdefault(label, []).append((out.layer, d))
    panels: list[tuple[str, Callable[[DictionaryReport], float]]] = [
        ("L0", lambda d: d.recon.l0),
        ("FVU", lambda d: d.recon.fvu),
        ("delta LM loss", lambda d: d.lm.delta_loss),
        ("KL", lambda d: d.lm.kl),
    ]
    # A CLT's own layers give it a line in the panels measured per layer (its LM metrics are joint).
    per_layer: dict[str, Callable[[ReconstructionMetrics], float]] = {
        "L0": lambda r: r.l0,
        "FVU": lambda r: r.fvu,
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (title, value) in zip(axes, panels, strict=True):
        for label, members in groups.items():
            members = sorted(members, key=lambda p: p[0])
            ax.plot([p[0] for p in members], [value(p[1]) for p in members], "o-", label=label)
        for d in dicts:
            if d.layers and title in per_layer:
                ys = [per_layer[title](r) for r in d.layers]
                what = "crosscoder" if d.kind == "crosscoder" else "CLT"
                ax.plot(_model_layers(d), ys, "s--", label=f"{d.name} ({what}, per layer)")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("metrics across depth")
    _save_figure(fig, path)


def _frequency_plot(dicts: Sequence[DictionaryReport], path: Path) -> None:
    import matplotlib.pyplot as plt  # matplotlib is slow to import: only when plots are drawn

    shown = list(dicts)[:_MAX_PANELS]
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, shown, strict=False):
        h = d.histogram
        ax.stairs(h.counts, h.edges, fill=True, alpha=0.7)
        ax.set_title(f"{d.name}\n{h.dead} dead of {d.width}", fontsize=8)
        ax.set_xlabel("log10 firing frequency", fontsize=8)
        ax.axvline(math.log10(0.1), color="tab:red", lw=0.8, ls="--")  # the dense-latent line
        ax.tick_params(labelsize=7)
    fig.suptitle("latent firing frequencies (dashed: dense above 10%)")
    fig.tight_layout()
    _save_figure(fig, path)


def _prefix_plot(dicts: Sequence[DictionaryReport], path: Path) -> None:
    import matplotlib.pyplot as plt  # matplotlib is slow to import: only when plots are drawn

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for ax, (title, value) in zip(
        axes, (("FVU", lambda p: p.fvu), ("delta LM loss (nats)", lambda p: p.delta_loss)), strict=True
    ):
        for d in dicts:
            if d.prefixes:
                ax.plot([p.size for p in d.prefixes], [value(p) for p in d.prefixes], "o-", label=d.name)
        ax.set_xscale("log")
        ax.set_xlabel(
            "prefix size (latents kept" + (", per layer)" if any(d.n_layers > 1 for d in dicts) else ")")
        )
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Matryoshka prefix quality")
    _save_figure(fig, path)


def write_plots(report: EvalReport, output: Path) -> list[Path]:
    """The PNG plots of a report; returns the files written."""
    import matplotlib  # slow to import: only when plots are drawn

    matplotlib.use("Agg")  # files only: never needs a display
    dicts = report.dictionaries
    files = [output / "l0_vs_fvu.png", output / "l0_vs_delta_loss.png", output / "frequencies.png"]
    _tradeoff_plot(dicts, lambda d: d.recon.fvu, "FVU", files[0])
    _tradeoff_plot(dicts, lambda d: d.lm.delta_loss, "delta LM loss (nats)", files[1])
    _frequency_plot(dicts, files[2])
    if len({d.site_out.partition(".")[0] for d in dicts if d.n_layers == 1}) > 1 or any(
        d.layers for d in dicts
    ):
        files.append(output / "depth.png")
        _depth_plot(dicts, files[-1])
    if any(d.prefixes for d in dicts):
        files.append(output / "prefix_quality.png")
        _prefix_plot(dicts, files[-1])
    return files


def write_report(
    report: EvalReport,
    output: Path,
    cfg: EvalConfig | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write report.json, report.md, frequencies.safetensors and the plots into a report folder
    (`openscope.reports.report_folder`: staged, an earlier report replaced only with `overwrite`), and
    `extra` JSON files (relative path -> data, e.g. SAEBench's layout); returns the files."""
    with report_folder(Path(output), overwrite) as folder:
        for rel, data in (extra or {}).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            save_json(folder / rel, finite_or_none(data))
        save_json(folder / REPORT_JSON, report_json(report, cfg))
        write_text(folder / REPORT_MD, report_markdown(report), sync=False)
        write_tensors(
            folder / FREQUENCIES, {d.name: d.recon.frequencies.float().cpu() for d in report.dictionaries}
        )
        files = [folder / REPORT_JSON, folder / REPORT_MD, folder / FREQUENCIES, *write_plots(report, folder)]
    return [Path(output) / f.name for f in files] + [Path(output) / rel for rel in extra or {}]
