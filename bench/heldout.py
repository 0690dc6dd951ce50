"""The held-out set the benchmarks score on: noises of seed 1 and the teacher's answers for them."""

from __future__ import annotations

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
