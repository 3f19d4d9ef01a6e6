"""The examples of a dashboard: each latent's top activations and a quantile-grouped random sample.

- **top-k examples**: the k tokens with the largest activation, each with a window of ±`window`
  tokens of its context and the latent's activation at every token of the window;
- **quantile examples**: a uniform random sample of the tokens where the latent fired (priority
  sampling: each firing gets a seeded random key, the largest keys are kept), split at the end into
  `quantile_buckets` groups by activation, so the dashboard shows weak, medium and strong firings.

Both are gathered while streaming (`openscope.features.streaming.Slots`); this module turns them into
database rows, windows trimmed to their context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from openscope.features.index import ExampleRow
from openscope.features.streaming import LatentStats, Slots


class Pick(NamedTuple):
    """One example chosen for the database: which slot, and where it is listed."""

    latent: int
    """Latent index."""
    kind: str
    """'top' or 'quantile'."""
    bucket: int
    """Quantile bucket (0 for top examples)."""
    rank: int
    """Order within (kind, bucket), 0 = highest activation."""
    slot: int
    """The slot (of the latent's `Slots` row) holding the example."""


def quantile_groups(n: int, buckets: int) -> list[range]:
    """Split ranks 0..n-1 (ascending activation) into up to `buckets` near-equal consecutive groups."""
    base, extra = divmod(n, buckets)
    groups, start = [], 0
    for b in range(buckets):
        size = base + (1 if b < extra else 0)
        if size:
            groups.append(range(start, start + size))
        start += size
    return groups


def example_rows(slots: Slots, picks: Sequence[Pick], window: int) -> list[ExampleRow]:
    """Database rows of the picked slots, windows trimmed to the context (vectorised, then one pass)."""
    tokens = slots.tokens.numpy()
    acts = slots.acts.numpy()
    inside = tokens >= 0
    lo = inside.argmax(2).tolist()
    hi = (tokens.shape[2] - inside[:, :, ::-1].argmax(2)).tolist()
    context, position, value = slots.context.tolist(), slots.position.tolist(), slots.value.tolist()
    centre = tokens[:, :, window].tolist()
    rows = []
    for p in picks:
        i, j = p.latent, p.slot
        a, b = lo[i][j], hi[i][j]
        rows.append(
            ExampleRow(
                latent=i,
                kind=p.kind,
                bucket=p.bucket,
                rank=p.rank,
                context=context[i][j],
                position=position[i][j],
                start=position[i][j] - window + a,
                max_index=window - a,
                max_activation=value[i][j],
                max_token_id=centre[i][j],
                token_ids=tokens[i, j, a:b],
                activations=acts[i, j, a:b],
            )
        )
    return rows


class Examples(NamedTuple):
    """A dictionary's examples, finished."""

    top: Slots
    """The top examples, each latent's best first."""
    sample: Slots
    """The quantile sample, as streamed (unordered)."""
    rows: list[ExampleRow]
    """Database rows: the top examples, then the quantile groups."""

    def token_ids(self) -> set[int]:
        """Every token id the examples' windows show."""
        seen = [
            self.top.tokens[torch.isfinite(self.top.score)],
            self.sample.tokens[torch.isfinite(self.sample.score)],
        ]
        return set(torch.cat([t.reshape(-1) for t in seen]).unique().tolist()) - {-1}


def finish_examples(stats: LatentStats, quantile_buckets: int, window: int) -> Examples:
    """The top examples sorted and the sample split into `quantile_buckets` activation groups (0 = weakest),
    each listed strongest first."""
    f = stats.width
    top = stats.top.sorted()
    n_top = torch.isfinite(top.score).sum(1).tolist()
    top_picks = [Pick(lat, "top", 0, r, r) for lat in range(f) for r in range(n_top[lat])]
    # The sample is uniform over firings; its activation quantiles are the buckets (0 = weakest),
    # each listed strongest first.
    sample = stats.sample
    filled = torch.isfinite(sample.score)
    desc = torch.where(filled, sample.value, torch.tensor(-math.inf)).argsort(
        dim=1, descending=True, stable=True
    )
    n_filled, desc_l = filled.sum(1).tolist(), desc.tolist()
    sample_picks = []
    for lat in range(f):
        ascending = desc_l[lat][: n_filled[lat]][::-1]
        for bucket, g in enumerate(quantile_groups(n_filled[lat], quantile_buckets)):
            for rank, i in enumerate(reversed(g)):
                sample_picks.append(Pick(lat, "quantile", bucket, rank, ascending[i]))
    rows = example_rows(top, top_picks, window) + example_rows(sample, sample_picks, window)
    return Examples(top, sample, rows)
