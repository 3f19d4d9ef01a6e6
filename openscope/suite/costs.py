"""What a suite costs on paper, before any compute: FLOPs, parameters, storage, memory and wall time.

Pure functions of a plan and the model's shape (`ModelDims`), except `calibrate`, which times a few real
float32 matrix products on this machine. The formulas:

- **Harvest** (one item alone): tokens × the forward FLOPs per token of blocks 0..L, L the last layer
  the item reads (harvesting stops there and never runs the LM head). One block costs
  2·(d·h·dh + 2·d·kv·dh + h·dh·d + m·d·d_mlp) + 2·h·dh·ctx per token: its weight products (queries,
  keys and values, output projection, m = 3 MLP matrices when gated, else 2) and attention over a causal
  context's mean span of ctx/2 (QKᵀ and AV). Norms, embeddings and sliding windows are left out.
- **Training**: steps × batch × (4·E + 6·D + 4·S) with E, D, S the encoder, decoder and skip weights
  (steps = ⌈tokens / batch⌉). A step's dense products: the encoder forward and its weight gradient
  (2 × 2·B·E), the decoder forward, its weight gradient and the latents' gradient (3 × 2·B·D), the skip's
  forward and weight gradient (2 × 2·B·S); no gradient flows into the activations. A cross-layer
  transcoder or crosscoder over L layers with F latents each: E = L·d_in·F (a latent reads its own
  layer), D = F·d_out·L(L+1)/2 (a latent writes to its layer and every later one).
- **Parameters**: E + D + S + biases (b_enc and threshold per latent, b_dec per output value).
- **Storage**: tokens × the widths of every site the item reads (a transcoder's target too) × the
  store's bytes per value; 0 when the plan trains live.
- **Peak memory** of the training process: 4 float32 copies of the parameters (weights, gradients,
  Adam's two moments) + one batch of its sites in float32 + 4 float32 values per latent and token of
  the batch (pre-activations, latents and their gradients; the dense path's worst case).
- **Wall time**: FLOPs / speed. Here: the speed `calibrate` measured for the item's shape (harvest: the
  model's [d_model × d_mlp] products). On an accelerator: its bf16 dense peak × `EFFICIENCY`.

In the total, harvesting and storage count each site once: one forward feeds every dictionary that
reads a site, and a store keeps each site once for the largest token budget that reads it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import NamedTuple

import torch

from openscope.errors import OpenscopeError
from openscope.models.catalog import ModelDims
from openscope.models.sites import Site
from openscope.suite.plan import (
    MULTI_LAYER_KINDS,
    STORE_DTYPES,
    SuiteItem,
    SuitePlan,
    coder_layers,
    item_layer_width,
    item_reads,
    item_sites,
)

PEAK_FLOPS = {
    "h100": 989e12,  # NVIDIA H100 SXM, dense bf16 tensor cores (no sparsity)
    "h200": 989e12,  # H200: the H100's compute with more, faster memory
    "a100": 312e12,  # A100 (40 or 80 GB), dense bf16
}
"""Peak dense bf16 FLOP/s of one accelerator, from the vendors' data sheets."""
EFFICIENCY = 0.4
"""Fraction of the peak a training or harvesting run sustains (matrix products of these shapes, plus
the rest of a step); an assumption, a typical utilisation of large dense training."""
ACCELERATORS = (*PEAK_FLOPS, "cpu")
"""Accelerators the wall time is given for (`cpu`: this machine, at its measured speed)."""
FP32_BYTES = 4
"""Bytes of a float32 (training state and batches)."""
STATE_COPIES = 4
"""Float32 copies of the parameters a training process holds: weights, gradients, Adam's two moments."""
VALUES_PER_LATENT = 4
"""Float32 values per latent and token of a batch: pre-activations, latents and their two gradients."""
CALIBRATION_ROWS = 512
"""Rows of the calibration products (a slice of a batch)."""
CALIBRATION_WIDTH = 2048
"""Widest calibration product: wider dictionaries run at the speed measured at this width."""


