"""Benchmark: SAE training-step throughput of openscope vs SAELens and EleutherAI sparsify.

What it measures
    Tokens/s of one full optimisation step (forward, losses, backward, gradient constraint,
    optimiser step, dead-latent bookkeeping) of a width-16384 dictionary on d=640 activations,
    batch 4096, fp32, torch's default threads, on the *same* activations and the *same* initial
    weights for every method:

    * TopK k=32 and k=64: openscope (``activation="topk"``, default ``path="auto"`` = sparse
      fast path), sparsify (``SparseCoder``: fused encoder + sparse ``embedding_bag`` decoder),
      SAELens ``TopKTrainingSAE`` through ``SAETrainer.step`` (dense activations, its default),
      and SAELens with ``use_sparse_activations=True`` (COO activations + ``torch.sparse.mm``).
    * JumpReLU with thresholds set so that about 50 latents fire per token (a quantile of the
      pre-activations): openscope vs SAELens ``JumpReLUTrainingSAE`` (quadratic L0 loss).
    * The dense floor: the five fp32 products a dense step needs ([4096x640]·[640x16384]
      encoder, the decoder, and the three backward products), timed alone.

    Each figure is reported as tokens/s, ratio to SAELens, ratio to sparsify and ratio to the floor.
    Warm-up 1 step, then ``--steps`` timed steps (median).

How it runs
    The activations (random Gaussian scaled to unit mean squared norm), the initial decoder
    (unit-norm rows; encoder = its transpose) and the JumpReLU threshold are generated once and
    saved to ``benchmarks/out/acts.safetensors``. Each method then runs in its own subprocess:
    openscope and the floor with this Python, each peer with the Python of its own virtual
    environment ``benchmarks/out/envs/<peer>`` (``python3 -m venv --system-site-packages``, so it
    reuses the system torch). The script creates and fills those environments itself on first use,
    pip-installing the peer with a constraints file pinning ``torch==<system version>`` (a dry run
    first refuses anything that would replace torch). The peers are never dependencies of openscope.

    python benchmarks/bench_train_peers.py               # full run (~5-8 min on 2 cores)
    python benchmarks/bench_train_peers.py --steps 5 --methods openscope sparsify
    python benchmarks/bench_train_peers.py --setup-only  # just create the peer environments

Prints a readable table, then the JSON report (also written to benchmarks/out/bench_train_peers.json).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
ENVS = OUT / "envs"
ACTS = OUT / "acts.safetensors"
REPORT = OUT / "bench_train_peers.json"

# Peer name -> (pip requirement, import name). Pinned so the figures are reproducible.
PEERS: dict[str, tuple[str, str]] = {
    "saelens": ("sae-lens==6.54.12", "sae_lens"),
    "sparsify": ("eai-sparsify==1.3.3", "sparsify"),
}
# Method -> which environment runs it ("system" = this Python).
METHODS: dict[str, str] = {
    "floor": "system",
    "openscope": "system",
    "sparsify": "sparsify",
    "saelens": "saelens",
    "saelens-sparse": "saelens",
}
# Which cases each method can run.
SUPPORTS: dict[str, tuple[str, ...]] = {
    "openscope": ("topk", "jumprelu"),
    "sparsify": ("topk",),
    "saelens": ("topk", "jumprelu"),
    "saelens-sparse": ("topk",),
}
# What one timed step of each method includes (copied into the JSON report).
NOTES: dict[str, str] = {
    "floor": "x@W_enc, f@W_dec, g@W_dec^T, f^T@g, x^T@g_z: fp32 GEMMs only, no elementwise work",
    "openscope": "openscope.coders.train_step(path='auto'): forward (TopK: sparse path; JumpReLU: sparse "
    "path while <=3% of B*F entries are touched), reconstruction loss (+ quadratic L0 and frequency "
    "penalty for JumpReLU), backward, parallel-grad removal, Adam(0, 0.999), decoder renormalisation, "
    "DeadLatentTracker (no latent is dead, so no AuxK work)",
    "sparsify": "sparsify.SparseCoder as Trainer.fit uses it (loss_fn=fvu, auxk_alpha=0 default): "
    "set_decoder_norm_to_unit_norm, forward (FusedEncoder: dense F.linear + topk, index_add backward; "
    "eager embedding_bag decoder, no Triton on CPU), FVU loss, backward, "
    "remove_gradient_parallel_to_decoder_directions, torch Adam(0, 0.999) (sparsify's default "
    "optimiser is SignSGD + schedule-free), fired-latent bookkeeping",
    "saelens": "sae_lens.SAETrainer.step: TrainingSAE.training_forward_pass (dense z, dense latents, "
    "dense decoder), MSE (+ quadratic L0 for JumpReLU; TopK AuxK skipped: no dead latents yet), "
    "backward, clip_grad_norm_(1.0), Adam(0, 0.999), schedulers, firing statistics; no decoder "
    "renormalisation (TopK rescales by ||W_dec|| instead)",
    "saelens-sparse": "as saelens, TopKTrainingSAEConfig(use_sparse_activations=True): COO latents + torch.sparse.mm",
}
LR = 7e-5
BETAS = (0.0, 0.999)
BANDWIDTH = 0.001
PROGRESS = "  · "  # prefix of a worker's progress lines (relayed to our stderr)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def env_python(name: str) -> Path:
    return ENVS / name / "bin" / "python"


def system_torch_version() -> str:
    return torch.__version__.split("+")[0]


def ensure_env(name: str) -> str | None:
    """Create/fill the peer's venv; returns None when ready, else why the peer is skipped."""
    requirement, module = PEERS[name]
    py = env_python(name)
    if not py.exists():
        log(f"[setup] creating venv {ENVS / name}")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(ENVS / name)], check=True)
    check = f"import {module}, torch; print(torch.__version__)"
    probe = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
    if probe.returncode == 0 and last_line(probe.stdout).split("+")[0] == system_torch_version():
        return None
    constraints = OUT / "constraints.txt"
    constraints.write_text(f"torch=={system_torch_version()}\n")
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]
    log(f"[setup] dry run: pip install {requirement} (torch pinned to {system_torch_version()})")
    dry = subprocess.run(
        [*pip, "--dry-run", "--quiet", "--report", "-", requirement], capture_output=True, text=True
    )
    if dry.returncode != 0:
        return (
            f"cannot install {requirement} with torch=={system_torch_version()}: {dry.stderr.strip()[-400:]}"
        )
    try:
        planned = [item["metadata"]["name"].lower() for item in json.loads(dry.stdout)["install"]]
    except (ValueError, KeyError):
        return f"could not read pip's dry-run report for {requirement}"
    heavy = sorted(p for p in planned if p.startswith(("torch", "nvidia-", "triton")))
    if heavy:
        return f"{requirement} would install {heavy} (refusing to replace the system torch)"
    log(f"[setup] installing {requirement} into {ENVS / name}")
    inst = subprocess.run([*pip, "--quiet", requirement], capture_output=True, text=True)
    if inst.returncode != 0:
        return f"pip install {requirement} failed: {inst.stderr.strip()[-400:]}"
    probe = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{module} does not import after install: {probe.stderr.strip()[-400:]}"
    if last_line(probe.stdout).split("+")[0] != system_torch_version():
        return f"venv torch is {last_line(probe.stdout)}, expected {system_torch_version()}"
    return None


