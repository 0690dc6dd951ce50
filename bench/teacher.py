"""Teacher accuracy: the error-controlled teacher's estimates against its true error (a 4096-step solve).

    OMP_NUM_THREADS=1 python bench/teacher.py [--models gmm2d,gmm64,gmm-scales,digits] [--n 256] [--tols 1e-3,1e-4]

For each model and tolerance: the steps the error control chose and their cost, the estimate it made
on its 16 check noises, the estimate on the held-out noises themselves (``Teacher.error_on``), and the
true error, the mean per-sample RMSE to a 4096-step float64 solve on those ``--n`` held-out noises (seed
1); the ratios of the estimates to the truth.
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
    p.add_argument("--models", default="gmm2d,gmm64,gmm-scales,digits")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--tols", default="1e-3,1e-4")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(describe())
    print(f"{'model':11} {'tol':>7} {'steps':>5} {'rows/noise':>10} {'est(check)':>10} {'est(held)':>10} "
          f"{'true':>9} {'check/true':>10} {'held/true':>9} {'seconds':>7}")
    for name in args.models.split(","):
        den = fewstep.load_model(name)
        x = fewstep.noise(args.n, den.shape, den.sigma_max, TEST_SEED)
        truth = fewstep.Teacher(den, steps=4096).solve(x)
        for tol in [float(v) for v in args.tols.split(",")]:
            t, start = fewstep.Teacher(den, tol=tol), time.perf_counter()
            y = t.solve(x)
            seconds = time.perf_counter() - start
            true = float(fewstep.rmse(y, truth).mean())
            check, held = t.error(), t.error_on(x, x0=y)
            print(f"{name:11} {tol:7.0e} {t.steps():5d} {t.steps() + 1:10d} {check:10.2e} {held:10.2e} {true:9.2e} "
                  f"{check / true if true else float('nan'):10.2f} {held / true if true else float('nan'):9.2f} "
                  f"{seconds:7.1f}", flush=True)


if __name__ == "__main__":
    main()
