"""The candidate grid that GITS and OSS pick their timesteps from, and the teacher on it.

The grid is the EDM polynomial schedule (Karras et al. 2022, eq. 5; rho = 7 as in GITS's reference,
zju-pi/diff-sampler ``gits-main``) with ``size`` points from sigma_max down to sigma_min, plus a final 0:
``grid[0] = sigma_max``, ``grid[size - 1] = sigma_min``, ``grid[size] = 0``. A schedule picked from it
starts exactly at sigma_max and ends with the final denoising step to 0.
"""

from __future__ import annotations

import torch

from ..schedules import RHO, polynomial

DEFAULT_SIZE = 80


def candidate_grid(sigma_min: float, sigma_max: float, size: int = DEFAULT_SIZE, rho: float = RHO) -> torch.Tensor:
    """``size`` polynomial(rho) sigmas from sigma_max to sigma_min, then 0: float64, ``[size + 1]``."""
    if int(size) != size or size < 2:
        raise ValueError(f"grid size must be an integer >= 2, got {size!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return polynomial(int(size), sigma_min, sigma_max, rho, final_zero=True).sigmas


def teacher_on_grid(teacher, x: torch.Tensor, grid: torch.Tensor, substeps: int | None = None,
                    cond=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher states from ``x`` (at grid[0]) at every grid sigma, ``[len(grid), batch, ...]`` float64, and
    the model's outputs at them (but the last, 0): from the teacher's one solve when the grid is its
    candidate grid (``substeps`` None), else solved with ``substeps`` steps per interval."""
    if substeps is not None and (int(substeps) != substeps or substeps < 1):
        raise ValueError(f"teacher substeps must be a positive integer, got {substeps!r}")
    return teacher.with_outputs(x, grid, None if substeps is None else int(substeps), cond)


def check_steps(steps: int, size: int) -> None:
    """A schedule of ``steps`` steps needs steps - 1 distinct intermediate grid points."""
    if steps < 2:
        raise ValueError(f"nfe gives {steps} step(s): the only schedule is [sigma_max, 0], nothing to optimize; "
                         "ask for a larger nfe")
    if steps > size:
        raise ValueError(f"grid of {size} points is too small for {steps} steps: use grid >= {steps}")
