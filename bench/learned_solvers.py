"""Learned-coefficient solvers (s4s, pas; docs/methods/s4s.md, pas.md) against the best of today's methods.

Part 1, per model and NFE: ``fewstep.tune`` (every method x every planned solver, tune's own settings and
sizes: its race on 128 test noises of seed 1) on ``--calib`` calibration noises (seed 0); every cell it made
is then sampled on ``--n`` held-out noises (seed 2, seen by nothing before); "today" is the cell with the
lowest mean on their first half of every cell whose method is not new (the built-in schedules, gits, oss,
sdm, ld3, instance, any solver), "new" the lowest of the s4s and pas cells; both are measured on the second
half (chosen and measured on the same noises, the best of some 60 cells would look better than it is). The
ratio new / today has a 95% interval from a paired bootstrap over the second half's noises (both cells'
per-sample errors, 2000 resamples). Target: at most 0.75 at NFE <= 5, at most 1 above.
Part 2, per model: s4s and pas with 1 and 8 calibration noises (the first of seed 0) against their own
start (the same call with gate=inf: what they return when nothing passes), held out, the ratio's interval.

    OMP_NUM_THREADS=1 python bench/learned_solvers.py [--models gmm2d,...] [--nfe 3,4,...] [--calib 32] [--n 512] [--robust_nfe 3,5]
                                                      [--options '{"s4s": {"iters": 200}}']  (the tune's method_options)

A rerun with the same settings resumes each model's tune from ``--out``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch

import fewstep
from fewstep.models.info import fingerprint, model_info
from fewstep.noises import CALIB_SEED
from fewstep.schedules import BUILTIN_SCHEDULES
from fewstep.tuning import baseline

from heldout import arguments, begin

NEW = ("s4s", "pas")
HELD_OUT_SEED = 2  # neither calibration (0) nor the tune's test noises (1)


def ratio_interval(new: torch.Tensor, old: torch.Tensor, resamples: int = 2000) -> tuple[float, float, float]:
    """mean(new) / mean(old) and its 95% paired-bootstrap interval over the noises."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(new), (resamples, len(new)), generator=g)
    r = (new[idx].mean(1) / old[idx].mean(1)).sort().values
    return float(new.mean() / old.mean()), float(r[int(0.025 * resamples)]), float(r[int(0.975 * resamples)])


def per_sample(run: dict, cell: dict) -> torch.Tensor:
    """The cell's per-sample held-out errors, its schedule rebuilt (a baseline) or loaded (tune's file)."""
    if cell["method"] in BUILTIN_SCHEDULES:
        sched = baseline(cell["method"], cell["solver"], cell["nfe"], run["info"])
    else:
        sched = fewstep.load_schedule(run["out"] / "schedules" / cell["schedule_file"])
    return fewstep.rmse(fewstep.sample(run["den"], run["x"], sched), run["ref"])


def tuned(name: str, args, out: Path) -> dict:
    """tune for one model (resumed from ``out``), with its held-out noises and the teacher's answers."""
    den = fewstep.load_model(name)
    info = model_info(den)
    start = time.perf_counter()
    summary = fewstep.tune(den, nfe=args.nfe, n_calib=args.calib, outdir=out, progress=False, report=False,
                           method_options=json.loads(getattr(args, "options", None) or "{}"),
                           exhaustive=getattr(args, "exhaustive", False))
    seconds = time.perf_counter() - start
    teacher = fewstep.Teacher(den, sigma_min=info["sigma_min"], model_id=f"{info['name']}@{fingerprint(den)}",
                              cache_dir=out / "teacher")
    x = fewstep.noise(args.n, info["shape"], info["sigma_max"], HELD_OUT_SEED)
    return {"den": den, "info": info, "summary": summary, "out": out, "x": x, "seconds": seconds,
            "ref": teacher.solve(x, info["sigma_max"]), "teacher": teacher}