class CoderShape(NamedTuple):
    """The weights and batch values of one dictionary (all its layers together)."""

    encoder: int
    """Encoder weights (E)."""
    decoder: int
    """Decoder weights (D)."""
    skip: int
    """Skip-connection weights (S; 0 without one)."""
    biases: int
    """b_enc, thresholds and b_dec."""
    latents: int
    """Latents in all."""
    batch_values: int
    """Activation values per token of a batch: the widths of every site read."""
    d_in: int
    """Width of the site one layer's encoder reads (for the speed of its products)."""
    layer_width: int
    """Latents per layer."""

    @property
    def parameters(self) -> int:
        """E + D + S + biases."""
        return self.encoder + self.decoder + self.skip + self.biases


class CostRow(NamedTuple):
    """The cost of one item, or of a group of items summed."""

    label: str
    """The item's name, its family, or `total`."""
    items: int
    """How many items the row covers."""
    tokens: int
    """Training tokens, summed over the items."""
    harvest_flops: float
    """FLOPs of running the model to the sites (each item alone; the total: shared)."""
    train_flops: float
    """FLOPs of the training steps' dense products."""
    parameters: int
    """Dictionary parameters."""
    storage_bytes: int
    """Activation storage if stored (each item alone; the total: each site once); 0 when live."""
    peak_memory_bytes: int
    """Peak memory of one training process (a group: its largest item)."""
    seconds_here: float
    """Wall time on this machine at its measured speed."""
    seconds_accelerator: float
    """Wall time on the chosen accelerator."""


class SuiteCost(NamedTuple):
    """The costs of a plan: per item, per family (top folder) and in total."""

    items: list[CostRow]
    """One row per item, in the plan's order."""
    families: list[CostRow]
    """One row per family, in order of first appearance."""
    total: CostRow
    """The whole suite, harvesting and storing each site once."""
    separate_harvest_flops: float
    """Harvest FLOPs if every item ran its own forward (the sum of the item rows)."""
    separate_storage_bytes: int
    """Storage if every item kept its own copy of its sites (the sum of the item rows)."""
    accelerator: str
    """The accelerator of `seconds_accelerator`."""


class Throughput(NamedTuple):
    """This machine's float32 matrix-product speed, measured per product shape."""

    by_shape: dict[tuple[int, int], float]
    """FLOP/s by (inner dimension, width) as `shape_key` gives it."""
    default: float
    """FLOP/s for a shape not measured."""

    def of(self, d: int, width: int) -> float:
        """FLOP/s of products of inner dimension `d` and `width` columns."""
        return self.by_shape.get(shape_key(d, width), self.default)


def shape_key(d: int, width: int) -> tuple[int, int]:
    """The calibration shape standing for a product of `d` × `width` (widths capped)."""
    return (d, min(width, CALIBRATION_WIDTH))


def site_width(dims: ModelDims, site: Site) -> int:
    """Width of a site's activation: the heads for `attn_out`, else the residual width."""
    return dims.attn_width if site.kind == "attn_out" else dims.d_model


def coder_shape(item: SuiteItem, dims: ModelDims) -> CoderShape:
    """The weights of an item's dictionary (see the module's docstring)."""
    n_layers = coder_layers(item, dims.n_layers)
    f = item_layer_width(item, dims.n_layers)
    d_in = site_width(dims, item_sites(item, dims.n_layers)[0])
    d_out = d_in  # a transcoder's target (mlp_out) is as wide as its input (mlp_in)
    blocks = n_layers * (n_layers + 1) // 2 if item.kind in MULTI_LAYER_KINDS else 1
    skip = n_layers * d_in * d_out if item.kind in ("skip_transcoder", "skip_clt") else 0
    return CoderShape(
        encoder=n_layers * d_in * f,
        decoder=blocks * f * d_out,
        skip=skip,
        biases=n_layers * (2 * f + d_out),
        latents=n_layers * f,
        batch_values=sum(site_width(dims, s) for s in item_reads(item, dims.n_layers)),
        d_in=d_in,
        layer_width=f,
    )


