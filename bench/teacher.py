"""Teacher accuracy: the error-controlled teacher's estimates against its true error (a 4096-step solve).

    OMP_NUM_THREADS=1 python bench/teacher.py [--models gmm2d,gmm64,gmm-scales,digits] [--n 256] [--tols 1e-3,1e-4]

For each model and tolerance: the steps the error control chose and their cost, the estimate it made
on its 16 check noises, the estimate on the held-out noises themselves (``Teacher.error_on``), and the
true error, the mean per-sample RMSE to a 4096-step float64 solve on those ``--n`` held-out noises (seed
1); the ratios of the estimates to the truth.

``--dense``: the teacher's states on grids off its own (random seeded 7-step schedules, as pas asks for):
from the one solve's states and outputs on its candidate points (``Teacher.trajectory``'s dense output, no
more calls) and from a solve on the grid's own refinement (as many steps, what it did before), each against
a 4096-step solve on the same grid: the mean per-sample RMSE over the grid's inner points, and the rows
each grid cost (one teacher per model: the dense output's solve serves every grid after the first).
"""

from __future__ import annotations

import argparse
import math
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
    p.add_argument("--dense", action="store_true", help="the dense output off the teacher's grid instead")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(describe())
    if args.dense:
        return dense(args)
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


def dense(args) -> None:
    print(f"{'model':11} {'schedule':>8} {'steps':>5} {'dense':>9} {'re-solve':>9} {'ratio':>6} {'rows dense':>10} "
          f"{'rows re-solve':>13}")
    g = torch.Generator().manual_seed(0)
    for name in args.models.split(","):
        den = fewstep.load_model(name)
        x = fewstep.noise(args.n, den.shape, den.sigma_max, TEST_SEED)
        lo, hi = math.log(den.sigma_min), math.log(den.sigma_max)
        t = fewstep.Teacher(den, shape=den.shape)  # one teacher per model, as in a run: one solve serves every grid
        t.steps()  # the error control first: its rows are neither's
        for k in range(3):
            inner = torch.exp(lo + (hi - lo) * torch.rand(6, generator=g, dtype=torch.float64)).sort(descending=True).values
            grid = torch.cat([torch.tensor([den.sigma_max], dtype=torch.float64), inner, torch.zeros(1, dtype=torch.float64)])
            truth = fewstep.Teacher(den, steps=4096).trajectory(x, grid, substeps=4096 // 7)
            rows = t.rows
            a = t.trajectory(x, grid)
            rows_dense, rows = t.rows - rows, t.rows
            b = t.trajectory(x, grid, substeps=math.ceil(t.steps() / 7))
            errs = [float(torch.stack([fewstep.rmse(v[i], truth[i]) for i in range(1, 7)]).mean()) for v in (a, b)]
            print(f"{name:11} {k:8d} {t.steps():5d} {errs[0]:9.2e} {errs[1]:9.2e} {errs[0] / errs[1]:6.2f} "
                  f"{rows_dense:10d} {t.rows - rows:13d}", flush=True)


if __name__ == "__main__":
    main()
