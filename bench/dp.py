"""GITS and OSS against the karras (rho = 7) and logSNR-uniform baselines, held out.

Schedules are optimized on calibration noises (seed 0) and evaluated on other noises (seed 1) against
the core teacher (512 Heun steps). Every optimize call builds its own teacher, so the seconds and calls
include the teacher on the grid. Prints model x solver x NFE x method: mean RMSE, ratio to the better
baseline, calibration seconds, denoiser calls (batched), the method's own per-sample evaluations and, for
GITS, the coeff and propagation exponent it chose.

    OMP_NUM_THREADS=1 python bench/dp.py [--models gmm64,gmm2d,digits] [--solvers ...] [--nfe 4,5,6,8,10]
        [--methods gits,oss] [--n 64] [--eval-n 256] [--grid 80]
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

import torch

import fewstep
from fewstep import schedules

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402


def _choice(prov: dict) -> str:
    """GITS's automatic choice of coeff and propagation exponent (empty for other methods)."""
    return f"coeff {prov['coeff']:g}, propagation {prov['propagation']:g}" if "coeff" in prov else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gmm64,gmm2d,digits")
    p.add_argument("--solvers", default="dpmpp_2m,ipndm,euler")
    p.add_argument("--nfe", default="4,5,6,8,10")
    p.add_argument("--methods", default="gits,oss")
    p.add_argument("--n", type=int, default=64, help="calibration batch (seed 0)")
    p.add_argument("--eval-n", type=int, default=256, help="held-out batch (seed 1)")
    p.add_argument("--grid", type=int, default=80)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# {describe()}; calib n={args.n} (seed 0), eval n={args.eval_n} (seed 1), grid {args.grid}")
    print(f"{'model':7s} {'solver':9s} {'nfe':>3s} {'method':6s} {'rmse':>8s} {'ratio':>6s} {'base':>8s} "
          f"{'seconds':>7s} {'calls':>6s} {'evals':>8s}  choice")
    wins = total = 0
    for model in args.models.split(","):
        den = fewstep.load_model(model)
        teacher = fewstep.Teacher(den, sigma_min=den.sigma_min)
        x = fewstep.noise(args.eval_n, den.shape, den.sigma_max, seed=1)
        for solver in args.solvers.split(","):
            for nfe in map(int, args.nfe.split(",")):
                steps, opts = fewstep.plan(solver, nfe)
                base = min(fewstep.evaluate(den, schedules.builtin(b, steps, den.sigma_min, den.sigma_max)
                                            .with_metadata(solver_options=opts), solver, x=x, teacher=teacher,
                                            distribution=False)["mean"] for b in ("karras", "logsnr_uniform"))
                for method in args.methods.split(","):
                    s = fewstep.optimize(den, method, solver, nfe, n=args.n, seed=0, grid=args.grid)
                    err = fewstep.evaluate(den, s, x=x, teacher=teacher, distribution=False)["mean"]
                    prov = s.metadata["provenance"]
                    wins, total = wins + (err < base), total + 1
                    print(f"{model:7s} {solver:9s} {nfe:3d} {method:6s} {err:8.4f} {err / base:6.3f} {base:8.4f} "
                          f"{prov['seconds']:7.1f} {prov['evaluations']['total']:6d} {prov['candidate_rows']:8d}  "
                          f"{_choice(prov)}", flush=True)
    print(f"# {wins}/{total} below the better baseline")


if __name__ == "__main__":
    main()
