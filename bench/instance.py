"""Held-out RMSE of karras rho=7, GITS, OSS, LD3 and the instance-aware policies (global: LD3 with global
corrections and no per-sample part; route, residual, auto; auto without the corrections); phi's overhead.

Optimizers see seed-0 noises (the calibration batch); errors are on seed-1 noises, against the teacher.
    OMP_NUM_THREADS=1 python bench/instance.py [--models gmm2d gmm64 gmm-scales] [--solvers euler ipndm] [--nfe 3 4 5]
The checks (instance < ld3 < karras, instance < best DP) are for the default policy (``instance.POLICY``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import fewstep
from fewstep.noises import CALIB_SEED, TEST_SEED
from fewstep.zoo import BUILTIN_MODELS
from fewstep.methods import METHODS
from fewstep.methods.instance import POLICY
from overhead import cpu_name  # bench/overhead.py, next to this script


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"


def timed(fn, repeat: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gmm2d", "gmm64"], choices=list(BUILTIN_MODELS))
    ap.add_argument("--solvers", nargs="+", default=["euler", "ipndm"])
    ap.add_argument("--nfe", nargs="+", type=int, default=[3, 4, 5])
    ap.add_argument("--n-calib", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    print("ld3 s and calls: the optimization after the OSS method's (its start, reused); calls = denoiser calls "
          "on a batch (teacher excluded); instance phi: phi's training only (the global stage is ld3's, reused), "
          f"for the default policy ({POLICY}); k: the route policy's clusters (- : gated back to ld3)")
    print(f"calibration: {args.n_calib} noises (seed {CALIB_SEED}, half train / half validation); "
          f"held-out: {args.n_test} noises (seed {TEST_SEED}); mean per-sample RMSE to the teacher\n")
    others = [m for m in ("gits", "oss") if m in METHODS]
    policies = ["global", "route", "residual", "auto"]
    cols = ["karras", *others, "ld3", *policies, "auto no corr"]
    print(f"| model | solver | NFE | {' | '.join(cols)} | instance < ld3 < karras | instance < best DP "
          f"| k | oss s | ld3 s (calls) | instance phi s (calls) |")
    print("|" + "---|" * (len(cols) + 8))
    overhead = {}
    for name in args.models:
        den = fewstep.load_model(name)
        teacher = fewstep.Teacher(den, sigma_min=den.sigma_min, model_id=name)
        calib = fewstep.noise(args.n_calib, den.shape, den.sigma_max, CALIB_SEED)
        test = fewstep.noise(args.n_test, den.shape, den.sigma_max, TEST_SEED)

        def err(sched, solver):
            return fewstep.evaluate(den, sched, solver, x=test, teacher=teacher, distribution=False)["mean"]

        for solver in args.solvers:
            for nfe in args.nfe:
                steps, _ = fewstep.plan(solver, nfe)
                res = {"karras": err(fewstep.schedules.karras(steps, den.sigma_min, den.sigma_max), solver)}
                seconds = {}
                for m in others:
                    start = time.perf_counter()
                    res[m] = err(fewstep.optimize(den, m, solver, nfe, calib=calib, teacher=teacher), solver)
                    seconds[m] = time.perf_counter() - start
                # as in tune: ld3 (its OSS start is the oss result above, from fewstep.methods's memo),
                # then instance, whose global stage is ld3's memoized result
                ld3 = fewstep.optimize(den, "ld3", solver, nfe, calib=calib, teacher=teacher)
                res["ld3"] = err(ld3, solver)
                pols = {p: fewstep.optimize(den, "instance", solver, nfe, calib=calib, teacher=teacher, policy=p)
                        for p in policies}
                res.update({p: err(pol, solver) for p, pol in pols.items()})
                res["auto no corr"] = err(fewstep.optimize(den, "instance", solver, nfe, calib=calib, teacher=teacher,
                                                           corrections=False), solver)
                pol = pols[POLICY]
                tl, tr = ld3.metadata["training"], pol.metadata["training"]
                assert tr["ld3_reused"], "instance did not reuse the ld3 result"
                order = res[POLICY] < res["ld3"] < res["karras"]
                dp = res[POLICY] < min((res[m] for m in others), default=float("inf"))
                route = pols["route"].metadata["training"]
                print(f"| {name} | {solver} | {nfe} | " + " | ".join(f"{res[c]:.4f}" for c in cols)
                      + f" | {'yes' if order else 'NO'} | {'yes' if dp else 'NO' if others else 'n/a'}"
                      f" | {route['clusters'] if route['phi_kept'] else '-'} | {seconds.get('oss', float('nan')):.1f} | {tl['seconds']:.1f} ({tl['student_calls']})"
                      f" | {tr['seconds']:.1f} ({tr['student_calls']}) |", flush=True)
        t_phi = timed(lambda: pol.plan_for(test))  # what fewstep.sample runs: sigmas and corrections
        t_den = timed(lambda: den(test, torch.full((test.shape[0],), 1.0, dtype=torch.float64)))
        overhead[name] = (t_phi, t_den)
    print(f"\nphi's overhead at sampling time (batch {args.n_test}, one phi pass per batch vs one denoiser call):")
    print("| model | phi ms | denoiser call ms | phi / denoiser call |")
    print("|---|---|---|---|")
    for name, (t_phi, t_den) in overhead.items():
        print(f"| {name} | {1e3 * t_phi:.3f} | {1e3 * t_den:.3f} | {t_phi / t_den:.3f} |")


if __name__ == "__main__":
    main()
