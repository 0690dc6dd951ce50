"""OSS: Optimal Stepsize for diffusion Sampling (Pei, Hu, Gu 2025, arXiv 2503.21774).

A dynamic program over a fine grid that propagates the *student's own* few-step states: at level k
(k steps taken) each grid point j keeps the best path of k steps from sigma_max to j, the state the
solver reaches there, and every model output along that path (its multistep history). Level k + 1 makes
one model call per kept point, then tries every later grid point as the next timestep by re-running the
solver in use along the kept path (recorded outputs, no model calls) and scores the state it lands on
against the teacher at that point: the batch's mean RMSE. The last level steps to sigma = 0, where the
score is the final error. Kept per point: the best predecessor (optimal substructure, the paper's Sec. 3).

Differences from the reference (bebebe666/OptimalSteps, OSS/OSS.py): the cost is the solver actually
used, with its history, not an Euler step; one schedule for the batch's mean error, not per-sample paths
combined by a median; every path starts at sigma_max (the reference seeds every grid point with the
noise); exactly ``steps`` levels, not "at most"; the run's error-controlled teacher on its candidate grid,
not 200 Euler steps.

Cost in network evaluations (rows; G grid points, K steps from ``plan(solver, nfe)``, batch B): the
teacher's solve of the B states (shared with every method of a run); then at most G * B per level,
K * G * B in all. Heun adds its corrector call for every candidate pair, about (G^2 / 2) * B per level,
plus G * B to rerun the winners. Replays cost no calls but O(K^2 G^2 B) solver arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from ..schedules import RHO, Schedule
from ..solvers import get_solver, plan
from .base import Calibration, register
from .dp import Counter, batch_rmse, extend, pad_sigmas, per_sample, run_candidates, step_calls
from .grid import DEFAULT_SIZE, candidate_grid, check_steps, teacher_on_grid


def _land(ctx: Calibration, model: Counter, solver: str, orders, steps: int, k: int, sig: torch.Tensor,
          paths: torch.Tensor, outs: list[torch.Tensor], a: torch.Tensor, j: torch.Tensor):
    """Step k of the kept paths ``a`` (indices into the kept points) to grid points ``j``: the states
    reached, ``[c, B, ...]``, and the outputs of the step's live calls (Heun's second call)."""
    c, b = a.numel(), ctx.x.shape[0]
    head = torch.cat([sig[paths[a]].T, sig[j][None]])
    sigmas = per_sample(pad_sigmas(head, steps + 1), b)
    x0 = ctx.x.repeat(c, *[1] * (ctx.x.ndim - 1))
    x, rec = run_candidates(solver, x0, sigmas, [o[a].flatten(0, 1) for o in outs], model,
                            step_calls(solver, orders, k) - 1, orders=orders)
    return x.view(c, *ctx.x.shape), [r.view(c, *ctx.x.shape) for r in rec]


@dataclass(frozen=True)
class Options:
    """OSS's options: ``grid`` candidate grid points; ``substeps`` teacher steps per grid interval
    (None: the teacher's steps spread over the grid); ``batch``: the DP propagates the first that many
    calibration states (default: all of them; its cost is linear in it)."""

    grid: int = DEFAULT_SIZE
    substeps: int | None = None
    batch: int | None = None

    def __post_init__(self):
        if self.batch is not None and (int(self.batch) != self.batch or self.batch < 1):
            raise ValueError(f"batch must be a positive integer or None, got {self.batch!r}")


def cost(opts: Options, solver: str, nfe: int, n: int) -> int:
    """K * G * B: one model call per kept grid point and sample at each of the K levels; Heun's corrector
    call for every candidate pair, (G^2 / 2) * B per level."""
    steps, b = plan(solver, nfe)[0], min(n, opts.batch or n)
    return steps * opts.grid * b * (1 + (opts.grid // 2 if get_solver(solver).calls_per_step == 2 else 0))


# tune: a 40-point grid, the DP on 8 noises (digits-unet: the same winners as 16 for half the cost; docs/tune.md)
@register("oss", Options, tune_options={"grid": 40, "batch": 8}, cost=cost)
@torch.no_grad()
def oss(ctx: Calibration, solver: str, nfe: int, opts: Options) -> Schedule:
    """OSS schedule of exactly ``nfe`` calls with ``solver``, picked from an ``opts.grid``-point grid."""
    grid, ctx = opts.grid, ctx.subset(slice(None, opts.batch))
    steps, sopts = plan(solver, nfe)
    check_steps(steps, grid)
    orders = sopts.get("orders")
    sig = candidate_grid(ctx.sigma_min, ctx.sigma_max, grid)
    traj, _ = teacher_on_grid(ctx.teacher, ctx.x, sig, opts.substeps, ctx.cond)
    end, b = grid, ctx.x.shape[0]
    model = Counter(ctx.denoiser)
    nodes = torch.zeros(1, dtype=torch.long)  # grid index of each kept point at this level
    paths = torch.zeros(1, 1, dtype=torch.long)  # its best path from sigma_max, [kept, k + 1]
    states = ctx.x[None]  # the state the solver reaches there, [kept, B, ...]
    outs: list[torch.Tensor] = []  # the model outputs along that path, one [kept, B, ...] per call
    for k in tqdm(range(steps), desc="oss", leave=False, disable=not ctx.progress):
        fresh = model(states.flatten(0, 1), per_sample(sig[nodes], b)).view_as(states)
        outs = outs + [fresh]
        if k == steps - 1:  # the final step to 0 returns the denoised estimate
            err = batch_rmse(fresh, traj[end].expand_as(fresh))
            best = int(err.argmin())
            path = paths[best].tolist() + [end]
            break
        # Candidate next points leave room for the steps - k - 2 points still to come before 0.
        land = partial(_land, ctx, model, solver, orders, steps, k, sig, paths, outs)
        nodes, a, _, paths = extend(nodes, paths, end - steps + k + 1,
                                    lambda a, j: batch_rmse(land(a, j)[0], traj[j]), b * ctx.x[0].numel() * (k + 2))
        states, rec = land(a, nodes)
        outs = [o[a] for o in outs] + rec
    return Schedule(sig[path], solver=solver, solver_options=sopts, method="oss",
                    provenance={"grid": {"size": grid, "rho": RHO, "substeps": opts.substeps, "indices": path},
                                "candidate_rows": model.samples, "calib_error": float(err[best])})
