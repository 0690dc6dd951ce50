"""Calibration sharded over 2 gloo processes gives the same schedule as 1 process."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest


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
    assert run.returncode == 0, run.stderr[run.stderr.find("Traceback"):][:3000]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["sigmas"] == pytest.approx(two["sigmas"], rel=1e-12, abs=0)
    print(f"\ncalibration wall time: 1 process {t1 - t0:.1f} s, 2 gloo processes {t2 - t1:.1f} s (with start-up)")
