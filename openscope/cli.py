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
from openscope.config import check_numbers, field_docs
from openscope.demo import DemoConfig, demo
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate
from openscope.features import FeaturesConfig, compute_features
from openscope.files import check_file_output, json_with
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


def config_command(
    cls: type[C], run: Callable[[C], None], arguments: tuple[str, ...] = ()
) -> Callable[..., None]:
    """A typer command whose flags are the fields of dataclass `cls` (help from field docstrings).

    Fields named in `arguments` are positional arguments instead (required when they have no default).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    params = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in _SKIP_FIELDS:
            continue
        if f.name in arguments:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            value: Any = ...
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif not required:
                value = f.default_factory()  # type: ignore[misc]
            argument = typer.Argument(value, help=docs.get(f.name, ""), show_default=not required)
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=argument, annotation=hints[f.name]
                )
            )
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
        cfg = cls(**kwargs)
        check_numbers(cfg)  # NaN or inf in any float flag is a one-line error, not a broken run
        run(cfg)

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
    # A CLT has one folder (keyed by its first layer) and a row of final numbers per layer.
    for site, last in result.final.items():
        folder = result.folders.get(site, "")
        table.add_row(
            site, str(folder), f"{last['l0']:.1f}", f"{last['fvu']:.3f}", f"{last['dead_fraction']:.1%}"
        )
    console.print(table)


app.command(
    "train",
    help="Train sparse dictionaries (SAE, transcoder, skip-transcoder, cross-layer transcoder; JumpReLU, TopK, BatchTopK, ReLU; "
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
    from openscope.eval.report import LAYER_COLUMNS, layer_rows

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


app.command(
    "eval",
    help="Evaluate dictionaries on held-out text: L0, FVU, dead/dense latents, delta LM loss and KL with "
    "each dictionary spliced into the model, loss recovered vs zero-ablation. Writes report.json, report.md "
    "and PNG plots.",
)(config_command(EvalConfig, _run_eval))


def _run_serve(cfg: ServeConfig) -> None:
    from openscope.serve.config import check_serve_config
    from openscope.serve.run import serve  # FastAPI and uvicorn load only for this command

    check_serve_config(cfg)
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
    from openscope.coders.export import export_folders

    target, written = export_folders(sources, to, out, model_name=model_name, overwrite=overwrite)
    for d in written:
        console.print(f"{d.name}: {d.site_in.name} -> {d.site_out.name}")
    console.print(f"exported {len(written)} dictionaries for {to} to {target}")


@app.command("show")
def show_command(store: Path = typer.Argument(..., help="An activation store folder.")) -> None:
    """Summarise an activation store: model, data, sites, sizes and normalisation statistics."""
    print_store_summary(store)


def _run_attribute(cfg: Any) -> None:
    from openscope.attribution.commands import run_attribute

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
    from openscope.attribution.commands import run_intervene

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


def _add_attribution_commands() -> None:
    from openscope.attribution.commands import AttributeConfig, InterveneConfig

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


_add_attribution_commands()


# ---- `openscope chat ...`: every chat analysis registers its sub-command on chat_app -------------------

chat_app = typer.Typer(
    help="Chat-behaviour analysis: chat data with a role per token, role-specific latents, base-vs-chat "
    "diffing (and the contrast-direction analyses). Each writes report.json, report.md and PNG plots.",
    no_args_is_help=True,
)
app.add_typer(chat_app, name="chat")
_ROLE_STYLE = {"template": "dim", "system": "magenta", "user": "cyan", "model": "green"}


@chat_app.command("tokens")
def chat_tokens_command(
    source: str = typer.Option(
        "sharegpt[:200]", help="Chat source: sharegpt or chat:PATH, sliced by conversation."
    ),
    model: str = typer.Option(
        "gemma-3-270m", help="Model whose tokenizer and chat template render the data."
    ),
    show: int = typer.Option(0, help="Print the first N conversations token by token, coloured by role."),
    output: Optional[Path] = typer.Option(None, help="Also write the counts to this JSON file."),  # noqa: UP045
    overwrite: bool = typer.Option(False, help="Replace the counts file already at --output."),
    cache_dir: Optional[Path] = typer.Option(None, help="Model cache folder."),  # noqa: UP045
) -> None:
    """Render chat data with the model's chat template and count its tokens per role (template, system, user, model); --show prints conversations with every token coloured by its role."""
    import itertools

    from rich.text import Text

    from openscope.config import save_json
    from openscope.data.chat import ROLES, render_many
    from openscope.data.conversations import ChatSource, count_roles
    from openscope.models.load import load_model

    if output is not None:
        output = check_file_output(
            output, "a role count", json_with(("source", "model", "tokens")), overwrite=overwrite
        )
    tok = load_model(model, cache_dir=cache_dir).tokenizer
    for r in render_many(tok, list(itertools.islice(ChatSource(source).conversations(), show))):
        text = Text()
        for piece, role in zip(tok.convert_ids_to_tokens(r.input_ids), r.roles, strict=True):
            text.append(tok.convert_tokens_to_string([piece]), style=_ROLE_STYLE[ROLES[role]])
        console.print(text)
        console.print("legend: " + ", ".join(f"[{s}]{n}[/]" for n, s in _ROLE_STYLE.items()))
    counts = count_roles(source, tok)
    table = Table(title=f"{counts.conversations} conversations of {source!r} rendered for {model}")
    for col in ("role", "tokens", "share", "turns"):
        table.add_column(col)
    for role, n in counts.tokens.items():
        table.add_row(role, str(n), f"{n / max(counts.total, 1):.1%}", str(counts.turns.get(role, "")))
    table.add_row("all", str(counts.total), "100%", str(sum(counts.turns.values())))
    console.print(table)
    if output is not None:
        save_json(output, {"source": source, "model": model, **counts._asdict(), "total": counts.total})
        console.print(f"counts: {output}")


