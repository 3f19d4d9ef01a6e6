"""Suites: a whole catalogue of dictionaries for a model, planned and costed before any compute.

`plan` is the data model (`SuitePlan`, `SuiteItem`) and its rules, with `train_config`, which turns an
item into the `openscope train` settings that train it; `planfile` reads and writes plans (YAML or
JSON, edited by hand); `presets` fills a plan with Gemma Scope 2's catalogue (or a minimal one) and
names folders as Gemma Scope 2 does; `costs` prices a plan (FLOPs, parameters, storage, memory, wall
time); `commands` holds `openscope suite plan` and `openscope suite cost`. `schedule` groups the items
into training runs that share their batches, `folder` keeps the suite folder's manifest and catalogue,
`run` is `openscope suite run`, and `catalogue` (with `figures`) is `openscope eval --catalogue`.
"""

from openscope.suite.commands import CostConfig, PlanConfig, run_cost, run_plan
from openscope.suite.costs import SuiteCost, suite_cost
from openscope.suite.plan import SuiteItem, SuitePlan, check_plan, train_config
from openscope.suite.planfile import read_plan, write_plan
from openscope.suite.presets import PRESETS, build_plan, parse_name
from openscope.suite.run import RunConfig, RunResult, run_suite

__all__ = [
    "PRESETS",
    "CostConfig",
    "PlanConfig",
    "RunConfig",
    "RunResult",
    "SuiteCost",
    "SuiteItem",
    "SuitePlan",
    "build_plan",
    "check_plan",
    "parse_name",
    "read_plan",
    "run_cost",
    "run_plan",
    "run_suite",
    "suite_cost",
    "train_config",
    "write_plan",
]