def peer_version(name: str) -> str:
    requirement, _ = PEERS[name]
    dist = requirement.split("==")[0]
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    res = subprocess.run([str(env_python(name)), "-c", code], capture_output=True, text=True)
    return last_line(res.stdout) or "?"


# ---------------------------------------------------------------------------------------------
# Shared inputs
# ---------------------------------------------------------------------------------------------


def make_inputs(batch: int, d: int, width: int, target_l0: int) -> dict[str, float]:
    """Activations, initial decoder and JumpReLU threshold, saved for every worker."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=gen)
    x = x / x.pow(2).sum(1).mean().sqrt()  # E‖x‖² = 1
    w_dec = torch.randn(width, d, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    z = x[:512] @ w_dec.t()  # pre-activations at init (zero biases)
    theta = float(torch.quantile(z.flatten(), 1 - target_l0 / width))
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({"x": x.contiguous(), "w_dec": w_dec.contiguous(), "theta": torch.tensor([theta])}, str(ACTS))
    return {"theta": theta, "mean_sq_norm": float(x.pow(2).sum(1).mean())}


def load_inputs() -> tuple[torch.Tensor, torch.Tensor, float]:
    from safetensors.torch import load_file

    t = load_file(str(ACTS))
    return t["x"], t["w_dec"], float(t["theta"][0])


# ---------------------------------------------------------------------------------------------
# Workers (one subprocess per method)
# ---------------------------------------------------------------------------------------------


def time_steps(step: Callable[[], float], n: int) -> dict[str, Any]:
    """One warm-up step, then n timed steps; each step returns the L0 it measured."""
    l0 = step()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        l0 = step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "all_seconds": times, "l0": l0}


def floor_step(x: torch.Tensor, w_dec: torch.Tensor) -> Callable[[], float]:
    """The five dense fp32 products of a dense SAE step, in the layouts autograd would use."""
    batch, width = x.shape[0], w_dec.shape[0]
    w_enc = w_dec.t().contiguous()  # [d, F]
    f = torch.randn(batch, width)  # stands for the latents
    g = torch.randn_like(x)  # stands for ∂L/∂x̂
    gz = torch.randn(batch, width)  # stands for ∂L/∂z

    def step() -> float:
        _ = x @ w_enc  # encoder      [B,d]·[d,F]
        _ = f @ w_dec  # decoder      [B,F]·[F,d]
        _ = g @ w_dec.t()  # ∂f           [B,d]·[d,F]
        _ = f.t() @ g  # ∂W_dec       [F,B]·[B,d]
        _ = x.t() @ gz  # ∂W_enc       [d,B]·[B,F]
        return 0.0

    return step


def openscope_step(
    case: dict[str, Any], x: torch.Tensor, w_dec: torch.Tensor, theta: float
) -> Callable[[], float]:
    from openscope.coders import CoderConfig, SparseCoder
    from openscope.train.steps import DeadLatentTracker, StepConfig, make_optimizer, train_step

    width, d = w_dec.shape
    if case["kind"] == "topk":
        cfg = CoderConfig(d_in=d, d_out=d, width=width, activation="topk", k=case["k"])
        sc = StepConfig(sparsity="none", lr=LR, lr_warmup_steps=0)
    else:
        cfg = CoderConfig(d_in=d, d_out=d, width=width, activation="jumprelu", bandwidth=BANDWIDTH)
        sc = StepConfig(sparsity="quadratic_l0", target_l0=case["l0"], lr=LR, lr_warmup_steps=0)
    coder = SparseCoder(cfg)
    with torch.no_grad():
        coder.w_dec.copy_(w_dec)
        coder.w_enc.copy_(w_dec.t())
        if coder.log_threshold is not None:
            coder.log_threshold.fill_(math.log(theta))
    opt = make_optimizer(coder, lr=LR)
    tracker = DeadLatentTracker(width)
    counter = [0]

    def step() -> float:
        stats = train_step(coder, opt, x, None, sc, counter[0], tracker)
        counter[0] += 1
        return stats.l0

    return step


def sparsify_step(case: dict[str, Any], x: torch.Tensor, w_dec: torch.Tensor) -> Callable[[], float]:
    """One step as sparsify's Trainer.fit does it for an SAE with loss_fn="fvu" (auxk_alpha=0, its
    default), but with torch Adam β=(0, 0.999) instead of its default SignSGD+schedule-free."""
    sparsify = importlib.import_module("sparsify")
    width, d = w_dec.shape
    cfg = sparsify.SparseCoderConfig(activation="topk", num_latents=width, k=case["k"])
    sae = sparsify.SparseCoder(d, cfg, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        sae.encoder.weight.copy_(w_dec)  # nn.Linear weight [F, d] = W_enc^T
        sae.W_dec.copy_(w_dec)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=BETAS)
    tokens_since_fired = torch.zeros(width, dtype=torch.long)

    def step() -> float:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        loss = out.fvu + out.multi_topk_fvu / 8  # Trainer: fvu + auxk_alpha·auxk + multi_topk/8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            did_fire = torch.zeros(width, dtype=torch.bool)
            did_fire[out.latent_indices.flatten()] = True
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
            return float((out.latent_acts > 0).sum(-1).float().mean())

    return step


def saelens_step(
    case: dict[str, Any], x: torch.Tensor, w_dec: torch.Tensor, theta: float, sparse_acts: bool
) -> Callable[[], float]:
    """One step through SAELens's own SAETrainer.step (forward, losses, backward, grad-norm clip,
    Adam, LR/coefficient schedulers, dead-neuron bookkeeping)."""
    sl = importlib.import_module("sae_lens")
    width, d = w_dec.shape
    if case["kind"] == "topk":
        cfg = sl.TopKTrainingSAEConfig(
            d_in=d,
            d_sae=width,
            k=case["k"],
            dtype="float32",
            device="cpu",
            use_sparse_activations=sparse_acts,
        )
        sae = sl.TopKTrainingSAE(cfg)
    else:
        cfg = sl.JumpReLUTrainingSAEConfig(
            d_in=d,
            d_sae=width,
            dtype="float32",
            device="cpu",
            jumprelu_init_threshold=theta,
            jumprelu_bandwidth=BANDWIDTH,
            jumprelu_sparsity_loss_mode="quadratic",
            target_l0=float(case["l0"]),
            l0_coefficient=1e-3,
        )
        sae = sl.JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.t())
        if case["kind"] == "jumprelu":
            sae.threshold.fill_(theta)
    tcfg = importlib.import_module("sae_lens.config").SAETrainerConfig(
        total_training_samples=x.shape[0] * 100_000,
        train_batch_size_samples=x.shape[0],
        lr=LR,
        lr_end=LR,  # constant schedule (the runner config's post-init normally fills this in)
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        device="cpu",
        autocast=False,
    )
    trainer = sl.SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))

    def step() -> float:
        out = trainer.step(x)
        trainer.n_training_steps += 1
        with torch.no_grad():
            acts = out.feature_acts
            nnz = acts._nnz() if acts.is_sparse else int((acts != 0).sum())
            return nnz / x.shape[0]

    return step


def worker(method: str, cases: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    x, w_dec, theta = load_inputs()
    results = []
    for case in cases:
        if method == "floor":
            step = floor_step(x, w_dec)
        elif method == "openscope":
            step = openscope_step(case, x, w_dec, theta)
        elif method == "sparsify":
            step = sparsify_step(case, x, w_dec)
        elif method in ("saelens", "saelens-sparse"):
            step = saelens_step(case, x, w_dec, theta, sparse_acts=method == "saelens-sparse")
        else:
            raise ValueError(f"unknown method {method}")
        res = time_steps(step, steps)
        res.update(case=case, threads=torch.get_num_threads())
        results.append(res)
        log(
            f"{PROGRESS}{method:15s} {case_name(case):12s} {x.shape[0] / res['seconds']:8.0f} tok/s  L0 {res['l0']:.1f}"
        )
        del step
    return results


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def case_name(case: dict[str, Any]) -> str:
    if case["kind"] == "floor":
        return "dense floor"
    if case["kind"] == "topk":
        return f"topk k={case['k']}"
    return f"jumprelu L0~{case['l0']}"


def run_worker(method: str, cases: list[dict[str, Any]], steps: int) -> list[dict[str, Any]] | str:
    env = METHODS[method]
    py = sys.executable if env == "system" else str(env_python(env))
    cmd = [
        py,
        str(Path(__file__).resolve()),
        "--worker",
        method,
        "--cases",
        json.dumps(cases),
        "--steps",
        str(steps),
    ]
    environ = dict(os.environ, SPARSIFY_DISABLE_TRITON="1", WANDB_MODE="disabled", TQDM_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ)
    sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines() if line.startswith(PROGRESS)))
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line and not line.startswith(" ")]
        return f"worker failed (rc {proc.returncode}): {(errors or [proc.stderr.strip()])[-1][:400]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_table(report: dict[str, Any]) -> str:
    batch = report["config"]["batch"]
    floor_tps = report["floor"]["tokens_per_s"] if report.get("floor") else None
    head = f"{'case':14s} {'method':15s} {'tok/s':>8s} {'s/step':>7s} {'L0':>6s} {'/floor':>7s} {'/SAELens':>9s} {'/sparsify':>10s}"
    lines = [head, "-" * len(head)]
    if floor_tps:
        lines.append(
            f"{'dense floor':14s} {'5 fp32 GEMMs':15s} {floor_tps:8.0f} {batch / floor_tps:7.2f} {'':>6s} {1.0:7.2f}"
            f" {'':>9s} {'':>10s}   ({report['floor']['gflops']:.0f} GFLOP/s)"
        )
    for row in report["rows"]:

        def fmt(v: float | None, w: int) -> str:
            return f"{v:{w}.2f}" if v is not None else f"{'-':>{w}s}"

        lines.append(
            f"{row['case']:14s} {row['method']:15s} {row['tokens_per_s']:8.0f} {row['seconds']:7.2f} {row['l0']:6.1f}"
            f" {fmt(row['vs_floor'], 7)} {fmt(row['vs_saelens'], 9)} {fmt(row['vs_sparsify'], 10)}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per method and case (median; after 1 warm-up)"
    )
    parser.add_argument("--width", type=int, default=16384, help="dictionary width F")
    parser.add_argument("--d", type=int, default=640, help="activation width d")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64], help="TopK k values")
    parser.add_argument("--target-l0", type=int, default=50, help="L0 the JumpReLU thresholds are set for")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        help="methods to run (floor included)",
    )
    parser.add_argument("--no-jumprelu", action="store_true", help="skip the JumpReLU case")
    parser.add_argument("--setup-only", action="store_true", help="create the peer environments and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.cases), args.steps)))
        return

    skipped: dict[str, str] = {}
    versions: dict[str, str] = {"openscope-torch": torch.__version__}
    for peer in PEERS:
        if any(METHODS[m] == peer for m in args.methods):
            why = ensure_env(peer)
            if why is None:
                versions[peer] = peer_version(peer)
            else:
                skipped[peer] = why
                log(f"[setup] skipping {peer}: {why}")
    if args.setup_only:
        print(json.dumps({"versions": versions, "skipped": skipped}, indent=2))
        return

    data = make_inputs(args.batch, args.d, args.width, args.target_l0)
    cases: list[dict[str, Any]] = [{"kind": "topk", "k": k} for k in args.ks]
    if not args.no_jumprelu:
        cases.append({"kind": "jumprelu", "l0": args.target_l0})
    log(
        f"threads={torch.get_num_threads()} width={args.width} d={args.d} batch={args.batch} steps={args.steps}"
    )

    t0 = time.perf_counter()
    raw: dict[str, list[dict[str, Any]]] = {}
    floor_runs: list[dict[str, Any]] = []
    methods = [m for m in args.methods if m != "floor" and METHODS[m] not in skipped]
    if "floor" in args.methods:
        out = run_worker("floor", [{"kind": "floor"}], args.steps)
        if isinstance(out, str):
            skipped["floor"] = out
        else:
            floor_runs += out
    for method in methods:
        mine = [c for c in cases if c["kind"] in SUPPORTS[method]]
        out = run_worker(method, mine, args.steps)
        if isinstance(out, str):
            skipped[method] = out
            log(f"[{method}] {out}")
        else:
            raw[method] = out
    if "floor" in args.methods and "floor" not in skipped:  # once more at the end: the machine drifts
        out = run_worker("floor", [{"kind": "floor"}], args.steps)
        if not isinstance(out, str):
            floor_runs += out

    flops = 5 * 2 * args.batch * args.d * args.width
    floor = None
    if floor_runs:
        secs = statistics.median(s for r in floor_runs for s in r["all_seconds"])
        floor = {
            "seconds": secs,
            "tokens_per_s": args.batch / secs,
            "gflops": flops / secs / 1e9,
            "runs_seconds": [r["all_seconds"] for r in floor_runs],
        }

    rows = []
    for case in cases:
        by_method = {m: r for m, rs in raw.items() for r in rs if r["case"] == case}
        ref_sl = by_method.get("saelens")
        ref_sp = by_method.get("sparsify")
        for method, r in by_method.items():
            tps = args.batch / r["seconds"]
            rows.append(
                {
                    "case": case_name(case),
                    "method": method,
                    "tokens_per_s": tps,
                    "seconds": r["seconds"],
                    "all_seconds": r["all_seconds"],
                    "l0": r["l0"],
                    "threads": r["threads"],
                    "vs_floor": tps / floor["tokens_per_s"] if floor else None,
                    "vs_saelens": tps / (args.batch / ref_sl["seconds"]) if ref_sl else None,
                    "vs_sparsify": tps / (args.batch / ref_sp["seconds"]) if ref_sp else None,
                }
            )
    report = {
        "config": {
            "width": args.width,
            "d": args.d,
            "batch": args.batch,
            "ks": args.ks,
            "target_l0": args.target_l0,
            "steps": args.steps,
            "dtype": "float32",
            "threads": torch.get_num_threads(),
            "jumprelu_theta": data["theta"],
            "acts_mean_sq_norm": data["mean_sq_norm"],
            "machine": platform.processor() or platform.machine(),
        },
        "versions": versions,
        "notes": {m: NOTES[m] for m in args.methods},
        "floor": floor,
        "rows": rows,
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - t0,
    }
    REPORT.write_text(json.dumps(report, indent=2))
    print(build_table(report))
    if skipped:
        print("skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
