"""The pipeline's commands: models, sites, harvest, train, eval, features, serve, demo, export, show,
attribute and intervene. Each prints a short summary of what it did; the work is the package's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from openscope.activations.harvest import HarvestConfig, harvest
from openscope.activations.store import ActivationStore
from openscope.attribution.commands import AttributeConfig, InterveneConfig, run_attribute, run_intervene
from openscope.cli.app import app, config_command, console
from openscope.coders.export import export_folders
from openscope.demo import DemoConfig, demo
from openscope.eval import EvalConfig, evaluate
from openscope.eval.report import COLUMNS, LAYER_COLUMNS, layer_rows, summary_rows
from openscope.features import FeaturesConfig, compute_features
from openscope.models.load import DEFAULT_MODEL, KNOWN_MODELS, converted_dir, is_cached, load_model
from openscope.models.sites import locate, parse_sites, site_width
from openscope.serve.config import ServeConfig, check_serve_config
from openscope.suite.catalogue import evaluate_catalogue, kind_rows
from openscope.train import TrainConfig, train
from openscope.train.config import dictionaries_per_site


@app.command("models")
def models_command(
    cache_dir: Optional[Path] = typer.Option(None, help="Model cache folder (default: ~/.cache/openscope)."),  # noqa: UP045
) -> None:
    """List the models openscope knows by name, and whether each is converted and cached."""

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
        f"[bold]{store.root}[/]: {m['model']['name']}, source {ident['source']!r}, "
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
    # One row per dictionary: keyed by its site, or by `<site>_w<width>_l0_<target>` when the run trains
    # several widths or targets per site. A CLT has one folder (keyed by its first layer) and a row of
    # final numbers per layer.
    for col in ("site" if dictionaries_per_site(cfg) == 1 else "dictionary", "folder", "L0", "FVU", "dead"):
        table.add_column(col)
    for site, last in result.final.items():
        folder = result.folders.get(site, "")
        table.add_row(
            site, str(folder), f"{last['l0']:.1f}", f"{last['fvu']:.3f}", f"{last['dead_fraction']:.1%}"
        )
    console.print(table)


app.command(
    "train",
    help="Train sparse dictionaries (SAE, transcoder, skip-transcoder, cross-layer transcoder, crosscoder; JumpReLU, TopK, BatchTopK, ReLU; "
    "optionally Matryoshka) on every chosen site of an activation store at once. Saved in the Gemma Scope 2 layout.",
)(config_command(TrainConfig, _run_train))


def _run_eval(cfg: EvalConfig) -> None:
    if cfg.catalogue is not None:  # a whole suite: `openscope.suite.catalogue` (suite sits above eval)
        _run_eval_catalogue(cfg)
        return
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

    for d in report.dictionaries:  # a cross-layer transcoder: its layers one by one
        if d.layers:
            layers = Table(
                title=f"{d.name} per layer (all {d.n_layers} spliced at once: delta loss {d.lm.delta_loss:.4f})"
            )
            for i, col in enumerate(LAYER_COLUMNS):
                layers.add_column(col, justify="left" if i < 2 else "right")
            for row in layer_rows(d):
                layers.add_row(*row)
            console.print(layers)
    console.print(f"report: {cfg.output / 'report.md'} (and report.json, plots)")


def _run_eval_catalogue(cfg: EvalConfig) -> None:
    result = evaluate_catalogue(cfg, progress=True)
    report = result.report
    held = "held-out " if result.held_out else ""
    table = Table(
        title=f"{len(report.dictionaries)} dictionaries of {cfg.catalogue} on {report.n_tokens} {held}tokens "
        f"of {result.source} ({report.seconds:.0f} s)"
    )
    for col in ("site kind", "dictionaries", "L0", "FVU", "delta loss"):
        table.add_column(col, justify="left" if col == "site kind" else "right")
    for row in kind_rows(result.entries):
        table.add_row(*row)
    console.print(table)
    if result.skipped:
        console.print(f"not evaluated (not finished): {len(result.skipped)} items")
    console.print(
        f"report: {result.output / 'report.md'} (figures: {', '.join(result.figures) or 'none'}); "
        f"catalogue: {result.catalogue}"
    )


app.command(
    "eval",
    help="Evaluate dictionaries on held-out text: L0, FVU, dead/dense latents, delta LM loss and KL with "
    "each dictionary spliced into the model, loss recovered vs zero-ablation. Writes report.json, report.md "
    "and PNG plots.",
)(config_command(EvalConfig, _run_eval))


def _run_serve(cfg: ServeConfig) -> None:
    # FastAPI and uvicorn are loaded only for this command (they add a second to every start-up).
    from openscope.serve.run import serve

    check_serve_config(cfg)
    console.print(f"openscope explorer: http://{cfg.host}:{cfg.port}/  (API docs: /docs; Ctrl-C stops)")
    serve(cfg)


app.command(
    "serve",
    help="Explore features in the browser: dashboards from `openscope features`, search, a prompt "
    "inspector and a steering playground, and with --suite a suite's catalogue, on a local web server "
    "(API documented at /docs).",
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
    sources: list[Path] = typer.Argument(
        ...,
        help="Dictionary folders, folders to search, Hub references (hf://OWNER/REPO/FOLDER) or release names.",
    ),
    to: str = typer.Option(
        ..., "--to", help="Format: saelens, circuit-tracer or gemma-scope (openscope's own)."
    ),
    source: str = typer.Option(
        "auto",
        "--from",
        help="Format of the sources: auto, gemma-scope, saelens, sparsify, circuit-tracer or dictionary-learning.",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder to write; several dictionaries for SAELens get a subfolder each."
    ),
    model_name: Optional[str] = typer.Option(None, help="Model name to record (default: config.json's)."),  # noqa: UP045
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
) -> None:
    """Export dictionaries (ours, Gemma Scope 1 or 2, or a peer's) for SAELens or circuit-tracer, or into
    openscope's own Gemma Scope 2 layout."""

    target, written = export_folders(
        sources, to, out, model_name=model_name, overwrite=overwrite, source=source
    )
    for d in written:
        console.print(f"{d.name}: {d.site_in.name} -> {d.site_out.name}")
    console.print(f"exported {len(written)} dictionaries for {to} to {target}")


@app.command("show")
def show_command(
    store: Path = typer.Argument(
        ..., help="An activation store: a folder or an fsspec URL (s3://, gs://, …)."
    ),
) -> None:
    """Summarise an activation store: model, data, sites, sizes and normalisation statistics."""
    print_store_summary(store)


def _run_attribute(cfg: Any) -> None:
    result = run_attribute(cfg)
    m = result.document.metadata.openscope
    assert m is not None
    s = m.metrics
    logits = [n for n in result.document.nodes if n.feature_type == "logit"]
    top = ", ".join(f"{n.token!r} {n.token_prob:.2f}" for n in logits)
    console.print(f"next token: {top}")
    console.print(
        f"{s.n_active_features} latents active, {s.n_feature_nodes} attributed in {s.seconds:.1f} s; kept "
        f"{s.n_nodes} nodes and {s.n_links} links; {s.nodes_for_80_percent} nodes hold 80% of the influence"
    )
    console.print(f"replacement score {s.replacement_score:.3f}, completeness {s.completeness_score:.3f}")
    console.print(f"graph: {result.path}")


def _run_intervene(cfg: Any) -> None:
    r = run_intervene(cfg)
    edits = ", ".join(f"{e.node_id} x{e.factor:g}" for e in r.edits)
    table = Table(title=f"{r.prompt!r} with {edits}")
    for col in ("before", "p", "after", "p"):
        table.add_column(col)
    for b, a in zip(r.top_before, r.top_after, strict=True):
        table.add_row(repr(b.token), f"{b.probability:.3f}", repr(a.token), f"{a.probability:.3f}")
    console.print(table)
    for g in r.graph_logits:
        console.print(f"graph logit {g.token!r}: p {g.probability_before:.3f} -> {g.probability_after:.3f}")


app.command(
    "attribute",
    help="Attribution graph of a prompt: the replacement model of per-layer transcoders or a cross-layer "
    "transcoder (attention and norms frozen, error nodes kept), direct effects between tokens, latents, "
    "errors and the top logits, pruned by influence; written as circuit-tracer / Neuronpedia graph JSON "
    "with replacement and completeness scores.",
)(config_command(AttributeConfig, _run_attribute, arguments=("prompt",)))
app.command(
    "intervene",
    help="Zero or scale feature nodes of an attribution graph on its prompt and compare the top next "
    "tokens before and after.",
)(config_command(InterveneConfig, _run_intervene, arguments=("graph",)))
