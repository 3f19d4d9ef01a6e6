"""The `openscope suite plan` and `openscope suite cost` commands: typed configs and what they run.

Each config's field docstrings are the command's `--help` (see `openscope.cli.app.config_command`).
Both check everything they are given before writing or measuring anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from openscope.errors import OpenscopeError
from openscope.models.catalog import ModelDims, dims_of
from openscope.suite.costs import (
    ACCELERATORS,
    SuiteCost,
    Throughput,
    calibrate,
    calibration_shapes,
    suite_cost,
)
from openscope.suite.plan import SuitePlan, check_plan
from openscope.suite.planfile import read_plan, write_plan
from openscope.suite.presets import PRESETS, build_plan


@dataclass
class PlanConfig:
    """Which catalogue to plan for which model, and where to write the plan."""

    model: str = "gemma-3-270m"
    """Model: a Gemma 3 size (gemma-3-270m, -1b, -4b, -12b, -27b, or its hub id such as google/gemma-3-1b-pt) or a local Hugging Face model folder (only its config.json is read)."""
    preset: str = "gemma-scope-2"
    """gemma-scope-2 (Gemma Scope 2's catalogue: sweep layers × sites × widths × L0 targets, all-layer sets, CLTs, crosscoders) or minimal (one SAE per layer's residual stream, trained live)."""
    scale: float = 1.0
    """Multiply every width and token budget by this, e.g. 0.004 for a laptop; widths are rounded to a power of two and kept at least 32 latents (per layer for a CLT or crosscoder), and names say the real widths."""
    tokens: int | None = None
    """Training tokens per dictionary (default: the preset's budget × --scale; gemma-scope-2: 4 billion, minimal: 2 million)."""
    accelerator: str = "h100"
    """Also give the wall time on this accelerator: h100, h200, a100 (bf16 dense peak × 0.4) or cpu (this machine)."""
    output: Path = Path("suite-plan.yaml")
    """Plan file to write: YAML (one line per dictionary), or JSON when it ends in .json."""
    overwrite: bool = False
    """Replace the plan already at --output (only a plan file is ever replaced)."""
    per_item: bool = False
    """Print a row per dictionary, not only per family."""


@dataclass
class CostConfig:
    """Which plan to price, and on what."""

    plan: Path
    """A plan file (written by `openscope suite plan`, perhaps edited, or by hand)."""
    accelerator: str = "h100"
    """Also give the wall time on this accelerator: h100, h200, a100 (bf16 dense peak × 0.4) or cpu (this machine)."""
    per_item: bool = False
    """Print a row per dictionary, not only per family."""


class PlanResult(NamedTuple):
    """A plan, the model's shape and what it costs."""

    plan: SuitePlan
    """The plan."""
    dims: ModelDims
    """The model's dimensions."""
    cost: SuiteCost
    """Its costs."""
    here: Throughput
    """This machine's measured speeds."""
    path: Path
    """The plan file written or read."""


def check_accelerator(name: str) -> None:
    """One-line error unless `name` is an accelerator the wall time can be given for."""
    if name not in ACCELERATORS:
        raise OpenscopeError(f"unknown --accelerator {name!r}; choose one of {', '.join(ACCELERATORS)}")


def price(plan: SuitePlan, dims: ModelDims, accelerator: str) -> tuple[SuiteCost, Throughput]:
    """Measure this machine's speed on the plan's shapes and cost the plan."""
    here = calibrate(calibration_shapes(plan, dims))
    return suite_cost(plan, dims, here, accelerator), here


def run_plan(cfg: PlanConfig) -> PlanResult:
    """`openscope suite plan`: build the preset's plan, check it, write it, cost it."""
    check_accelerator(cfg.accelerator)
    if cfg.preset not in PRESETS:
        raise OpenscopeError(f"unknown --preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    dims = dims_of(cfg.model)
    plan = build_plan(cfg.model, dims, cfg.preset, scale=cfg.scale, tokens=cfg.tokens)
    check_plan(plan, dims)
    path = write_plan(plan, cfg.output, overwrite=cfg.overwrite)
    cost, here = price(plan, dims, cfg.accelerator)
    return PlanResult(plan, dims, cost, here, path)


def run_cost(cfg: CostConfig) -> PlanResult:
    """`openscope suite cost`: read a plan, check it against its model, cost it."""
    check_accelerator(cfg.accelerator)
    plan, loc = read_plan(cfg.plan)
    dims = dims_of(plan.model)
    check_plan(plan, dims, loc.at)
    cost, here = price(plan, dims, cfg.accelerator)
    return PlanResult(plan, dims, cost, here, Path(cfg.plan))
