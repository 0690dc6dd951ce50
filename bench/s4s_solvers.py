"""Which one-call solver s4s learns best on: s4s from the AFS start on each of them (docs/methods/s4s.md).

    OMP_NUM_THREADS=1 python bench/s4s_solvers.py [--model digits-unet] [--nfe 5,6] [--iters 60 | --iters 18,60] [--lr 0.1]

Per NFE and solver: ``fewstep.optimize(model, "s4s", solver, nfe, afs=True, gate=-inf)`` on 32 calibration
noises (seed 0), ``iters`` training steps (the tune's 60, no early stop), what it returns whatever its gain;
printed: the AFS start's validation error, the learned solver's best validation error, and its mean RMSE on 512
held-out noises (seed 2) against an error-controlled teacher. With several ``--iters`` (a screen's length and
the full run's), those two per length: does a short run rank the solvers as the full one does? With several
``--lr``, one row per learning rate (AdamW's, on every parameter; s4s's default 0.1).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from pathlib import Path

import torch

import fewstep
from fewstep.solvers import PLANNED, SOLVERS

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402


def setup(model: str) -> tuple:
    """One torch thread, warnings off; the model, the calibration teacher, 512 held-out noises (seed 2) and an
    error-controlled teacher's answers for them."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    den = fewstep.load_model(model)
    x = fewstep.noise(512, den.shape, den.sigma_max, 2)
    return den, fewstep.Teacher(den, shape=den.shape), x, fewstep.Teacher(den, shape=den.shape).solve(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-unet")
    ap.add_argument("--nfe", default="5,6")
    ap.add_argument("--iters", default="60", help="training steps; a comma list runs each length")
    ap.add_argument("--lr", default="0.1", help="learning rate; a comma list runs each")
    args = ap.parse_args()
    den, teacher, x, ref = setup(args.model)
    print(describe())
    lengths = [int(v) for v in args.iters.split(",")]
    cols = "".join(f" {n} steps: validation | held out |" for n in lengths)
    print(f"{args.model}; s4s from the AFS start\n| NFE | solver | lr | start (validation) |{cols}")
    print("|---" * (4 + 2 * len(lengths)) + "|")
    for k in (int(v) for v in args.nfe.split(",")):
        one_call = [s for s in PLANNED if SOLVERS[s].calls_per_step == 1]
        for solver, lr in itertools.product(one_call, [float(v) for v in args.lr.split(",")]):
            line = f"| {k} | {solver} | {lr:g} |"
            for n in lengths:
                s = fewstep.optimize(den, "s4s", solver, k, n=32, teacher=teacher, oss_grid=40, iters=n,
                                     patience=n, afs=True, gate=-float("inf"), lr=lr)
                tr = s.metadata["training"]
                e = float(fewstep.rmse(fewstep.sample(den, x, s), ref).mean())
                if n == lengths[0]:
                    line += f" {tr['tried'][0]['valid_init']:.4f} |"
                line += f" {tr['valid_kept']:.4f} | {e:.4f} |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
