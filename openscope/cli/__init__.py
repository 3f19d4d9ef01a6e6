"""The `openscope` command line: one entry point, one sub-command per stage of the pipeline.

`app` (in `openscope.cli.app`) is the Typer app; `openscope.cli.pipeline`, `openscope.cli.chat` and
`openscope.cli.suite` register the commands on it; `run` executes a command line and turns bad input into one line on stderr.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from openscope.cli import autointerp, chat, pipeline, push, releases, suite
from openscope.cli.app import app, chat_app, config_command, console
from openscope.cli.suite import suite_app
from openscope.errors import OpenscopeError
from openscope.train.parallel import leave_process_groups

__all__ = [
    "app",
    "autointerp",
    "chat",
    "chat_app",
    "config_command",
    "console",
    "main",
    "pipeline",
    "push",
    "releases",
    "run",
    "suite",
    "suite_app",
]

# typer bundles its own click; its usage errors (bad flag, bad value) all derive from ClickException.
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_INTERRUPTED = 130


def run(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit status. Bad input —
    a bad flag or value, or anything openscope refuses — is one line on stderr (`error: ...`) and
    status 2, never a traceback; an interrupt keeps what was written and says how to resume (130).
    Anything else is a bug and keeps its traceback."""
    try:
        status = _run_app(argv)
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


def _run_app(argv: list[str] | None) -> Any:
    """The command's own status; under torchrun the process group is left however the command ends."""
    try:
        return app(args=argv, prog_name="openscope", standalone_mode=False)
    finally:
        leave_process_groups()


def main() -> None:
    """Entry point (`openscope`): `run` with the process's arguments, its status as the exit code."""
    sys.exit(run())
