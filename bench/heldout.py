"""The held-out set the benchmarks score on: noises of seed 1 and the teacher's answers for them."""

from __future__ import annotations

import argparse

import torch

import fewstep

from machine import describe


def held_out(name: str, n: int):
    """Built-in model ``name``, its teacher, ``n`` held-out initial states (seed 1) and the teacher's x0."""
    den = fewstep.load_model(name)
    teacher = fewstep.Teacher(den, sigma_min=den.sigma_min)
    xt = fewstep.noise(n, den.shape, den.sigma_max, 1)
    return den, teacher, xt, teacher.solve(xt, sigma_max=den.sigma_max)


def header(n: int, calib: int) -> str:
    """The machine line, with the held-out and calibration sizes and seeds."""
    return f"{describe()}; held-out n={n} (seed 1), calibration n={calib} (seed 0)"


def arguments(models: str, n: int, calib: int, **extra: str) -> argparse.ArgumentParser:
    """The benches' common options: --models, --n (held out), --calib, and ``extra`` (name -> default) as
    comma-separated lists."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=models)
    for name, default in extra.items():
        ap.add_argument(f"--{name}", default=default)
    ap.add_argument("--n", type=int, default=n, help="held-out samples")
    ap.add_argument("--calib", type=int, default=calib, help="calibration samples")
    return ap


def begin(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the options, use one torch thread, and print the header line."""
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(header(args.n, args.calib))
    return args
