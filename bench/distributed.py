"""``fewstep tune`` under torchrun next to one process: wall time, evaluations, and the results cell by cell.

    OMP_NUM_THREADS=1 python bench/distributed.py [--nproc 2] [--out runs/distributed] [-- tune args]

Runs ``fewstep tune`` (default ``--quick`` on the default model) once as one process and once under
``torchrun --nproc_per_node N`` (gloo on CPU, NCCL on GPUs), each into its own folder with its own teacher
cache, then compares the two results.json files cell by cell: the same cells with the same status and
number of test noises, and the largest relative difference in any cell's schedule or per-sample errors.
Wall times include each command's start-up (imports, process group). Prints one JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _compare(one: dict, two: dict) -> dict:
    a = {(c["nfe"], c["method"], c["solver"]): c for c in one["cells"]}
    b = {(c["nfe"], c["method"], c["solver"]): c for c in two["cells"]}
    differ = [k for k in a if k not in b or (a[k]["status"], a[k].get("n")) != (b[k]["status"], b[k].get("n"))]
    worst = 0.0
    for k in set(a) & set(b):
        for f in ("errors", "sigmas"):
            for p, q in zip(a[k].get(f, []), b[k].get(f, [])):
                worst = max(worst, abs(p - q) / max(abs(p), 1e-300))
    return {"cells": len(a), "same_cells": set(a) == set(b), "status_or_n_differ": [list(k) for k in differ],
            "ok_cells": sum(c["status"] == "ok" for c in a.values()), "max_relative_difference": worst}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/distributed")
    p.add_argument("tune_args", nargs="*", help="after --: fewstep tune's arguments (default --quick)")
    args = p.parse_args()
    out, tune_args = Path(args.out), args.tune_args or ["--quick"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = ["-m", "fewstep.cli", "tune", *tune_args, "--json", "-o"]
    env["FEWSTEP_CACHE"] = str(out / "cache-one")
    one = _timed([sys.executable, *cmd, str(out / "one")], env)
    env["FEWSTEP_CACHE"] = str(out / "cache-ranks")
    ranks = _timed([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *cmd, str(out / "ranks")], env)
    a, b = (json.loads((out / f / "results.json").read_text()) for f in ("one", "ranks"))
    record = {"tune_args": tune_args, "nproc": args.nproc, "machine": describe(),
              "wall_seconds": {"one_process": round(one, 1), f"{args.nproc}_ranks": round(ranks, 1)},
              "evaluations": {"one_process": a["cost"]["total"], f"{args.nproc}_ranks": b["cost"]["total"]},
              **_compare(a, b)}
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
