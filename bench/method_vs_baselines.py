"""A method's best tuned cell against the best built-in schedule, held out (issue #15: ld3 and instance on digits).

    OMP_NUM_THREADS=1 python bench/method_vs_baselines.py [--models digits] [--methods ld3,instance]
        [--nfe 4,5,6,7,8] [--calib 32] [--n 512] [--out bench-out/method_vs_baselines] [--options JSON]
        [--exhaustive]

A default ``fewstep.tune`` per model (resumed from ``--out``), then every cell it made sampled on ``--n``
held-out noises of a seed the tune never saw (``learned_solvers.py``'s protocol): per NFE, each method's
best cell and the best baseline cell (any solver) are chosen on the first half of those noises and
measured on the second half; the ratio method / baseline with its paired-bootstrap 95% interval.
``--options``: the tune's ``method_options`` (method -> options, JSON), e.g. a variant to compare.
``--exhaustive``: the tune runs every method on every solver (no race), so each method's best cell is its
best over all solvers, not over the few solvers a race gives it.
"""

from __future__ import annotations

from pathlib import Path

from fewstep.schedules import BUILTIN_SCHEDULES

from heldout import arguments, begin
from learned_solvers import per_sample, ratio_interval, tuned


def main() -> None:
    ap = arguments("digits", 512, 32, methods="ld3,instance", nfe="4,5,6,7,8", out="bench-out/method_vs_baselines",
                   options="")
    ap.add_argument("--exhaustive", action="store_true", help="tune every method on every solver (no race)")
    args = begin(ap)
    args.nfe = [int(v) for v in args.nfe.split(",")]
    print("| model | NFE | method | its best cell | error | best baseline | error | ratio [95% CI] |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        run = tuned(name, args, Path(args.out) / name)
        half = len(run["x"]) // 2
        for k in args.nfe:
            cells = [c for c in run["summary"]["cells"] if c["nfe"] == k and c["status"] == "ok"]
            errors = {id(c): per_sample(run, c) for c in cells}
            pick = lambda group: min(group, key=lambda c: float(errors[id(c)][:half].mean()))  # noqa: E731
            base = pick([c for c in cells if c["method"] in BUILTIN_SCHEDULES])
            for method in args.methods.split(","):
                mine = [c for c in cells if c["method"] == method]
                if not mine:
                    print(f"| {name} | {k} | {method} | no cell | | | | |")
                    continue
                best = pick(mine)
                e, b = errors[id(best)][half:], errors[id(base)][half:]
                r, lo, hi = ratio_interval(e, b)
                print(f"| {name} | {k} | {method} | {best['solver']} | {float(e.mean()):.4f} | {base['method']} + "
                      f"{base['solver']} | {float(b.mean()):.4f} | {r:.3f} [{lo:.3f}, {hi:.3f}] |", flush=True)


if __name__ == "__main__":
    main()