def block_flops(dims: ModelDims, context_len: int) -> float:
    """Forward FLOPs per token of one decoder block (weight products and causal attention)."""
    d, h, kv, dh = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.head_dim
    mlp = (3 if dims.gated_mlp else 2) * d * dims.d_mlp
    weights = d * h * dh + 2 * d * kv * dh + h * dh * d + mlp
    return 2.0 * weights + 2.0 * h * dh * context_len


def forward_flops(dims: ModelDims, blocks: int, tokens: int, context_len: int) -> float:
    """FLOPs of running `tokens` tokens through the first `blocks` blocks (no LM head)."""
    return float(tokens) * blocks * block_flops(dims, context_len)


def train_flops(shape: CoderShape, tokens: int, batch_size: int) -> float:
    """FLOPs of a training run's dense products: steps × batch × (4E + 6D + 4S)."""
    steps = math.ceil(tokens / batch_size)
    return float(steps) * batch_size * (4 * shape.encoder + 6 * shape.decoder + 4 * shape.skip)


def peak_memory(shape: CoderShape, batch_size: int) -> int:
    """Bytes a training process holds at its peak (see the module's docstring)."""
    state = STATE_COPIES * shape.parameters
    batch = batch_size * (shape.batch_values + VALUES_PER_LATENT * shape.latents)
    return FP32_BYTES * (state + batch)


