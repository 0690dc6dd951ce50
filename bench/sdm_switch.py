"""SDM's gate switch, candidate by candidate: what the calibration batch sees against what happens held out.

For Heun at a given NFE, every step count N spends exactly NFE calls with one switch j (order 1 on steps
< j and on the last step, order 2 between). Per candidate, on SDM's resampled N-step schedule:
- the calibration batch (seed 0): mean, RMS and max over samples of the RMSE to the teacher;
- ``bound``: the sum over steps of the local W2 error of each step at its order, started from the
  teacher's state (the triangle-inequality bound of the final error with non-expansive propagation,
  the error model SDM's timesteps use);
- held out (seed 1): mean RMSE, samples with RMSE > 0.3 (``far``: ended in another mode than the
  teacher's, on the mixtures), and the paired difference to karras(rho=7) Heun with its standard error.
``*`` marks the candidate ``fewstep.optimize(method="sdm")`` picks (lowest calibration mean among the
switches a threshold tau can make).

    OMP_NUM_THREADS=1 python bench/sdm_switch.py [--models gmm64] [--nfe 10,20,40] [--n 2048]
"""

import math
import sys

from pathlib import Path

import torch

import fewstep
from fewstep.methods import sdm
from fewstep.sampling import CheckedDenoiser
from fewstep.schedules import Schedule, karras

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import arguments, begin, held_out  # noqa: E402


def local_errors(den, teacher, x, sigmas, orders):
    """Per step but the last (to 0): batch RMS of the RMSE between one step of its order from the
    teacher's state and the teacher's next state."""
    traj = teacher.trajectory(x, sigmas[:-1], substeps=16)
    out = []
    for i in range(len(sigmas) - 2):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        d = (traj[i] - den(traj[i], torch.full((x.shape[0],), s, dtype=torch.float64))) / s
        x_next = traj[i] + (t - s) * d
        if orders[i] == 2:  # Heun: trapezoid with the drift at the Euler point
            d_next = (x_next - den(x_next, torch.full((x.shape[0],), t, dtype=torch.float64))) / t
            x_next = traj[i] + (t - s) * (d + d_next) / 2
        out.append(float(fewstep.rmse(x_next, traj[i + 1]).square().mean().sqrt()))
    return out


def main() -> None:
    ap = arguments("gmm64", 2048, 64, nfe="10,20,40")
    args = begin(ap)
    print(f"{'model':7} {'nfe':>3} {'N':>3} {'j':>3} | {'cal-mean':>8} {'cal-rms':>7} {'cal-max':>7} {'bound':>7} | "
          f"{'held':>7} {'far':>4} {'-K-heun':>8} {'+-se':>6}")
    for name in args.models.split(","):
        den, teacher, xt, ref = held_out(name, args.n)
        xc = fewstep.noise(args.calib, den.shape, den.sigma_max, 0)
        ref_c = teacher.solve(xc, sigma_max=den.sigma_max)
        path, etas, _ = sdm.search(CheckedDenoiser(den), xc, den.sigma_min, den.sigma_max)
        for nfe in [int(v) for v in args.nfe.split(",")]:
            steps, opts = fewstep.plan("heun", nfe)
            k_heun = fewstep.rmse(fewstep.sample(den, xt, karras(steps, den.sigma_min, den.sigma_max), "heun", **opts),
                                  ref)
            chosen = fewstep.optimize(den, "sdm", "heun", nfe, calib=xc, teacher=teacher)
            for n_steps in range((nfe + 2) // 2, nfe + 1):
                j = 2 * n_steps - 1 - nfe if n_steps < nfe else n_steps  # the one switch spending nfe calls
                orders = [1] * j + [2] * (n_steps - 1 - j) + [1] * (j < n_steps)
                sigmas = sdm.resample(path, etas, n_steps)
                assert fewstep.nfe(Schedule(sigmas), "heun", orders=orders) == nfe
                cal = fewstep.rmse(fewstep.sample(den, xc, Schedule(sigmas), "heun", orders=orders), ref_c)
                held = fewstep.rmse(fewstep.sample(den, xt, Schedule(sigmas), "heun", orders=orders), ref)
                diff = held - k_heun
                mark = "*" if torch.equal(chosen.sigmas, sigmas) and chosen.solver_options["orders"] == orders else " "
                print(f"{name:7} {nfe:3d} {n_steps:3d} {j:3d}{mark}| {cal.mean():8.4f} {cal.square().mean().sqrt():7.4f} "
                      f"{cal.max():7.4f} {sum(local_errors(den, teacher, xc, sigmas, orders)):7.4f} | {held.mean():7.4f} "
                      f"{int((held > 0.3).sum()):4d} {diff.mean():8.4f} {diff.std() / math.sqrt(len(diff)):6.4f}",
                      flush=True)
            print(f"{name:7} {nfe:3d} karras-heun {k_heun.mean():.4f}, far {int((k_heun > 0.3).sum())}", flush=True)


if __name__ == "__main__":
    main()
