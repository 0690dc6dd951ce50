"""The teacher: a high-accuracy float64 solve of the probability-flow ODE, cached.

EDM Heun (2nd order) on a fine rho = 7 grid, then a final step to sigma = 0 (x0 = D(x, sigma_min)).
``bench/teacher.py`` and the tests check that doubling the grid moves the answer by < 1e-4 RMSE.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .distributed import shard_map
from .files import load_cached, save_cached
from .models.info import fingerprint
from .sampling import CheckedDenoiser
from .schedules import RHO, SIGMA_MAX, SIGMA_MIN, check_sigmas
from .solvers import heun

DEFAULT_STEPS = 512


def refine(grid: torch.Tensor, substeps: int, rho: float = RHO) -> list[torch.Tensor]:
    """Per interval of ``grid``, the fine sigmas from its start to its end: ``substeps`` steps uniform
    in sigma^(1/rho); an interval that ends at 0 is one step (the final denoising step)."""
    out = []
    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
        if b == 0:
            out.append(torch.tensor([a, 0.0], dtype=torch.float64))
        else:
            u = torch.linspace(a ** (1 / rho), b ** (1 / rho), substeps + 1, dtype=torch.float64)
            out.append(u ** rho)
    return out


def content_key(*parts) -> str:
    """A short hash of tensors (their bytes) and other values (their repr)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.detach().cpu().contiguous().numpy().tobytes() if isinstance(p, torch.Tensor) else repr(p).encode())
    return h.hexdigest()[:20]


class Teacher:
    """Reference ODE solutions for a denoiser, cached in memory and (optionally) on disk.

    ``steps``: Heun steps from sigma_max to sigma_min (default: the denoiser's ``teacher_steps``
    attribute if it has one, else 512).
    ``model_id`` names the model in the disk cache key (with the initial states and the settings;
    default: its name and ``models.info.fingerprint``, which changes with its weights). Cache entries carry
    a format version, their key and a checksum (``files.load_cached``): a damaged or foreign file is
    recomputed with a warning naming it, and a cache that cannot be written is a warning.
    """

    def __init__(self, denoiser: Callable, steps: int | None = None, sigma_min: float = SIGMA_MIN,
                 cache_dir: str | Path | None = None, model_id: str | None = None, batch_size: int = 512,
                 progress: bool = False):
        steps = steps if steps is not None else getattr(denoiser, "teacher_steps", DEFAULT_STEPS)
        if steps < 1:
            raise ValueError(f"teacher steps must be >= 1, got {steps}")
        self.denoiser = denoiser
        self.steps, self.sigma_min = int(steps), float(sigma_min)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        name = str(getattr(denoiser, "name", type(denoiser).__name__))
        self.model_id = model_id or (f"{name}@{fingerprint(denoiser)}" if self.cache_dir else name)
        self.batch_size, self.progress = batch_size, progress
        self._memory: dict[str, torch.Tensor] = {}
        self.calls = 0

    def trajectory(self, x: torch.Tensor, grid, substeps: int | None = None) -> torch.Tensor:
        """Teacher states at every sigma of ``grid`` (which starts at the sigma of ``x``):
        ``[len(grid), batch, ...]`` float64, solved with ``substeps`` Heun steps per interval."""
        grid = check_sigmas(grid)
        if not torch.isfinite(x).all():
            raise ValueError("the initial states x contain NaN or inf")
        substeps = substeps or max(1, self.steps // max(1, len(grid) - 1))
        key = content_key(self.model_id, x.to(torch.float64), grid, substeps)
        if key in self._memory:
            return self._memory[key]
        file = self.cache_dir / f"teacher-{key}.pt" if self.cache_dir else None
        traj = load_cached(file, key, (len(grid), *x.shape)) if file is not None else None
        if traj is None:
            traj = shard_map(lambda xs: torch.cat([self._solve_chunk(c, grid, substeps)
                                                   for c in xs.split(self.batch_size)], dim=1), x, dim=1)
            if file is not None:
                save_cached(file, traj, key)
        self._memory[key] = traj = traj.to(x.device)
        return traj

    @torch.no_grad()
    def _solve_chunk(self, x: torch.Tensor, grid: torch.Tensor, substeps: int) -> torch.Tensor:
        model = CheckedDenoiser(self.denoiser)
        x = x.to(torch.float64)
        states = [x]
        pieces = refine(grid, substeps)
        for fine in tqdm(pieces, desc="teacher", leave=False, disable=not self.progress):
            x = heun(model, x, fine.to(x.device))
            states.append(x)
        self.calls += model.calls
        return torch.stack(states)

    def solve(self, x: torch.Tensor, sigma_max: float | None = None) -> torch.Tensor:
        """x0 from initial states ``x`` at ``sigma_max`` (default: the denoiser's sigma_max, else 80)."""
        sigma_max = float(sigma_max if sigma_max is not None else getattr(self.denoiser, "sigma_max", SIGMA_MAX))
        grid = torch.tensor([sigma_max, self.sigma_min, 0.0], dtype=torch.float64)
        return self.trajectory(x, grid, substeps=self.steps)[-1]
