"""The teacher: a float64 solve of the probability-flow ODE to a stated accuracy, solved once, cached.

DEIS (3rd order, one call a step; Zhang & Chen 2023) on a polynomial (rho = 7) grid of N steps from
sigma_max to sigma_min, then the final step to 0 (x0 = D(x, sigma_min)): N + 1 calls. N is a multiple of
``grid - 1``, so the fine grid holds the ``grid`` candidate points GITS and OSS pick from: their states
and the model's outputs there come with the solve, and no method solves the teacher again.

Error control: on ``CHECK_NOISES`` fixed seeded noises the solve is repeated with 2N steps; the
teacher's error (the mean per-sample RMSE of its x0) is estimated as |x_N - x_2N| / (1 - 2^-3), and N
is doubled from 2 (grid - 1) until that is at most ``tol``. ``steps`` fixes N instead. ``error_on(x)`` estimates the error
on the noises a run reports, every one of them: |x_N - x_2N| / (1 - 2^-q) per sample, q the order
observed on the check noises (per-sample errors are heavy-tailed, so a few check noises can miss the hard
ones; ``bench/teacher.py`` compares both with a 4096-step solve). Every evaluation is counted in rows
(``rows``; batched ``calls``).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import conditions
from .distributed import shard_map
from .files import FewstepWarning, load_cached, save_cached
from .models.info import fingerprint
from .noises import noise
from .sampling import CheckedDenoiser
from .schedules import RHO, SIGMA_MAX, SIGMA_MIN, check_sigmas, polynomial
from .solvers import SOLVERS

SOLVER, ORDER = "deis", 3
DEFAULT_GRID = 40  # candidate points (GITS / OSS): the fine grid refines them
CHECK_NOISES, CHECK_SEED = 16, 3  # the noises the error is estimated on (fixed, so N does not depend on the run)
DEFAULT_REL_TOL = 2e-3  # default tolerance: this fraction of the RMS of x0
MAX_STEPS = 4096


def refine(grid: torch.Tensor, substeps: int, rho: float = RHO) -> torch.Tensor:
    """``grid`` (ending at 0) with each interval to a positive sigma split into ``substeps`` steps uniform
    in sigma^(1/rho); the interval to 0 stays one step. The grid's own points are kept exactly."""
    out = [grid[:1]]
    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist()):
        if b == 0:
            out.append(grid.new_zeros(1))
        else:
            u = torch.linspace(a ** (1 / rho), b ** (1 / rho), substeps + 1, dtype=torch.float64) ** rho
            u[-1] = b
            out.append(u[1:])
    return torch.cat(out)


def _mean_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).reshape(len(a), -1).pow(2).mean(1).sqrt().mean())


def _richardson(x_n: torch.Tensor, x_2n: torch.Tensor, order: float) -> float:
    """The estimated error of the N-step answers x_n from the 2N-step ones: |x_N - x_2N| / (1 - 2^-order)."""
    return _mean_rmse(x_n, x_2n) / (1 - 2.0 ** -order)


