"""The `openscope` command line: one entry point, one sub-command per stage of the pipeline.

Options of the big commands come straight from their dataclass configs: each field is a
flag, and the docstring under the field is its `--help` text.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from openscope.activations.harvest import HarvestConfig, harvest
from openscope.activations.store import ActivationStore
from openscope.config import field_docs
from openscope.demo import DemoConfig, demo
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate
from openscope.features.compute import FeaturesConfig, compute_features
from openscope.serve import ServeConfig
from openscope.train import TrainConfig, train

app = typer.Typer(
    help="openscope: an open microscope for language models. Harvest activations, train sparse "
    "dictionaries on every layer, evaluate them, and explore their features.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
C = TypeVar("C")

_SKIP_FIELDS = {"extra"}


def _option_type(tp: Any) -> Any:
    """Typer understands Optional[X] but not every spelling of `X | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return Optional[args[0]]  # noqa: UP045 - typer needs typing.Optional here
    return tp


def config_command(cls: type[C], run: Callable[[C], None]) -> Callable[..., None]:
    """A typer command whose flags are the fields of dataclass `cls` (help from field docstrings)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    params = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in _SKIP_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if default is True:
            flag += "/--no-" + f.name.replace("_", "-")  # a flag that is on by default must be switchable off
        option = typer.Option(default, flag, help=docs.get(f.name, ""), show_default=True)
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=_option_type(hints[f.name])
            )
        )

    def command(**kwargs: Any) -> None:
        run(cls(**kwargs))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = cls.__doc__
    return command


@app.callback()
def _main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more (debug level)."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Hugging Face libraries are chatty at INFO; keep their warnings only.
    for name in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)


@app.command("models")
def models_command(
    cache_dir: Optional[Path] = typer.Option(None, help="Model cache folder (default: ~/.cache/openscope)."),  # noqa: UP045
) -> None:
    """List the models openscope knows by name, and whether each is converted and cached."""
    from openscope.models.load import DEFAULT_MODEL, KNOWN_MODELS, converted_dir, is_cached

    table = Table(title="known models (any local HF directory or hub id also works)")
    for col in ("name", "description", "from package", "cached"):
        table.add_column(col)
    for known in KNOWN_MODELS.values():
        cached = (
            str(converted_dir(known.name, cache_dir))
            if is_cached(known.name, cache_dir)
            else "no (first load converts it)"
        )
        name = known.name + (" (default)" if known.name == DEFAULT_MODEL else "")
        table.add_row(name, known.description, known.package, cached)
    console.print(table)


@app.command("sites")
def sites_command(
    model: str = typer.Option("gemma-3-270m", help="Model name, local directory or hub id."),
    sites: str = typer.Option("*.*", help="Site names or patterns to list (e.g. 6.*, *.mlp_out)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Model cache folder."),  # noqa: UP045
) -> None:
    """Show the site table of a model: every hook site, its HF hook point and width."""
    from openscope.models.load import load_model
    from openscope.models.sites import locate, parse_sites, site_width

    loaded = load_model(model, cache_dir=cache_dir)
    table = Table(title=f"sites of {loaded.name} ({loaded.n_layers} layers)")
    for col in ("site", "hook point", "width"):
        table.add_column(col)
    for site in parse_sites(sites, loaded.n_layers):
        point = locate(loaded.arch.layers, loaded.arch.layers_path, site)
        table.add_row(site.name, point.hook_point, str(site_width(point, loaded.d_model)))
    console.print(table)


def print_store_summary(root: Path) -> None:
    store = ActivationStore(root, verify=False)
    m = store.manifest
    ident = m["identity"]
    console.print(
        f"[bold]{root}[/]: {m['model']['name']}, source {ident['source']!r}, "
        f"{sum(s['n_contexts'] for s in store.shards)} contexts x {ident['context_len']} tokens, "
        f"{store.n_rows} rows stored (BOS/EOS/pad excluded), {len(store.shards)} shards, "
        f"dtype {ident['dtype']}, {'complete' if store.complete else 'INCOMPLETE (run again to resume)'}"
    )
    table = Table()
    for col in ("site", "hook point", "width", "E|x|^2", "scale C = sqrt(E|x|^2)"):
        table.add_column(col)
    for name, info in m["sites"].items():
        st = store.stats(name)
        table.add_row(
            name, info["hook_point"], str(info["width"]), f"{st.mean_sq_norm:.4g}", f"{st.norm_scale:.4g}"
        )
    console.print(table)


def _run_harvest(cfg: HarvestConfig) -> None:
    result = harvest(cfg, progress=True)
    if result.resumed_shards:
        console.print(f"resumed: {result.resumed_shards} shards were already done")
    console.print(
        f"harvested {result.n_rows} rows into {result.n_shards} shards in {result.seconds:.1f} s "
        f"({result.tokens_per_s:.0f} tokens/s this run)"
    )
    print_store_summary(result.output)


app.command(
    "harvest",
    help="Capture activations at many sites in one forward per batch into a sharded, resumable store. "
    "Run the same command again to resume an interrupted harvest.",
)(config_command(HarvestConfig, _run_harvest))


def _run_train(cfg: TrainConfig) -> None:
    result = train(cfg, progress=True)
    table = Table(
        title=f"trained {len(result.folders)} dictionaries in {result.steps} steps ({result.seconds:.0f} s)"
    )
    for col in ("site", "folder", "L0", "FVU", "dead"):
        table.add_column(col)
    for site, folder in result.folders.items():
        last = result.final[site]
        table.add_row(
            site, str(folder), f"{last['l0']:.1f}", f"{last['fvu']:.3f}", f"{last['dead_fraction']:.1%}"
        )
    console.print(table)


app.command(
    "train",
    help="Train sparse dictionaries (SAE, transcoder, skip-transcoder; JumpReLU, TopK, BatchTopK, ReLU; "
    "optionally Matryoshka) on every chosen site of an activation store at once. Saved in the Gemma Scope 2 layout.",
)(config_command(TrainConfig, _run_train))


def _run_eval(cfg: EvalConfig) -> None:
    from openscope.eval.report import COLUMNS, summary_rows

    report = evaluate(cfg, progress=True)
    table = Table(
        title=f"{len(report.dictionaries)} dictionaries on {report.model}: {report.n_tokens} tokens "
        f"({report.seconds:.0f} s, {report.tokens_per_s:.0f} tokens/s)"
    )
    # The short summary: report.md has every column.
    shown = [COLUMNS.index(c) for c in ("name", "site", "L0", "FVU", "dead", "dense", "delta loss", "KL")]
    for i in shown:
        table.add_column(COLUMNS[i], justify="left" if i < 2 else "right")
    for row in summary_rows(report):
        table.add_row(*(row[i] for i in shown))
    console.print(table)
    if report.joint is not None:
        j = report.joint
        console.print(f"all at once: delta loss {j.delta_loss:.4f}, KL {j.kl:.4f}")
    console.print(f"report: {cfg.output / 'report.md'} (and report.json, plots)")


app.command(
    "eval",
    help="Evaluate dictionaries on held-out text: L0, FVU, dead/dense latents, delta LM loss and KL with "
    "each dictionary spliced into the model, loss recovered vs zero-ablation. Writes report.json, report.md "
    "and PNG plots.",
)(config_command(EvalConfig, _run_eval))


def _run_serve(cfg: ServeConfig) -> None:
    from openscope.serve.run import serve  # FastAPI and uvicorn load only for this command

    console.print(f"openscope explorer: http://{cfg.host}:{cfg.port}/  (API docs: /docs; Ctrl-C stops)")
    serve(cfg)


app.command(
    "serve",
    help="Explore features in the browser: dashboards from `openscope features`, search, a prompt "
    "inspector and a steering playground, on a local web server (API documented at /docs).",
)(config_command(ServeConfig, _run_serve))


def _run_features(cfg: FeaturesConfig) -> None:
    result = compute_features(cfg, progress=True)
    for name in result.skipped:
        console.print(f"{name}: up to date (skipped)")
    for name in result.computed:
        console.print(f"{name}: dashboards written")
    if result.computed:
        console.print(
            f"encoded {result.n_tokens} tokens in {result.seconds:.1f} s ({result.tokens_per_s:.0f} tokens/s)"
        )
    if result.exported:
        console.print(f"exported {len(result.exported)} feature JSON files under {cfg.export}")
    console.print(f"feature database: {result.output}")


app.command(
    "features",
    help="Build feature dashboards (top and quantile examples, histograms, logit effects, neighbours) for "
    "every latent of the dictionaries into a SQLite index; incremental and resumable. --export writes "
    "each feature as JSON.",
)(config_command(FeaturesConfig, _run_features))


def _run_demo(cfg: DemoConfig) -> None:
    demo(cfg, say=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))


app.command(
    "demo",
    help="The whole loop on the embedded defaults: harvest Gemma 3 270M's middle layer on Wikipedia, train "
    "a JumpReLU SAE, evaluate it on held-out text, build its dashboards and open the explorer. Rerun: "
    "finished stages are skipped, interrupted ones resume.",
)(config_command(DemoConfig, _run_demo))


@app.command("export")
def export_command(
    sources: list[Path] = typer.Argument(..., help="Dictionary folders, or folders to search for them."),
    to: str = typer.Option(..., "--to", help="Format: saelens or circuit-tracer."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder to write; several dictionaries for SAELens get a subfolder each."
    ),
    model_name: Optional[str] = typer.Option(None, help="Model name to record (default: config.json's)."),  # noqa: UP045
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
) -> None:
    """Export dictionaries (ours, Gemma Scope 1 or 2) for SAELens or circuit-tracer."""
    from openscope.export import export_folders

    target, written = export_folders(sources, to, out, model_name=model_name, overwrite=overwrite)
    for d in written:
        console.print(f"{d.name}: {d.site_in.name} -> {d.site_out.name}")
    console.print(f"exported {len(written)} dictionaries for {to} to {target}")


@app.command("show")
def show_command(store: Path = typer.Argument(..., help="An activation store folder.")) -> None:
    """Summarise an activation store: model, data, sites, sizes and normalisation statistics."""
    print_store_summary(store)


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit status 2, not a traceback."""
    try:
        app()
    except OpenscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted: what was written so far is kept; run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
