"""SDM held out, NFE x solver: optimize on seed-0 noises, evaluate on seed-1 noises against the teacher.

Per model, NFE and solver: the RMSE (mean and median over held-out samples) of SDM with the adaptive
solver (stored gate) and the step where its gate switches to the higher order; karras(rho=7) with the same
solver; karras(rho=7) with Heun and with Euler (the issue's baselines) and SDM's ratios to them; the
paired difference SDM - karras-Heun per held-out sample with its standard error (on the mixtures the mean
is decided by a few samples that end in another mode than the teacher's: use a large --n there); GITS and
OSS with the same solver at NFE <= --dp-max; SDM's calibration denoiser calls (batched; search, gate and
the teacher on the gate's noises, which is computed once per model and shared by later rows) and seconds.

    OMP_NUM_THREADS=1 python bench/sdm.py [--models gmm64,gmm2d,gmm-scales,digits] [--nfe 5,6,8,10,20,40]
        [--solvers heun,dpmpp_2m,unipc] [--n 1024] [--dp-max 10]
"""

import math
import sys
import time

from pathlib import Path


import fewstep
from fewstep.schedules import karras

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import arguments, begin, held_out  # noqa: E402


def main() -> None:
    ap = arguments("gmm64,gmm2d,gmm-scales,digits", 1024, 64, nfe="5,6,8,10,20,40", solvers="heun,dpmpp_2m,unipc")
    ap.add_argument("--dp-max", type=int, default=10, help="GITS and OSS columns up to this NFE (0: none)")
    args = begin(ap)
    print(f"{'model':10} {'nfe':>3} {'solver':8} | {'sdm':>7} {'median':>7} {'switch':>6} | {'K-same':>7} {'K-heun':>7} "
          f"{'K-euler':>7} | {'/K-same':>7} {'/K-heun':>7} {'/K-euler':>8} {'-K-heun':>8} {'+-se':>6} | "
          f"{'gits':>7} {'oss':>7} | {'calls':>5} {'sec':>5}")
    for name in args.models.split(","):
        den, _, xt, ref = held_out(name, args.n)
        calib_teacher = fewstep.Teacher(den, sigma_min=den.sigma_min)  # shared by the rows: calls counted once

        def ev(sched):  # per-sample RMSE to the teacher
            return fewstep.rmse(fewstep.sample(den, xt, sched), ref)

        def baseline(solver, nfe):
            steps, opts = fewstep.plan(solver, nfe)
            return ev(karras(steps, den.sigma_min, den.sigma_max).with_metadata(solver=solver, solver_options=opts))

        for nfe in [int(v) for v in args.nfe.split(",")]:
            k_heun, k_euler = baseline("heun", nfe), baseline("euler", nfe).mean()
            for solver in args.solvers.split(","):
                start = time.perf_counter()
                sched = fewstep.optimize(den, "sdm", solver, nfe, n=args.calib, teacher=calib_teacher)
                sec = time.perf_counter() - start
                r, k_same = ev(sched), baseline(solver, nfe).mean()
                dp = [ev(fewstep.optimize(den, m, solver, nfe, n=args.calib, teacher=calib_teacher)).mean()
                      if nfe <= args.dp_max else math.nan for m in ("gits", "oss")]
                diff, mean, kh = r - k_heun, r.mean(), k_heun.mean()
                print(f"{name:10} {nfe:3d} {solver:8} | {mean:7.4f} {r.median():7.4f} "
                      f"{str(sched.metadata['sdm'].get('switch', '-')):>6} | {k_same:7.4f} {kh:7.4f} {k_euler:7.4f} | "
                      f"{mean / k_same:7.2f} {mean / kh:7.2f} {mean / k_euler:8.2f} {diff.mean():8.4f} "
                      f"{diff.std() / math.sqrt(len(diff)):6.4f} | {dp[0]:7.4f} {dp[1]:7.4f} | "
                      f"{sched.metadata['provenance']['evaluations']['total']:5d} {sec:5.1f}", flush=True)


if __name__ == "__main__":
    main()
