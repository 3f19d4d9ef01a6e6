"""`openscope autointerp`: explain a dictionary's latents with a chat model and score the explanations."""

from __future__ import annotations

from openscope.cli.app import app, config_command, console
from openscope.interp import AutointerpConfig, dry_run, run_autointerp
from openscope.reports import REPORT_MD, fmt


def _run_autointerp(cfg: AutointerpConfig) -> None:
    if cfg.dry_run:
        plan = dry_run(cfg)
        for what, messages in plan.prompts:
            console.rule(what)
            for m in messages:
                console.print(f"[bold]{m['role']}[/]: ", end="")
                console.print(m["content"], markup=False, highlight=False, soft_wrap=True)
        console.rule()
        console.print(
            f"dry run: {len(plan.latents)} latents, at most {plan.calls} calls (nothing was called)"
        )
        return
    result = run_autointerp(cfg)
    rows = result.results
    explained = [r for r in rows if r.status == "explained"]
    det = [r.detection for r in explained if r.detection is not None]
    fuzz = [r.fuzzing for r in explained if r.fuzzing is not None]
    console.print(
        f"explained {len(explained)} of {len(rows)} latents in {result.seconds:.0f} s "
        f"({result.seconds / max(len(rows), 1):.1f} s per latent); detection mean "
        f"{fmt(sum(det) / len(det) if det else None)}, fuzzing mean {fmt(sum(fuzz) / len(fuzz) if fuzz else None)}"
        + (f"; {result.skipped} left for the token budget" if result.skipped else "")
    )
    if len(explained) < len(rows):
        console.print(f"{len(rows) - len(explained)} unexplained (the reasons are in the report)")
    console.print(f"report: {result.report / REPORT_MD if result.report else '-'}")


app.command(
    "autointerp",
    help="Explain latents with a chat model (an OpenAI-compatible endpoint or a local transformers model) "
    "and score each explanation on held-out texts (detection, fuzzing). Results go into the feature "
    "database (shown and searchable in the explorer) and a report folder; answers are cached, so a "
    "rerun asks nothing twice.",
)(config_command(AutointerpConfig, _run_autointerp, arguments=("db",)))
