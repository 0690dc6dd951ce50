"""Schedules for a conditional model, calibrated on one set of conditions and judged on others (issue #17).

    OMP_NUM_THREADS=1 python bench/conditional.py [--guidance 1,3] [--nfe 4,5,6,8,10] [--pool 64] [--n 512]

For the exact class-conditional mixture ``gmm-cond`` (classifier-free guidance w) with condition vectors
on the simplex: ``fewstep.tune`` with a pool of ``--pool`` conditions (its first half calibrates, its
second half scores); then every NFE's winner and every baseline with every solver are scored on ``--n``
fresh noises (seed 2) under as many fresh conditions (seed 7, in no pool), against a fine teacher. Prints
the winner, the best baseline, and the paired difference winner - best baseline with its standard error.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

import fewstep
from fewstep.schedules import BASELINES
from fewstep.tuning import baseline
from fewstep.zoo import gmm_cond, simplex_conditions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    numbers = lambda kind: lambda text: [kind(v) for v in text.split(",")]  # noqa: E731
    ap.add_argument("--guidance", type=numbers(float), default=[1.0, 3.0])
    ap.add_argument("--nfe", type=numbers(int), default=[4, 5, 6, 8, 10])
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    nfes = args.nfe
    print(describe())
    print(f"held out: {args.n} noises (seed 2) under {args.n} fresh conditions (seed 7); tune pool {args.pool} "
          "(first half calibrates, second half scores)")
    print(f"{'w':>3} {'nfe':>3} | {'winner':22} {'error':>7} | {'best baseline':24} {'error':>7} | "
          f"{'diff':>8} {'+-se':>7} {'ratio':>6} | {'evals':>8}")
    for w in args.guidance:
        den, out = gmm_cond(w), Path(tempfile.mkdtemp())
        summary = fewstep.tune(den, nfe=nfes, conds=simplex_conditions(args.pool, seed=3), outdir=out, progress=False,
                               report=False)
        x, c = fewstep.noise(args.n, den.shape, den.sigma_max, 2), simplex_conditions(args.n, seed=7)
        ref = fewstep.Teacher(den, tol=1e-4, check_cond=c).solve(x, cond=c)
        for k in nfes:
            win, sched = summary["best"][str(k)]["winner"], fewstep.Schedule.load(out / "best" / f"nfe-{k}.json")
            e_win = fewstep.rmse(fewstep.sample(den, x, sched, cond=c), ref)
            base = min(((fewstep.rmse(fewstep.sample(den, x, baseline(b, s, k, summary["model"]), cond=c), ref), b, s)
                        for b in BASELINES for s in fewstep.SOLVERS), key=lambda t: float(t[0].mean()))
            d = e_win - base[0]
            print(f"{w:3g} {k:3d} | {win['method'] + '+' + win['solver']:22} {e_win.mean():7.4f} | "
                  f"{base[1] + '+' + base[2]:24} {base[0].mean():7.4f} | {d.mean():+8.4f} {d.std() / math.sqrt(len(d)):7.4f} "
                  f"{e_win.mean() / base[0].mean():6.3f} | {summary['cost']['total']:8,}", flush=True)


if __name__ == "__main__":
    main()
