"""`openscope chat roles`: a dictionary's latents per chat role, as report.json, report.md and roles.png.

The statistics (firing frequency and mean activation per role, and each latent's specificity to a role)
are `openscope.features.roles`; this module measures one dictionary on chat data with them and writes
the ranking of the most role-specific latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from openscope.analysis.common import write_report
from openscope.coders.dictionary import (
    Dictionary,
    find_dictionaries,
    load_dictionary,
    model_of,
    validate_dictionary,
)
from openscope.data.chat import ROLES
from openscope.data.sources import is_chat_source
from openscope.errors import OpenscopeError
from openscope.features.roles import (
    RoleLatent,
    RoleStats,
    measure_roles,
    most_specific,
    role_table,
    specificity,
)
from openscope.models.load import LoadedModel, load_model, resolve_device
from openscope.reports import check_report_output, figure, fmt, md_table, report_folder


@dataclass
class RolesConfig:
    """Which dictionary to measure on which chat data, and where to write the report."""

    dictionary: Path = Path("openscope-out/dictionaries")
    """A dictionary folder (or a folder holding exactly one)."""
    model: str | None = None
    """Model (name, local directory or hub id). Default: the dictionary's model_name."""
    source: str = "sharegpt[:200]"
    """Chat data: sharegpt or chat:PATH (.json/.jsonl conversations), sliced by conversation."""
    text_field: str = "text"
    """Unused for chat sources (kept for plain-text sources)."""
    tokens: int = 32_768
    """Token budget: contexts are read until this many context positions are covered."""
    context_len: int = 256
    """Tokens per packed context."""
    batch_size: int = 8
    """Contexts per forward."""
    top: int = 20
    """Latents listed per role."""
    min_fired: int = 5
    """A latent is ranked for a role only if it fired at least this often in it."""
    output: Path = Path("openscope-out/chat-roles")
    """Folder for report.json, report.md and roles.png."""
    overwrite: bool = False
    """Replace the report already in --output (only a report openscope wrote is ever replaced)."""
    device: str = "auto"
    """Device: auto (cuda if available), cpu, cuda, ..."""
    cache_dir: Path | None = None
    """Where converted models are cached (default: $OPENSCOPE_CACHE or ~/.cache/openscope)."""


class RolesReport(NamedTuple):
    """What `role_report` measured."""

    dictionary: str
    """The dictionary's name."""
    model: str
    """The model it ran on."""
    stats: RoleStats
    """The per-role counts."""
    ranked: dict[str, list[RoleLatent]]
    """Per role that has tokens, its most specific latents."""
    files: list[Path]
    """Files written."""


def one_dictionary(path: Path, loaded: LoadedModel | None = None) -> Dictionary:
    """The single dictionary at (or under) a folder; OpenscopeError if there are none or several."""
    folders = find_dictionaries(path) if Path(path).is_dir() else []
    if len(folders) != 1:
        found = f"{len(folders)} ({', '.join(f.name for f in folders[:4])})" if folders else "none"
        raise OpenscopeError(f"{path} must hold exactly one dictionary; found {found}")
    return load_dictionary(folders[0], loaded)


def role_report(
    cfg: RolesConfig, loaded: LoadedModel | None = None, dictionary: Dictionary | None = None
) -> RolesReport:
    """Measure a dictionary's latents per chat role and write report.json, report.md and roles.png."""
    if not is_chat_source(cfg.source):
        raise OpenscopeError(
            f"role statistics need a chat source (sharegpt or chat:PATH), not {cfg.source!r}"
        )
    device = resolve_device(cfg.device)
    check_report_output(cfg.output, cfg.overwrite)
    d = dictionary or one_dictionary(cfg.dictionary, loaded)
    if loaded is None:
        loaded = load_model(cfg.model or model_of([d]), device=device, cache_dir=cfg.cache_dir)
    validate_dictionary(d, loaded)
    d.coder.to(loaded.device).eval()
    stats = measure_roles(loaded, d, cfg.source, cfg.text_field, cfg.context_len, cfg.tokens, cfg.batch_size)
    present = [name for i, name in enumerate(ROLES) if int(stats.n_tokens[i]) > 0]
    ranked = {role: most_specific(stats, role, cfg.top, cfg.min_fired) for role in present}
    with report_folder(cfg.output, cfg.overwrite) as output:
        with figure(output / "roles.png", 6.4, 4.2) as fig:
            ax = fig.add_subplot(1, 1, 1)
            spec = specificity(stats)
            fired = stats.n_fired.sum(0) > 0
            for role in present:
                r = ROLES.index(role)
                ax.hist(spec[r][fired].numpy(), bins=40, range=(0, 1), histtype="step", label=role)
            ax.set_xlabel("specificity to the role (0.5 = indifferent)")
            ax.set_ylabel("latents")
            ax.set_title(f"{d.name}: role specificity of {int(fired.sum())} live latents")
            ax.legend()
        table = role_table(stats, present)
        md = [
            f"# Role statistics: {d.name} on {loaded.name}",
            "",
            f"Source `{cfg.source}`; {int(stats.n_tokens.sum())} tokens.",
            "",
            *md_table(
                ["role", "tokens", "latents that fired", "mean L0"],
                [[t["role"], t["tokens"], t["alive"], fmt(float(t["mean_l0"]), ".1f")] for t in table],
            ),
        ]
        for role, rows in ranked.items():
            md += [
                "",
                f"## Most specific to {role}",
                "",
                *md_table(
                    ["latent", "specificity", f"freq in {role}", "freq elsewhere", "mean act", "fired"],
                    [
                        [
                            x.latent,
                            fmt(x.specificity),
                            fmt(x.frequency, ".2e"),
                            fmt(x.frequency_elsewhere, ".2e"),
                            fmt(x.mean_activation, ".3g"),
                            x.n_fired,
                        ]
                        for x in rows
                    ],
                ),
            ]
        notes = [
            "specificity = f_in / (f_in + f_out): firing frequency on the role's tokens against every other "
            "token; 1 = only in that role, 0.5 = indifferent (openscope.analysis.roles).",
        ]
        results = {
            "dictionary": d.name,
            "site": d.site_in.name,
            "source": cfg.source,
            "roles": table,
            "most_specific": {role: [x._asdict() for x in rows] for role, rows in ranked.items()},
        }
        write_report(output, "roles", cfg, loaded.name, results, md, ["roles.png"], notes)
    output = Path(cfg.output)
    return RolesReport(
        d.name,
        loaded.name,
        stats,
        ranked,
        [output / "report.json", output / "report.md", output / "roles.png"],
    )
