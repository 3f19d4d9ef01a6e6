"""One shard of a harvest: the model run over a block of contexts, the kept rows of every site gathered
into the shard's tensors (with token ids, positions, roles and the float64 sums of the statistics)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import torch

from openscope.data.packing import to_batch
from openscope.errors import OpenscopeError
from openscope.models.hooks import run_with_readers
from openscope.models.load import LoadedModel, dtype_name
from openscope.models.sites import Site
from openscope.models.tokens import keep_mask


class Shard(NamedTuple):
    """One shard's tensors and the numbers its manifest entry records."""

    tensors: dict[str, torch.Tensor]
    n_rows: int
    sum_sq_norm: dict[str, float]


def harvest_shard(
    loaded: LoadedModel,
    widths: dict[Site, int],
    contexts: torch.Tensor,
    context_start: int,
    batch_size: int,
    store_dtype: torch.dtype,
    device: str,
    bar: Any,
    roles: torch.Tensor | None = None,
    wanted: list[int] | None = None,
) -> Shard:
    """Run the model over one shard's contexts and gather the kept rows of every site.

    roles: [n, context_len] role of every token (chat sources): stored per row, and with `wanted`
    only rows of those roles are kept.
    """
    keep = keep_mask(contexts, loaded.tokenizer)
    if roles is not None and wanted:
        keep &= torch.isin(roles, torch.tensor(wanted, dtype=roles.dtype))
    n_rows = int(keep.sum())
    bufs: dict[Site, torch.Tensor] = {}
    sums: dict[Site, torch.Tensor] = {}
    sites = list(widths)
    sum_sq: dict[str, float] = {s.name: 0.0 for s in sites}
    for s in sites:
        bufs[s] = torch.empty(n_rows, widths[s], dtype=store_dtype)
        sums[s] = torch.zeros(widths[s], dtype=torch.float64)
    filled = 0
    for b in range(0, len(contexts), batch_size):
        batch = to_batch(contexts[b : b + batch_size].tolist(), loaded.tokenizer)
        rows_idx = keep[b : b + batch_size].reshape(-1).nonzero().squeeze(1).to(device)
        n = len(rows_idx)

        def reader(
            x: torch.Tensor, s: Site, start: int = filled, n: int = n, rows_idx: torch.Tensor = rows_idx
        ) -> None:
            # Copy the kept rows straight into the shard inside the hook, so the layer's output is
            # freed as usual and the allocator reuses its memory.
            flat = x.reshape(-1, x.shape[-1])
            out = bufs[s][start : start + n]
            if flat.device == out.device and flat.dtype == out.dtype:
                torch.index_select(flat, 0, rows_idx, out=out)
            else:
                out.copy_(flat.index_select(0, rows_idx))
            # Statistics of the stored values while they are in cache: float32 BLAS sums,
            # accumulated in float64 across batches (a fixed order, so reruns give the same bytes).
            stored = out.float()
            sum_sq[s.name] += float(torch.dot(stored.reshape(-1), stored.reshape(-1)))
            sums[s] += stored.sum(0).double()

        readers = {s: partial(reader, s=s) for s in sites}
        run_with_readers(loaded, batch.input_ids.to(device), readers, batch.attention_mask.to(device))
        filled += n
        bar.update(batch.input_ids.numel())
    positions = torch.arange(contexts.shape[1]).expand_as(contexts)
    global_ctx = context_start + torch.arange(len(contexts)).unsqueeze(1).expand_as(contexts)
    tensors: dict[str, torch.Tensor] = {s.name: bufs[s] for s in sites}
    tensors["token_ids"] = contexts[keep].to(torch.int32)
    tensors["context"] = global_ctx[keep].to(torch.int64)
    tensors["position"] = positions[keep].to(torch.int32)
    tensors["contexts"] = contexts.to(torch.int32)
    if roles is not None:
        tensors["role"] = roles[keep].contiguous()
    for s in sites:
        tensors[f"stats.sum.{s.name}"] = sums[s]
        # A NaN or inf anywhere makes the sums non-finite: that is how a float16 overflow or a
        # broken model is caught, once per shard rather than per value.
        if not (math.isfinite(sum_sq[s.name]) and torch.isfinite(sums[s]).all()):
            raise OpenscopeError(
                f"site {s.name} has NaN or inf values in the shard starting at context {context_start} "
                f"(stored as {dtype_name(store_dtype)}); float16 overflows on large residuals: "
                "use --dtype bfloat16 or float32"
            )
    return Shard(tensors, n_rows, sum_sq)
