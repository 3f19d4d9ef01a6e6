"""Quality benchmark: openscope's dictionaries against SAELens, sparsify and dictionary_learning.

What it measures
    Every method trains on the same activation store (e.g. Gemma 3 270M layer 9 `resid_post` on
    `wiki[:9000]`, made by `openscope harvest`), the same batches in the same order (the store's
    seeded `batches`), for the same number of tokens, with the same width and target L0 (TopK-style
    methods: k = target L0). Methods:

    openscope-jumprelu            openscope's JumpReLU (Gemma Scope 2 recipe, `openscope.train`)
    openscope-jumprelu-shared     the same started from one θ for every latent (before per-latent θ)
    openscope-jumprelu-lively     per-latent θ, AuxK revival (dead window 50k tokens) and the frequency
                                  penalty at λ_f = 1 with cap 5% (the earlier settings against dead and dense latents)
    openscope-jumprelu-preact     per-latent θ, the pre-activation loss on latents dead for 100k tokens and
                                  the frequency penalty at λ_f = 1 with cap 8% (the settings against dead and
                                  dense latents now)
    openscope-jumprelu-resample   the same with `revive="resample"` (dead window recorded)
    openscope-jumprelu-aux        the same with `revive="aux"` (AuxK on dead latents' pre-activations)
    openscope-matryoshka          JumpReLU with Matryoshka prefixes width/16, width/4, width
    openscope-topk                `activation="topk"`, k = target L0
    saelens-jumprelu              SAELens's JumpReLU (`bench_quality_saelens.saelens_worker`)
    sparsify-topk                 EleutherAI sparsify's TopK `SparseCoder`, its own loss and optimiser
    dl-batchtopk                  dictionary_learning's `BatchTopKTrainer`
    dl-matryoshka-batchtopk       dictionary_learning's `MatryoshkaBatchTopKTrainer` (same prefixes)

    All are then measured by one function. On a held-out store: L0, FVU = E‖x − x̂‖² / E‖x − mean‖²,
    dead latents (never fire) and dense latents (fire on > 10% of tokens), plus training wall seconds.
    With the live model, by one `openscope eval --format saebench` over all the folders (one site, so
    its multi-dictionary path runs them together): delta loss, KL, ce_loss_score, explained variance,
    cosine, l2 ratio, relative reconstruction bias, frac_alive, mean max decoder cosine, and with
    `--full-eval` sparse probing and feature absorption. `--curve` adds a tokens-to-quality curve (delta
    loss and FVU against training tokens) for `--curve-methods`.

How it runs
    openscope trains in this process. Each peer trains in a subprocess with the Python of its own
    virtual environment (`.venv-peers/<peer>/bin/python`, or OPENSCOPE_SAELENS_PYTHON,
    OPENSCOPE_SPARSIFY_PYTHON, OPENSCOPE_DICTIONARY_LEARNING_PYTHON; else `bench_train_peers.ensure_env`
    builds one): the repository goes on its PYTHONPATH so openscope is importable there, and this
    interpreter's site-packages are appended after the venv's own (for openscope's own dependencies,
    e.g. numpy, which a peer's venv may lack; the venv's packages win). Workers read the store through
    openscope and train on x/C (C = the store's norm_scale, E‖x/C‖² = 1), then convert the result to an
    openscope folder with `set_scales(C, C)` (so it takes raw activations) and check it against the
    peer's own encode/decode on a further batch (relative error < 1e-3, else the worker fails).

    - SAELens: `bench_quality_saelens.saelens_worker` unchanged (openscope's data-dependent init, same
      lr, warm-ups and bandwidth as openscope; see that file).
    - sparsify (eai-sparsify): `SparseCoder(d, SaeConfig(k=target L0, num_latents=width))`, the rest of
      SaeConfig and sparsify's TrainConfig at their defaults. The step loop is sparsify's
      `Trainer.fit` for loss_fn="fvu" with the model replaced by the store: seed set before the coder is
      built; b_dec = mean of the first batch; decoder rows renormalised before every forward; forward
      with total_variance = Σ(x − mean)² of the batch and dead_mask = tokens since fired >
      dead_feature_threshold when auxk_alpha > 0; loss = fvu + auxk_alpha·auxk_loss + multi_topk_fvu/8;
      gradient parallel to decoder rows removed; its default optimiser (signum: ScheduleFreeWrapper(
      SignSGD, momentum 0.95), lr = 5e-3/√(num_latents/2¹⁴), no schedule); fire counters updated per
      step; `optimizer.eval()` before the weights are read (as its checkpointing does). With its
      defaults auxk_alpha = 0 (no AuxK) and dead_feature_threshold = 10M tokens (recorded).
      Inference form: TopK of ReLU(W(x − b_dec) + b) — openscope's `topk` coder, exact.
    - dictionary_learning: its trainer's own `update(step, x)`, default hyper-parameters except
      k, dict_size, steps, seed, device, and warmup_steps / threshold_start_step (default 1000 each)
      capped at a tenth of the run: its lr schedule asserts warmup_steps < steps, and without a
      threshold update the inference threshold stays −1. lr: its default 2e-4/√(dict_size/2¹⁴),
      Adam(0.9, 0.999), no decay. Matryoshka group_fractions give the same prefixes as
      openscope-matryoshka. Inference form: the library's `encode(use_threshold=True)`, ReLU(z)
      above one learned global threshold = an openscope JumpReLU with θ = max(threshold, 0) for
      every latent (as openscope's dictionary_learning reader converts it).

Run
    python benchmarks/bench_quality_peers.py --store RUNS/l9_wiki_train --heldout RUNS/l9_wiki_heldout
    (--methods a,b to choose; --reuse to resume method by method; --curve 500000,1000000,2000000;
    --full-eval for probing and absorption; --threads 1 for one torch thread everywhere.)
Writes benchmarks/out/quality_peers/{dicts/<method>, curve/<method>@<tokens>, results/*.json, eval/,
report.json, report.md, curve.png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out" / "quality_peers"
METHODS = (
    "openscope-jumprelu",
    "openscope-jumprelu-shared",
    "openscope-jumprelu-lively",
    "openscope-jumprelu-preact",
    "openscope-jumprelu-resample",
    "openscope-jumprelu-aux",
    "openscope-matryoshka",
    "openscope-topk",
    "saelens-jumprelu",
    "sparsify-topk",
    "dl-batchtopk",
    "dl-matryoshka-batchtopk",
)
PEER_OF = {
    "saelens-jumprelu": "saelens",
    "sparsify-topk": "sparsify",
    "dl-batchtopk": "dictionary-learning",
    "dl-matryoshka-batchtopk": "dictionary-learning",
}
PACKAGE_OF = {"saelens": "sae-lens", "sparsify": "eai-sparsify", "dictionary-learning": "dictionary-learning"}
SITE_ENV = "OPENSCOPE_BENCH_SITE_PACKAGES"
PROBE_KEYS = ("llm_test_accuracy", "sae_top_1_test_accuracy", "sae_top_5_test_accuracy")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="training activation store")
    p.add_argument("--heldout", type=Path, required=True, help="held-out activation store (evaluation)")
    p.add_argument("--site", default="9.resid_post")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--target-l0", type=float, default=50.0, help="target L0 (k of the TopK methods)")
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=5e-4, help="openscope and SAELens (peers: their own)")
    p.add_argument("--lr-decay", type=float, default=0.2, help="final fraction with linear lr decay")
    p.add_argument("--sparsity-coeff", type=float, default=1.0, help="λ of the quadratic L0 loss")
    p.add_argument("--threshold-lr-scale", type=float, default=50.0, help="openscope: log θ lr ×")
    p.add_argument("--freq-coeff", type=float, default=0.1, help="openscope's frequency penalty")
    p.add_argument("--bandwidth", type=float, default=0.001, help="STE bandwidth ε (openscope, SAELens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of methods to run")
    p.add_argument("--reuse", action="store_true", help="skip a method whose folder and result exist")
    p.add_argument("--curve", default="", help="token budgets, e.g. 500000,1000000,2000000")
    p.add_argument("--curve-methods", default="openscope-jumprelu,sparsify-topk")
    p.add_argument("--eval-source", default="wiki[9000:]", help="text for `openscope eval`")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-context-len", type=int, default=128)
    p.add_argument("--eval-device", default="auto")
    p.add_argument("--full-eval", action="store_true", help="also sparse probing and absorption")
    p.add_argument("--probing-texts", type=int, default=200)
    p.add_argument("--absorption-words", type=int, default=3000)
    p.add_argument("--no-live-eval", action="store_true", help="skip `openscope eval` (store metrics only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--output", type=Path, default=OUT)
    p.add_argument("--worker", choices=sorted(PEER_OF), help=argparse.SUPPRESS)
    p.add_argument("--worker-tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.saelens_defaults = False  # read by bench_quality_saelens.saelens_worker
    return args


def prefixes(width: int) -> list[int]:
    """Matryoshka prefix sizes shared by openscope-matryoshka and dl-matryoshka-batchtopk."""
    return sorted({max(1, width // 16), max(1, width // 4), width})


def dead_tokens(tokens: int) -> int:
    return max(1, min(250_000, tokens // 4))


# ---------------------------------------------------------------------------------------------
# Evaluation on the held-out store (one function for every method)
# ---------------------------------------------------------------------------------------------


def evaluate_store(folder: Path, heldout: Path, site_name: str) -> dict[str, float]:
    """L0, FVU, dead and dense fractions on every row of the held-out store (bench_quality_saelens's)."""
    sys.path.insert(0, str(HERE))
    from bench_quality_saelens import evaluate  # type: ignore[import-not-found]

    return evaluate(folder, heldout, site_name)


# ---------------------------------------------------------------------------------------------
# openscope (this process)
# ---------------------------------------------------------------------------------------------


def run_openscope(args: argparse.Namespace, method: str, tokens: int, folder: Path) -> dict[str, Any]:
    """Train one openscope variant; move its dictionary folder to `folder`."""
    from openscope.train import TrainConfig, train

    steps = tokens // args.batch
    extra: dict[str, Any] = {}
    if method == "openscope-jumprelu-resample":
        extra = {
            "revive": "resample",
            "dead_tokens": dead_tokens(tokens),
            "resample_every": max(1, min(250, steps // 4)),
        }
    elif method == "openscope-jumprelu-shared":
        extra = {"init_threshold_per_latent": False}
    elif method == "openscope-jumprelu-lively":
        extra = {
            "revive": "aux",
            "dead_tokens": min(50_000, tokens),
            "freq_coeff": 1.0,
            "max_fire_rate": 0.05,
        }
    elif method == "openscope-jumprelu-preact":
        extra = {
            "revive": "preact",
            "dead_tokens": min(100_000, tokens),
            "freq_coeff": 1.0,
            "max_fire_rate": 0.08,
        }
    elif method == "openscope-jumprelu-aux":
        extra = {"revive": "aux", "dead_tokens": dead_tokens(tokens)}
    elif method == "openscope-matryoshka":
        extra = {"matryoshka": ",".join(map(str, prefixes(args.width)))}
    elif method == "openscope-topk":
        extra = {"activation": "topk", "k": round(args.target_l0)}
    run_dir = folder.parent / f".train-{folder.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    common: dict[str, Any] = {
        "store": args.store,
        "sites": args.site,
        "width": args.width,
        "target_l0": args.target_l0,
        "sparsity_coeff": args.sparsity_coeff,
        "freq_coeff": args.freq_coeff,
        "threshold_lr_scale": args.threshold_lr_scale,
        "lr": args.lr,
        "lr_decay": args.lr_decay,
        "batch_size": args.batch,
        "tokens": tokens,
        "seed": args.seed,
        "output": run_dir,
        "checkpoint_every": 10**9,
    }
    cfg = TrainConfig(**(common | extra))  # a variant's settings win over the shared ones
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    shutil.move(str(result.folders[args.site]), str(folder))
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"seconds": seconds, "steps": result.steps, "settings": extra, "check_error": None}


# ---------------------------------------------------------------------------------------------
# Peers (each in its own venv)
# ---------------------------------------------------------------------------------------------


def peer_python(peer: str) -> Path:
    """The peer's Python: env override, else .venv-peers/<peer>, else bench_train_peers's venv."""
    env = os.environ.get(f"OPENSCOPE_{peer.upper().replace('-', '_')}_PYTHON")
    if env:
        return Path(env)
    py = REPO / ".venv-peers" / peer / "bin" / "python"
    if py.exists():
        return py
    sys.path.insert(0, str(HERE))
    from bench_train_peers import ensure_env, env_python  # type: ignore[import-not-found]

    why = ensure_env(peer)
    if why is not None:
        raise SystemExit(f"{peer} unavailable: {why}")
    return env_python(peer)


def worker_argv(args: argparse.Namespace, method: str, tokens: int, folder: Path) -> list[str]:
    keys = ("store", "heldout", "site", "width", "target_l0", "batch", "lr", "lr_decay")
    keys += ("sparsity_coeff", "threshold_lr_scale", "freq_coeff", "bandwidth", "seed", "threads")
    argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys]
    return [
        *argv,
        f"--tokens={tokens}",
        "--worker",
        method,
        f"--worker-tokens={tokens}",
        f"--worker-out={folder}",
    ]


