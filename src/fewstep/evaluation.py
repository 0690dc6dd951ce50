"""Held-out evaluation: sample from fresh noises and compare with the teacher from the same noises."""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import conditions
from .metrics import rmse, summarize, w2_exact
from .models.info import model_info
from .models.reference import GaussianMixture
from .noises import TEST_SEED, noise
from .sampling import nfe, sample
from .schedules import SIGMA_MAX, SIGMA_MIN, as_schedule
from .teacher import Teacher


@torch.no_grad()
def evaluate(denoiser: Callable, schedule: Any, solver: str | None = None, x: torch.Tensor | None = None, *,
             n: int = 256, seed: int = TEST_SEED, teacher: Teacher | None = None, shape=None,
             distribution: bool = True, ci: bool = False, cond=None) -> dict:
    """Per-sample RMSE to the teacher (mean, median, p90) and the NFE, on held-out noises (and, for a
    conditional denoiser, ``cond``: one condition per noise, held out too); for a GaussianMixture also the
    exact W2 between the samples and as many exact data samples (``w2``, ``w2_n``)."""
    sched = as_schedule(schedule)
    sigma_max = float(sched.sigma_max or getattr(denoiser, "sigma_max", SIGMA_MAX))
    if x is None:
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n (held-out noises) must be a positive integer, got {n!r}")
        info = model_info(denoiser, shape)
        x = noise(n, info["shape"], sigma_max, seed, device=info["device"])
    conditions.check_model(denoiser, cond)
    teacher = teacher or Teacher(denoiser, sigma_min=float(getattr(denoiser, "sigma_min", SIGMA_MIN)), check_cond=cond,
                                 shape=tuple(x.shape[1:]))
    ref = teacher.solve(x, sigma_max=sigma_max, cond=cond)
    out = sample(denoiser, x, sched, solver, cond=cond)
    result = summarize(rmse(out, ref), ci=ci)
    result["nfe"] = nfe(sched, solver)
    if distribution and isinstance(denoiser, GaussianMixture) and cond is None:
        g = torch.Generator().manual_seed(int(seed) + 10_000)
        result["w2"] = w2_exact(out, denoiser.sample(out.shape[0], generator=g))  # on the CPU
        result["w2_n"] = out.shape[0]
    return result
