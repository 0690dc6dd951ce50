"""Teacher accuracy: how far the teacher's answer moves when its grid is refined 2x, per built-in model.

    OMP_NUM_THREADS=1 python bench/teacher.py [--models gmm2d,gmm64,digits] [--n 128] [--steps 128,256,512,1024]

Prints, for each model and teacher step count N, the mean and max per-sample RMSE between the N-step and
2N-step answers on held-out noises (seed 1), and the seconds of the N-step solve. fewstep's criterion:
the model's default (512 steps, 1024 for digits-flow) moves by < 1e-4 mean RMSE.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fewstep
from fewstep.noises import TEST_SEED

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gmm2d,gmm64,digits,digits-unet,digits-flow")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--steps", default="128,256,512,1024")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(describe())
    print(f"{'model':12} {'steps':>6} {'mean d(N,2N)':>13} {'max d(N,2N)':>12} {'seconds(N)':>10}")
    steps = [int(v) for v in args.steps.split(",")]
    for name in args.models.split(","):
        den = fewstep.load_model(name)
        x = fewstep.noise(args.n, den.shape, den.sigma_max, TEST_SEED)
        answers, seconds = {}, {}
        for n in sorted(set(steps + [2 * s for s in steps])):
            t = time.perf_counter()
            answers[n] = fewstep.Teacher(den, steps=n, sigma_min=den.sigma_min).solve(x)
            seconds[n] = time.perf_counter() - t
        for n in steps:
            d = fewstep.rmse(answers[n], answers[2 * n])
            print(f"{name:12} {n:>6} {float(d.mean()):>13.2e} {float(d.max()):>12.2e} {seconds[n]:>10.1f}")


if __name__ == "__main__":
    main()
