"""Calibration sharded over 2 gloo processes gives the same schedule as 1 process."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from fewstep.zoo import simplex_conditions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ARGS = ["optimize", "--model", "gmm64", "--method", "oss", "--solver", "dpmpp_2m", "--nfe", "5", "--n-calib", "24",
        "--teacher-steps", "128", "--json"]


def test_two_process_calibration_matches_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_CACHE": str(tmp_path / "cache1")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fewstep.cli", *ARGS, "-o", str(tmp_path / "one.json")],
                   env=env, check=True, capture_output=True)
    t1 = time.perf_counter()
    env["FEWSTEP_CACHE"] = str(tmp_path / "cache2")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "fewstep.cli", *ARGS, "-o", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True)
    t2 = time.perf_counter()
    assert run.returncode == 0, run.stderr[-6000:]  # a rank's own message comes before torchrun's summary
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["sigmas"] == pytest.approx(two["sigmas"], rel=1e-12, abs=0)
    print(f"\ncalibration wall time: 1 process {t1 - t0:.1f} s, 2 gloo processes {t2 - t1:.1f} s (with start-up)")


TUNE = ["tune", "--model", "gmm64", "--nfe", "4,6", "--n-calib", "8", "--n-test", "48", "--solvers", "euler,dpmpp_2m,unipc",
        "--methods", "karras,time_uniform,gits,oss,sdm,ld3,s4s", "--json"]


def _cells(folder) -> dict:
    data = json.loads((folder / "results.json").read_text())
    return {(c["nfe"], c["method"], c["solver"]): c for c in data["cells"]}


COND_TUNE = ["tune", "--model", "gmm-cond", "--nfe", "4", "--n-calib", "8", "--n-test", "32", "--solvers", "euler,dpmpp_2m",
             "--methods", "karras,ays,gits,ld3", "--json"]


@pytest.mark.parametrize("conditional", [False, True])
def test_two_process_tune_gives_the_results_of_one(tmp_path, conditional):
    """The cells dealt out to 2 ranks: every cell's status, schedule and per-sample errors as one process's
    (a conditional model too: each rank's cells and teacher shards take their rows of the conditions)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_CACHE": str(tmp_path / "cache1")}
    args = TUNE
    if conditional:
        torch.save(simplex_conditions(16, seed=3), tmp_path / "conds.pt")
        args = [*COND_TUNE, "--conds", str(tmp_path / "conds.pt")]
    subprocess.run([sys.executable, "-m", "fewstep.cli", *args, "-o", str(tmp_path / "one")], env=env, check=True,
                   capture_output=True)
    env["FEWSTEP_CACHE"] = str(tmp_path / "cache2")  # the teacher solved again, sharded
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "fewstep.cli", *args, "-o", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-6000:]  # a rank's own message comes before torchrun's summary
    assert run.stdout.count('"best"') == 1  # rank 0 alone prints
    one, two = _cells(tmp_path / "one"), _cells(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert sum(c["status"] == "ok" and c["method"] in ("gits", "ld3", "s4s") for c in one.values()) >= 2
    for key, row in one.items():
        assert (row["status"], row.get("n"), row.get("sigmas")) == (two[key]["status"], two[key].get("n"),
                                                                   two[key].get("sigmas")), key
        assert row.get("errors") == pytest.approx(two[key].get("errors"), rel=1e-9, abs=1e-12), key
    for folder in ("one", "two"):  # the schedules written by rank 0 load and are the cells'
        files = sorted((tmp_path / folder / "schedules").iterdir())
        assert files and all(f.stat().st_size > 0 for f in files)
