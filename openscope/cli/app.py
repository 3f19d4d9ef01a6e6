"""The `openscope` Typer app and the rule that turns a dataclass config into a command.

Options of the big commands come straight from their dataclass configs: each field is a flag, and the
docstring under the field is its `--help` text (`config_command`). The commands themselves are
registered by `openscope.cli.pipeline` (the pipeline's stages) and `openscope.cli.chat` (`openscope chat`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
import typing
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console

import openscope
from openscope.config import check_numbers, field_docs

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
    """Typer understands Optional[X] but not every spelling of `X | None`, nor other unions: a field that
    takes a number or a comma list of them (`int | str`) is read as text, which its config parses."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return Optional[args[0]]  # noqa: UP045 - typer needs typing.Optional here
        if str in args and type(None) not in typing.get_args(tp):
            return str
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


chat_app = typer.Typer(
    help="Chat-behaviour analysis: chat data with a role per token, role-specific latents, base-vs-chat "
    "diffing (and the contrast-direction analyses). Each writes report.json, report.md and PNG plots.",
    no_args_is_help=True,
)
app.add_typer(chat_app, name="chat")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"openscope {openscope.__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more (debug level)."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Hugging Face libraries are chatty at INFO; keep their warnings only.
    for name in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
