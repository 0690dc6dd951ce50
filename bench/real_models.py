"""The shipped networks, held out: every built-in schedule and every optimizer at NFE 4-10 (issue 9).

For each shipped network (``digits-unet``, ``digits-flow``), ``fewstep.tune`` scores every (NFE, method,
solver) cell: schedules are optimized on calibration noises (seed 0) and evaluated on other noises
(seed 1) against the teacher (``fewstep.Teacher``: error-controlled DEIS, or the model's teacher_steps). Prints one row per (model, solver,
NFE): the mean held-out RMSE of each method, then the best method and its ratio to the best baseline;
then each optimizer's calibration seconds summed over its cells. A progress bar goes to stderr.

    OMP_NUM_THREADS=1 python bench/real_models.py [--models digits-unet,digits-flow] [--solvers dpmpp_2m,ipndm]
        [--nfe 4,5,6,8,10] [--n-calib 32] [--n-test 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fewstep
from fewstep.methods import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

BASELINES = ["karras", "logsnr_uniform", "time_uniform", "time_quadratic", "ays", "flow_uniform"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits-unet,digits-flow")
    p.add_argument("--solvers", default="dpmpp_2m,ipndm")
    p.add_argument("--nfe", default="4,5,6,8,10")
    p.add_argument("--methods", default=None, help="comma list; default: the baselines and every optimizer")
    p.add_argument("--n-calib", type=int, default=32, help="calibration batch (seed 0)")
    p.add_argument("--n-test", type=int, default=128, help="held-out batch (seed 1)")
    args = p.parse_args()
    torch.set_num_threads(1)
    methods = args.methods.split(",") if args.methods else BASELINES + sorted(METHODS)
    solvers, nfes = args.solvers.split(","), [int(v) for v in args.nfe.split(",")]
    print(describe())
    print(f"calibration n={args.n_calib} (seed 0), held-out n={args.n_test} (seed 1), teacher: each model's "
          "teacher_steps, else the error-controlled DEIS teacher (fewstep.Teacher); mean held-out RMSE to the teacher")
    head = f"{'model':12} {'solver':9} {'nfe':>3} | " + " ".join(f"{m[:10]:>10}" for m in methods)
    print(head + f" | {'best':>14} {'/base':>6}")
    for model in args.models.split(","):
        den = fewstep.load_model(model)
        start = time.perf_counter()
        res = fewstep.tune(den, nfe=nfes, methods=methods, solvers=solvers, n_calib=args.n_calib,
                           n_test=args.n_test, progress=True, report=False, model_id=model, exhaustive=True)
        cells = {(c["nfe"], c["method"], c["solver"]): c for c in res["cells"]}
        for solver in solvers:
            for k in nfes:
                ok = {m: cells[k, m, solver]["mean"] for m in methods if cells[k, m, solver]["status"] == "ok"}
                row = " ".join(f"{ok[m]:10.4f}" if m in ok else f"{'skip':>10}" for m in methods)
                best = min(ok, key=ok.get)
                base = min(ok[m] for m in BASELINES if m in ok)
                print(f"{model:12} {solver:9} {k:3d} | {row} | {best:>14} {ok[best] / base:6.3f}", flush=True)
        seconds = {m: sum(c.get("calib_seconds", 0.0) for c in res["cells"] if c["method"] == m) for m in methods}
        print(f"  {model} calibration seconds per method (all cells): "
              + ", ".join(f"{m} {v:.0f}" for m, v in seconds.items() if v > 0))
        skipped = [c for c in res["cells"] if c["status"] != "ok"]
        for c in skipped:
            print(f"  skipped {model} nfe {c['nfe']} {c['method']} {c['solver']}: {c['reason']}")
        print(f"  {model}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
