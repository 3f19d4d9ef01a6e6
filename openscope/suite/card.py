"""The model card (README.md) of a folder `openscope push` publishes: what the dictionaries are, how to
load them, the recipe that trained them, the data, and their evaluation.

Everything comes from the dictionaries' own config.json (the `openscope` provenance training writes:
`train_config`, `data`, `tokens_seen`, `command_line`, final training numbers), from an `openscope eval`
report (report.json: one row per dictionary, matched by folder) and, for a suite, from catalogue.json.
Settings that only describe the machine a run used (output folders, device, cache) are left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import openscope
from openscope.coders.dictionary import Dictionary
from openscope.reports import fmt, md_table

CARD_MARK = "<!-- written by openscope push -->"
"""The line every card carries: `--overwrite` replaces only a folder whose README has it."""
_LOCAL_SETTINGS = {"output", "overwrite", "device", "cache_dir", "resume", "store"}
"""Training settings that name the machine, not the recipe."""
EVAL_COLUMNS = ("folder", "L0", "FVU", "dead", "dense", "delta loss", "KL", "loss recovered")


class EvalTable(NamedTuple):
    """The evaluation rows of the published dictionaries, from one report.json."""

    rows: list[list[str]]
    """One row per published dictionary the report evaluates, in EVAL_COLUMNS order."""
    complete: bool
    """Whether the report evaluates exactly the published dictionaries (then its plots are theirs)."""
    model: str
    """The model the report evaluated on."""
    source: str
    """The text it evaluated on."""
    n_tokens: int
    """Tokens measured."""

    @classmethod
    def of(cls, doc: dict[str, Any], entries: list[dict[str, Any]], wanted: dict[str, str]) -> EvalTable:
        """The rows of `entries` (report.json's dictionaries) whose folder is a key of `wanted`
        (resolved folder → folder in the repository)."""
        rows, matched = [], 0
        for e in entries:
            folder = e.get("folder")
            key = str(Path(folder).resolve()) if isinstance(folder, str) else None
            if key not in wanted:
                continue
            matched += 1
            rows.append(
                [
                    wanted[key],
                    fmt(e.get("l0"), ".1f"),
                    fmt(e.get("fvu"), ".4f"),
                    str(e.get("dead", "-")),
                    str(e.get("dense", "-")),
                    fmt(e.get("delta_loss"), ".4f"),
                    fmt(e.get("kl"), ".4f"),
                    fmt(e.get("loss_recovered"), ".4f"),
                ]
            )
        complete = matched == len(entries) == len(wanted)
        return cls(
            rows,
            complete,
            str(doc.get("model", "")),
            str(doc.get("source", "")),
            int(doc.get("n_tokens") or 0),
        )


def _provenance(d: Dictionary) -> dict[str, Any]:
    config = d.config or {}
    own = config.get("openscope")
    return own if isinstance(own, dict) else {}


def _recipe(d: Dictionary) -> dict[str, str]:
    """The training settings of one dictionary as printable values (machine settings left out)."""
    train = _provenance(d).get("train_config")
    if not isinstance(train, dict):
        return {}
    return {k: json.dumps(v) for k, v in sorted(train.items()) if k not in _LOCAL_SETTINGS}


def _kind(d: Dictionary) -> str:
    return str(getattr(d.coder, "kind", None) or getattr(d.coder.cfg, "kind", "sae"))


def _yaml_front(model: str, license: str) -> list[str]:
    lines = ["---", "library_name: openscope", "tags:"]
    lines += [f"  - {t}" for t in ("openscope", "sparse-autoencoder", "interpretability", "gemma-scope")]
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):  # a Hub id, not a local folder
        lines.append(f"base_model: {model}")
    if license:
        lines.append(f"license: {license}")
    return [*lines, "---"]


def _contents(items: Sequence[tuple[Dictionary, str]]) -> list[str]:
    rows = []
    for d, folder in items:
        config = d.config or {}
        p = _provenance(d)
        rows.append(
            [
                f"`{folder}`",
                _kind(d),
                config.get("hf_hook_point_in", d.site_in.name),
                config.get("hf_hook_point_out", d.site_out.name),
                str(d.coder.cfg.width),
                str(config.get("architecture", "-")),
                fmt(p.get("final_l0"), ".1f"),
                fmt(p.get("final_fvu"), ".4f"),
            ]
        )
    header = ("folder", "kind", "reads", "writes", "width", "architecture", "L0 (training)", "FVU (training)")
    return md_table(header, rows)


def _recipe_section(items: Sequence[tuple[Dictionary, str]]) -> list[str]:
    recipes = [(folder, _recipe(d)) for d, folder in items]
    known = [(f, r) for f, r in recipes if r]
    if not known:
        return [
            "The dictionaries' config.json records no training settings (they were not trained by openscope)."
        ]
    keys = sorted({k for _, r in known for k in r})
    common = [k for k in keys if len({r.get(k) for _, r in known}) == 1 and len(known) == len(recipes)]
    differ = [k for k in keys if k not in common]
    lines = ["Settings of `openscope train` shared by every dictionary:", ""]
    lines += md_table(("setting", "value"), [[f"`{k}`", f"`{known[0][1][k]}`"] for k in common])
    if differ:
        lines += ["", "Settings that differ:", ""]
        lines += md_table(
            ("folder", *differ), [[f"`{f}`", *(r.get(k, "-") for k in differ)] for f, r in recipes]
        )
    commands = sorted(
        {str(_provenance(d).get("command_line")) for d, _ in items if _provenance(d).get("command_line")}
    )
    if commands:
        lines += ["", "Command line" + ("s" if len(commands) > 1 else "") + ":", "", "```"]
        lines += [*commands, "```"]
    return lines


def _data_section(items: Sequence[tuple[Dictionary, str]]) -> list[str]:
    rows = []
    for d, folder in items:
        p = _provenance(d)
        data, seen = p.get("data"), p.get("tokens_seen")
        if data is not None or seen is not None:
            rows.append(
                [
                    f"`{folder}`",
                    str(data) if data is not None else "-",
                    str(seen) if seen is not None else "-",
                ]
            )
    if not rows:
        return ["Not recorded in the dictionaries' config.json."]
    if len({(r[1], r[2]) for r in rows}) == 1:
        return [f"Activations of {rows[0][1]}; {rows[0][2]} tokens seen per dictionary."]
    return md_table(("folder", "data", "tokens seen"), rows)


def _eval_section(table: EvalTable | None, plots: Sequence[str]) -> list[str]:
    if table is None:
        lines = [
            "No `openscope eval` report was found for these dictionaries (`openscope push --eval` names one)."
        ]
    else:
        lines = [
            f"Held-out evaluation on `{table.model}` with text `{table.source}` ({table.n_tokens} tokens): "
            "L0 is the mean number of active latents per token, FVU the fraction of variance unexplained, "
            "delta loss the next-token loss with the reconstruction spliced in minus the clean loss (nats), "
            "KL that of the next-token distributions, loss recovered against zero-ablation. The whole "
            "report is in `eval/`.",
            "",
            *md_table(EVAL_COLUMNS, table.rows),
        ]
    for plot in plots:
        lines += ["", f"![{Path(plot).stem.replace('_', ' ')}]({plot})"]
    return lines


def _suite_section(catalogue: dict[str, Any]) -> list[str]:
    counts = catalogue.get("counts") or {}
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return [
        "## Suite",
        "",
        f"These dictionaries are the finished items of an `openscope suite run` (preset "
        f"`{catalogue.get('preset')}`, scale `{catalogue.get('scale')}`; {shown}). `catalogue.json` lists "
        "every item with its sites, width, L0 target, tokens and numbers; `openscope serve --suite` "
        "browses it.",
        "",
    ]


def model_card(
    repo: str,
    items: Sequence[tuple[Dictionary, str]],
    table: EvalTable | None,
    plots: Sequence[str],
    catalogue: dict[str, Any] | None = None,
    *,
    license: str = "",
    model_name: str | None = None,
) -> str:
    """README.md of the pushed folder (module docstring). `items`: (dictionary, its folder in the repo)."""
    models = sorted({str(model_name or (d.config or {}).get("model_name") or "") for d, _ in items} - {""})
    model = models[0] if len(models) == 1 else ", ".join(models)
    first = items[0][1]
    lines = [
        *_yaml_front(model, license),
        CARD_MARK,
        "",
        f"# {repo}",
        "",
        f"{len(items)} sparse dictionar{'y' if len(items) == 1 else 'ies'} of `{model}`, in the Gemma Scope 2 "
        f"layout (one folder each: `config.json` + `params.safetensors`), published with openscope "
        f"{openscope.__version__}.",
        "",
        "## Dictionaries",
        "",
        *_contents(items),
        "",
        "## Use",
        "",
        "```",
        f"openscope eval --dictionaries hf://{repo}/{first}",
        f"openscope features --dictionaries hf://{repo}/{first}",
        "```",
        "",
        "```python",
        "from openscope.coders.dictionary import load_dictionary",
        "",
        f'dictionary = load_dictionary("hf://{repo}/{first}")',
        "```",
        "",
        "Every folder loads the same way (`hf://OWNER/NAME@REVISION/FOLDER` for a branch or tag).",
        "",
        "## Recipe",
        "",
        *_recipe_section(items),
        "",
        "## Training data",
        "",
        *_data_section(items),
        "",
        "## Evaluation",
        "",
        *_eval_section(table, plots),
        "",
    ]
    if catalogue is not None:
        lines += _suite_section(catalogue)
    return "\n".join(lines)
