"""`openscope suite`: plan a whole catalogue of dictionaries for a model, price it on paper, train it.

`suite plan` writes an editable plan (Gemma Scope 2's catalogue, or a minimal one) and prints what it
costs; `suite cost` prices a plan file again after editing; `suite run` trains every item of a plan
into one folder, with a progress view over the whole suite. The work is `openscope.suite`'s.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from openscope.cli.app import app, config_command, console
from openscope.suite import CostConfig, PlanConfig, run_cost, run_plan
from openscope.suite.commands import PlanResult
from openscope.suite.costs import EFFICIENCY, PEAK_FLOPS, CostRow
from openscope.suite.folder import CATALOGUE
from openscope.suite.run import Observer, RunConfig, RunResult, item_line, run_suite

suite_app = typer.Typer(
    help="Suites: a whole catalogue of dictionaries for one model (Gemma Scope 2's, or your own), planned "
    "as an editable file and priced on paper (FLOPs, parameters, storage, memory, wall time) before any "
    "compute.",
    no_args_is_help=True,
)
app.add_typer(suite_app, name="suite")


def _count(n: float) -> str:
    """262144 -> 262k, 2.1e12 -> 2.1T."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    """Decimal units: 1.2GB, 110PB."""
    for unit, size in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}B"


def _seconds(s: float) -> str:
    """3.2h, 41.4d, 2,830y."""
    for unit, size in (("y", 365.25 * 86400), ("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            value = s / size
            return f"{value:,.0f}{unit}" if value >= 1000 else f"{value:.3g}{unit}"
    return f"{s:.2g}s"


def _flops(n: float) -> str:
    """2.86e+17 -> 2.9e17 (narrow columns)."""
    mantissa, _, exponent = f"{n:.1e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def _row(row: CostRow) -> list[str]:
    return [
        row.label,
        str(row.items),
        _count(row.tokens),
        _flops(row.harvest_flops),
        _flops(row.train_flops),
        _count(row.parameters),
        _bytes(row.storage_bytes),
        _bytes(row.peak_memory_bytes),
        _seconds(row.seconds_here),
        _seconds(row.seconds_accelerator),
    ]


def print_costs(result: PlanResult, per_item: bool) -> None:
    """The cost table (per family, or per item, and in total) and the assumptions behind it."""
    plan, cost = result.plan, result.cost
    data = plan.data
    stored = f"stored in {data.dtype}" if data.activations == "stored" else "streamed (live, nothing stored)"
    table = Table(
        title=f"{len(plan.items)} dictionaries for {plan.model} ({result.dims.n_layers} layers, "
        f"d_model {result.dims.d_model}); activations {stored}; batches of {data.batch_size} tokens",
        caption="FLOPs of harvesting and training; parameters; activation storage; peak memory of one "
        f"training process; wall time here and on one {cost.accelerator}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    columns = ("item" if per_item else "family", "n", "tokens", "harvest", "train", "params")
    columns += ("storage", "memory", "here", cost.accelerator)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    rows = [_row(row) for row in (cost.items if per_item else cost.families)] + [_row(cost.total)]
    for i, cells in enumerate(rows):
        table.add_row(*cells, style="bold" if i == len(rows) - 1 else None)
    # Never cut the numbers short: a terminal narrower than the table wraps its lines instead.
    needed = console.measure(table, options=console.options.update_width(1000)).maximum
    # A console of the table's width for it alone (console.print clamps to the terminal's width, and
    # setting console.width would fix the shared console's width for good).
    Console(width=max(console.width, needed), force_terminal=console.is_terminal).print(table)
    speeds = sorted(result.here.by_shape.items())
    measured = ", ".join(f"{d}x{w}: {s / 1e9:.0f}" for (d, w), s in speeds)
    console.print(
        f"total: one forward feeds every dictionary and each site is stored once; item by item it would be "
        f"{cost.separate_harvest_flops:.2e} harvest FLOPs and {_bytes(cost.separate_storage_bytes)} stored.\n"
        f"speeds: this machine's float32 products (GFLOP/s by shape) {measured}"
        + (
            f"; {cost.accelerator}: {PEAK_FLOPS[cost.accelerator] / 1e12:.0f} TFLOP/s bf16 peak x {EFFICIENCY}"
            if cost.accelerator in PEAK_FLOPS
            else ""
        ),
        highlight=False,
    )


def _run_plan(cfg: PlanConfig) -> None:
    result = run_plan(cfg)
    print_costs(result, cfg.per_item)
    console.print(
        f"plan: {result.path} (edit it, then `openscope suite cost {result.path}`)", highlight=False
    )


def _run_cost(cfg: CostConfig) -> None:
    print_costs(run_cost(cfg), cfg.per_item)


suite_app.command(
    "plan",
    help="Write the plan of a catalogue for a model (gemma-scope-2: Gemma Scope 2's folders, sweep layers x "
    "sites x widths x L0 targets, all-layer sets, cross-layer transcoders and crosscoders; minimal: one SAE "
    "per layer) as an editable YAML or JSON file, and print what it costs: tokens, FLOPs of harvesting and "
    "training, dictionary parameters, activation storage, peak memory, and wall time here and on an "
    "accelerator. --scale shrinks widths (to powers of two, at least 32) and token budgets for a laptop.",
)(config_command(PlanConfig, _run_plan))
suite_app.command(
    "cost",
    help="Price a plan file (after editing it, or one written by hand): the same table as `suite plan`.",
)(config_command(CostConfig, _run_cost, arguments=("plan",)))


# ---- suite run ------------------------------------------------------------------------------------------


class _Rate(ProgressColumn):
    """Tokens per second of the suite's progress."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{_count(speed)} tok/s" if speed else "- tok/s", style="progress.data.speed")


