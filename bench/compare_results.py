"""Compare two ``fewstep tune`` results.json files cell by cell: every field but wall-clock times.

    python bench/compare_results.py before/results.json after/results.json [--tol 0]

Prints the cells whose results differ (``--tol 0``: bit for bit) and exits 1 if any do. Used to show
that a refactoring left the tune results unchanged (docs/architecture.md).
"""

import argparse
import json
import math
import sys

TIMES = {"calib_seconds", "seconds"}


def _diff(a, b, tol: float, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys if k not in TIMES for d in _diff(a.get(k), b.get(k), tol, f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, tol, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        same = a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(abs(a), abs(b))
        return [] if same else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--tol", type=float, default=0.0, help="relative tolerance for floats (default 0: bit for bit)")
    args = ap.parse_args()
    cells = [{(c["nfe"], c["method"], c["solver"]): c for c in json.load(open(p))["cells"]} for p in (args.before, args.after)]
    names = sorted(set(cells[0]) | set(cells[1]), key=str)
    bad = 0
    for name in names:
        diffs = _diff(cells[0].get(name), cells[1].get(name), args.tol)
        if diffs:
            bad += 1
            print(f"{name}: {'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}")
    print(f"{len(names)} cells, {bad} differ ({'bit for bit' if args.tol == 0 else f'rel tol {args.tol:g}'}, "
          f"times ignored)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
