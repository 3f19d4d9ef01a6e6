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
stores them per latent (`role_rows`; the feature page shows them); `measure_roles` measures one
dictionary on chat data, for `openscope chat roles` (`openscope.analysis.roles`) and `openscope chat diff`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from openscope.activations.batches import keep_roles, live_batches
from openscope.coders.coder import SparseCoder
from openscope.coders.dictionary import Dictionary
from openscope.data.chat import ROLES
from openscope.errors import OpenscopeError
from openscope.features.index import RoleStatRow
from openscope.models.load import LoadedModel


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


def role_rows(counter: RoleCounter) -> list[RoleStatRow]:
    """Database rows of the per-role statistics: every latent in every role that has tokens."""
    stats = counter.result()
    spec, f_out = specificity(stats), frequency_elsewhere(stats)
    freq, mean = stats.frequency, stats.mean_activation
    rows = []
    for r, name in enumerate(ROLES):
        n = int(stats.n_tokens[r])
        if n == 0:
            continue
        columns = (stats.n_fired[r], freq[r], mean[r], f_out[r], spec[r])
        for j, values in enumerate(zip(*(c.tolist() for c in columns), strict=True)):
            rows.append(RoleStatRow(j, name, n, *values))
    return rows


# ---- measuring a dictionary on chat data ----------------------------------------------------------------


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
