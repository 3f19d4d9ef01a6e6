"""`openscope chat contrast`: what separates two prompt sets inside the model, layer by layer.

Defaults: harmful requests (AdvBench) against harmless first turns (ShareGPT), each rendered as a
user turn. At the last prompt token (where a chat model decides how to answer) and at every chosen
site:

- the difference-of-means direction r = μ_pos − μ_neg, from a training split of each set;
- how well the projection on r separates the held-out prompts: AUROC with DeLong's 95 % interval,
  and Cohen's d of the held-out projections;
- with dictionaries: per latent, Welch's t-test of its activations (positive vs negative set), Cohen's
  d and Benjamini–Hochberg q-values; the latents that differ most among those significant at
  `alpha`; and the latents whose decoder directions align most with r at the dictionary's output site.

Writes `report.json`, `report.md`, `directions.safetensors` (r, μ_pos, μ_neg per site: what `ablate`,
`jailbreak` and `sweep` read), and plots: AUROC per layer with its interval, and one volcano plot
(effect size against q-value) per dictionary.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from openscope.analysis import stats
from openscope.analysis.common import (
    ChatRunConfig,
    last_token_activations,
    load_dictionaries,
    load_for,
    write_report,
)
from openscope.coders.dictionary import Dictionary
from openscope.data.prompts import load_prompts, render
from openscope.errors import OpenscopeError
from openscope.files import write_bytes
from openscope.interventions.steer import coder_of
from openscope.models.load import LoadedModel
from openscope.models.sites import Site, parse_sites
from openscope.models.tokens import encode
from openscope.reports import REPORT_JSON, check_report_output, figure, fmt, md_table, report_folder

log = logging.getLogger(__name__)

DIRECTIONS_FILE = "directions.safetensors"
"""Per site: `direction/<site>` (μ_pos − μ_neg of the training split), `mean_pos/<site>`, `mean_neg/<site>`."""


@dataclass
class ContrastConfig(ChatRunConfig):
    """Contrast two prompt sets: per layer, the difference-of-means direction, its held-out AUROC, and
    the dictionary latents that differ most or align with it."""

    positive: str = "advbench"
    """Positive prompt set: advbench, sharegpt, or a .txt/.jsonl/.json file; a slice may follow (advbench[:200])."""
    negative: str = "sharegpt"
    """Negative prompt set (same forms as --positive)."""
    n: int = 128
    """Prompts taken from each set (0: all)."""
    max_chars: int = 300
    """ShareGPT turns longer than this are skipped (keeps the harmless set close to AdvBench's one-line requests)."""
    held_out: float = 0.5
    """Fraction of each set held out to measure the AUROC (the direction comes from the rest); 0: measure in-sample."""
    sites: str = "*.resid_post"
    """Sites to contrast (names or patterns: *.resid_post, 4-12.resid_post, mid.resid_post)."""
    dictionaries: list[Path] = field(default_factory=list)
    """Dictionary folders (or folders to search) for the latent tables; repeat the flag for several."""
    top_k: int = 10
    """Latents listed per table."""
    alpha: float = 0.05
    """False-discovery rate at which a latent counts as differing (Benjamini–Hochberg)."""
    output: Path = Path("openscope-out/chat/contrast")
    """Folder for report.json, report.md, directions.safetensors and plots."""


class SiteContrast(NamedTuple):
    """The contrast at one site."""

    site: Site
    """Where it was measured."""
    direction: Tensor
    """μ_pos − μ_neg [d] (float64) of the training split."""
    mean_pos: Tensor
    """μ_pos [d] of the training split."""
    mean_neg: Tensor
    """μ_neg [d] of the training split."""
    auroc: stats.Auroc
    """AUROC of the projection on the direction, held-out positives against held-out negatives."""
    separation: float
    """Cohen's d of the held-out projections."""
    in_sample: bool
    """Whether the AUROC was measured on the training prompts (no held-out split)."""


class LatentTable(NamedTuple):
    """Per latent of one dictionary: how its activation differs between the sets, and its alignment."""

    dictionary: str
    """Dictionary name."""
    site_in: Site
    """Site the latents are read at."""
    site_out: Site
    """Site the decoder writes (alignment is measured with the direction there)."""
    test: stats.ColumnTest
    """Welch's t-test, Cohen's d and q-values per latent (positive set a, negative set b)."""
    freq_pos: Tensor
    """[F] fraction of positive prompts on which the latent fires."""
    freq_neg: Tensor
    """[F] fraction of negative prompts on which the latent fires."""
    alignment: Tensor | None
    """[F] cosine of each decoder direction with the contrast direction at site_out (None: not contrasted there)."""


class ContrastResult(NamedTuple):
    """What `contrast` measured and where it wrote it."""

    sites: list[SiteContrast]
    """One entry per site, in forward order."""
    tables: list[LatentTable]
    """One per dictionary."""
    best: SiteContrast
    """The site with the highest held-out AUROC (earliest on ties)."""
    n_pos: int
    """Positive prompts used."""
    n_neg: int
    """Negative prompts used."""
    output: Path | None
    """Report folder (None when not written)."""


# ---- math (pure) ---------------------------------------------------------------------------------------


def split(n: int, held_out: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, test) index tensors of a seeded permutation of range(n); held_out 0 tests in-sample."""
    if not 0 <= held_out < 1:
        raise OpenscopeError(f"held_out must be in [0, 1), got {held_out}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if held_out == 0:
        return perm, perm
    n_test = max(2, round(n * held_out))
    if n - n_test < 1:
        raise OpenscopeError(
            f"{n} prompts are too few to hold out {held_out:.0%} and keep some for the direction"
        )
    return perm[n_test:], perm[:n_test]


def contrast_site(
    site: Site, pos: Tensor, neg: Tensor, pos_split: tuple[Tensor, Tensor], neg_split: tuple[Tensor, Tensor]
) -> SiteContrast:
    """The difference-of-means direction from the training rows, scored on the test rows."""
    pos_train, pos_test = pos[pos_split[0]], pos[pos_split[1]]
    neg_train, neg_test = neg[neg_split[0]], neg[neg_split[1]]
    direction = stats.mean_difference(pos_train, neg_train)
    u = stats.unit(direction)
    sp, sn = pos_test.double() @ u, neg_test.double() @ u
    sep = stats.welch_test(sp[:, None], sn[:, None]).d
    in_sample = bool(torch.equal(pos_split[0], pos_split[1]))
    return SiteContrast(
        site,
        direction,
        pos_train.double().mean(0),
        neg_train.double().mean(0),
        stats.auroc(sp, sn),
        float(sep[0]),
        in_sample,
    )


def latent_table(d: Dictionary, f_pos: Tensor, f_neg: Tensor, direction_out: Tensor | None) -> LatentTable:
    """Effect sizes and tests of every latent of d, and its decoder rows' alignment with the direction."""
    test = stats.welch_test(f_pos, f_neg)
    align = None
    if direction_out is not None:
        align = stats.cosine_alignment(coder_of(d).w_dec.detach(), direction_out)
    return LatentTable(
        d.name,
        d.site_in,
        d.site_out,
        test,
        (f_pos > 0).double().mean(0),
        (f_neg > 0).double().mean(0),
        align,
    )


def top_effects(table: LatentTable, k: int, alpha: float) -> list[int]:
    """Up to k latents with q < alpha, largest |Cohen's d| first (infinite d sorts first)."""
    q, d = table.test.q, table.test.d.abs()
    significant = (q < alpha).nonzero().squeeze(1)
    if significant.numel() == 0:
        return []
    order = d[significant].argsort(descending=True, stable=True)
    return significant[order][:k].tolist()


def top_positive(table: LatentTable, k: int, alpha: float) -> list[int]:
    """Up to k latents with q < alpha that are more active on the positive set, largest d first."""
    return [j for j in top_effects(table, table.test.d.numel(), alpha) if float(table.test.d[j]) > 0][:k]


def top_aligned(table: LatentTable, k: int) -> list[int]:
    """The k latents whose decoder direction is most aligned (|cosine|) with the contrast direction."""
    if table.alignment is None:
        return []
    return table.alignment.abs().argsort(descending=True, stable=True)[:k].tolist()


# ---- the run --------------------------------------------------------------------------------------------


def encode_prompts(loaded: LoadedModel, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """Token ids (BOS + rendered prompt) of each prompt."""
    return [encode(loaded.tokenizer, render(loaded.tokenizer, p, chat_template)) for p in prompts]


def encode_latents(d: Dictionary, x: Tensor, batch: int = 1024) -> Tensor:
    """Latent activations [n, F] (float32, CPU) of raw inputs x [n, d_in]."""
    coder = coder_of(d)
    w = coder.w_enc
    with torch.inference_mode():
        parts = [
            coder.encode(x[i : i + batch].to(w.device, w.dtype)).float().cpu()
            for i in range(0, len(x), batch)
        ]
    return torch.cat(parts) if parts else torch.zeros(0, coder.cfg.width)


def run_contrast(
    cfg: ContrastConfig,
    loaded: LoadedModel | None = None,
    dictionaries: list[Dictionary] | None = None,
    *,
    positive: list[str] | None = None,
    negative: list[str] | None = None,
    write: bool = True,
) -> ContrastResult:
    """Run the contrast (prompt lists may be passed in directly); writes the report unless write=False."""
    if write:
        check_report_output(cfg.output, cfg.overwrite)  # a bad --output is refused before the work
    pos_prompts = positive if positive is not None else load_prompts(cfg.positive, cfg.n, cfg.max_chars)
    neg_prompts = negative if negative is not None else load_prompts(cfg.negative, cfg.n, cfg.max_chars)
    for name, ps in (("positive", pos_prompts), ("negative", neg_prompts)):
        if not ps:
            raise OpenscopeError(f"the {name} prompt set is empty")
    loaded = load_for(cfg, loaded)
    dicts = dictionaries if dictionaries is not None else load_dictionaries(cfg.dictionaries, loaded)
    sites = parse_sites(cfg.sites, loaded.n_layers)
    needed = sorted({*sites, *(s for d in dicts for s in (d.site_in, d.site_out))}, key=lambda s: s.order)
    log.info(
        "contrast: %d positive, %d negative prompts at %d sites",
        len(pos_prompts),
        len(neg_prompts),
        len(needed),
    )
    acts_pos = last_token_activations(
        loaded, encode_prompts(loaded, pos_prompts, cfg.chat_template), needed, cfg.batch_size
    )
    acts_neg = last_token_activations(
        loaded, encode_prompts(loaded, neg_prompts, cfg.chat_template), needed, cfg.batch_size
    )
    pos_split = split(len(pos_prompts), cfg.held_out, cfg.seed)
    neg_split = split(len(neg_prompts), cfg.held_out, cfg.seed + 1)
    by_site = {s: contrast_site(s, acts_pos[s], acts_neg[s], pos_split, neg_split) for s in needed}
    tables = []
    for d in dicts:
        f_pos, f_neg = encode_latents(d, acts_pos[d.site_in]), encode_latents(d, acts_neg[d.site_in])
        tables.append(latent_table(d, f_pos, f_neg, by_site[d.site_out].direction))
    shown = [by_site[s] for s in needed]
    best = max(shown, key=lambda c: (c.auroc.auc, -c.site.layer))
    result = ContrastResult(shown, tables, best, len(pos_prompts), len(neg_prompts), None)
    if write:
        result = result._replace(output=write_contrast(cfg, loaded, result))
    return result


# ---- directions on disk -----------------------------------------------------------------------------------


def save_directions(path: Path, contrasts: list[SiteContrast]) -> None:
    """directions.safetensors: direction, mean_pos and mean_neg per site (float32)."""
    tensors = {}
    for c in contrasts:
        name = c.site.name
        tensors[f"direction/{name}"] = c.direction.float().contiguous()
        tensors[f"mean_pos/{name}"] = c.mean_pos.float().contiguous()
        tensors[f"mean_neg/{name}"] = c.mean_neg.float().contiguous()
    write_bytes(path, save(tensors), sync=False)


class SiteDirection(NamedTuple):
    """A contrast direction read back from disk."""

    site: Site
    """Where it lives."""
    direction: Tensor
    """μ_pos − μ_neg [d] (float32)."""
    mean_pos: Tensor
    """μ_pos [d]."""
    mean_neg: Tensor
    """μ_neg [d]."""


def _directions_file(source: Path) -> Path:
    source = Path(source)
    file = source / DIRECTIONS_FILE if source.is_dir() else source
    if not file.is_file():
        raise OpenscopeError(f"no {DIRECTIONS_FILE} at {source}: run `openscope chat contrast` first")
    return file


def load_directions(source: Path) -> dict[Site, SiteDirection]:
    """Every site's direction and means from a contrast folder (or its directions.safetensors)."""
    tensors = load_file(str(_directions_file(source)))
    names = sorted(k.split("/", 1)[1] for k in tensors if k.startswith("direction/"))
    return {
        Site.from_name(n): SiteDirection(
            Site.from_name(n), tensors[f"direction/{n}"], tensors[f"mean_pos/{n}"], tensors[f"mean_neg/{n}"]
        )
        for n in names
    }


def load_direction(source: Path, site: str = "") -> SiteDirection:
    """One site's direction from a contrast folder (or its directions.safetensors).

    site "" picks the report's best site (highest held-out AUROC).
    """
    file = _directions_file(source)
    every = {s.name: d for s, d in load_directions(file).items()}
    if not site:
        report = file.parent / REPORT_JSON
        if not report.is_file():
            raise OpenscopeError(f"no {REPORT_JSON} beside {file} to pick the best site from; pass a site")
        site = json.loads(report.read_text())["best_site"]
    if site not in every:
        raise OpenscopeError(f"{file} has no direction at site {site!r}; it has {', '.join(every)}")
    return every[site]


def top_latents_from_report(source: Path, dictionary: str, k: int) -> list[int]:
    """The latents a contrast report lists as significantly more active on the positive set, for one
    dictionary (largest effect first)."""
    report = (source if source.is_dir() else source.parent) / REPORT_JSON
    if not report.is_file():
        raise OpenscopeError(f"no contrast report at {report}")
    for table in json.loads(report.read_text()).get("dictionaries", []):
        if table["name"] == dictionary:
            return [int(r["latent"]) for r in table.get("top_positive", [])][:k]
    raise OpenscopeError(f"the contrast report {report} has no latent table for dictionary {dictionary!r}")


# ---- the report ---------------------------------------------------------------------------------------------


def _latent_row(t: LatentTable, j: int) -> dict[str, float | int | None]:
    return {
        "latent": j,
        "d": float(t.test.d[j]),
        "t": float(t.test.t[j]),
        "p": float(t.test.p[j]),
        "q": float(t.test.q[j]),
        "mean_pos": float(t.test.mean_a[j]),
        "mean_neg": float(t.test.mean_b[j]),
        "freq_pos": float(t.freq_pos[j]),
        "freq_neg": float(t.freq_neg[j]),
        "cosine": float(t.alignment[j]) if t.alignment is not None else None,
    }


def write_contrast(cfg: ContrastConfig, loaded: LoadedModel, result: ContrastResult) -> Path:
    """The report folder: report.json, report.md, directions.safetensors and the plots."""
    with report_folder(cfg.output, cfg.overwrite) as out:
        save_directions(out / DIRECTIONS_FILE, result.sites)
        site_rows = [
            {
                "site": c.site.name,
                "layer": c.site.layer,
                "kind": c.site.kind,
                "auroc": c.auroc.auc,
                "auroc_low": c.auroc.low,
                "auroc_high": c.auroc.high,
                "separation_d": c.separation,
                "direction_norm": float(c.direction.norm()),
                "in_sample": c.in_sample,
            }
            for c in result.sites
        ]
        tables = []
        for t in result.tables:
            tables.append(
                {
                    "name": t.dictionary,
                    "site_in": t.site_in.name,
                    "site_out": t.site_out.name,
                    "width": int(t.test.d.numel()),
                    "n_significant": int((t.test.q < cfg.alpha).sum()),
                    "top_effects": [_latent_row(t, j) for j in top_effects(t, cfg.top_k, cfg.alpha)],
                    "top_positive": [_latent_row(t, j) for j in top_positive(t, cfg.top_k, cfg.alpha)],
                    "top_aligned": [_latent_row(t, j) for j in top_aligned(t, cfg.top_k)],
                }
            )
        figures = _plots(out, result, cfg)
        notes = _notes(loaded, result)
        md = _contrast_markdown(cfg, loaded, result, site_rows, tables)
        results = {
            "n_positive": result.n_pos,
            "n_negative": result.n_neg,
            "best_site": result.best.site.name,
            "sites": site_rows,
            "dictionaries": tables,
        }
        write_report(out, "contrast", cfg, loaded.name, results, md, figures, notes)
    return cfg.output


def _contrast_markdown(
    cfg: ContrastConfig,
    loaded: LoadedModel,
    result: ContrastResult,
    site_rows: list[dict],
    tables: list[dict],
) -> list[str]:
    """The report's Markdown: the sets, the AUROC per site, and each dictionary's latent tables."""
    md = [
        f"# Contrast: {cfg.positive} vs {cfg.negative} on {loaded.name}",
        "",
        f"{result.n_pos} positive and {result.n_neg} negative prompts"
        + (
            " (AUROC in-sample)"
            if cfg.held_out == 0
            else f", {cfg.held_out:.0%} of each held out for the AUROC"
        )
        + f"; last prompt token{', chat template' if cfg.chat_template else ''}.",
        "",
        f"Best site: **{result.best.site.name}**, AUROC {result.best.auroc.auc:.3f} "
        f"[{result.best.auroc.low:.3f}, {result.best.auroc.high:.3f}].",
        "",
        *md_table(
            ["site", "AUROC", "95% CI", "Cohen's d", "|r|"],
            [
                [
                    r["site"],
                    fmt(r["auroc"]),
                    f"{fmt(r['auroc_low'])}–{fmt(r['auroc_high'])}",
                    fmt(r["separation_d"], ".2f"),
                    fmt(r["direction_norm"], ".1f"),
                ]
                for r in site_rows
            ],
        ),
    ]
    for t in tables:
        md += [
            "",
            f"## {t['name']} ({t['site_in']}): {t['n_significant']} of {t['width']} latents differ (q < {cfg.alpha})",
            "",
        ]
        for title, key in (
            ("Largest effects", "top_effects"),
            ("Most active on the positive set", "top_positive"),
        ):
            md += [f"{title}:", ""]
            md += _effect_table(t[key]) if t[key] else ["(none significant)"]
            md += [""]
        md += ["Decoder directions most aligned with the contrast direction:", ""]
        md += md_table(
            ["latent", "cos(r)", "d", "q"],
            [
                [r["latent"], fmt(r["cosine"], ".3f"), fmt(r["d"], ".2f"), fmt(r["q"], ".2g")]
                for r in t["top_aligned"]
            ],
        )
    return md


def _effect_table(rows: list[dict]) -> list[str]:
    return md_table(
        ["latent", "d", "q", "mean pos", "mean neg", "fires pos", "fires neg", "cos(r)"],
        [
            [
                r["latent"],
                fmt(r["d"], ".2f"),
                fmt(r["q"], ".2g"),
                fmt(r["mean_pos"], ".2f"),
                fmt(r["mean_neg"], ".2f"),
                fmt(r["freq_pos"], ".0%"),
                fmt(r["freq_neg"], ".0%"),
                fmt(r["cosine"], ".3f"),
            ]
            for r in rows
        ],
    )


def _notes(loaded: LoadedModel, result: ContrastResult) -> list[str]:
    notes = []
    if not getattr(loaded.tokenizer, "chat_template", None):
        notes.append(
            "The model has no chat template of its own (a base checkpoint): prompts were rendered with "
            "Gemma's turn markers, which a base model has seen little of. A direction found here separates "
            "the two sets; it is not evidence of a refusal mechanism, which base models do not have."
        )
    first = result.sites[0]
    if first.auroc.auc >= 0.95:
        notes.append(
            f"The sets are already separable at {first.site.name} (AUROC {first.auroc.auc:.3f}): they differ "
            "in surface form (length, wording, topic), not only in harmfulness. Read the layer profile and the "
            "latent tables with that confound in mind."
        )
    if result.best.auroc.se == 0:
        notes.append(
            "Held-out prompts are separated perfectly at the best site: its confidence interval is degenerate."
        )
    return notes


def _plots(out: Path, result: ContrastResult, cfg: ContrastConfig) -> list[str]:
    figures = []
    kinds = sorted({c.site.kind for c in result.sites})
    with figure(out / "auroc.png") as fig:
        ax = fig.add_subplot(1, 1, 1)
        for kind in kinds:
            rows = [c for c in result.sites if c.site.kind == kind]
            layers = [c.site.layer for c in rows]
            ax.plot(layers, [c.auroc.auc for c in rows], marker="o", label=kind)
            ax.fill_between(layers, [c.auroc.low for c in rows], [c.auroc.high for c in rows], alpha=0.2)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("layer")
        ax.set_ylabel("held-out AUROC" if cfg.held_out else "AUROC (in-sample)")
        ax.set_ylim(0.4, 1.02)
        ax.set_title(f"{cfg.positive} vs {cfg.negative}: projection on μ_pos − μ_neg")
        ax.legend()
    figures.append("auroc.png")
    for t in result.tables:
        name = "volcano_" + "".join(ch if ch.isalnum() else "_" for ch in t.dictionary) + ".png"
        with figure(out / name) as fig:
            ax = fig.add_subplot(1, 1, 1)
            d = t.test.d.clamp(-10, 10).numpy()
            q = (-t.test.q.clamp_min(1e-300).log10()).numpy()
            ax.scatter(d, q, s=4, alpha=0.5)
            ax.axhline(-math.log10(cfg.alpha), color="red", linestyle=":", linewidth=1)
            ax.set_xlabel("Cohen's d (positive − negative)")
            ax.set_ylabel("−log10 q (Benjamini–Hochberg)")
            ax.set_title(f"{t.dictionary} latents")
        figures.append(name)
    return figures
