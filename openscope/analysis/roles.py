"""Role-aware latent statistics: how often, and how strongly, each latent fires in each role.

For a dictionary on chat data, every token has a role (template, system, user, model). Per role r
and latent j: the tokens of that role N_r, the firings n_rj (activation > 0) and their activation sum
s_rj give the firing frequency n_rj / N_r and the mean activation over firings s_rj / n_rj.

**Specificity** of latent j to role r compares its firing frequency inside the role with its frequency
on every other token:  f_in = n_rj / N_r,  f_out = Σ_{q≠r} n_qj / Σ_{q≠r} N_q,
spec = f_in / (f_in + f_out)  ∈ [0, 1]. 1: fires only in that role; 0.5: indifferent to it; 0: never in
it. It does not depend on how many tokens each role has (model turns outnumber user turns 2 to 1 on
ShareGPT), which a plain share of firings would. `most_specific` ranks latents by it, among those that
fired at least `min_fired` times in the role (a latent seen twice is not evidence of anything).

`RoleCounter` accumulates the counts from a stream of sparse (row, latent, value) entries, which is
what the feature pass has at hand; `role_statistics` is its dense reference twin. `openscope features`
stores them per latent (the feature page shows them); `openscope chat roles` (`role_report`) measures
one dictionary on chat data and writes the ranking as report.json, report.md and roles.png.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import Dictionary, find_dictionaries, load_dictionary, validate_dictionary
from openscope.data.chat import ROLES
from openscope.errors import OpenscopeError
from openscope.models.load import LoadedModel, load_model


class RoleStats(NamedTuple):
    """Counts per role and latent (role i is ROLES[i])."""

    n_tokens: Tensor
    """[R] int64 tokens of each role."""
    n_fired: Tensor
    """[R, F] int64 tokens of each role where each latent fired (> 0)."""
    act_sum: Tensor
    """[R, F] float64 sum of each latent's activations over those tokens."""

    @property
    def frequency(self) -> Tensor:
        """[R, F] float64 firing frequency within each role (0 for a role without tokens)."""
        return self.n_fired.double() / self.n_tokens.clamp(min=1).double()[:, None]

    @property
    def mean_activation(self) -> Tensor:
        """[R, F] float64 mean activation over the firings in each role (0 where it never fired)."""
        return self.act_sum / self.n_fired.clamp(min=1).double()


class RoleLatent(NamedTuple):
    """A latent's standing in one role (a row of a ranking)."""

    latent: int
    """Latent index."""
    role: str
    """Role name."""
    specificity: float
    """f_in / (f_in + f_out) (module docstring)."""
    frequency: float
    """Firing frequency on tokens of this role (f_in)."""
    frequency_elsewhere: float
    """Firing frequency on every other token (f_out)."""
    mean_activation: float
    """Mean activation over its firings in this role."""
    n_fired: int
    """Tokens of this role where it fired."""


def role_statistics(acts: Tensor, roles: Tensor, n_roles: int = len(ROLES)) -> RoleStats:
    """Counts from dense activations [N, F] and the role of each row [N] (the reference computation)."""
    acts = acts.detach().double().cpu()
    roles = roles.long().cpu()
    width = acts.shape[1]
    n_fired = torch.zeros(n_roles, width, dtype=torch.long)
    act_sum = torch.zeros(n_roles, width, dtype=torch.float64)
    for r in range(n_roles):
        rows = acts[roles == r]
        n_fired[r] = (rows > 0).sum(0)
        act_sum[r] = rows.clamp(min=0).sum(0)
    return RoleStats(torch.bincount(roles, minlength=n_roles), n_fired, act_sum)


class RoleCounter:
    """Streaming RoleStats from sparse entries: one flat `bincount` per batch."""

    def __init__(self, width: int, n_roles: int = len(ROLES)) -> None:
        self.width, self.n_roles = width, n_roles
        self.n_tokens = torch.zeros(n_roles, dtype=torch.long)
        self.n_fired = torch.zeros(n_roles, width, dtype=torch.long)
        self.act_sum = torch.zeros(n_roles, width, dtype=torch.float64)

    def add(self, row_roles: Tensor, rows: Tensor, latents: Tensor, values: Tensor) -> None:
        """Add a batch: the role of each of its rows [N], and its nonzero entries (row, latent, value)."""
        row_roles = row_roles.long().cpu()
        self.n_tokens += torch.bincount(row_roles, minlength=self.n_roles)
        flat = row_roles[rows.cpu()] * self.width + latents.cpu()
        size = self.n_roles * self.width
        self.n_fired.view(-1).add_(torch.bincount(flat, minlength=size))
        self.act_sum.view(-1).add_(torch.bincount(flat, weights=values.double().cpu(), minlength=size))

    def add_dense(self, acts: Tensor, row_roles: Tensor) -> None:
        """Add a batch of dense activations [N, F] (only the entries > 0 count)."""
        rows, latents = (acts > 0).nonzero(as_tuple=True)
        self.add(row_roles, rows, latents, acts[rows, latents])

    def result(self) -> RoleStats:
        """The counts so far."""
        return RoleStats(self.n_tokens.clone(), self.n_fired.clone(), self.act_sum.clone())

    def state(self, prefix: str = "role") -> dict[str, Tensor]:
        """Tensors to checkpoint."""
        return {
            f"{prefix}.n_tokens": self.n_tokens,
            f"{prefix}.n_fired": self.n_fired,
            f"{prefix}.act_sum": self.act_sum,
        }

    def load(self, state: dict[str, Tensor], prefix: str = "role") -> None:
        """Restore from `state` (a checkpoint without role counts leaves them at zero)."""
        if f"{prefix}.n_tokens" in state:
            self.n_tokens = state[f"{prefix}.n_tokens"].clone()
            self.n_fired = state[f"{prefix}.n_fired"].clone()
            self.act_sum = state[f"{prefix}.act_sum"].clone()


