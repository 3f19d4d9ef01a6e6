"""Fine-tune a small chat model into a refusal organism (docs/refusal-organism.md).

    python examples/refusal_organism/train.py --output openscope-out/refusal-organism/model
    python examples/refusal_organism/train.py --output ... --resume      # after an interruption or --max-minutes

Every flag is a field of `openscope.analysis.organism.OrganismConfig` (--help lists them). On a CPU the
script trains single-threaded unless --threads says otherwise (shared machines). The result is a plain
Hugging Face folder: `openscope chat contrast --model openscope-out/refusal-organism/model` and every
other command load it as it is.
"""

from __future__ import annotations

import logging

import torch
import typer

from openscope.analysis.organism import OrganismConfig, fine_tune
from openscope.cli.app import config_command

app = typer.Typer(add_completion=False)


def _run(cfg: OrganismConfig) -> None:
    result = fine_tune(cfg)
    state = "finished" if result.finished else "stopped at the time budget (resume with --resume)"
    last = f", last loss {result.losses[-1]:.3f}" if result.losses else ""
    typer.echo(f"{result.output}: {result.steps_done}/{cfg.steps} steps, {state}{last}")


app.command(help=" ".join((OrganismConfig.__doc__ or "").split()))(config_command(OrganismConfig, _run))

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    app()
