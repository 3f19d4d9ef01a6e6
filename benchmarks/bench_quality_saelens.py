"""Quality benchmark: openscope's JumpReLU SAE against SAELens's, trained on the same activations.

What it measures
    Both trainers see the same activation store (e.g. Gemma 3 270M layer 9 `resid_post` on
    `wiki[:9000]`, made by `openscope harvest`), the same batches in the same order, for the same
    number of tokens, with the same width, target L0, learning rate and Adam betas. Both SAEs are
    then measured by one function on held-out activations (a second store, e.g. `wiki[9000:]`):
    L0, FVU = E‖x − x̂‖² / E‖x − mean‖², dead latents (never fire) and dense latents (> 10% of
    tokens). The issue's bar: L0 within ±20% of the target, and at matched L0 openscope's FVU no
    worse than SAELens's.

How it runs
    openscope trains in this process (`openscope.train.train`). SAELens trains in a subprocess with
    the Python of its own virtual environment (`benchmarks/out/envs/saelens`, created and filled by
    `bench_train_peers.ensure_env`: SAELens is never a dependency of openscope). Its worker reads
    the same store through openscope (importable there: the venv has the system site-packages),
    feeds `SAETrainer.step` batches divided by the store's scale C (E‖x/C‖² = 1, as openscope
    normalises), and starts from the same data-dependent initialisation openscope uses (b_dec =
    mean of the first batch, one threshold giving L0 = target on it) so the comparison is of
    training, not of init (`--saelens-defaults` runs SAELens with its own init and bandwidth
    instead, saved as `saelens-defaults`). SAELens's own recipe is kept: its quadratic L0 loss (per token),
    threshold parameterised directly, grad-norm clipping at 1. Its trained weights are converted to
    an openscope/Gemma Scope 2 folder (checked against SAELens's own encode/decode in the worker),
    so both are evaluated by the same code — and `openscope eval` can splice both into the model.

Run
    python benchmarks/bench_quality_saelens.py --store RUNS/l9_wiki_train --heldout RUNS/l9_wiki_heldout
Writes benchmarks/out/quality/{openscope,saelens}/ (dictionary folders) and quality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "quality"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="training activation store")
    p.add_argument("--heldout", type=Path, required=True, help="held-out activation store (evaluation)")
    p.add_argument("--site", default="9.resid_post")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--target-l0", type=float, default=50.0)
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument(
        "--lr", type=float, default=5e-4, help="both trainers (a 2M-token run needs more than 7e-5)"
    )
    p.add_argument("--lr-decay", type=float, default=0.2, help="final fraction with linear lr decay (both)")
    p.add_argument("--sparsity-coeff", type=float, default=1.0, help="λ of the quadratic L0 loss (both)")
    p.add_argument("--threshold-lr-scale", type=float, default=50.0, help="openscope: log θ learning rate ×")
    p.add_argument("--freq-coeff", type=float, default=0.1, help="openscope's frequency penalty")
    p.add_argument("--bandwidth", type=float, default=0.001, help="STE bandwidth ε (both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["openscope", "saelens"], help="run one side (the other is reused)")
    p.add_argument(
        "--saelens-defaults",
        action="store_true",
        help="SAELens with its own init (θ 0.01, b_dec 0) and bandwidth (0.05) instead of openscope's",
    )
    p.add_argument("--worker", choices=["saelens"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Evaluation (one function for both SAEs)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(folder: Path, heldout: Path, site: str) -> dict[str, float]:
    """L0, FVU, dead and dense fractions of a saved SAE on every row of the held-out store."""
    from openscope.activations.store import ActivationStore
    from openscope.coders import load_coder

    coder = load_coder(folder)
    store = ActivationStore(heldout)
    n = 0
    sq_err = sum_x = sum_sq = l0 = 0.0
    fires = torch.zeros(coder.cfg.width, dtype=torch.float64)
    for batch in store.batches([site], 4096, seed=0, epochs=1, drop_last=False):
        x = batch.acts[site].float()
        f = coder.encode(x)
        recon = coder.decode(f)
        active = f > 0
        n += x.shape[0]
        sq_err += float((x - recon).double().pow(2).sum())
        sum_x += x.double().sum(0)  # type: ignore[assignment]
        sum_sq += float(x.double().pow(2).sum())
        l0 += float(active.sum())
        fires += active.sum(0).double()
    mean = sum_x / n  # type: ignore[operator]
    total_var = sum_sq - n * float(mean.pow(2).sum())  # type: ignore[union-attr]
    freq = fires / n
    return {
        "rows": n,
        "l0": l0 / n,
        "fvu": sq_err / total_var,
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction": float((freq > 0.1).double().mean()),
    }


# ---------------------------------------------------------------------------------------------
# openscope
# ---------------------------------------------------------------------------------------------


def run_openscope(args: argparse.Namespace) -> tuple[Path, float]:
    from openscope.train import TrainConfig, train

    out = OUT / "openscope"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = TrainConfig(
        store=args.store,
        sites=args.site,
        width=args.width,
        target_l0=args.target_l0,
        sparsity_coeff=args.sparsity_coeff,
        freq_coeff=args.freq_coeff,
        threshold_lr_scale=args.threshold_lr_scale,
        lr=args.lr,
        lr_decay=args.lr_decay,
        batch_size=args.batch,
        tokens=args.tokens,
        seed=args.seed,
        output=out,
        checkpoint_every=10**9,
    )
    t0 = time.perf_counter()
    result = train(cfg)
    return result.folders[args.site], time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# SAELens (runs inside its own venv)
# ---------------------------------------------------------------------------------------------


def saelens_worker(args: argparse.Namespace) -> None:
    """Train SAELens's JumpReLUTrainingSAE on the store; save it as an openscope folder."""
    import importlib

    from openscope.activations.store import ActivationStore
    from openscope.coders import CoderConfig, SparseCoder, save_coder, threshold_for_l0

    sl = importlib.import_module("sae_lens")
    torch.set_num_threads(torch.get_num_threads())
    store = ActivationStore(args.store)
    scale = store.stats(args.site).norm_scale
    d = int(store.manifest["sites"][args.site]["width"])
    steps = args.tokens // args.batch
    bandwidth = 0.05 if args.saelens_defaults else args.bandwidth
    cfg = sl.JumpReLUTrainingSAEConfig(
        d_in=d,
        d_sae=args.width,
        dtype="float32",
        device="cpu",
        apply_b_dec_to_input=True,
        jumprelu_bandwidth=bandwidth,
        jumprelu_sparsity_loss_mode="quadratic",
        target_l0=float(args.target_l0),
        l0_coefficient=args.sparsity_coeff,
        l0_warm_up_steps=steps // 5,  # openscope's schedule: Gemma Scope's warm-ups capped to the run
    )
    sae = sl.JumpReLUTrainingSAE(cfg)
    tcfg = importlib.import_module("sae_lens.config").SAETrainerConfig(
        total_training_samples=steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr * 1e-3,
        lr_warm_up_steps=steps // 10,
        lr_decay_steps=round(args.lr_decay * steps),
        adam_beta1=0.0,
        adam_beta2=0.999,
        device="cpu",
        autocast=False,
    )
    trainer = sl.SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))
    batches = store.batches([args.site], args.batch, seed=args.seed, epochs=None, drop_last=True)
    t0 = time.perf_counter()
    for step in range(steps):
        x = next(batches).acts[args.site].float() / scale
        if step == 0 and not args.saelens_defaults:
            # The same data-dependent start openscope uses (see the module docstring).
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
                z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
                sae.threshold.fill_(threshold_for_l0(z, args.target_l0))
        out = trainer.step(x)
        trainer.n_training_steps += 1
        if step % 20 == 0 or step == steps - 1:
            l0 = float((out.feature_acts > 0).sum(-1).float().mean())
            mse = float((out.sae_out - x).pow(2).sum(-1).mean())
            print(f"  · step {step}/{steps} L0 {l0:.1f} mse {mse:.4f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0

    # Convert to an openscope coder: same math (z = (x − b_dec) W_enc + b_enc, f = z·[z > θ],
    # x̂ = f W_dec + b_dec, all on x/C); save_coder folds C and the pre-encoder bias away.
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, width=args.width, bandwidth=bandwidth))
    coder.set_scales(scale, scale)
    with torch.no_grad():
        coder.w_enc.copy_(sae.W_enc)
        coder.b_enc.copy_(sae.b_enc)
        coder.w_dec.copy_(sae.W_dec)
        coder.b_dec.copy_(sae.b_dec)
        assert coder.log_threshold is not None
        coder.log_threshold.copy_(sae.threshold.clamp_min(1e-12).log())
        probe = next(batches).acts[args.site].float()
        theirs = sae.decode(sae.encode(probe / scale)) * scale
        ours = coder.decode(coder.encode(probe))
        err = float((theirs - ours).abs().max() / theirs.abs().max())
    if err > 1e-4:
        raise SystemExit(f"converted SAELens SAE disagrees with SAELens (relative error {err:.2e})")
    version = importlib.import_module("importlib.metadata").version("sae-lens")
    out = OUT / ("saelens-defaults" if args.saelens_defaults else "saelens")
    save_coder(
        coder,
        out,
        hook_point_in=store.manifest["sites"][args.site]["hook_point"],
        model_name=store.manifest["model"]["name"],
        provenance={"trained_by": f"sae-lens {version}", "seconds": seconds, "steps": steps},
    )
    print(json.dumps({"folder": str(out), "seconds": seconds, "version": version}))


