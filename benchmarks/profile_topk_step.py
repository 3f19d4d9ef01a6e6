"""Where a TopK training step spends its time: openscope's sparse and dense paths beside sparsify's step.

Times one training step (forward, losses, backward, Adam) of each on the same Gaussian batch and prints
PyTorch profiler's table of the kernels (or CPU operators) that took the most time, to see what separates
openscope's step from its peer's. sparsify is a peer, never a dependency: its arm runs only where it imports.

    python benchmarks/profile_topk_step.py --device cuda --width 131072
    python benchmarks/profile_topk_step.py --device cpu --width 4096 --batch 1024    # smoke run
"""

from __future__ import annotations

import argparse
import time

import torch
from gpu_check import openscope_step, sparsify_step, sync  # the GPU check's arms (this folder)
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--width", type=int, default=131072)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=12, help="rows of each profiler table")
    args = p.parse_args()
    x = torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(0)).to(args.device)
    # sparsify runs its encoder in bfloat16: openscope's bf16 arms are the like-for-like ones.
    arms = {
        f"openscope-{path}-{'bf16' if bf16 else 'fp32'}": openscope_step(x, args.width, args.k, path, bf16)
        for path in ("sparse", "dense")
        for bf16 in (False, True)
    }
    try:
        import sparsify  # type: ignore[import-not-found]  # a peer, measured only where it imports
    except Exception as exc:
        print(f"sparsify not measured: {type(exc).__name__}: {exc}")
    else:
        arms["sparsify"] = sparsify_step(sparsify, x, args.width, args.device, args.k)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, step in arms.items():
        for _ in range(3):
            step()
        sync(args.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(args.device)
        seconds = (time.perf_counter() - start) / args.steps
        print(f"\n== {name}: {seconds * 1e3:.1f} ms/step, {args.batch / seconds:,.0f} tokens/s")
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            sync(args.device)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
