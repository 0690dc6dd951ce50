"""How much a per-sample schedule could gain at 3 steps, and how much of it depends on the data mode.

For a GaussianMixture and a solver at 3 steps (two free sigmas): every schedule on a 48 x 48 grid of
(sigma_1, sigma_2) is run on 256 held-out noises (seed 1). Printed: the best global grid schedule,
the per-sample oracle (each sample its own best grid schedule), and per data mode (the mode nearest to
the teacher's endpoint) the mode's best schedule, chosen on these samples and so an upper bound of
what a mode-routed policy can reach. Then the OSS schedule per mode calibrated on 512 other noises
(seed 0), evaluated held out: what routing by mode gives in practice.

    OMP_NUM_THREADS=1 python bench/instance_oracle.py [--model gmm-scales] [--solver euler]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fewstep
from fewstep.metrics import rmse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm-scales")
    ap.add_argument("--solver", default="euler")
    args = ap.parse_args()
    torch.set_num_threads(1)
    den = fewstep.load_model(args.model)
    teacher = fewstep.Teacher(den, sigma_min=den.sigma_min)
    x = fewstep.noise(256, den.shape, den.sigma_max, 1)
    y = teacher.solve(x)
    mode = torch.cdist(y.flatten(1), den.means).argmin(1)
    grid_1 = torch.logspace(-1.5, 1.7, 48, dtype=torch.float64)
    grid_2 = torch.logspace(-2.7, 1.0, 48, dtype=torch.float64)
    pairs = [(float(a), float(b)) for a in grid_1 for b in grid_2 if b < a]
    err = torch.stack([rmse(fewstep.sample(den, x, torch.tensor([den.sigma_max, a, b, 0.0], dtype=torch.float64),
                                           args.solver), y) for a, b in pairs])  # [schedules, samples]
    best = int(err.mean(1).argmin())
    print(f"{describe()}\n{args.model}, {args.solver}, 3 steps, 256 held-out samples (seed 1); mean RMSE to the teacher")
    print(f"best global grid schedule {pairs[best]}: {float(err[best].mean()):.4f}; "
          f"per-sample oracle: {float(err.min(0).values.mean()):.4f}")
    routed = torch.zeros_like(err[0])
    calib = fewstep.noise(512, den.shape, den.sigma_max, 0)
    calib_mode = torch.cdist(teacher.solve(calib).flatten(1), den.means).argmin(1)
    glob_oss = fewstep.optimize(den, "oss", args.solver, 3, calib=calib, teacher=teacher)
    e_glob = rmse(fewstep.sample(den, x, glob_oss), y)
    print("| mode | samples | global grid best | mode's grid best (in-sample) | per-sample oracle | global OSS | mode's OSS (held out) |")
    print("|---|---|---|---|---|---|---|")
    for k in range(den.means.shape[0]):
        i = mode == k
        own = int(err[:, i].mean(1).argmin())
        oss_k = fewstep.optimize(den, "oss", args.solver, 3, calib=calib[calib_mode == k], teacher=teacher)
        routed[i] = rmse(fewstep.sample(den, x[i], oss_k), y[i])
        print(f"| {k} | {int(i.sum())} | {float(err[best, i].mean()):.4f} | {float(err[own, i].mean()):.4f} "
              f"{tuple(round(v, 3) for v in pairs[own])} | {float(err[:, i].min(0).values.mean()):.4f} "
              f"| {float(e_glob[i].mean()):.4f} | {float(routed[i].mean()):.4f} |")
    print(f"all modes: global OSS {float(e_glob.mean()):.4f}, OSS per mode routed by the true mode {float(routed.mean()):.4f}")


if __name__ == "__main__":
    main()