def run_peer(args: argparse.Namespace, method: str, tokens: int, folder: Path) -> dict[str, Any]:
    """Run the method's worker in its peer's venv; it saves `folder` and prints its result as JSON."""
    py = peer_python(PEER_OF[method])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env[SITE_ENV] = os.pathsep.join(site.getsitepackages())
    cmd = [str(py), str(Path(__file__).resolve()), *worker_argv(args, method, tokens, folder)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{method} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bootstrap_worker(args: argparse.Namespace) -> None:
    """In a peer venv: openscope's dependencies the venv lacks come after its own packages."""
    for path in os.environ.get(SITE_ENV, "").split(os.pathsep):
        if path and path not in sys.path:
            sys.path.append(path)
    sys.path.insert(0, str(HERE))
    if args.threads:
        torch.set_num_threads(args.threads)


def store_batches(args: argparse.Namespace) -> tuple[Any, float, int, Iterator[torch.Tensor]]:
    """(store, C, d, iterator of x/C batches) — the batch order every method sees."""
    from openscope.activations.store import ActivationStore

    store = ActivationStore(args.store)
    scale = store.stats(args.site).norm_scale
    d = int(store.manifest["sites"][args.site]["width"])
    batches = store.batches([args.site], args.batch, seed=args.seed, epochs=None, drop_last=True)
    return store, scale, d, (b.acts[args.site].float() / scale for b in batches)


def save_checked(
    args: argparse.Namespace, store: Any, coder: Any, theirs: Any, probe: torch.Tensor, info: dict[str, Any]
) -> float:
    """Check coder (raw units) against `theirs(probe)` (the peer's own x̂, raw units); save it."""
    from openscope.coders import save_coder

    with torch.no_grad():
        ref = theirs(probe)
        ours = coder.decode(coder.encode(probe))
        err = float((ref - ours).abs().max() / ref.abs().max())
    # 1e-3: a trained sparsify TopK after 1M tokens of 270M layer 9 measured 4.4e-4 (2.6e-7 untrained):
    # float32 rounding of the folded scale, or a near-tie flipping one top-k choice; not investigated.
    if not err < 1e-3:
        raise SystemExit(f"converted {args.worker} disagrees with its library (relative error {err:.2e})")
    shutil.rmtree(args.worker_out, ignore_errors=True)
    save_coder(
        coder,
        args.worker_out,
        hook_point_in=store.manifest["sites"][args.site]["hook_point"],
        model_name=store.manifest["model"]["name"],
        provenance={"trained_by": info["trained_by"], "seconds": info["seconds"], "steps": info["steps"]},
    )
    return err


def sparsify_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train sparsify's TopK SparseCoder with sparsify's own step (see the module docstring)."""
    import importlib.metadata

    from schedulefree import ScheduleFreeWrapper  # type: ignore[import-not-found]
    from sparsify import SaeConfig  # type: ignore[import-not-found]
    from sparsify import SparseCoder as SparsifyCoder  # type: ignore[import-not-found]
    from sparsify.config import TrainConfig as SparsifyTrainConfig  # type: ignore[import-not-found]
    from sparsify.sign_sgd import SignSGD  # type: ignore[import-not-found]

    from openscope.coders import CoderConfig, SparseCoder

    store, scale, d, xs = store_batches(args)
    steps = args.worker_tokens // args.batch
    defaults = SparsifyTrainConfig(sae=SaeConfig())
    if defaults.optimizer != "signum" or defaults.k_decay_steps or defaults.sae.multi_topk:
        raise SystemExit(f"sparsify's defaults changed ({defaults.optimizer}); update the worker")
    torch.manual_seed(args.seed)
    sae = SparsifyCoder(d, SaeConfig(k=round(args.target_l0), num_latents=args.width), "cpu", torch.float32)
    lr = defaults.lr or 5e-3 / (sae.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    t0 = time.perf_counter()
    for step in range(steps):
        x = next(xs)
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        alpha = defaults.auxk_alpha
        dead = since_fired > defaults.dead_feature_threshold if alpha > 0 else None
        out = sae(x=x, y=x, dead_mask=dead, total_variance=(x - x.mean(0)).pow(2).sum())
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired += x.shape[0]
        since_fired[did_fire] = 0
        did_fire.zero_()
        if step % 20 == 0 or step == steps - 1:
            log(f"  · sparsify step {step}/{steps} fvu {float(out.fvu):.4f}")
    opt.eval()  # schedule-free: the averaged weights, as sparsify saves them
    seconds = time.perf_counter() - t0

    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, width=args.width, activation="topk", k=sae.cfg.k))
    coder.set_scales(scale, scale)
    with torch.no_grad():
        coder.w_enc.copy_(sae.encoder.weight.t())
        coder.b_enc.copy_(sae.encoder.bias)
        coder.w_dec.copy_(sae.W_dec)
        coder.b_dec.copy_(sae.b_dec)

    def theirs(x: torch.Tensor) -> torch.Tensor:
        acts, idx, _ = sae.encode(x / scale)
        return sae.decode(acts, idx) * scale

    version = importlib.metadata.version("eai-sparsify")
    info = {"trained_by": f"eai-sparsify {version}", "seconds": seconds, "steps": steps}
    err = save_checked(args, store, coder, theirs, next(xs) * scale, info)
    settings = {
        "optimizer": f"{defaults.optimizer} (ScheduleFreeWrapper(SignSGD), momentum 0.95)",
        "lr": lr,
        "auxk_alpha": defaults.auxk_alpha,
        "dead_feature_threshold": defaults.dead_feature_threshold,
        "k": sae.cfg.k,
        "normalize_decoder": sae.cfg.normalize_decoder,
    }
    return {**info, "version": version, "check_error": err, "settings": settings}


def import_dictionary_learning() -> None:
    """The package's __init__ imports its activation buffer (nnsight), which its venv may lack (the
    Makefile installs none of it): then the package is entered without running that __init__, as
    tests/test_peer_libraries.py does; the trainers import only torch, einops and the package."""
    import importlib.util
    import types

    try:
        import dictionary_learning  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        sys.modules.pop("dictionary_learning", None)
        spec = importlib.util.find_spec("dictionary_learning")
        if spec is None or spec.submodule_search_locations is None:
            raise SystemExit("dictionary_learning is not installed in this venv") from None
        package = types.ModuleType("dictionary_learning")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = package


def dl_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train dictionary_learning's (Matryoshka)BatchTopKTrainer through its own `update`."""
    import importlib.metadata
    import inspect

    import_dictionary_learning()

    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer  # type: ignore[import-not-found]
    from dictionary_learning.trainers.matryoshka_batch_top_k import (  # type: ignore[import-not-found]
        MatryoshkaBatchTopKTrainer,
    )

    from openscope.coders import CoderConfig, SparseCoder

    store, scale, d, xs = store_batches(args)
    steps = args.worker_tokens // args.batch
    matryoshka = args.worker == "dl-matryoshka-batchtopk"
    cls = MatryoshkaBatchTopKTrainer if matryoshka else BatchTopKTrainer
    params = inspect.signature(cls.__init__).parameters
    settings: dict[str, Any] = {
        "warmup_steps": min(params["warmup_steps"].default, max(1, steps // 10)),
        "threshold_start_step": min(params["threshold_start_step"].default, max(1, steps // 10)),
    }
    if matryoshka:
        sizes = prefixes(args.width)
        settings["group_fractions"] = [(b - a) / args.width for a, b in zip([0, *sizes], sizes, strict=False)]
    trainer = cls(
        steps=steps,
        activation_dim=d,
        dict_size=args.width,
        k=round(args.target_l0),
        layer=int(args.site.split(".")[0]) if args.site.split(".")[0].isdigit() else 0,
        lm_name=str(store.manifest["model"]["name"]),
        seed=args.seed,
        device="cpu",
        **settings,
    )
    t0 = time.perf_counter()
    for step in range(steps):
        loss = trainer.update(step, next(xs))
        if step % 20 == 0 or step == steps - 1:
            log(f"  · {args.worker} step {step}/{steps} loss {loss:.4f}")
    seconds = time.perf_counter() - t0
    ae = trainer.ae
    if float(ae.threshold) < 0:
        raise SystemExit(f"{args.worker}: the inference threshold was never set ({steps} steps)")
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, width=args.width))
    coder.set_scales(scale, scale)
    with torch.no_grad():
        coder.w_enc.copy_(ae.W_enc if matryoshka else ae.encoder.weight.t())
        coder.b_enc.copy_(ae.b_enc if matryoshka else ae.encoder.bias)
        coder.w_dec.copy_(ae.W_dec if matryoshka else ae.decoder.weight.t())
        coder.b_dec.copy_(ae.b_dec)
        assert coder.log_threshold is not None
        # ReLU(z)·[ReLU(z) > t] = JumpReLU with θ = max(t, 0), the same θ for every latent.
        coder.log_threshold.fill_(math.log(max(float(ae.threshold), 1e-12)))

    def theirs(x: torch.Tensor) -> torch.Tensor:
        return ae.decode(ae.encode(x / scale)) * scale  # use_threshold=True: its inference form

    version = importlib.metadata.version("dictionary-learning")
    info = {"trained_by": f"dictionary-learning {version}", "seconds": seconds, "steps": steps}
    err = save_checked(args, store, coder, theirs, next(xs) * scale, info)
    settings |= {"lr": trainer.lr, "auxk_alpha": trainer.auxk_alpha, "threshold": float(ae.threshold)}
    settings["group_sizes"] = list(getattr(trainer, "group_sizes", [])) or None
    return {**info, "version": version, "check_error": err, "settings": settings}


def saelens_worker(args: argparse.Namespace) -> dict[str, Any]:
    """bench_quality_saelens's worker as it is, saving into a scratch folder moved to --worker-out."""
    import contextlib
    import io

    import bench_quality_saelens as bqs  # type: ignore[import-not-found]

    ns = argparse.Namespace(**{**vars(args), "tokens": args.worker_tokens})
    scratch = args.worker_out.parent / f".saelens-{args.worker_out.name}"
    bqs.OUT = scratch
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bqs.saelens_worker(ns)
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    shutil.rmtree(args.worker_out, ignore_errors=True)
    shutil.move(res["folder"], str(args.worker_out))
    shutil.rmtree(scratch, ignore_errors=True)
    settings = {"lr": args.lr, "bandwidth": args.bandwidth, "init": "openscope's data-dependent init"}
    # The worker raises unless its own check passed (relative error < 1e-4).
    steps = args.worker_tokens // args.batch
    return {
        "seconds": res["seconds"],
        "version": res["version"],
        "steps": steps,
        "check_error": "< 1e-4",
        "settings": settings,
    }


def worker_main(args: argparse.Namespace) -> None:
    bootstrap_worker(args)
    if args.worker == "sparsify-topk":
        res = sparsify_worker(args)
    elif args.worker == "saelens-jumprelu":
        res = saelens_worker(args)
    else:
        res = dl_worker(args)
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def train_one(args: argparse.Namespace, method: str, tokens: int, folder: Path) -> dict[str, Any]:
    """Train (or with --reuse, take the saved) `method` at `tokens`; its result is written at once."""
    result_path = args.output / "results" / f"{folder.name}.json"
    if args.reuse and (folder / "config.json").is_file() and result_path.is_file():
        log(f"[{folder.name}] reused")
        return json.loads(result_path.read_text())
    log(f"[{folder.name}] training ({tokens} tokens)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    if method in PEER_OF:
        res = run_peer(args, method, tokens, folder)
    else:
        res = run_openscope(args, method, tokens, folder)
    res = {"method": method, "tokens": tokens, "folder": str(folder), **res}
    res["store"] = evaluate_store(folder, args.heldout, args.site)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(res, indent=2))
    s = res["store"]
    log(f"[{folder.name}] L0 {s['l0']:.1f} FVU {s['fvu']:.4f} ({res['seconds']:.0f} s)")
    return res


def live_eval(args: argparse.Namespace, folders: list[Path], out: Path, full: bool) -> dict[str, Any]:
    """One `openscope eval` over every folder; its report.json."""
    from openscope.activations.store import ActivationStore

    model = str(ActivationStore(args.store).manifest["model"]["name"])
    cmd = [sys.executable, "-m", "openscope.cli", "eval", "--model", model, "--source", args.eval_source]
    cmd += ["--tokens", str(args.eval_tokens), "--context-len", str(args.eval_context_len)]
    cmd += ["--format", "saebench", "--output", str(out), "--overwrite", "--device", args.eval_device]
    for folder in folders:
        cmd += ["--dictionaries", str(folder)]
    if full:
        cmd += ["--probing", "--probing-texts", str(args.probing_texts)]
        cmd += ["--absorption", "--absorption-words", str(args.absorption_words)]
    log(f"[eval] openscope eval over {len(folders)} dictionaries")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=sys.stderr)  # its table: to stderr
    report = json.loads((out / "report.json").read_text())
    report["_seconds"] = time.perf_counter() - t0
    return report


def flat_numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a nested dict, keyed by its dotted path."""
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out |= flat_numbers(value, f"{prefix}{key}.")
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}


def live_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """The numbers this benchmark reports from one dictionary of `openscope eval`'s report.json."""
    sb = entry.get("saebench") or {}
    out = {
        "l0": entry.get("l0"),
        "fvu": entry.get("fvu"),
        "delta_loss": entry.get("delta_loss"),
        "kl": entry.get("kl"),
        "ce_loss_score": sb.get("model_performance_preservation", {}).get("ce_loss_score"),
        "explained_variance": sb.get("reconstruction_quality", {}).get("explained_variance"),
        "cossim": sb.get("reconstruction_quality", {}).get("cossim"),
        "l2_ratio": sb.get("shrinkage", {}).get("l2_ratio"),
        "relative_reconstruction_bias": sb.get("shrinkage", {}).get("relative_reconstruction_bias"),
        "frac_alive": sb.get("misc_metrics", {}).get("frac_alive"),
        "max_decoder_cosine": sb.get("misc_metrics", {}).get("average_max_decoder_cosine_sim"),
    }
    for key in ("sparse_probing", "absorption"):
        if entry.get(key) is not None:
            out[key] = flat_numbers(entry[key].get("metrics", {}))
    return out


def fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    """One table: store metrics, live-model metrics and training seconds per method."""
    cols = ["method", "L0", "FVU", "Δ loss", "KL", "ce_loss_score", "expl. var", "cossim", "l2 ratio"]
    cols += ["rel. bias", "dead %", "dense %", "alive %", "max dec cos", "train s", "check err"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in report["methods"].items():
        s, live = r["store"], r.get("live") or {}
        cells = [name, fmt(s["l0"], ".1f"), fmt(s["fvu"], ".4f"), fmt(live.get("delta_loss"), ".4f")]
        cells += [fmt(live.get("kl"), ".4f"), fmt(live.get("ce_loss_score"), ".3f")]
        cells += [fmt(live.get(k), ".3f") for k in ("explained_variance", "cossim", "l2_ratio")]
        cells += [fmt(live.get("relative_reconstruction_bias"), ".3f")]
        cells += [fmt(100 * s["dead_fraction"], ".1f"), fmt(100 * s["dense_fraction"], ".1f")]
        alive = live.get("frac_alive")
        cells += [
            fmt(None if alive is None else 100 * alive, ".1f"),
            fmt(live.get("max_decoder_cosine"), ".3f"),
        ]
        err = r.get("check_error")
        cells += [fmt(r["seconds"], ".1f"), err if isinstance(err, str) else fmt(err, ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    extra = [(n, r["live"]) for n, r in report["methods"].items() if r.get("live")]
    for key in ("sparse_probing", "absorption"):
        rows = [(n, live[key]) for n, live in extra if key in live]
        if rows:
            lines += ["", f"{key} (SAEBench metrics; all of them in report.json):", ""]
            for n, m in rows:
                short = {
                    k.split(".")[-1]: v for k, v in m.items() if key == "absorption" or k.endswith(PROBE_KEYS)
                }
                lines.append(f"- {n}: " + (", ".join(f"{k} {v:.3f}" for k, v in short.items()) or "no score"))
    if report.get("curve"):
        lines += ["", "tokens-to-quality curve (held-out FVU / Δ loss):", ""]
        for p in report["curve"]:
            lines.append(
                f"- {p['method']} @ {p['tokens']}: FVU {fmt(p['fvu'], '.4f')}, Δ loss {fmt(p['delta_loss'], '.4f')}"
            )
    return "\n".join(lines) + "\n"


def run_curve(args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Train --curve-methods at each --curve budget (the full-budget one reused); one live eval."""
    budgets = sorted({int(float(t)) for t in args.curve.split(",") if t.strip()})
    points: list[dict[str, Any]] = []
    todo: list[tuple[dict[str, Any], Path]] = []
    for method in [m.strip() for m in args.curve_methods.split(",") if m.strip()]:
        for tokens in budgets:
            main = report["methods"].get(method)
            if tokens == args.tokens and main is not None:
                live = main.get("live") or {}
                points.append(
                    {
                        "method": method,
                        "tokens": tokens,
                        "fvu": main["store"]["fvu"],
                        "delta_loss": live.get("delta_loss"),
                        "folder": main["folder"],
                    }
                )
                continue
            folder = args.output / "curve" / f"{method}@{tokens}"
            res = train_one(args, method, tokens, folder)
            point = {"method": method, "tokens": tokens, "fvu": res["store"]["fvu"], "delta_loss": None}
            points.append(
                point | {"folder": str(folder), "seconds": res["seconds"], "l0": res["store"]["l0"]}
            )
            todo.append((points[-1], folder))
    if todo and not args.no_live_eval:
        ev = live_eval(args, [f for _, f in todo], args.output / "eval_curve", full=False)
        by_name = {e["name"]: e for e in ev["dictionaries"]}
        for point, folder in todo:
            point["delta_loss"] = by_name[folder.name].get("delta_loss")
    plot_curve(points, args.output / "curve.png")
    return sorted(points, key=lambda p: (p["method"], p["tokens"]))


def plot_curve(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({p["method"] for p in points}):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["tokens"])
        for ax, key in zip(axes, ("delta_loss", "fvu"), strict=True):
            xy = [(p["tokens"], p[key]) for p in pts if p[key] is not None]
            if xy:
                ax.plot(*zip(*xy, strict=True), marker="o", label=method)
    for ax, label in zip(axes, ("delta loss (live model)", "FVU (held-out store)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def peer_versions(methods: list[str]) -> dict[str, str]:
    import importlib.metadata

    out = {"openscope": importlib.metadata.version("openscope"), "torch": torch.__version__}
    for peer in sorted({PEER_OF[m] for m in methods if m in PEER_OF}):
        code = f"import importlib.metadata as m; print(m.version({PACKAGE_OF[peer]!r}))"
        proc = subprocess.run([str(peer_python(peer)), "-c", code], capture_output=True, text=True)
        out[PACKAGE_OF[peer]] = proc.stdout.strip() or f"unknown ({proc.stderr.strip()[-200:]})"
    return out


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.output.mkdir(parents=True, exist_ok=True)
    config = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("worker")
    }
    config |= {"prefixes": prefixes(args.width), "dead_tokens": dead_tokens(args.tokens)}
    report: dict[str, Any] = {"config": config, "versions": peer_versions(methods), "methods": {}}
    for method in methods:
        report["methods"][method] = train_one(args, method, args.tokens, args.output / "dicts" / method)
    if not args.no_live_eval:
        folders = [Path(r["folder"]) for r in report["methods"].values()]
        ev = live_eval(args, folders, args.output / "eval", full=args.full_eval)
        by_name = {e["name"]: e for e in ev["dictionaries"]}
        for r in report["methods"].values():
            r["live"] = live_metrics(by_name[Path(r["folder"]).name])
        report["eval"] = {k: ev.get(k) for k in ("model", "source", "n_tokens", "n_contexts", "_seconds")}
    if args.curve:
        report["curve"] = run_curve(args, report)
    (args.output / "report.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.output / "report.md").write_text(table)
    print(table)
    print(f"report: {args.output / 'report.json'} and report.md")


if __name__ == "__main__":
    main()
