"""Held-out evaluation: sample from fresh noises and compare with the teacher from the same noises."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .metrics import rmse, summarize, w2_exact
from .models.builtin import model_info
from .models.reference import GaussianMixture
from .sample import nfe, sample
from .schedules import as_schedule
from .teacher import Teacher

CALIB_SEED = 0  # optimizers see noises from this seed by default
TEST_SEED = 1  # evaluation uses another seed: held out


def noise(n: int, shape, sigma_max: float, seed: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Initial states x_T = sigma_max * n, n ~ N(0, I), seeded; shape [n, *shape]. Drawn on the CPU and
    then moved to ``device``, so a seed gives the same noises on every device."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randn(int(n), *shape, generator=g, dtype=dtype) * float(sigma_max)).to(device)


def evaluate(denoiser: Callable, schedule: Any, solver: str | None = None, x: torch.Tensor | None = None, *,
             n: int = 256, seed: int = TEST_SEED, teacher: Teacher | None = None, shape=None,
             distribution: bool = True, ci: bool = False) -> dict:
    """Per-sample RMSE to the teacher (mean, median, p90) on held-out noises; for a GaussianMixture
    also the exact W2 between the samples and as many exact data samples (``w2``, ``w2_n``)."""
    sched_like = schedule if hasattr(schedule, "sigmas_for") else as_schedule(schedule)
    sigma_max = float(getattr(sched_like, "sigma_max", None) or getattr(denoiser, "sigma_max", 80.0))
    if x is None:
        info = model_info(denoiser, shape)
        x = noise(n, info["shape"], sigma_max, seed, device=info["device"])
    teacher = teacher or Teacher(denoiser, sigma_min=float(getattr(denoiser, "sigma_min", 0.002)))
    ref = teacher.solve(x, sigma_max=sigma_max)
    out = sample(denoiser, x, sched_like, solver)
    result = summarize(rmse(out, ref), ci=ci)
    if not hasattr(sched_like, "sigmas_for"):
        result["nfe"] = nfe(sched_like, solver)
    if distribution and isinstance(denoiser, GaussianMixture):
        g = torch.Generator().manual_seed(int(seed) + 10_000)
        result["w2"] = w2_exact(out, denoiser.sample(out.shape[0], generator=g))  # on the CPU
        result["w2_n"] = out.shape[0]
    return result