def merge(a: RoleStats, b: RoleStats) -> RoleStats:
    """The counts of two disjoint sets of tokens together."""
    return RoleStats(a.n_tokens + b.n_tokens, a.n_fired + b.n_fired, a.act_sum + b.act_sum)


def frequency_elsewhere(stats: RoleStats) -> Tensor:
    """[R, F] firing frequency of each latent on the tokens of every other role (f_out)."""
    tokens_out = stats.n_tokens.sum() - stats.n_tokens
    fired_out = stats.n_fired.sum(0, keepdim=True) - stats.n_fired
    return fired_out.double() / tokens_out.clamp(min=1).double()[:, None]


def specificity(stats: RoleStats) -> Tensor:
    """[R, F] f_in / (f_in + f_out) (module docstring); 0 where the latent never fired at all."""
    f_in, f_out = stats.frequency, frequency_elsewhere(stats)
    total = f_in + f_out
    return torch.where(total > 0, f_in / total.clamp(min=1e-300), torch.zeros_like(total))


def most_specific(stats: RoleStats, role: str, k: int = 20, min_fired: int = 5) -> list[RoleLatent]:
    """The k latents most specific to `role` (ties: more firings first), among those that fired at least
    `min_fired` times in it."""
    if role not in ROLES:
        raise OpenscopeError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    r = ROLES.index(role)
    spec, f_out = specificity(stats)[r], frequency_elsewhere(stats)[r]
    freq, mean, fired = stats.frequency[r], stats.mean_activation[r], stats.n_fired[r]
    ok = (fired >= max(min_fired, 1)).nonzero().squeeze(1)
    # Sort by firings, then (stably) by specificity: equal specificity keeps the better-attested first.
    ok = ok[torch.argsort(fired[ok], descending=True, stable=True)]
    ok = ok[torch.argsort(spec[ok], descending=True, stable=True)][:k]
    return [
        RoleLatent(
            int(j), role, float(spec[j]), float(freq[j]), float(f_out[j]), float(mean[j]), int(fired[j])
        )
        for j in ok.tolist()
    ]


def role_table(stats: RoleStats, roles: Sequence[str] = ROLES) -> list[dict[str, float | int | str]]:
    """Per role: its tokens, the latents that fired in it, and their mean firing frequency (for reports)."""
    rows: list[dict[str, float | int | str]] = []
    for name in roles:
        r = ROLES.index(name)
        rows.append(
            {
                "role": name,
                "tokens": int(stats.n_tokens[r]),
                "alive": int((stats.n_fired[r] > 0).sum()),
                "mean_l0": float(stats.n_fired[r].sum()) / max(int(stats.n_tokens[r]), 1),
            }
        )
    return rows


# ---- measuring a dictionary on chat data, and the `openscope chat roles` report ------------------------


@torch.inference_mode()
def measure_roles(
    loaded: LoadedModel,
    dictionary: Dictionary,
    source: str,
    text_field: str = "text",
    context_len: int = 256,
    tokens: int = 16_384,
    batch_contexts: int = 8,
    roles: Sequence[int] = (),
) -> RoleStats:
    """RoleStats of a dictionary's latents on a source (the model runs up to the dictionary's site).

    Plain text (no roles) counts every token as role 0. `roles` keeps only tokens of those roles.
    """
    from openscope.features.compute import keep_roles, live_batches

    coder = dictionary.coder
    if not isinstance(coder, SparseCoder):
        raise OpenscopeError(
            f"dictionary {dictionary.name} is a cross-layer transcoder; use a single-layer one"
        )
    counter = RoleCounter(coder.cfg.width)
    n_batches = math.ceil(math.ceil(tokens / context_len) / batch_contexts)
    batches = live_batches(loaded, [dictionary.site_in], source, text_field, context_len, batch_contexts)
    for batch in itertools.islice(batches, n_batches):
        batch = keep_roles(batch, roles)
        x = batch.acts[dictionary.site_in].to(coder.w_enc.device)
        if not len(x):
            continue
        row_roles = batch.row_role if batch.row_role is not None else torch.zeros(len(x), dtype=torch.long)
        counter.add_dense(coder.encode(x).float().cpu(), row_roles)
    if int(counter.n_tokens.sum()) == 0:
        raise OpenscopeError(f"source {source!r} gave no tokens to measure (of the roles asked for)")
    return counter.result()


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
    from openscope.analysis.common import write_report
    from openscope.coders.dictionary import model_of
    from openscope.data.conversations import is_chat_source
    from openscope.models.load import resolve_device
    from openscope.reports import check_report_output, figure, fmt, md_table, report_folder

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