def run_saelens(args: argparse.Namespace) -> tuple[Path, float, str]:
    sys.path.insert(0, str(HERE))
    from bench_train_peers import ensure_env, env_python  # type: ignore[import-not-found]

    why = ensure_env("saelens")
    if why is not None:
        raise SystemExit(f"SAELens unavailable: {why}")
    cmd = [str(env_python("saelens")), __file__, "--worker", "saelens", *sys.argv[1:]]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"SAELens worker failed (exit {proc.returncode})")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return Path(res["folder"]), float(res["seconds"]), res["version"]


def main() -> None:
    args = parse_args()
    if args.worker == "saelens":
        saelens_worker(args)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    report_path = OUT / "quality.json"
    report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.only in (None, "openscope"):
        log("[openscope] training")
        folder, seconds = run_openscope(args)
        report["openscope"] = {"seconds": seconds, **evaluate(folder, args.heldout, args.site)}
    if args.only in (None, "saelens"):
        log("[saelens] training in its venv")
        folder, seconds, version = run_saelens(args)
        report["saelens-defaults" if args.saelens_defaults else "saelens"] = {
            "seconds": seconds,
            "version": version,
            **evaluate(folder, args.heldout, args.site),
        }
    report_path.write_text(json.dumps(report, indent=2))
    print(f"{'':10} {'L0':>7} {'FVU':>7} {'dead':>6} {'dense':>6} {'seconds':>8}")
    for name in ("openscope", "saelens", "saelens-defaults"):
        if name in report:
            r = report[name]
            print(
                f"{name:10} {r['l0']:7.1f} {r['fvu']:7.4f} {r['dead_fraction']:6.1%} "
                f"{r['dense_fraction']:6.1%} {r['seconds']:8.0f}"
            )
    print(f"report: {report_path}")


if __name__ == "__main__":
    main()
