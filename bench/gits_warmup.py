"""Where GITS loses with few warm-up noises: its cost matrix or its choice among (coeff, p) (issue #16).

    OMP_NUM_THREADS=1 python bench/gits_warmup.py [--model gmm2d] [--solver unipc] [--nfe 8] [--seeds 0,1,5]

For each setting (W trajectories build the cost matrix, the first S of them judge the candidates, a G-point
grid, a teacher of T steps: T = G - 1 is one step per grid interval, the reference's teacher): GITS's DP for
every automatic (coeff, p), the candidate with the least error on the S noises kept; printed: its mean RMSE
on 512 held-out noises (seed 2) against an error-controlled teacher, the best of all the candidates held out
(what a perfect choice would give), and the evaluations (teacher and candidates, rows), per calibration seed
(128 noises of that seed).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import torch

import fewstep
from fewstep.methods import _calibration, gits
from fewstep.methods.dp import Counter
from fewstep.sampling import sample
from fewstep.schedules import Schedule
from fewstep.solvers import plan
from fewstep.teacher import Teacher

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

SETTINGS = ((16, 16, 80, 79), (128, 16, 80, 79), (16, 128, 80, 79), (128, 128, 80, 79),  # (W, S, G, T)
            (128, 16, 40, 39), (64, 16, 40, 39), (48, 16, 40, 39), (128, 16, 20, 19), (128, 16, 20, 38))


def run(den, solver: str, nfe: int, seed: int, w: int, s: int, size: int, steps: int, held_out) -> tuple:
    teacher = Teacher(den, steps=steps, grid=size, shape=den.shape)
    ctx, _ = _calibration(den, None, None, 128, seed, None, None, teacher, False)
    k, sopts = plan(solver, nfe)
    sig = gits.candidate_grid(ctx.sigma_min, ctx.sigma_max, size)
    model = Counter(ctx.denoiser)
    traj, den_out, final, weight = gits._on_teacher(ctx.subset(slice(None, w)), sig, None)
    level_cost = gits._level_costs(model, solver, sopts.get("orders"), k, 0, traj, den_out, sig)
    judge = ctx.subset(slice(None, s))
    y = judge.target()
    found = {}
    for c, p in itertools.product(gits.AUTO_COEFFS, gits.AUTO_PROPAGATION):
        path = tuple(gits._dp(k, size, c, weight ** p, final, level_cost))
        if path not in found:
            sched = Schedule(sig[list(path)], solver=solver, solver_options=sopts)
            found[path] = (float(fewstep.rmse(sample(model, judge.x, sched), y).mean()), sched)
    chosen = min(found.values(), key=lambda t: t[0])[1]
    return held_out(chosen), min(held_out(sc) for _, sc in found.values()), teacher.rows + model.samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm2d")
    ap.add_argument("--solver", default="unipc")
    ap.add_argument("--nfe", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,5")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    den = fewstep.load_model(args.model)
    x = fewstep.noise(512, den.shape, den.sigma_max, 2)
    ref = fewstep.Teacher(den, shape=den.shape).solve(x)

    def held_out(sched: Schedule) -> float:
        return float(fewstep.rmse(fewstep.sample(den, x, sched), ref).mean())

    print(describe())
    print(f"{args.model}, {args.solver}, NFE {args.nfe}; per seed: held-out error of the choice / of the best "
          "candidate (evaluations)\n| W | S | G | T | " + " | ".join(f"seed {v}" for v in args.seeds.split(","))
          + " |\n|---|---|---|---|" + "---|" * len(args.seeds.split(",")))
    for w, s, size, steps in SETTINGS:
        cells = [run(den, args.solver, args.nfe, int(seed), w, s, size, steps, held_out) for seed in args.seeds.split(",")]
        print(f"| {w} | {s} | {size} | {steps} | " + " | ".join(f"{a:.4f} / {b:.4f} ({e:,})" for a, b, e in cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