def _run_chat_roles(cfg: Any) -> None:
    from openscope.analysis.roles import role_report

    result = role_report(cfg)
    for role, rows in result.ranked.items():
        shown = ", ".join(f"#{r.latent} ({r.specificity:.2f})" for r in rows[:8]) or "none"
        console.print(f"most specific to {role}: {shown}")
    console.print(f"report: {result.files[1]} (and report.json, roles.png)")


def _run_chat_diff(cfg: Any) -> None:
    from openscope.analysis.diff import chat_diff

    result = chat_diff(cfg)
    table = Table(
        title=f"one dictionary on two checkpoints (r of log frequencies {result.frequency_correlation:.3f})"
    )
    for col in ("", "model", "L0", "FVU", "delta loss", "KL", "alive"):
        table.add_column(col)
    for label, s in (("A", result.a), ("B", result.b)):
        table.add_row(
            label, s.model, f"{s.l0:.1f}", f"{s.fvu:.3f}", f"{s.delta_loss:.4f}", f"{s.kl:.4f}", str(s.alive)
        )
    console.print(table)
    console.print(f"report: {result.files[1]} (and report.json, diff.png)")


def _add_chat_commands() -> None:
    from openscope.analysis.diff import DiffConfig
    from openscope.analysis.roles import RolesConfig

    chat_app.command(
        "roles",
        help="Per-role firing frequency and mean activation of a dictionary's latents on chat data, and the "
        "latents most specific to template, system, user and model tokens.",
    )(config_command(RolesConfig, _run_chat_roles))
    chat_app.command(
        "diff",
        help="Apply one dictionary to two checkpoints of one architecture (base vs chat) on the same data: "
        "which latents' frequencies change most, and its FVU and delta loss on each model.",
    )(config_command(DiffConfig, _run_chat_diff))


_add_chat_commands()


def _chat_done(kind: str, output: Path | None, headline: str) -> None:
    console.print(headline)
    console.print(f"{kind} report: {output / 'report.md' if output else '-'} (and report.json, plots)")


