"""SDM held out: optimize on seed-0 noises, evaluate on seed-1 noises against the teacher.

Per model and NFE: RMSE (mean, median) of SDM with the adaptive Heun (stored gate), of SDM's schedule
with plain Euler, and of karras(rho=7) with Heun and Euler; ratios to karras-Heun and karras-Euler;
the paired difference sdm-adapt - karras-Heun per held-out sample with its standard error (the held-out
mean is decided by a few samples that end in another mode than the teacher's where n is small: use
--n 1024 or 2048 there); the calibration's denoiser calls (search + gate + teacher on the calibration
batch) and seconds.

    OMP_NUM_THREADS=1 python bench/sdm.py [--models gmm64,gmm2d,digits] [--nfe 5,6,8,10,20,40] [--n 256]
"""

import argparse
import math
import sys
import time

from pathlib import Path

import torch

import fewstep
from fewstep.schedules import karras

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gmm64,gmm2d,digits")
    ap.add_argument("--nfe", default="5,6,8,10,20,40")
    ap.add_argument("--n", type=int, default=256, help="held-out samples")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{describe()}; held-out n={args.n} (seed 1), calibration n={args.calib} (seed 0)")
    print(f"{'model':7} {'nfe':>3} | {'sdm-adapt':>9} {'median':>7} {'steps':>5} {'switch':>6} | {'sdm-euler':>9} | "
          f"{'K-heun':>7} {'K-euler':>7} | {'/K-heun':>7} {'/K-euler':>8} {'-K-heun':>8} {'+-se':>6} | {'calls':>5} {'sec':>5}")
    for name in args.models.split(","):
        den = fewstep.load_model(name)
        teacher = fewstep.Teacher(den, sigma_min=den.sigma_min)
        xt = fewstep.noise(args.n, den.shape, den.sigma_max, 1)
        ref = teacher.solve(xt, sigma_max=den.sigma_max)

        def ev(sched, solver=None):  # per-sample RMSE to the teacher
            return fewstep.rmse(fewstep.sample(den, xt, sched, solver), ref)

        for nfe in [int(v) for v in args.nfe.split(",")]:
            steps, opts = fewstep.plan("heun", nfe)
            k_heun = ev(karras(steps, den.sigma_min, den.sigma_max).with_metadata(solver_options=opts), "heun")
            k_euler = ev(karras(nfe, den.sigma_min, den.sigma_max), "euler").mean()
            calib_teacher = fewstep.Teacher(den, sigma_min=den.sigma_min)  # fresh: its calls are counted
            start = time.perf_counter()
            sched = fewstep.optimize(den, "sdm", "heun", nfe, n=args.calib, teacher=calib_teacher)
            sec = time.perf_counter() - start
            r = ev(sched)
            euler = ev(fewstep.optimize(den, "sdm", "euler", nfe, n=args.calib), "euler").mean()
            diff = r - k_heun
            info = sched.metadata["sdm"]
            mean, k_heun = r.mean(), k_heun.mean()
            print(f"{name:7} {nfe:3d} | {mean:9.4f} {r.median():7.4f} {sched.steps:5d} {info['switch']:6d} | "
                  f"{euler:9.4f} | {k_heun:7.4f} {k_euler:7.4f} | {mean / k_heun:7.2f} {mean / k_euler:8.2f} "
                  f"{diff.mean():8.4f} {diff.std() / math.sqrt(len(diff)):6.4f} | "
                  f"{sched.metadata['provenance']['denoiser_calls']:5d} {sec:5.1f}", flush=True)


if __name__ == "__main__":
    main()
