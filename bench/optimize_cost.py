"""What one ``fewstep.optimize`` costs in network evaluations, teacher included, and what it finds (issue #16).

    OMP_NUM_THREADS=1 python bench/optimize_cost.py [--models gmm64,gmm2d,digits-unet] [--n-calib 128] [--n 512]

For each model, GITS and OSS on 128 calibration noises with their default options and with a warm-up /
DP batch of 16 and 32 of them, for DPM-Solver++(2M) at NFE 5 and UniPC at NFE 8: the rows the model
evaluated (a batched call of B rows is B; counted below every fewstep wrapper) and the mean per-sample
RMSE, with its standard error, on ``--n`` held-out noises (seed 2) against an error-controlled teacher.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch

import fewstep

sys.path.insert(0, str(Path(__file__).parent))
from cost import Rows  # noqa: E402
from machine import describe  # noqa: E402

SETTINGS = (("gits", {}), ("gits", {"warmup": 16}), ("gits", {"warmup": 32}),
            ("oss", {}), ("oss", {"batch": 16}), ("oss", {"batch": 32}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gmm64,gmm2d,digits-unet")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(describe())
    print("| model | solver | NFE | method | options | evaluations | held-out error +- se |\n|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        den = fewstep.load_model(name)
        x = fewstep.noise(args.n, den.shape, den.sigma_max, 2)
        ref = fewstep.Teacher(den, shape=den.shape).solve(x)
        for solver, k in (("dpmpp_2m", 5), ("unipc", 8)):
            for method, opts in SETTINGS:
                counted = Rows(den)
                sched = fewstep.optimize(counted, method, solver, k, n=args.n_calib, **opts)
                e = fewstep.rmse(fewstep.sample(den, x, sched), ref)
                print(f"| {name} | {solver} | {k} | {method} | {opts or 'default'} | {counted.rows:,} | "
                      f"{float(e.mean()):.4f} +- {float(e.std()) / math.sqrt(len(e)):.4f} |", flush=True)


if __name__ == "__main__":
    main()