LAGRANGE, GAUSS = 4, 8  # the dense output: outputs its polynomial goes through, nodes of its quadrature


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on [-1, 1] (Golub-Welsch: the eigenpairs of the Jacobi matrix)."""
    k = torch.arange(1, n, dtype=torch.float64)
    beta = k / torch.sqrt(4 * k * k - 1)
    nodes, vecs = torch.linalg.eigh(torch.diag(beta, 1) + torch.diag(beta, -1))
    return nodes, 2 * vecs[0] ** 2


def dense_state(grid: torch.Tensor, states: torch.Tensor, outs: torch.Tensor, sigma: float) -> torch.Tensor:
    """The teacher's state at ``sigma`` between the positive points of ``grid`` from its states and the model's
    outputs there: x(s) / s = x_j / s_j + int_{l_j}^{l} e^u D(u) du in l = -log s, sigma_j the point above (the
    exact solution of the probability-flow ODE dx/ds = (x - D) / s, as in DPM-Solver++, Lu et al. 2022, eq. 9),
    D the Lagrange polynomial in l through the LAGRANGE nearest outputs, the integral by GAUSS-point quadrature."""
    pos = grid[grid > 0]
    lam = -torch.log(pos)
    j = min(max(int((pos >= sigma * (1 - 1e-12)).sum()) - 1, 0), len(pos) - 1)
    if abs(float(pos[j]) - sigma) <= 1e-12 * sigma:
        return states[j]
    lo = min(max(j - LAGRANGE // 2 + 1, 0), max(len(pos) - LAGRANGE, 0))
    idx = torch.arange(lo, min(lo + LAGRANGE, len(pos)))
    nodes, weights = _gauss_legendre(GAUSS)
    a, b = float(lam[j]), -math.log(sigma)
    u = (a + b) / 2 + (b - a) / 2 * nodes
    basis = torch.ones(GAUSS, len(idx), dtype=torch.float64)  # Lagrange basis at the quadrature nodes
    for k in range(len(idx)):
        for m in range(len(idx)):
            if m != k:
                basis[:, k] *= (u - lam[idx[m]]) / (lam[idx[k]] - lam[idx[m]])
    w = (b - a) / 2 * weights * torch.exp(u)  # [GAUSS]
    coef = (w[:, None] * basis).sum(0).to(outs.device)  # one weight per output
    return sigma * (states[j] / pos[j] + torch.einsum("k,k...->...", coef, outs[idx.to(outs.device)]))


def content_key(*parts) -> str:
    """A short hash of tensors (their bytes) and other values (their repr)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.detach().cpu().contiguous().numpy().tobytes() if isinstance(p, torch.Tensor) else repr(p).encode())
    return h.hexdigest()[:20]