class _Polling(Progress):
    """A progress display that asks the view for the running unit's progress at every refresh."""

    def __init__(self, poll: Callable[[], None], *columns: Any, **kwargs: Any) -> None:
        self.poll = poll  # (before Progress's own set-up, which renders once)
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Any:
        self.poll()
        yield from super().get_renderables()


class SuiteView(Observer):
    """The suite's progress on the console: a bar over every token still to harvest and train with the
    items done / running / failed / left, tokens/s and the time left; under it the harvest or training
    run going on; a line per finished item above them."""

    def __init__(self) -> None:
        self.task: Any = None
        self.now: Any = None
        self.items = self.done = self.failed = self.running = 0
        self.base = self.current = 0
        self.poll: Callable[[], int] = lambda: 0
        self._handlers: list[logging.Handler] = []
        self._level = logging.NOTSET
        self.progress = _Polling(
            self._update,
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            _Rate(),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=2,
        )

    def __enter__(self) -> SuiteView:
        # Log lines go above the bars (a plain stream handler would write through them), and the
        # trainer's per-run chatter is left out unless --verbose.
        root, ours = logging.getLogger(), logging.getLogger("openscope")
        self._handlers, self._level = list(root.handlers), ours.level
        root.handlers = [RichHandler(console=console, show_path=False, show_time=False)]
        if root.level > logging.DEBUG:
            ours.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc: object) -> None:
        self._update()
        self.progress.stop()
        logging.getLogger().handlers = self._handlers
        logging.getLogger("openscope").setLevel(self._level)

    def _counts(self) -> str:
        left = self.items - self.done - self.failed - self.running
        failed = f" [red]{self.failed} failed[/]," if self.failed else ""
        return f"[bold]suite[/] {self.done}/{self.items} done, {self.running} running,{failed} {left} left"

    def _update(self) -> None:
        if self.task is None:
            return
        now = min(self.poll(), self.current)
        self.progress.update(self.task, completed=self.base + now, description=self._counts())
        if self.now is not None:
            self.progress.update(self.now, completed=now)

    def begin(self, items: int, finished: int, units: list[tuple[str, int]]) -> None:
        self.items, self.done = items, finished
        total = sum(tokens for _, tokens in units)
        self.task = self.progress.add_task(self._counts(), total=max(total, 1))
        self.progress.start()

    def unit(self, label: str, tokens: int, poll: Callable[[], int], items: int = 0) -> None:
        self.base += self.current
        self.current, self.poll, self.running = tokens, poll, items
        old, self.now = self.now, None  # (a refresh may come while the rows change)
        if old is not None:
            self.progress.remove_task(old)
        self.now = self.progress.add_task(f"  {label}", total=max(tokens, 1))

    def item(self, entry: dict[str, Any]) -> None:
        self.running = max(0, self.running - 1)
        if entry["status"] == "failed":
            self.failed += 1
        else:
            self.done += 1
        self.progress.console.print(item_line(entry), highlight=False, markup=False, soft_wrap=True)


def print_suite(result: RunResult, total: int) -> None:
    """The run's summary: what it did, where the catalogue is."""
    passes = f"{result.passes} pass{'es' if result.passes != 1 else ''} of the model over the text"
    console.print(
        f"suite {result.output}: {total} items; {len(result.done)} trained now, {len(result.skipped)} "
        f"finished before (untouched), {len(result.failed)} failed; {passes}; {result.seconds:.0f} s.\n"
        f"catalogue: {result.output / CATALOGUE} (evaluate: `openscope eval --catalogue {result.output}`)",
        highlight=False,
    )


def _run_suite(cfg: RunConfig) -> None:
    with SuiteView() as view:
        result = run_suite(cfg, view)
    total = view.items
    print_suite(result, total)
    if result.failed:
        named = "; ".join(f"{name} ({reason})" for name, reason in result.failed.items())
        print(
            f"error: {len(result.failed)} of {total} items failed: {named}; rerun the same command to retry them",
            file=sys.stderr,
        )
        raise typer.Exit(1)


suite_app.command(
    "run",
    help="Train every dictionary of a plan into one folder (each in its Gemma Scope 2 folder, with "
    "catalogue.json), in as few passes of the model as the plan allows: items that read the same sites "
    "train from the same batches, and with stored activations one harvest feeds them all. Rerun the same "
    "command after an interruption: finished items are skipped, the rest resume from their checkpoints. "
    "A failed item (NaN, out of memory, full disk) is marked failed and the rest go on.",
)(config_command(RunConfig, _run_suite, arguments=("plan",)))