def _run_chat_contrast(cfg: Any) -> None:
    from openscope.analysis.contrast import run_contrast

    r = run_contrast(cfg)
    b = r.best.auroc
    _chat_done(
        "contrast",
        r.output,
        f"best site {r.best.site.name}: held-out AUROC {b.auc:.3f} [{b.low:.3f}, {b.high:.3f}]",
    )


def _run_chat_ablate(cfg: Any) -> None:
    from openscope.analysis.ablate import run_ablate

    r = run_ablate(cfg)
    lines = [
        f"{c.name} ({c.prompts}): KL {c.kl:.4f}, P(watch) {c.watch_clean:.3f} -> {c.watch_edited:.3f}"
        for c in r.conditions
    ]
    _chat_done("ablate", r.output, "\n".join(lines))


def _run_chat_jailbreak(cfg: Any) -> None:
    from openscope.analysis.jailbreak import run_jailbreak

    r = run_jailbreak(cfg)
    top = ", ".join(f"{t.name} ({t.shift:+.2f})" for t in r.templates[:3])
    _chat_done(
        "jailbreak", r.output, f"plain requests at {r.plain_position:.2f}; most harmless-looking: {top}"
    )


def _run_chat_sweep(cfg: Any) -> None:
    from openscope.analysis.sweep import run_sweep

    r = run_sweep(cfg)
    pts = "; ".join(f"{p.strength:g}: eff {p.efficacy:.3g}, loss {p.loss:.2f}" for p in r.points)
    _chat_done("sweep", r.output, f"{r.target}: {pts}")


def _run_chat_cot(cfg: Any) -> None:
    from openscope.analysis.cot import run_cot

    r = run_cot(cfg)
    i = r.best
    _chat_done(
        "cot",
        r.output,
        f"model accuracy {float(r.at_answer[-1]):.0%} (chance {r.chance:.0%}); best layer {r.layers[i]}: readable "
        f"before written {float(r.before_mention[i]):.0%} vs control {float(r.before_mention_control[i]):.0%}",
    )


def _add_chat_analysis_commands() -> None:
    from openscope.analysis.ablate import AblateConfig
    from openscope.analysis.contrast import ContrastConfig
    from openscope.analysis.cot import CotConfig
    from openscope.analysis.jailbreak import JailbreakConfig
    from openscope.analysis.sweep import SweepConfig

    # Help text: each config's class docstring, on one line.
    for name, cls, run in (
        ("contrast", ContrastConfig, _run_chat_contrast),
        ("ablate", AblateConfig, _run_chat_ablate),
        ("jailbreak", JailbreakConfig, _run_chat_jailbreak),
        ("sweep", SweepConfig, _run_chat_sweep),
        ("cot", CotConfig, _run_chat_cot),
    ):
        chat_app.command(name, help=" ".join((cls.__doc__ or "").split()))(config_command(cls, run))


_add_chat_analysis_commands()


# typer bundles its own click; its usage errors (bad flag, bad value) all derive from ClickException.
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_INTERRUPTED = 130


def run(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit status. Bad input —
    a bad flag or value, or anything openscope refuses — is one line on stderr (`error: ...`) and
    status 2, never a traceback; an interrupt keeps what was written and says how to resume (130).
    Anything else is a bug and keeps its traceback."""
    try:
        status = app(args=argv, prog_name="openscope", standalone_mode=False)
    except OpenscopeError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except _USAGE_ERROR as exc:
        message = " ".join(str(getattr(exc, "format_message", exc.__str__)()).split())
        if message:  # (no message: the help was shown for a bare command)
            print(f"error: {message} (see `openscope COMMAND --help`)", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except (KeyboardInterrupt, typer.Abort):
        status = _INTERRUPTED
    if status == _INTERRUPTED:  # typer turns Ctrl-C into this status
        print(
            "interrupted: what was written so far is kept; run the same command again to resume",
            file=sys.stderr,
        )
    return status if isinstance(status, int) else 0


def main() -> None:
    """Entry point (`openscope`): `run` with the process's arguments, its status as the exit code."""
    sys.exit(run())


if __name__ == "__main__":
    main()