def _interval(e: torch.Tensor) -> str:
    half = 1.96 * float(e.std()) / math.sqrt(len(e))
    return f"{float(e.mean()):.4f} [{float(e.mean()) - half:.4f}, {float(e.mean()) + half:.4f}]"


def compare(name: str, run: dict) -> list[bool]:
    """Part 1's rows for one model; whether each met its target. Every cell the tune made (the race's
    eliminated ones too) is sampled on the held-out noises. Each side's best is chosen on their first half
    and measured on the second: the best of some 60 cells picked on the same noises it is measured on
    would look better than it is, and more so than the best of the two new methods' few cells."""
    met = []
    for k in run["summary"]["best"]:
        cells = [c for c in run["summary"]["cells"] if c["nfe"] == int(k) and c["status"] == "ok"]
        errors = {id(c): per_sample(run, c) for c in cells}
        half = len(run["x"]) // 2
        pick = lambda group: min(group, key=lambda c: float(errors[id(c)][:half].mean()))  # noqa: E731
        today, new = pick([c for c in cells if c["method"] not in NEW]), pick([c for c in cells if c["method"] in NEW])
        e_today, e_new = errors[id(today)][half:], errors[id(new)][half:]
        r, lo, hi = ratio_interval(e_new, e_today)
        target = 0.75 if int(k) <= 5 else 1.0
        met.append(r <= target)
        print(f"| {name} | {k} | {today['method']} + {today['solver']} | {_interval(e_today)} | {new['method']} + "
              f"{new['solver']} | {_interval(e_new)} | {r:.3f} [{lo:.3f}, {hi:.3f}] | {target} | "
              f"{'yes' if r <= target else 'NO'} |", flush=True)
    return met


def few_noises(name: str, run: dict, args) -> None:
    """Part 2's rows for one model."""
    den, info = run["den"], run["info"]
    for n in (1, 8):
        calib = fewstep.noise(n, info["shape"], info["sigma_max"], CALIB_SEED)
        for method in NEW:
            for k in args.robust_nfe:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sched, start = (fewstep.optimize(den, method, args.solver, k, calib=calib, teacher=run["teacher"],
                                                     **extra) for extra in ({}, {"gate": math.inf}))
                e, e0 = (fewstep.rmse(fewstep.sample(den, run["x"], s), run["ref"]) for s in (sched, start))
                r, lo, hi = ratio_interval(e, e0)
                kept = sched.metadata["training"].get("kept")
                print(f"| {name} | {n} | {method} | {k} | {float(e0.mean()):.4f} | {float(e.mean()):.4f} | {kept} | "
                      f"{r:.3f} [{lo:.3f}, {hi:.3f}] | {'yes' if r <= 1 + 1e-12 else 'NO'} |", flush=True)


def main() -> None:
    ap = arguments("gmm2d,gmm64,gmm-scales,digits,digits-unet,digits-flow", 512, 32, nfe="3,4,5,6,7,8,9,10",
                   robust_nfe="3,5", solver="dpmpp_2m", out="bench-out/learned_solvers", options="")
    args = begin(ap)
    print(f"(the held-out noises are seed {HELD_OUT_SEED}, not the tune's test noises; each side's best is chosen on "
          "their first half and measured on the second)")
    args.nfe, args.robust_nfe = ([int(v) for v in s.split(",")] for s in (args.nfe, args.robust_nfe))
    runs = {}
    print("\n| model | NFE | today's best | held-out mean [95% CI] | new best | held-out mean [95% CI] "
          "| new / today [95% CI] | target | met |\n|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        runs[name] = tuned(name, args, Path(args.out) / name)
        compare(name, runs[name])
    print("\ntune seconds per model (every method and solver, these NFE): "
          + ", ".join(f"{m} {r['seconds']:.0f}" for m, r in runs.items()))
    print(f"\n| model | calibration noises | method | NFE | start | result | kept | result / start [95% CI] "
          f"| no worse |\n|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        few_noises(name, run, args)


if __name__ == "__main__":
    main()
