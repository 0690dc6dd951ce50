"""Seeded initial states x_T = sigma_max * n: the calibration batch (seed 0) and the held-out one (seed 1)."""

from __future__ import annotations

import operator

import torch

CALIB_SEED = 0  # optimizers see noises from this seed by default
TEST_SEED = 1  # evaluation uses another seed: held out


def noise(n: int, shape, sigma_max: float, seed: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Initial states x_T = sigma_max * n, n ~ N(0, I), seeded; shape [n, *shape]. Drawn on the CPU and
    then moved to ``device``, so a seed gives the same noises on every device."""
    try:
        count = not isinstance(n, bool) and int(n) == n and n >= 0
    except (TypeError, ValueError, OverflowError):  # not a number, nan, inf
        count = False
    if not count:
        raise ValueError(f"noise: n must be a number of noises >= 0, got {n!r}")
    try:
        bad = isinstance(shape, str) or any(isinstance(d, bool) or operator.index(d) < 1 for d in shape)
    except TypeError:
        bad = True
    if bad:
        raise ValueError(f"noise: shape must be positive integers (the sample shape, e.g. (3, 32, 32)), got {shape!r}")
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randn(int(n), *shape, generator=g, dtype=dtype) * float(sigma_max)).to(device)
