"""Per-step overhead of fewstep's solvers next to k-diffusion's, with a near-free denoiser.

    OMP_NUM_THREADS=1 python bench/overhead.py [--steps 20] [--repeats 30] [--device cpu]

Time per step = wall time of a whole solve / steps (Heun makes two calls a step), best of
``--repeats`` solves, float32 state of shape [4, 3, 16, 16], denoiser ``x * 0.5``. fewstep runs through
``fewstep.sample`` (denoiser checks included), k-diffusion's samplers get the same sigmas. Ratio = fewstep /
k-diffusion; the goal is <= 1.0. k-diffusion has no UniPC, iPNDM or DEIS: those print fewstep alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

import fewstep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_crosscheck import load_k_sampling  # noqa: E402  (k-diffusion's sampling.py without its __init__)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

K_NAMES = {"euler": "sample_euler", "heun": "sample_heun", "dpmpp_2m": "sample_dpmpp_2m",
           "dpmpp_3m": "sample_dpmpp_3m_sde"}
K_OPTIONS = {"dpmpp_3m": {"eta": 0.0, "noise_sampler": lambda s, t: None}}  # eta = 0: the ODE solver


def denoiser(x, sigma):
    return x * 0.5


def per_step(run, steps: int, repeats: int, sync) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    K = load_k_sampling()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"machine: {where}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} thread), "
          f"python {platform.python_version()}")
    print(f"per-step time, {args.steps} steps, x float32 [4, 3, 16, 16] on {device}, denoiser x * 0.5, "
          f"best of {args.repeats}")
    sched = fewstep.schedules.karras(args.steps)
    sigmas = sched.sigmas.to(device)
    x = torch.randn(4, 3, 16, 16, device=device) * sched.sigma_max
    print(f"{'solver':10s} {'fewstep us/step':>16s} {'k-diffusion us/step':>20s} {'ratio':>7s}")
    for name in fewstep.solvers.PLANNED:
        ours = per_step(lambda: fewstep.sample(denoiser, x, sched, name), args.steps, args.repeats, sync)
        if name in K_NAMES:
            k_fn = getattr(K, K_NAMES[name])
            theirs = per_step(lambda: k_fn(denoiser, x, sigmas, disable=True, **K_OPTIONS.get(name, {})),
                              args.steps, args.repeats, sync)
            print(f"{name:10s} {ours * 1e6:16.1f} {theirs * 1e6:20.1f} {ours / theirs:7.2f}")
        else:
            print(f"{name:10s} {ours * 1e6:16.1f} {'-':>20s} {'-':>7s}")


if __name__ == "__main__":
    main()
