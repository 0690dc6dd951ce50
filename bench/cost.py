"""What a tune costs in network evaluations, and what it finds (issue #16).

    OMP_NUM_THREADS=1 python bench/cost.py run --out runs/default [--model digits-unet] [-- tune args]
    OMP_NUM_THREADS=1 python bench/cost.py compare runs/exhaustive runs/default [--n 1024]

``run`` wraps the model in a row counter (one row = one sample through the network: a batched call of
128 rows is 128) and calls ``fewstep.tune`` with the given keyword arguments (JSON after ``--kw``); it
writes ``cost.json`` beside the results: the evaluations the counter saw, wall seconds, the machine.
It uses only ``fewstep.load_model`` and ``fewstep.tune``, so it also measures older fewstep versions
(run it with PYTHONPATH pointing at their ``src``). ``compare`` re-scores each run's winner per NFE
(``best/nfe-<N>.json``) on a separate set of noises (seed 2) against a fine teacher, with paired
intervals against the first run's winner.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import fewstep

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402


class Rows:
    """The model with a count of the rows it evaluates; its facts (shape, range, name) passed through."""

    def __init__(self, den):
        self.den, self.rows = den, 0
        for attr in ("shape", "sigma_min", "sigma_max", "name", "teacher_steps"):
            if hasattr(den, attr):
                setattr(self, attr, getattr(den, attr))

    def __call__(self, x, sigma):
        self.rows += x.shape[0]
        return self.den(x, sigma)


def run(args) -> None:
    den = Rows(fewstep.load_model(args.model))
    kw = json.loads(args.kw) if args.kw else {}
    start = time.perf_counter()
    summary = fewstep.tune(den, outdir=args.out, progress=False, **kw)
    seconds = time.perf_counter() - start
    record = {"model": args.model, "kwargs": kw, "evaluations": den.rows, "seconds": round(seconds, 1),
              "fewstep": getattr(fewstep, "__version__", "?"), "machine": describe(),
              "reported": summary.get("cost")}
    (Path(args.out) / "cost.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


def _winner(folder: Path, k: str):
    return fewstep.Schedule.load(folder / "best" / f"nfe-{k}.json")


def compare(args) -> None:
    den = fewstep.load_model(args.model)
    x = fewstep.noise(args.n, den.shape, den.sigma_max, 2)
    ref = fewstep.Teacher(den, steps=args.teacher_steps).solve(x, sigma_max=den.sigma_max)
    runs = [Path(r) for r in args.runs]
    costs = [json.loads((r / "cost.json").read_text()) for r in runs]
    print(describe())
    print(f"held out: n={args.n} (seed 2), teacher {args.teacher_steps}-step Heun")
    print("run: " + " | ".join(f"{r.name}: {c['evaluations']:,} evaluations, {c['seconds']:.0f} s" for r, c in zip(runs, costs)))
    nfes = sorted({p.stem.split("-")[1] for p in (runs[0] / "best").glob("nfe-*.json") if p.stem.count("-") == 1}, key=int)
    for k in nfes:
        base = fewstep.rmse(fewstep.sample(den, x, _winner(runs[0], k)), ref)
        line = f"NFE {k:>2}: {runs[0].name} {base.mean():.4f}"
        for r in runs[1:]:
            sched = _winner(r, k)
            e = fewstep.rmse(fewstep.sample(den, x, sched), ref)
            d = e - base
            line += (f" | {r.name} {sched.metadata.get('method')}+{sched.solver} {e.mean():.4f} "
                     f"(ratio {e.mean() / base.mean():.3f}, diff {d.mean():+.4f} +- {d.std() / math.sqrt(len(d)):.4f})")
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--model", default="digits-unet")
    r.add_argument("--kw", help="fewstep.tune keyword arguments as JSON, e.g. '{\"budget\": 20000}'")
    c = sub.add_parser("compare")
    c.add_argument("runs", nargs="+")
    c.add_argument("--model", default="digits-unet")
    c.add_argument("--n", type=int, default=1024)
    c.add_argument("--teacher-steps", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    main()
