"""Schedules for a conditional model, calibrated on one set of conditions and judged on others (issue #17).

    OMP_NUM_THREADS=1 python bench/conditional.py [--model gmm-cond] [--guidance 1,3] [--nfe 4,5,6,8,10]
                                                  [--pool 64] [--n 512] [--n-test 128]

``fewstep.tune`` at guidance w with a pool of ``--pool`` conditions (its first half calibrates, its second
half scores); then every NFE's winner and every baseline with every solver are scored on ``--n`` fresh
noises (seed 2) under conditions in no pool, against a fine teacher. Conditions: for ``gmm-cond`` (the exact
class-conditional mixture) condition vectors on the simplex, the held-out ones fresh (seed 7); for
``digits-cond`` (the shipped class-conditional network) the pool's first half is digits 0-4 and its second
half digits 5-9, and the held-out samples are digits 5-9: classes no optimizer saw. Prints the winner, the
best baseline, and the paired difference winner - best baseline with its standard error; and, from the tune's
report on its own test noises, the winner's lead over its best baseline in standard errors (z) and the share
of its mean error in its worst 5% of samples (tail5%).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

import fewstep
from fewstep.report import improvement_rows
from fewstep.schedules import BASELINES
from fewstep.tuning import baseline
from fewstep.zoo import digits_cond, gmm_cond, simplex_conditions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402


def digit_pool(n: int, digits: range, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"class_labels": torch.tensor(list(digits))[torch.randint(len(digits), (n,), generator=g)]}


MODELS = {  # name: (model at guidance w, the tune's pool of n, held-out conditions for n samples)
    "gmm-cond": (gmm_cond, lambda n: simplex_conditions(n, seed=3), lambda n: simplex_conditions(n, seed=7)),
    "digits-cond": (digits_cond,
                    lambda n: {"class_labels": torch.cat([digit_pool(n // 2, range(5), 3)["class_labels"],
                                                          digit_pool(n - n // 2, range(5, 10), 4)["class_labels"]])},
                    lambda n: digit_pool(n, range(5, 10), 7)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    numbers = lambda kind: lambda text: [kind(v) for v in text.split(",")]  # noqa: E731
    ap.add_argument("--model", choices=sorted(MODELS), default="gmm-cond")
    ap.add_argument("--guidance", type=numbers(float), default=[1.0, 3.0])
    ap.add_argument("--nfe", type=numbers(int), default=[4, 5, 6, 8, 10])
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=None, help="the tune's test noises (default: tune's, 128)")
    ap.add_argument("--calib", type=int, default=None, help="the tune's calibration noises (default: tune's, 32)")
    ap.add_argument("--optimizer-cells", action="store_true",
                    help="also every optimizer cell the tune made: its error here and on the tune's test noises")
    args = ap.parse_args()
    torch.set_num_threads(1)
    nfes = args.nfe
    print(describe())
    make, pool, held_out = MODELS[args.model]
    print(f"{args.model}; held out: {args.n} noises (seed 2) under conditions in no pool; tune pool {args.pool} "
          "(first half calibrates, second half scores)")
    print(f"{'w':>3} {'nfe':>3} | {'winner':22} {'error':>7} | {'best baseline':24} {'error':>7} | "
          f"{'diff':>8} {'+-se':>7} {'ratio':>6} | {'evals':>8} | {'z':>5} {'tail5%':>6}")
    for w in args.guidance:
        den, out = make(w), Path(tempfile.mkdtemp())
        summary = fewstep.tune(den, nfe=nfes, conds=pool(args.pool), outdir=out, progress=False, report=False,
                               n_test=args.n_test, n_calib=args.calib)
        x, c = fewstep.noise(args.n, den.shape, den.sigma_max, 2), held_out(args.n)
        ref = fewstep.Teacher(den, tol=1e-4, check_cond=c).solve(x, cond=c)
        sure = {r["nfe"]: r for r in improvement_rows(summary)}  # on the tune's own test noises
        for k in nfes:
            win, sched = summary["best"][str(k)]["winner"], fewstep.Schedule.load(out / "best" / f"nfe-{k}.json")
            e_win = fewstep.rmse(fewstep.sample(den, x, sched, cond=c), ref)
            base = min(((fewstep.rmse(fewstep.sample(den, x, baseline(b, s, k, summary["model"]), cond=c), ref), b, s)
                        for b in BASELINES for s in fewstep.solvers.PLANNED), key=lambda t: float(t[0].mean()))
            d = e_win - base[0]
            print(f"{w:3g} {k:3d} | {win['method'] + '+' + win['solver']:22} {e_win.mean():7.4f} | "
                  f"{base[1] + '+' + base[2]:24} {base[0].mean():7.4f} | {d.mean():+8.4f} {d.std() / math.sqrt(len(d)):7.4f} "
                  f"{e_win.mean() / base[0].mean():6.3f} | {summary['cost']['total']:8,} | "
                  f"{sure[k].get('z', math.nan):5.1f} {sure[k]['tail']:6.0%}", flush=True)
            if args.optimizer_cells:
                _optimizer_cells(summary, out, den, x, c, ref, k)


def _optimizer_cells(summary: dict, out: Path, den, x, c, ref, k: int) -> None:
    """Each optimizer cell the tune made at NFE ``k``: its error on the held-out noises and on the tune's own."""
    for cell in summary["cells"]:
        if cell["nfe"] == k and cell["status"] == "ok" and "schedule_file" in cell:
            sched = fewstep.load_schedule(out / "schedules" / cell["schedule_file"])
            e = fewstep.rmse(fewstep.sample(den, x, sched, cond=c), ref)
            print(f"      {cell['method'] + '+' + cell['solver']:22} {e.mean():7.4f} here, {cell['mean']:7.4f} on the "
                  f"tune's first {cell['n']} test noises", flush=True)


if __name__ == "__main__":
    main()
