"""`openscope push`: publish dictionaries (or a suite) on the Hugging Face Hub with a model card."""

from __future__ import annotations

from openscope.cli.app import app, config_command, console
from openscope.suite.publish import PushConfig, push


def _run_push(cfg: PushConfig) -> None:
    result = push(cfg)
    console.print(f"{len(result.dictionaries)} dictionaries, {len(result.files)} files in {result.folder}")
    if result.url is None:
        console.print(
            f"dry run: nothing uploaded; `openscope push {cfg.folder} --repo {cfg.repo}` uploads it"
        )
    else:
        console.print(f"uploaded to {result.url}")


app.command(
    "push",
    help="Publish dictionaries (or a whole `suite run` folder) on the Hugging Face Hub: writes a Hub-ready "
    "folder in the Gemma Scope 2 layout with a model card (recipe, training data, evaluation table and "
    "plots) and uploads it with the token of HF_TOKEN or `hf auth login`; --dry-run writes the folder only.",
)(config_command(PushConfig, _run_push, arguments=("folder",)))
