"""GPU check: the key correctness tests on the device, then throughput figures, in one run (< 10 min on one GPU).

Correctness (each a pass/fail with the largest difference it saw):
1. capture equals hidden states: every layer's resid_pre/resid_post read by hooks equals HF's
   `output_hidden_states` on the device; on CUDA also the CPU model's captures (float32, TF32 off).
2. splice of a perfect dictionary: x̂ = x at every site kind of the middle layer leaves the logits unchanged.
3. sparse path equals dense: TopK and JumpReLU coders, values and gradients of both paths on the device.
4. resume equals uninterrupted: a training run stopped mid-way and resumed saves what an uninterrupted
   one saves (float32 on the device; on a GPU within twice the difference of two uninterrupted runs,
   which its atomic adds make differ a little).

Throughput (tokens/s, wall time of the whole call, start-up included):
- harvest of every layer's resid_post;
- training of one dictionary per configuration: widths (default 16k and 131k) × TopK / JumpReLU ×
  float32 / bf16 autocast (`--precision`), on the middle layer's resid_post; then the first width's bf16
  TopK with no batches read ahead and with 2 (`--batches-ahead`), side by side;
- with sparsify importable in this Python, sparsify's TopK step against openscope's on the same
  activations and the same GPU (otherwise the report says it was not installed);
- evaluation (splice, KL, loss recovered, absorption) of the first trained dictionary;
- its dashboards (`openscope features`) and one steered, sampled generation with it (seconds);
- attribution of one prompt with random JumpReLU transcoders on every layer (seconds).

    python benchmarks/gpu_check.py --device cuda                  # Gemma 3 270M, < 10 min on one GPU
    python benchmarks/gpu_check.py --device cpu --quick --model DIR --source FILE   # smoke run (tests)

`--stages` runs some of them (harvest, checks, train, peers, eval, features, steer, attribution; the
stages that need a dictionary train a small one when train is left out). A stage that raises is a failed
check named `<stage> runs`, and the stages after it still run: one call finds every failure.

Prints a table and writes the JSON report (default benchmarks/out/gpu_check.json). Exit status: 0 when every
check passed, 1 when one failed, 2 on bad input (e.g. --device cuda where CUDA is not available).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from openscope.activations import ActivationStore, HarvestConfig, harvest
from openscope.attribution import attribute
from openscope.coders.coder import CoderConfig, SparseCoder
from openscope.coders.dictionary import Dictionary, in_memory, load_dictionary
from openscope.errors import OpenscopeError
from openscope.eval import EvalConfig, evaluate, spliced
from openscope.features import FeaturesConfig, compute_features
from openscope.interventions import Intervention, generate
from openscope.models import SITE_KINDS, Site, load_model, run_to_sites
from openscope.models.load import LoadedModel, resolve_device, text_config
from openscope.models.sites import locate, site_width
from openscope.models.tokens import prompt_ids
from openscope.train import TrainConfig, train

log = logging.getLogger("gpu_check")
T = TypeVar("T")
STAGES = ("harvest", "checks", "train", "peers", "eval", "features", "steer", "attribution")
OUT = Path(__file__).parent / "out" / "gpu_check.json"
PROMPT = "Fact: the Eiffel Tower is a famous old landmark located in the city of"


class Report:
    """Checks (pass/fail, largest difference) and figures, printed as a table and saved as JSON."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.checks: list[dict[str, Any]] = []
        self.figures: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {
            "device": device,
            "device_name": torch.cuda.get_device_name(device)
            if device.startswith("cuda")
            else (platform.processor() or platform.machine()),
            "torch": torch.__version__,
            "model": args.model,
            "quick": args.quick,
        }

    def check(self, name: str, fn: Callable[[], tuple[float, float]]) -> None:
        """Run a check returning (largest difference, tolerance); an exception is a failure too."""
        start = time.perf_counter()
        try:
            diff, tol = fn()
            row = {"check": name, "ok": bool(diff <= tol), "max_diff": diff, "tolerance": tol}
        except Exception as exc:  # a check that crashes on the device is a failed check, reported
            log.exception("check %s failed", name)
            row = {"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        row["seconds"] = round(time.perf_counter() - start, 2)
        log.info("%s", row)
        self.checks.append(row)

    def stage(self, name: str, fn: Callable[[], T]) -> T | None:
        """Run one stage; one that raises is a failed check (`<name> runs`, with its error) and the later
        stages still run, so one call on a device finds every failure, not only the first."""
        start = time.perf_counter()
        try:
            return fn()
        except Exception as exc:
            log.exception("stage %s failed", name)
            row = {"check": f"{name} runs", "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            row["seconds"] = round(time.perf_counter() - start, 2)
            self.checks.append(row)
            return None

    def figure(self, name: str, value: float, unit: str, **extra: Any) -> None:
        row = {"figure": name, "value": value, "unit": unit, **extra}
        log.info("%s", row)
        self.figures.append(row)

    def table(self) -> str:
        lines = [
            f"gpu_check on {self.meta['device']} ({self.meta['device_name']}), model {self.meta['model']}"
        ]
        lines += ["", f"{'check':<42} {'ok':<5} {'max diff':>10} {'tol':>9} {'s':>7}"]
        for c in self.checks:
            diff = f"{c['max_diff']:.2e}" if "max_diff" in c else c.get("error", "")[:60]
            tol = f"{c['tolerance']:.0e}" if "tolerance" in c else ""
            lines.append(
                f"{c['check']:<42} {'yes' if c['ok'] else 'NO':<5} {diff:>10} {tol:>9} {c['seconds']:>7.1f}"
            )
        lines += ["", f"{'figure':<42} {'value':>12}  unit"]
        for f in self.figures:
            extra = ", ".join(f"{k} {v}" for k, v in f.items() if k not in ("figure", "value", "unit"))
            lines.append(
                f"{f['figure']:<42} {f['value']:>12,.1f}  {f['unit']}" + (f"  ({extra})" if extra else "")
            )
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": self.meta, "checks": self.checks, "figures": self.figures}
        path.write_text(json.dumps(doc, indent=2) + "\n")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def rel_diff(a: Tensor, b: Tensor) -> float:
    """max |a − b| / max |b|: a difference independent of the activations' scale."""
    return float((a.float() - b.float().to(a.device)).abs().max() / b.float().abs().max().clamp(min=1e-30))


def sample_ids(lm: LoadedModel, n: int, t: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(
        4, min(len(lm.tokenizer), int(text_config(lm.model.config).vocab_size)), (n, t), generator=g
    )
    ids[:, 0] = lm.tokenizer.bos_token_id
    return ids.to(lm.device)


# ---- correctness ---------------------------------------------------------------------------------------


def capture_vs_hidden(lm: LoadedModel, ids: Tensor) -> tuple[float, float]:
    sites = [Site(layer, kind) for layer in range(lm.n_layers) for kind in ("resid_pre", "resid_post")]
    acts = run_to_sites(lm, ids, sites)
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    diffs = [rel_diff(acts[Site(i, "resid_pre")], hidden[i]) for i in range(lm.n_layers)]
    diffs += [rel_diff(acts[Site(i, "resid_post")], hidden[i + 1]) for i in range(lm.n_layers - 1)]
    return max(diffs), 1e-6


def capture_vs_cpu(lm: LoadedModel, cpu: LoadedModel, ids: Tensor) -> tuple[float, float]:
    sites = [Site(layer, "resid_post") for layer in range(lm.n_layers)]
    on_device = run_to_sites(lm, ids, sites)
    on_cpu = run_to_sites(cpu, ids.cpu(), sites)
    return max(rel_diff(on_device[s].cpu(), on_cpu[s]) for s in sites), 1e-3


def perfect_sae(d: int, device: str) -> SparseCoder:
    """decode(encode(x)) == x exactly: f = [relu(x), relu(−x)], x̂ = relu(x) − relu(−x)."""
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, width=2 * d, activation="relu", pre_encoder_bias=False))
    eye = torch.eye(d)
    with torch.no_grad():
        coder.w_enc.copy_(torch.cat([eye, -eye], dim=1))
        coder.w_dec.copy_(torch.cat([eye, -eye], dim=0))
        coder.b_enc.zero_()
        coder.b_dec.zero_()
    return coder.to(device)


def splice_perfect(lm: LoadedModel, ids: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        clean = lm.model(input_ids=ids, use_cache=False).logits
    diffs = []
    for kind in SITE_KINDS:
        site = Site(lm.n_layers // 2, kind)
        width = site_width(locate(lm.arch.layers, lm.arch.layers_path, site), lm.d_model)
        with spliced(lm, in_memory(perfect_sae(width, str(lm.device)), site)), torch.no_grad():
            diffs.append(rel_diff(lm.model(input_ids=ids, use_cache=False).logits, clean))
    return max(diffs), 1e-5


def sparse_vs_dense(d: int, width: int, device: str) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(256, d, generator=g) * 2).to(device)
    diffs = []
    for activation, k in (("topk", 32), ("jumprelu", None)):
        cfg = CoderConfig(d_in=d, d_out=d, width=width, activation=activation, k=k, bandwidth=0.2)  # type: ignore[arg-type]
        results = []
        for path in ("dense", "sparse"):
            coder = SparseCoder(cfg).to(device)
            with torch.no_grad():
                coder.b_enc.normal_(0, 0.1, generator=torch.Generator(device).manual_seed(2))
            out = coder(x, path=path)
            out.reconstruction.pow(2).sum().backward()
            grads = [p.grad.clone() for p in coder.parameters() if p.grad is not None]
            results.append((out.reconstruction.detach(), grads))
        (dense, dense_grads), (sparse, sparse_grads) = results
        diffs.append(rel_diff(sparse, dense))
        diffs += [rel_diff(a, b) for a, b in zip(sparse_grads, dense_grads, strict=True)]
    return max(diffs), 1e-4


def resume_vs_uninterrupted(
    store: Path, site: str, width: int, batch: int, device: str, root: Path
) -> tuple[float, float]:
    def cfg(out: Path, resume: bool = False) -> TrainConfig:
        return TrainConfig(
            store=store, sites=site, width=width, batch_size=batch, tokens=batch * 12, target_l0=16,
            output=out, checkpoint_every=3, device=device, precision="float32", resume=resume,
            lr_warmup_steps=2, sparsity_warmup_steps=2,
        )  # fmt: skip

    from safetensors.torch import load_file  # only this check reads the saved parameters

    def params(result: Any) -> dict[str, Tensor]:
        return load_file(str(next(iter(result.folders.values())) / "params.safetensors"))

    full = params(train(cfg(root / "full"), progress=False))
    train(cfg(root / "part"), progress=False, stop_after=6)
    resumed = params(train(cfg(root / "part", resume=True), progress=False))
    diff = max(rel_diff(resumed[k], full[k]) for k in full)
    if device == "cpu":
        return diff, 1e-4
    # A GPU's atomic adds (sparse backward, reductions) make two uninterrupted runs differ a little too:
    # the resumed run must differ from the uninterrupted one by no more than that noise (twice it, 1e-4 at least).
    again = params(train(cfg(root / "again"), progress=False))
    noise = max(rel_diff(again[k], full[k]) for k in full)
    log.info("resume: resumed vs uninterrupted %.2e, two uninterrupted runs %.2e", diff, noise)
    return diff, max(1e-4, 2 * noise)


# ---- throughput ----------------------------------------------------------------------------------------


def train_configs(args: argparse.Namespace) -> list[tuple[int, str, str, int | None]]:
    """(width, activation, precision, batches ahead) of each timed run: every width x TopK/JumpReLU x
    float32/bf16 with the default read-ahead, then the first width's bf16 TopK with none and with 2 (side
    by side: what reading batches ahead in a background thread buys)."""
    precisions = ["float32", "bf16"]
    runs: list[tuple[int, str, str, int | None]] = [
        (w, act, p, None) for w in args.widths for act in ("topk", "jumprelu") for p in precisions
    ]
    return runs + [(args.widths[0], "topk", "bf16", ahead) for ahead in (0, 2)]


def train_throughput(
    report: Report, args: argparse.Namespace, store: Path, site: str, device: str, root: Path
) -> Path:
    first: Path | None = None
    for width, activation, precision, ahead in train_configs(args):
        label = f"train {activation} w{width} {precision}" + (
            "" if ahead is None else f" batches ahead {ahead}"
        )
        cfg = TrainConfig(
            store=store, sites=site, width=width, activation=activation, k=32 if activation == "topk" else None,
            target_l0=32, batch_size=args.batch_size, tokens=args.train_tokens, output=root / label.replace(" ", "_"),
            device=device, precision=precision, checkpoint_every=10**9, log_every=10**9, batches_ahead=ahead,
        )  # fmt: skip
        sync(device)
        start = time.perf_counter()
        result = train(cfg, progress=False)
        sync(device)
        seconds = time.perf_counter() - start
        final = next(iter(result.final.values()))
        report.figure(
            label, args.train_tokens / seconds, "tokens/s",
            fvu=round(final.get("fvu", math.nan), 4), l0=round(final.get("l0", math.nan), 1),
        )  # fmt: skip
        first = first or next(iter(result.folders.values()))
    assert first is not None
    return first


def sparsify_vs_openscope(
    report: Report, args: argparse.Namespace, store: Path, site: str, device: str
) -> None:
    """sparsify's TopK step (as its Trainer runs it, with Adam) against openscope's step on the same batch."""
    try:
        import sparsify  # type: ignore[import-not-found]  # a peer, never a dependency: compared only when installed in this Python
    except ImportError:
        report.meta["sparsify"] = "not installed in this Python (pip install eai-sparsify to compare)"
        return
    except Exception as exc:  # a peer whose own dependencies do not import here: say so, check on
        report.meta["sparsify"] = f"installed but its import failed: {type(exc).__name__}: {exc}"
        return
    shard = ActivationStore(store).read_shard(0, [site])[site][: args.batch_size].float().to(device)
    x = shard / shard.pow(2).sum(-1).mean().sqrt()
    report.meta["sparsify"] = getattr(sparsify, "__version__", "installed")
    for width in args.widths:
        rate = time_steps(openscope_step(x, width), device) * len(x)
        report.figure(f"step openscope topk w{width}", rate, "tokens/s")
        rate = time_steps(sparsify_step(sparsify, x, width, device), device) * len(x)
        report.figure(f"step sparsify topk w{width}", rate, "tokens/s")


def openscope_step(
    x: Tensor, width: int, k: int = 32, path: str = "auto", bf16: bool | None = None
) -> Callable[[], Any]:
    """One openscope TopK training step on x (Adam included); bf16 None: bf16 products on a GPU, as
    openscope trains there by default and as sparsify's encoder runs."""
    from openscope.train.steps import (
        DeadLatentTracker,
        StepConfig,
        make_optimizer,
        train_step,
    )  # peer run only

    d = x.shape[1]
    coder = SparseCoder(CoderConfig(d_in=d, d_out=d, width=width, activation="topk", k=k)).to(x.device)
    opt, tracker = make_optimizer(coder, lr=7e-5), DeadLatentTracker(width)
    bf16 = x.device.type == "cuda" if bf16 is None else bf16
    sc = StepConfig(sparsity="none", lr=7e-5, lr_warmup_steps=0, path=path, bf16=bf16)  # type: ignore[arg-type]
    return lambda: train_step(coder, opt, x, None, sc, 0, tracker)


def sparsify_step(sparsify: Any, x: Tensor, width: int, device: str, k: int = 32) -> Callable[[], Any]:
    """One sparsify TopK training step on x, as its Trainer runs it (Adam, unit-norm decoder)."""
    cfg = sparsify.SparseCoderConfig(activation="topk", num_latents=width, k=k)
    sae = sparsify.SparseCoder(x.shape[1], cfg, device=device)
    adam = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=(0.0, 0.999))

    def step() -> None:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        (out.fvu + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        adam.zero_grad()

    return step


def time_steps(step: Callable[[], Any], device: str, n: int = 10) -> float:
    """Steps per second over n timed steps after two warm-up steps."""
    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return n / (time.perf_counter() - start)


def random_transcoders(lm: LoadedModel, width: int, l0: float, ids: Tensor) -> list[Dictionary]:
    """Random JumpReLU transcoders on every layer, thresholds set so about l0 latents fire per token."""
    x = run_to_sites(lm, ids, [Site(layer, "mlp_in") for layer in range(lm.n_layers)])
    out = []
    for layer in range(lm.n_layers):
        c = SparseCoder(
            CoderConfig(d_in=lm.d_model, d_out=lm.d_model, width=width, kind="transcoder", seed=layer)
        )
        c = c.to(lm.device)
        with torch.no_grad():
            z = c.pre_activations(x[Site(layer, "mlp_in")][0, 1:]).float()
            theta = float(torch.quantile(z.flatten().cpu(), 1 - l0 / width).clamp(min=1e-6))
            assert c.log_threshold is not None
            c.log_threshold.fill_(math.log(theta))
        out.append(in_memory(c.eval(), Site(layer, "mlp_in"), Site(layer, "mlp_out"), f"random-tc{layer}"))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda).")
    p.add_argument("--model", default="gemma-3-270m", help="Model name or folder (default gemma-3-270m).")
    p.add_argument("--source", default="wiki", help="Text source for harvest and eval (default wiki).")
    p.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run in seconds (CPU, tests).")
    p.add_argument(
        "--widths", default="", help="Training widths, comma list (default 16384,131072; quick 128)."
    )
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"Comma list of stages to run (default all: {','.join(STAGES)}); a stage that fails is reported "
        "and the others still run.",
    )
    p.add_argument("--output", type=Path, default=OUT, help=f"JSON report (default {OUT}).")
    p.add_argument("--workdir", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = p.parse_args(argv)
    args.stages = [st for st in args.stages.split(",") if st]
    if unknown := set(args.stages) - set(STAGES):
        p.error(f"unknown stages {sorted(unknown)}; expected some of {', '.join(STAGES)}")
    q = args.quick
    args.widths = [int(w) for w in (args.widths or ("128" if q else "16384,131072")).split(",")]
    args.context_len = 32 if q else 256
    args.harvest_tokens = 1024 if q else 131_072
    args.batch_size = 128 if q else 4096
    args.train_tokens = 512 if q else 1 << 20
    args.eval_tokens = 256 if q else 32_768
    args.attr_width, args.attr_l0, args.attr_batch = (64, 4, 8) if q else (16384, 50, 32)
    args.steer_tokens = 4 if q else 32
    args.absorption_words = 300 if q else 3000
    return args


def run_checks(
    report: Report, lm: LoadedModel, args: argparse.Namespace, device: str, store: Path, site: str, root: Path
) -> None:
    ids = sample_ids(lm, 2, args.context_len)
    report.check("capture equals hidden states", lambda: capture_vs_hidden(lm, ids))
    if device != "cpu":
        cpu = load_model(args.model, device="cpu")
        report.check("device captures equal CPU captures", lambda: capture_vs_cpu(lm, cpu, ids))
        del cpu
    report.check("splice of a perfect dictionary", lambda: splice_perfect(lm, ids))
    report.check(
        "sparse path equals dense", lambda: sparse_vs_dense(lm.d_model, max(args.widths[0], 64), device)
    )
    width, batch = args.widths[0], args.batch_size
    report.check(
        "resume equals uninterrupted",
        lambda: resume_vs_uninterrupted(store, site, width, batch, device, root / "resume"),
    )


def run(args: argparse.Namespace, root: Path) -> Report:
    device = resolve_device(args.device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the checks compare float32 exactly; bf16 runs say so
    report = Report(args, device)
    lm = load_model(args.model, device=device)
    site = f"{lm.n_layers // 2}.resid_post"
    common = {"model": args.model, "source": args.source, "context_len": args.context_len, "device": device}
    want = args.stages.__contains__
    if want("harvest"):
        report.stage("harvest", lambda: harvest_all(report, args, lm, root, common))
    store = root / "mid"  # the stages but harvest and attribution read this one store
    if set(args.stages) - {"harvest", "attribution"}:
        h = harvest(
            HarvestConfig(sites=site, tokens=args.harvest_tokens, output=store, **common),
            loaded=lm,
            progress=False,
        )
        report.figure(f"harvest {site}", h.tokens_per_s, "tokens/s")
    if want("checks"):
        report.stage("checks", lambda: run_checks(report, lm, args, device, store, site, root))
    folder: Path | None = None
    if want("train"):
        folder = report.stage("train", lambda: train_throughput(report, args, store, site, device, root))
    if want("peers"):
        report.stage("peers", lambda: sparsify_vs_openscope(report, args, store, site, device))
    if {"eval", "features", "steer"} & set(args.stages) and folder is None:
        folder = report.stage("fixture", lambda: small_dictionary(args, store, site, device, root))
    if folder is not None and want("eval"):
        report.stage("eval", lambda: evaluate_one(report, args, lm, folder, root, common))
    if folder is not None and want("features"):
        report.stage("features", lambda: features_of(report, args, lm, folder, root, common))
    if folder is not None and want("steer"):
        report.stage("steer", lambda: steer_one(report, args, lm, folder))
    if want("attribution"):
        report.stage("attribution", lambda: attribution_of_one_prompt(report, args, lm, device))
    return report


def harvest_all(
    report: Report, args: argparse.Namespace, lm: LoadedModel, root: Path, common: dict[str, Any]
) -> None:
    cfg = HarvestConfig(sites="*.resid_post", tokens=args.harvest_tokens, output=root / "all", **common)
    h = harvest(cfg, loaded=lm, progress=False)
    report.figure("harvest every resid_post", h.tokens_per_s, "tokens/s", sites=lm.n_layers)


def small_dictionary(args: argparse.Namespace, store: Path, site: str, device: str, root: Path) -> Path:
    """A TopK SAE trained briefly, for the stages that need a dictionary when the train stage is left out."""
    cfg = TrainConfig(
        store=store, sites=site, width=args.widths[0], activation="topk", k=32, batch_size=args.batch_size,
        tokens=args.batch_size * 8, output=root / "fixture", device=device, log_every=10**9,
    )  # fmt: skip
    return next(iter(train(cfg, progress=False).folders.values()))


def evaluate_one(
    report: Report,
    args: argparse.Namespace,
    lm: LoadedModel,
    folder: Path,
    root: Path,
    common: dict[str, Any],
) -> None:
    cfg = EvalConfig(
        dictionaries=[folder], tokens=args.eval_tokens, output=root / "eval", absorption=True,
        absorption_words=args.absorption_words, **common,
    )  # fmt: skip
    ev = evaluate(cfg, loaded=lm, progress=False)
    report.figure("eval (splice, KL, loss recovered, absorption)", ev.tokens_per_s, "tokens/s")


def attribution_of_one_prompt(report: Report, args: argparse.Namespace, lm: LoadedModel, device: str) -> None:
    ids = prompt_ids(lm.tokenizer, PROMPT).to(lm.device)
    dicts = random_transcoders(lm, args.attr_width, args.attr_l0, ids)
    sync(device)
    start = time.perf_counter()
    graph = attribute(lm, dicts, ids, batch_size=args.attr_batch, max_feature_nodes=8192)
    sync(device)
    report.figure(
        "attribution of one prompt", time.perf_counter() - start, "s",
        tokens=graph.n_tokens, active=graph.n_active, width=args.attr_width,
    )  # fmt: skip


def features_of(
    report: Report,
    args: argparse.Namespace,
    lm: LoadedModel,
    folder: Path,
    root: Path,
    common: dict[str, Any],
) -> None:
    """Dashboards (top activations, histograms, logits) of the dictionary."""
    cfg = FeaturesConfig(
        dictionaries=[folder], tokens=args.eval_tokens, output=root / "features.db", **common
    )
    feats = compute_features(cfg, loaded=lm, progress=False)
    report.figure("features (dashboards)", feats.tokens_per_s, "tokens/s")


def steer_one(report: Report, args: argparse.Namespace, lm: LoadedModel, folder: Path) -> None:
    """One steered generation with the dictionary's first latent added, sampled (the sampler's generator
    is the CPU's)."""
    device = str(lm.device)
    steer = Intervention(load_dictionary(folder, lm, device=device), latent=0, value=8.0)
    sync(device)
    start = time.perf_counter()
    result = generate(lm, PROMPT, [steer], max_new_tokens=args.steer_tokens, temperature=0.7, seed=0)
    sync(device)
    report.figure(
        "steered generation (plain and steered)", time.perf_counter() - start, "s",
        tokens=args.steer_tokens, changed=result.steered != result.unsteered,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            report = run(args, Path(tmp))
    except OpenscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report.meta["seconds"] = round(time.perf_counter() - start, 1)
    print(report.table())
    report.save(args.output)
    print(f"\nreport: {args.output} ({report.meta['seconds']} s)")
    return 0 if all(c["ok"] for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
