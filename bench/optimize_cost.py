"""What one ``fewstep.optimize`` costs in network evaluations, teacher included, and what it finds (issue #16).

    OMP_NUM_THREADS=1 python bench/optimize_cost.py [--models gmm64,gmm2d,digits-unet] [--n-calib 128] [--n 512]
        [--reference OLD_CHECKOUT]

For each model, GITS and OSS on 128 calibration noises with their default options and with a warm-up /
DP batch of 16 and 32 of them, for DPM-Solver++(2M) at NFE 5 and UniPC at NFE 8: the rows the model
evaluated (a batched call of B rows is B; counted below every fewstep wrapper) and the mean per-sample
RMSE, with its standard error, on ``--n`` held-out noises (seed 2) against an error-controlled teacher.
``--reference``: a checkout of another fewstep version (e.g. ``git worktree add /tmp/old 411cca1``, the
version issue #16 measured): its GITS and OSS with their default options are run there (a subprocess with
its ``src`` first on the path, the same counter) and scored here on the same held-out noises.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
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


CELLS = (("dpmpp_2m", 5), ("unipc", 8))


def emit(models: str, n_calib: int) -> None:
    """(--emit, run by ``reference`` under the other version) GITS and OSS with their defaults: one JSON line
    per schedule, with the rows they cost."""
    for name in models.split(","):
        den = fewstep.load_model(name)
        for solver, k in CELLS:
            for method in ("gits", "oss"):
                counted = Rows(den)
                sched = fewstep.optimize(counted, method, solver, k, n=n_calib)
                print(json.dumps({"model": name, "solver": solver, "nfe": k, "method": method, "rows": counted.rows,
                                  "sigmas": [float(v) for v in sched.sigmas],
                                  "solver_options": dict(getattr(sched, "solver_options", None) or {})}), flush=True)


def reference(checkout: str, models: str, n_calib: int) -> dict:
    """The other version's default GITS and OSS schedules, keyed (model, solver, nfe, method)."""
    env = {**os.environ, "PYTHONPATH": str(Path(checkout) / "src")}
    out = subprocess.run([sys.executable, __file__, "--emit", "--models", models, "--n-calib", str(n_calib)], env=env,
                         check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {(r["model"], r["solver"], r["nfe"], r["method"]): r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gmm64,gmm2d,digits-unet")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--reference", help="a checkout of another fewstep version: its default GITS and OSS too")
    ap.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if args.emit:
        return emit(args.models, args.n_calib)
    old = reference(args.reference, args.models, args.n_calib) if args.reference else {}
    print(describe())
    print("| model | solver | NFE | method | options | evaluations | held-out error +- se |\n|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        den = fewstep.load_model(name)
        x = fewstep.noise(args.n, den.shape, den.sigma_max, 2)
        ref = fewstep.Teacher(den, shape=den.shape).solve(x)
        for solver, k in CELLS:
            for method, opts in SETTINGS:
                counted = Rows(den)
                sched = fewstep.optimize(counted, method, solver, k, n=args.n_calib, **opts)
                _line(name, solver, k, method, opts or "default", counted.rows, fewstep.rmse(fewstep.sample(den, x, sched), ref))
            for method in ("gits", "oss") if old else ():
                r = old[(name, solver, k, method)]
                sched = fewstep.Schedule(torch.tensor(r["sigmas"], dtype=torch.float64), solver=solver,
                                         solver_options=r["solver_options"])
                _line(name, solver, k, method, f"default of {args.reference}", r["rows"],
                      fewstep.rmse(fewstep.sample(den, x, sched), ref))


def _line(name, solver, k, method, options, rows, e) -> None:
    print(f"| {name} | {solver} | {k} | {method} | {options} | {rows:,} | "
          f"{float(e.mean()):.4f} +- {float(e.std()) / math.sqrt(len(e)):.4f} |", flush=True)


if __name__ == "__main__":
    main()