def accelerator_flops(accelerator: str, here: Throughput) -> float | None:
    """Sustained FLOP/s on an accelerator (peak × EFFICIENCY); None for `cpu` (this machine's speeds)."""
    if accelerator == "cpu":
        return None
    if accelerator not in PEAK_FLOPS:
        raise OpenscopeError(f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    return PEAK_FLOPS[accelerator] * EFFICIENCY


def _last_block(item: SuiteItem, dims: ModelDims) -> int:
    return max(s.layer for s in item_reads(item, dims.n_layers)) + 1


def item_cost(
    item: SuiteItem, plan: SuitePlan, dims: ModelDims, here: Throughput, accelerator: str
) -> CostRow:
    """The cost of one item trained alone."""
    shape = coder_shape(item, dims)
    data = plan.data
    harvest = forward_flops(dims, _last_block(item, dims), item.tokens, data.context_len)
    train = train_flops(shape, item.tokens, data.batch_size)
    stored = data.activations == "stored"
    storage = item.tokens * shape.batch_values * STORE_DTYPES[data.dtype] if stored else 0
    model_speed = here.of(dims.d_model, dims.d_mlp)
    seconds_here = harvest / model_speed + train / here.of(shape.d_in, shape.layer_width)
    fast = accelerator_flops(accelerator, here)
    return CostRow(
        label=item.name,
        items=1,
        tokens=item.tokens,
        harvest_flops=harvest,
        train_flops=train,
        parameters=shape.parameters,
        storage_bytes=storage,
        peak_memory_bytes=peak_memory(shape, data.batch_size),
        seconds_here=seconds_here,
        seconds_accelerator=seconds_here if fast is None else (harvest + train) / fast,
    )


def shared_harvest_flops(plan: SuitePlan, dims: ModelDims) -> float:
    """Harvest FLOPs when one forward feeds every item: the forward runs for the largest token budget,
    each token only as deep as the deepest item still needing tokens at that point requires."""
    need: dict[int, int] = {}  # token budget -> deepest block an item with that budget needs
    for item in plan.items:
        need[item.tokens] = max(need.get(item.tokens, 0), _last_block(item, dims))
    total, deepest = 0.0, 0
    budgets = sorted(need, reverse=True)
    for budget, lower in zip(budgets, [*budgets[1:], 0], strict=True):
        deepest = max(deepest, need[budget])
        total += forward_flops(dims, deepest, budget - lower, plan.data.context_len)
    return total


def shared_storage_bytes(plan: SuitePlan, dims: ModelDims) -> int:
    """Bytes of one store holding each site once, for the largest token budget that reads it."""
    if plan.data.activations != "stored":
        return 0
    rows: dict[Site, int] = {}
    for item in plan.items:
        for site in item_reads(item, dims.n_layers):
            rows[site] = max(rows.get(site, 0), item.tokens)
    return sum(n * site_width(dims, s) * STORE_DTYPES[plan.data.dtype] for s, n in rows.items())


def _sum(label: str, rows: list[CostRow]) -> CostRow:
    return CostRow(
        label=label,
        items=sum(r.items for r in rows),
        tokens=sum(r.tokens for r in rows),
        harvest_flops=sum(r.harvest_flops for r in rows),
        train_flops=sum(r.train_flops for r in rows),
        parameters=sum(r.parameters for r in rows),
        storage_bytes=sum(r.storage_bytes for r in rows),
        peak_memory_bytes=max(r.peak_memory_bytes for r in rows),
        seconds_here=sum(r.seconds_here for r in rows),
        seconds_accelerator=sum(r.seconds_accelerator for r in rows),
    )


def suite_cost(plan: SuitePlan, dims: ModelDims, here: Throughput, accelerator: str = "h100") -> SuiteCost:
    """The costs of every item, of each family and of the whole suite (harvest and storage shared)."""
    rows = [item_cost(item, plan, dims, here, accelerator) for item in plan.items]
    groups: dict[str, list[CostRow]] = {}
    for row in rows:
        groups.setdefault(row.label.split("/")[0], []).append(row)
    families = [_sum(name, group) for name, group in groups.items()]
    whole = _sum("total", rows)
    harvest = shared_harvest_flops(plan, dims)
    fast = accelerator_flops(accelerator, here)
    harvest_here = harvest / here.of(dims.d_model, dims.d_mlp)
    train_here = 0.0
    for item, row in zip(plan.items, rows, strict=True):
        shape = coder_shape(item, dims)
        train_here += row.train_flops / here.of(shape.d_in, shape.layer_width)
    total = whole._replace(
        harvest_flops=harvest,
        storage_bytes=shared_storage_bytes(plan, dims),
        seconds_here=harvest_here + train_here,
        seconds_accelerator=(
            harvest_here + train_here if fast is None else (harvest + whole.train_flops) / fast
        ),
    )
    return SuiteCost(rows, families, total, whole.harvest_flops, whole.storage_bytes, accelerator)


def calibration_shapes(plan: SuitePlan, dims: ModelDims) -> set[tuple[int, int]]:
    """The product shapes whose speed the plan's wall times need (the model's, each item's)."""
    shapes = {shape_key(dims.d_model, dims.d_mlp)}
    for item in plan.items:
        shape = coder_shape(item, dims)
        shapes.add(shape_key(shape.d_in, shape.layer_width))
    return shapes


def calibrate(shapes: Iterable[tuple[int, int]], repeats: int = 5) -> Throughput:
    """Time this machine's float32 products of each shape (d, width): a batch slice times the encoder,
    the latents times the decoder, and the encoder's weight gradient; the best of `repeats` after a
    warm-up. A short measurement (well under a second a shape for these sizes)."""
    speeds: dict[tuple[int, int], float] = {}
    gen = torch.Generator().manual_seed(0)
    rows = CALIBRATION_ROWS
    for d, width in sorted(set(shapes)):
        x = torch.randn(rows, d, generator=gen)
        w = torch.randn(d, width, generator=gen)
        f = torch.randn(rows, width, generator=gen)
        best = math.inf
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            torch.mm(x, w)
            torch.mm(f, w.T)
            torch.mm(x.T, f)
            seconds = time.perf_counter() - start
            if attempt:  # the first run warms caches and thread pools up
                best = min(best, seconds)
        speeds[(d, width)] = 3 * 2.0 * rows * d * width / max(best, 1e-9)
    default = sum(speeds.values()) / len(speeds) if speeds else 1e11
    return Throughput(speeds, default)
