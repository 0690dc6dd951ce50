"""SDM as the reference implementation configures it, next to fewstep's default SDM, held out.

The reference (aiimaginglab/sdm, its FFHQ/AFHQv2 scripts) builds an N-step schedule with whole-sample
L2 norms, the batch mean of the secants, eta 0.02 / 0.20, p = 1, grid = N points, resampling power 0.5,
q = 0.25, then samples with its online gate (Euler until kappa >= tau, then Heun, last step Euler),
which spends N + (Heun steps) calls, known only afterwards. Emulated here with fewstep's options
(``norm="l2", batch="mean"``; ``fewstep.methods.sdm.sample_adaptive`` for the online gate) and
tau = 1e-4 and 1e-3 (its scripts' range). The held-out batch is gated as one batch. fewstep's default
SDM (stored gate) and karras(rho=7) Heun are then run at the NFE the reference actually spent.
Columns: held-out RMSE to the teacher (mean over n), and the paired difference fewstep - reference
with its standard error (negative: fewstep better).

    OMP_NUM_THREADS=1 python bench/sdm_reference.py [--models gmm64,gmm2d,digits] [--steps 5,10,20] [--n 1024]
"""

import math
import sys

from pathlib import Path


import fewstep
from fewstep.methods.sdm import sample_adaptive
from fewstep.schedules import karras

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import arguments, begin, held_out  # noqa: E402

REFERENCE = dict(norm="l2", batch="mean", eta_min=0.02, eta_max=0.20, eta_p=1.0, power=0.5, q=0.25, gate=False)


def main() -> None:
    ap = arguments("gmm64,gmm2d,digits", 1024, 64, steps="5,10,20", taus="1e-4,1e-3")  # steps: the reference's N
    args = begin(ap)
    print(f"{'model':7} {'N':>3} {'tau':>7} | {'nfe':>3} {'reference':>9} | {'fewstep':>8} {'diff':>8} {'+-se':>7} | "
          f"{'K-heun':>7}")
    for name in args.models.split(","):
        den, teacher, xt, ref = held_out(name, args.n)
        for steps in [int(v) for v in args.steps.split(",")]:
            sched = fewstep.optimize(den, "sdm", "euler", steps, n=args.calib, grid_points=steps, **REFERENCE)
            for tau in [float(v) for v in args.taus.split(",")]:
                out, calls = sample_adaptive(den, xt, sched, solver="heun", tau=tau)
                e_ref = fewstep.rmse(out, ref)
                ours = fewstep.optimize(den, "sdm", "heun", calls, n=args.calib, teacher=teacher)
                e_ours = fewstep.rmse(fewstep.sample(den, xt, ours), ref)
                k_steps, k_opts = fewstep.plan("heun", calls)
                k_sched = karras(k_steps, den.sigma_min, den.sigma_max)
                e_k = fewstep.rmse(fewstep.sample(den, xt, k_sched, "heun", **k_opts), ref)
                diff = e_ours - e_ref
                print(f"{name:7} {steps:3d} {tau:7.0e} | {calls:3d} {e_ref.mean():9.4f} | {e_ours.mean():8.4f} "
                      f"{diff.mean():8.4f} {diff.std() / math.sqrt(len(diff)):7.4f} | {e_k.mean():7.4f}", flush=True)


if __name__ == "__main__":
    main()