class Teacher:
    """Reference ODE solutions for a denoiser, to a tolerance, cached in memory and (optionally) on disk.

    ``tol``: the target error of x0 (mean per-sample RMSE; default ``rel_tol`` times the RMS of the
    answers); ``steps``: a fixed number of steps instead (also the denoiser's ``teacher_steps``
    attribute). ``grid``: the candidate points (from sigma_max to sigma_min) the fine grid refines.
    ``sigma_min``: where the solve stops before its final step (default: the denoiser's, else 0.002).
    ``check_cond``: for a conditional denoiser, the conditions its error control's check noises take in turn
    (default: the first ``cond`` it is asked to solve for).
    ``model_id`` names the model in the disk cache key (default: its name and ``models.info.fingerprint``,
    which changes with its weights). Cache entries carry a format version, their key and a checksum
    (``files.load_cached``): a damaged or foreign file is recomputed with a warning naming it.
    """

    def __init__(self, denoiser: Callable, steps: int | None = None, sigma_min: float | None = None,
                 cache_dir: str | Path | None = None, model_id: str | None = None, batch_size: int = 512,
                 progress: bool = False, tol: float | None = None, grid: int = DEFAULT_GRID, shape=None,
                 check_cond=None, rel_tol: float = DEFAULT_REL_TOL):
        steps = steps if steps is not None else getattr(denoiser, "teacher_steps", None)
        if steps is not None and (int(steps) != steps or steps < 1):
            raise ValueError(f"teacher steps must be a positive integer, got {steps!r}")
        if tol is not None and not tol > 0:
            raise ValueError(f"teacher tol must be > 0, got {tol!r}")
        if int(grid) != grid or grid < 2:
            raise ValueError(f"teacher grid must be an integer >= 2, got {grid!r}")
        sigma_min = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", SIGMA_MIN)
        self.denoiser, self.sigma_min, self.tol, self.grid = denoiser, float(sigma_min), tol, int(grid)
        self.shape = tuple(shape if shape is not None else getattr(denoiser, "shape", ()))
        self.check_cond, self.rel_tol = check_cond, float(rel_tol)
        self.fixed = None if steps is None else int(steps)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        name = str(getattr(denoiser, "name", type(denoiser).__name__))
        self.model_id = model_id or (f"{name}@{fingerprint(denoiser)}" if self.cache_dir else name)
        self.batch_size, self.progress = batch_size, progress
        self._memory: dict[str, torch.Tensor] = {}
        self._control: dict[float, tuple[int, float]] = {}  # sigma_max -> (steps, estimated error)
        self.calls = self.rows = 0

    def using(self, denoiser: Callable) -> "Teacher":
        """A teacher of the same settings and cache around ``denoiser`` (the same model, e.g. counted)."""
        return Teacher(denoiser, steps=self.fixed, sigma_min=self.sigma_min, cache_dir=self.cache_dir,
                       model_id=self.model_id, batch_size=self.batch_size, progress=self.progress, tol=self.tol,
                       grid=self.grid, shape=self.shape or None, check_cond=self.check_cond, rel_tol=self.rel_tol)

    # ----------------------------------------------------------------------------------------
    # The grid and its accuracy

    def _sigma_max(self, sigma_max: float | None) -> float:
        return float(sigma_max if sigma_max is not None else getattr(self.denoiser, "sigma_max", SIGMA_MAX))

    def candidate_grid(self, sigma_max: float | None = None) -> torch.Tensor:
        """The ``grid`` candidate points, polynomial(rho) from sigma_max to sigma_min, then 0."""
        return polynomial(self.grid, self.sigma_min, self._sigma_max(sigma_max), RHO, final_zero=True).sigmas

    def fine_grid(self, sigma_max: float | None = None, steps: int | None = None) -> torch.Tensor:
        """The grid the teacher solves on: ``steps`` (default ``self.steps(sigma_max)``) polynomial steps from
        sigma_max to sigma_min (refining the candidate points when it is a multiple of ``grid - 1``), then 0."""
        steps = steps or self.steps(sigma_max)
        if steps % (self.grid - 1) == 0:
            return refine(self.candidate_grid(sigma_max), steps // (self.grid - 1))
        return polynomial(steps + 1, self.sigma_min, self._sigma_max(sigma_max), RHO, final_zero=True).sigmas

    def steps(self, sigma_max: float | None = None) -> int:
        """N: fixed, or chosen by the error control (computed on first use, for this sigma_max)."""
        return self.fixed if self.fixed is not None else self._controlled(self._sigma_max(sigma_max))[0]

    def error(self, sigma_max: float | None = None) -> float:
        """The estimated error of the teacher's x0 (mean per-sample RMSE), |x_N - x_2N| / (1 - 2^-3)."""
        s = self._sigma_max(sigma_max)
        if self.fixed is not None and s not in self._control:
            self._control[s] = (self.fixed, self._estimate(s, self.fixed)[0])
        return self._controlled(s)[1]

    def error_on(self, x: torch.Tensor, sigma_max: float | None = None, x0: torch.Tensor | None = None,
                 cond=None) -> float:
        """The estimated error of the teacher's x0 for the states ``x``, every one of them: the mean of the
        per-sample |x_N - x_2N| / (1 - 2^-q), q the order observed on the check noises (``_order``; x_2N on its
        own grid of 2N steps: 2N + 1 more calls each). The finer pair: a sample that the N/2-step solve puts in
        another mode is no evidence against the N-step one, and the truth is heavy-tailed.
        ``x0``: the teacher's answer for ``x`` if the caller has it (else it is solved, or read from the cache)."""
        steps = self.steps(sigma_max)
        a = x0 if x0 is not None else self._cached("x0", x, self.fine_grid(sigma_max), None, tuple(x.shape), cond)
        b = self._cached("x0", x, self.fine_grid(sigma_max, 2 * steps), None, tuple(x.shape), cond)
        return _richardson(a, b, self._order(self._sigma_max(sigma_max), steps))

    def _order(self, sigma_max: float, steps: int) -> float:
        """The order observed on the check noises, log2(|x_N/2 - x_N| / |x_N - x_2N|), in [1.5, ORDER]."""
        x = self._check_noises(sigma_max)
        a, b, c = (self._cached("x0", x, self.fine_grid(sigma_max, n), None, tuple(x.shape), self._check_cond())
                   for n in (max(1, steps // 2), steps, 2 * steps))
        ratio = _mean_rmse(a, b) / max(_mean_rmse(b, c), 1e-300)
        return min(float(ORDER), max(1.5, math.log2(ratio))) if ratio > 0 else float(ORDER)

    def _estimate(self, sigma_max: float, steps: int) -> tuple[float, float]:
        """(estimated error of the ``steps``-step x0, the RMS of the answers) on the check noises."""
        x = self._check_noises(sigma_max)
        a, b = (self._cached("x0", x, self.fine_grid(sigma_max, n), None, tuple(x.shape), self._check_cond())
                for n in (steps, 2 * steps))
        return _richardson(a, b, ORDER), float(b.pow(2).mean().sqrt())

    def _check_cond(self):
        """The check noises' conditions: ``check_cond`` in turn (a conditional model needs them; else the first
        conditions it is asked to solve for)."""
        if self.check_cond is None and conditions.takes_cond(self.denoiser) is True:
            raise ValueError("the teacher of a conditional model needs conditions for its error check: give "
                             "check_cond= (a few conditions), or solve with cond= first")
        return conditions.cycle(self.check_cond, CHECK_NOISES)

    def _check_noises(self, sigma_max: float) -> torch.Tensor:
        if not self.shape:
            raise ValueError("the teacher's error control needs the model's sample shape: give shape=")
        return noise(CHECK_NOISES, self.shape, sigma_max, CHECK_SEED, device=getattr(self.denoiser, "device", None))

    def _search(self, sigma_max: float, steps: int) -> tuple[int, float]:
        """Double N from ``steps`` until the estimated error is at most the tolerance (or N = MAX_STEPS)."""
        while True:
            err, scale = self._estimate(sigma_max, steps)
            tol = self.tol if self.tol is not None else self.rel_tol * scale
            if err <= tol:
                return steps, err
            if 2 * steps > MAX_STEPS:
                warnings.warn(f"teacher: estimated error {err:.3g} at {steps} steps, above the tolerance {tol:.3g}; "
                              "using it", FewstepWarning, stacklevel=4)
                return steps, err
            steps *= 2

    def _controlled(self, sigma_max: float) -> tuple[int, float]:
        """N from 2 (grid - 1) on (fewer steps can put a sample in another mode unseen by the check noises)."""
        if sigma_max not in self._control:
            self._control[sigma_max] = self._search(sigma_max, 2 * (self.grid - 1))
        return self._control[sigma_max]

    def refine_to(self, tol: float, sigma_max: float | None = None) -> None:
        """Lower the tolerance (a tune ties it to the errors it measures): N doubles on from where it is
        until the estimate is below ``tol``. Solutions at the old N stay cached and are not used again."""
        s = self._sigma_max(sigma_max)
        if self.fixed is not None or (self.tol is not None and tol >= self.tol):
            return
        self.tol = float(tol)
        if s in self._control and self._control[s][1] > tol:
            self._control[s] = self._search(s, self._control[s][0])

    # ----------------------------------------------------------------------------------------
    # Solving

    @torch.no_grad()
    def _solve(self, x: torch.Tensor, fine: torch.Tensor, keep: list[int] | None, cond=None):
        """DEIS on the fine grid: (x0, states at the fine indices ``keep``, outputs there)."""
        model = CheckedDenoiser(self.denoiser, cond)
        spec, states, outs = SOLVERS[SOLVER], {}, {}
        bar = tqdm(total=len(fine) - 1, desc="teacher", leave=False, disable=not self.progress)

        def record(info: dict) -> None:
            bar.update(1)
            if keep is not None and info["i"] in keep:
                states[info["i"]], outs[info["i"]] = info["x"], info["denoised"]

        try:
            x0 = spec.fn(model, x.to(torch.float64), fine.to(x.device), callback=record, **spec.options)
        finally:
            bar.close()
        self.calls, self.rows = self.calls + model.calls, self.rows + model.rows
        if keep is None:
            return x0, None, None
        return x0, torch.stack([states[i] for i in keep] + [x0]), torch.stack([outs[i] for i in keep])

    def _cached(self, kind: str, x: torch.Tensor, fine: torch.Tensor, keep: list[int] | None, shape: tuple,
                cond=None):
        """The solve of ``x`` on ``fine`` (x0, or states and outputs at ``keep``), from memory, disk or now."""
        key = content_key(kind, self.model_id, SOLVER, x.to(torch.float64), fine, keep, *conditions.parts(cond))
        if key in self._memory:
            return self._memory[key]
        file = self.cache_dir / f"teacher-{key}.pt" if self.cache_dir else None
        value = load_cached(file, key, shape) if file is not None else None
        if value is None:
            def solve(idx: torch.Tensor) -> torch.Tensor:  # this rank's rows, in chunks of batch_size
                parts = [self._solve(x[c], fine, keep, conditions.rows(cond, c)) for c in idx.split(self.batch_size)]
                if keep is None:
                    return torch.cat([p[0] for p in parts])
                return torch.cat([torch.cat([p[1], p[2]]) for p in parts], dim=1)

            value = shard_map(solve, torch.arange(len(x), device=x.device), dim=0 if keep is None else 1)
            if file is not None:
                save_cached(file, value, key)
        self._memory[key] = value = value.to(x.device)
        return value

    def _check_input(self, x: torch.Tensor, cond=None) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or not torch.isfinite(x).all():
            raise ValueError("the initial states x must be a finite tensor [batch, ...] (NaN or inf found)")
        conditions.check(cond, x.shape[0])
        if self.check_cond is None and cond is not None:  # the error check of a conditional model: these conditions
            self.check_cond = cond

    def solve(self, x: torch.Tensor, sigma_max: float | None = None, cond=None) -> torch.Tensor:
        """x0 from initial states ``x`` at ``sigma_max`` (default: the denoiser's sigma_max, else 80), with
        ``cond`` rows for a conditional denoiser."""
        self._check_input(x, cond)
        fine = self.fine_grid(sigma_max)
        return self._cached("x0", x, fine, None, tuple(x.shape), cond)

    def _on_grid(self, grid: torch.Tensor, fine: torch.Tensor) -> list[int] | None:
        """The fine indices of ``grid``'s positive points, if every one of them is on the fine grid."""
        idx = torch.searchsorted(-fine, -grid[grid > 0]).clamp(max=len(fine) - 1)
        return idx.tolist() if torch.allclose(fine[idx], grid[grid > 0], rtol=1e-12, atol=0) else None

    def trajectory(self, x: torch.Tensor, grid, substeps: int | None = None, cond=None) -> torch.Tensor:
        """Teacher states at every sigma of ``grid`` (which starts at the sigma of ``x``; the last, 0, is the
        teacher's x0): ``[len(grid), batch, ...]`` float64. A grid on the teacher's fine grid (its candidate points, or
        any subset) comes from the one solve; another grid, from the same solve's states and outputs on the
        candidate points (``dense_state``: no more model calls; its x0 is ``solve``'s), or with ``substeps`` steps
        per interval of its own (as ``with_outputs`` does off the fine grid: there D is the model's, exact)."""
        self._check_input(x, cond)
        grid = check_sigmas(grid)
        full = grid if float(grid[-1]) == 0 else torch.cat([grid, grid.new_zeros(1)])
        fine = self.fine_grid(float(grid[0]))
        inside = bool((grid[grid > 0] >= fine[-2] * (1 - 1e-12)).all())
        if substeps is not None or self._on_grid(full, fine) is not None or not inside:
            return self.with_outputs(x, grid, substeps, cond)[0]
        base = self.candidate_grid(float(grid[0]))  # on the fine grid (else the fine grid itself): x0 is solve(x)'s
        base = base if self._on_grid(base, fine) is not None else fine
        states, outs = self.with_outputs(x, base, None, cond)
        out = [states[-1] if float(s) == 0 else dense_state(base, states, outs, float(s)) for s in grid]
        return torch.stack(out)

    def with_outputs(self, x: torch.Tensor, grid, substeps: int | None = None,
                     cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(``trajectory``, the model's outputs D(state, sigma) at the grid's positive sigmas ``[len(grid) - 1,
        batch, ...]``): the solver evaluates the model there, so the outputs cost nothing more."""
        self._check_input(x, cond)
        grid = check_sigmas(grid)
        to_zero = float(grid[-1]) == 0  # else the states at the grid's points alone (the solve goes on to 0)
        full = grid if to_zero else torch.cat([grid, grid.new_zeros(1)])
        fine = self.fine_grid(float(grid[0])) if substeps is None else refine(full, int(substeps))
        keep = self._on_grid(full, fine)
        if keep is None:  # off the teacher's grid: its own fine grid, as accurate per interval
            fine = refine(full, max(1, math.ceil(self.steps(float(grid[0])) / (len(full) - 1))))
            keep = self._on_grid(full, fine)
        n = len(keep)
        both = self._cached("traj", x, fine, keep, (2 * n + 1, *x.shape), cond)
        return (both[:n + 1] if to_zero else both[:n]), both[n + 1:]
