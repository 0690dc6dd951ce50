"""Does s4s's gate (its validation gain over its start, in standard errors) see what holds held out?

    OMP_NUM_THREADS=1 python bench/s4s_gate.py [--model gmm64] [--nfe 4,10] [--solvers unipc,dpmpp_3m,dpmpp_2m]

Per NFE and solver: ``fewstep.optimize(model, "s4s", solver, nfe)`` with the tune's options (32 calibration
noises, seed 0: 16 train, 16 validation) and the same with ``gate=inf`` (its start). Printed: the gate's z on
the validation noises, the mean per-sample RMSE (the gate's loss) of start and learned solver on 512 held-out
noises (seed 2, error-controlled teacher) with the paired z there, and the share of 32 fresh sets of 16 of those
noises on which the gate (z >= 1) would pass: a gate on noises that early stopping did not see, as often as
that share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fewstep
from fewstep.methods import METHODS
from fewstep.metrics import significance

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402
from s4s_solvers import setup  # noqa: E402

TUNE = {**METHODS["s4s"].tune, "n": 32, "fallback": 0}  # the tune's options: one solver, no fallback


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm64")
    ap.add_argument("--nfe", default="4,10")
    ap.add_argument("--solvers", default="unipc,dpmpp_3m,dpmpp_2m")
    args = ap.parse_args()
    den, teacher, x, ref = setup(args.model)
    error = lambda s: fewstep.rmse(fewstep.sample(den, x, s), ref)  # noqa: E731
    print(f"{describe()}\n{args.model}\n| NFE | solver | gate z (validation) | held out: start | learned | z | "
          "fresh 16-noise gates passing |\n|---|---|---|---|---|---|---|")
    for k in (int(v) for v in args.nfe.split(",")):
        for solver in args.solvers.split(","):
            learned = fewstep.optimize(den, "s4s", solver, k, teacher=teacher, **TUNE)
            start = fewstep.optimize(den, "s4s", solver, k, teacher=teacher, gate=float("inf"), **TUNE)
            e_learned, e_start = error(learned), error(start)
            gain = e_start - e_learned
            passing = sum(significance(gain[i:i + 16]) >= 1 for i in range(0, len(gain), 16)) / (len(gain) // 16)
            print(f"| {k} | {solver} | {learned.metadata['training'].get('gate_z')} | {float(e_start.mean()):.4f} | "
                  f"{float(e_learned.mean()):.4f} | {significance(gain):.2f} | {passing:.2f} |", flush=True)


if __name__ == "__main__":
    main()
