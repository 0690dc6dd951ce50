"""GITS: geometry-inspired time scheduling (Chen et al., ICML 2024, "On the Trajectory Regularity of
ODE-based Diffusion Sampling"; arXiv 2506.10177). Reference: zju-pi/diff-sampler, gits-main/gits_utils.py.

Sampling trajectories are regular enough that a few warm-up teacher trajectories on a fine grid tell
how costly each jump between grid times is. GITS scores every step i -> j started on the teacher's
trajectory and picks the path of exactly ``steps`` steps from sigma_max to 0 that minimizes the weighted
sum of its step costs, by dynamic programming (exact shortest path when the costs are pairwise).

Step cost here: the batch's mean RMSE at j to the teacher, times w_j^p with w_j = spread(x_0) /
spread(x_sigma_j), the batch spread of the teacher's final states over that at sigma_j, times coeff^m
for step m. w_j estimates how much of an error made at sigma_j survives to the sample (exact for
isotropic Gaussian data, where the ODE maps x_sigma - mu to s / sqrt(s^2 + sigma^2) (x_sigma - mu));
without it the costs at high noise, in units of a very noisy state, dominate. coeff^m is the
reference's per-step weight (1.15, 1.20 for Stable Diffusion, set by hand per data set).

A sum of weighted local errors is a surrogate of the sample's error, and which weighting makes it a
good one depends on the model and the solver: measured on the built-in models, the best coeff moved
between 0.9 and 1.35 from cell to cell, and a wrong one cost up to 3x the baseline's error. So by default
(``coeff='auto'``, ``propagation='auto'``) GITS runs the DP for every (coeff, p) in AUTO_COEFFS x
AUTO_PROPAGATION (the pair costs are computed once; each DP is [G, G] tensor work) and keeps the schedule
whose real error, the solver run on the warm-up batch against the teacher's end, is least: the
reference's hand tuning of coeff, done on the calibration batch by the measure schedules are judged by.
- ``history=0`` (default): the step is taken from the teacher state at i as the solver's first step
  (all core multistep solvers start with the same first-order step; Heun takes its real two-call step,
  spending a corrector call per candidate pair). This is the reference's one-step cost.
- ``history=1..3``: a multistep solver (DPM-Solver++(2M/3M), UniPC, iPNDM, DEIS) runs the step with the
  teacher's states and model outputs at the last ``history`` points of the kept path to i forced in
  (teacher forcing), with the orders and remaining step count of the real schedule: its local error
  with an exact history. The DP then keeps the best predecessor per point and level. UniPC's corrector
  recomputes the state at i from the point before, so its cost includes that correction.
  Measured on the built-in models (bench/dp.py), this solver-exact local cost gave worse schedules than
  ``history=0``: a sum of local errors does not see how later steps amplify or damp them.
The final step to 0 returns the denoised estimate for every solver: its cost is the denoiser's error
at the teacher state.

Differences from the reference (zju-pi/diff-sampler gits-main): the reference costs every solver with
one Euler step along the teacher's derivative, scored by a signed trajectory-deviation metric ('dev')
with the coeff^m weight; its schedule ends at sigma_min with no final denoising step; its teacher is
iPNDM on its 61-point grid. Here the score is the RMSE the schedule is judged by with the propagation
weight, the last step goes to 0, and the teacher is the run's error-controlled one (``teacher.py``).

Cost in network evaluations (rows; G grid points, K steps, warm-up batch B, M distinct schedules among
the auto candidates, M <= 24): the teacher's solve of the B states (shared with every method of a run;
the model's outputs on the teacher states come with it), and at most M * K * B to measure the candidates
(all on half the batch, those not clearly worse there on the other half too); Heun
adds one corrector call per candidate pair, (G^2 / 2) * B for each of its two step orders. The DP
itself is K levels of [G, G] tensor operations per candidate, no model calls.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..metrics import clearly_worse, rmse
from ..sampling import sample
from ..schedules import RHO, Schedule
from ..solvers import MAX_HISTORY, get_solver, plan
from .base import Calibration, register
from .dp import Counter, batch_rmse, chunks, extend, pad_sigmas, per_sample, run_candidates, step_calls
from .grid import DEFAULT_SIZE, candidate_grid, check_steps, teacher_on_grid

AUTO_COEFFS = (0.9, 1.0, 1.05, 1.1, 1.15, 1.2, 1.35, 1.5)  # around the reference's 1.15 / 1.20
AUTO_PROPAGATION = (0.5, 1.0, 1.5)  # exponents p of the propagation weight w_j^p


def _floats(v) -> list[float]:
    """A number or a list of numbers as a list of floats."""
    return [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


@dataclass(frozen=True)
class Options:
    """GITS's options.

    ``grid``: candidate grid points; ``substeps``: teacher steps per grid interval (None: the
    teacher's steps spread over the grid); ``coeff``: weight coeff^m of step m in the path cost (> 0;
    the reference uses 1.15), a list of them, or 'auto' (AUTO_COEFFS); ``propagation``: the exponent p
    of the propagation weight w_j^p (>= 0; 0 is the reference's unweighted cost), a list, or 'auto'
    (AUTO_PROPAGATION). Of all the pairs, the schedule with the least error on the warm-up batch is kept.
    ``history``: 0 costs each step as the solver's first-order step from the teacher (the reference's
    choice); 1-3 give a multistep solver that many teacher-forced points of the kept path as history.
    ``warmup``: the number of calibration trajectories used for the cost and the choice (default, or
    more than the batch holds: all of them; the reference uses 256).
    """

    grid: int = DEFAULT_SIZE
    substeps: int | None = None
    coeff: float | str | list = "auto"
    propagation: float | str | list = "auto"
    history: int = 0
    warmup: int | None = None

    def __post_init__(self):
        if not all(c > 0 for c in self.coeffs()):
            raise ValueError(f"coeff must be > 0 or 'auto', got {self.coeff!r}")
        if not all(p >= 0 for p in self.propagations()):
            raise ValueError(f"propagation must be >= 0 or 'auto', got {self.propagation!r}")
        if self.history not in range(MAX_HISTORY + 1):
            raise ValueError(f"history must be 0..{MAX_HISTORY}, got {self.history!r}")
        if self.warmup is not None and (int(self.warmup) != self.warmup or self.warmup < 1):
            raise ValueError(f"warmup must be a positive integer or None, got {self.warmup!r}")

    def coeffs(self) -> list[float]:
        return list(AUTO_COEFFS) if self.coeff == "auto" else _floats(self.coeff)

    def propagations(self) -> list[float]:
        return list(AUTO_PROPAGATION) if self.propagation == "auto" else _floats(self.propagation)


def _local_error(model: Counter, solver: str, orders, steps: int, k: int, history: int, traj: torch.Tensor,
                 den: torch.Tensor, sig: torch.Tensor, paths: torch.Tensor, a: torch.Tensor,
                 j: torch.Tensor) -> torch.Tensor:
    """Mean RMSE at j of step k of the kept paths ``a`` to grid points ``j``, taken by the solver from
    the teacher with the teacher's states and outputs at the path's last ``q`` points as its history."""
    q = min(history, k)
    nodes = paths[a][:, -(q + 1):].T  # [q + 1, c], the last is i
    b = traj.shape[1]
    # the solver runs from step k - q of the real schedule: as many steps remain, with their orders
    sigmas = per_sample(pad_sigmas(torch.cat([sig[nodes], sig[j][None]]), steps - k + q + 1), b)
    orders = None if orders is None else orders[k - q:]
    force = [traj[n].flatten(0, 1) for n in nodes]
    x, _ = run_candidates(solver, force[0].clone(), sigmas, [den[n].flatten(0, 1) for n in nodes], model,
                          step_calls(solver, orders, q) - 1, force=force, orders=orders)
    return batch_rmse(x.view(j.numel(), *traj.shape[1:]), traj[j])


def _pair_costs(local, end: int, per_item: int) -> torch.Tensor:
    """``[end, end]`` matrix of the history-free step costs i -> j (i < j < end; +inf elsewhere)."""
    i, j = torch.triu_indices(end, end, 1)
    cost = torch.full((end, end), torch.inf, dtype=torch.float64)
    for s in chunks(i.numel(), per_item):
        cost[i[s], j[s]] = local(i[s], j[s])
    return cost


def _dp(steps: int, end: int, coeff: float, weight: torch.Tensor, final: torch.Tensor, level_cost) -> list[int]:
    """Grid indices of the path of exactly ``steps`` steps from 0 to ``end`` with the least
    sum_m coeff^m weight[s_{m+1}] C_m (the last step, to 0, costs ``final`` at its start);
    ``level_cost(k, nodes, paths)`` gives step k's cost function of (kept path, next point) pairs."""
    nodes, paths = torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
    total = torch.zeros(1, dtype=torch.float64)  # sum_m coeff^m w C_m along each kept path
    for k in range(steps - 1):
        cost, per_item = level_cost(k, nodes, paths)
        nodes, _, total, paths = extend(nodes, paths, end - steps + k + 1,
                                        lambda a, j: total[a] + coeff ** k * weight[j] * cost(a, j), per_item)
    best = int((total + coeff ** (steps - 1) * final[nodes]).argmin())
    return paths[best].tolist() + [end]


def _on_teacher(ctx: Calibration, sig: torch.Tensor, substeps: int | None):
    """The teacher on the grid from the calibration states, the model's outputs on its states (the
    solver's history; they come with the teacher's solve), the final step's cost at each point, and the
    propagation weight w_j."""
    traj, den = teacher_on_grid(ctx.teacher, ctx.x, sig, substeps, ctx.cond)
    end = len(sig) - 1
    final = batch_rmse(den, traj[end].expand_as(den))
    # how much of an error at sigma_j reaches the sample: spread(x_0) / spread(x_sigma_j) over the batch,
    # exact for isotropic Gaussian data (x_0 - mu = s / sqrt(s^2 + sigma^2) (x_sigma - mu) along the ODE)
    spread = (traj - traj.mean(1, keepdim=True)).pow(2).flatten(1).mean(1).sqrt()
    return traj, den, final, (spread[end] / spread).cpu()


def _level_costs(model: Counter, solver: str, orders, steps: int, history: int, traj: torch.Tensor,
                 den: torch.Tensor, sig: torch.Tensor) -> Callable:
    """``level_cost(k, nodes, paths)`` for ``_dp``: step k's cost of (kept path, next point) pairs."""
    end, per_item, mats = len(sig) - 1, traj.shape[1] * traj[0, 0].numel(), {}

    def level_cost(k, nodes, paths):
        if history:
            return (partial(_local_error, model, solver, orders, steps, k, history, traj, den, sig, paths),
                    per_item * (min(history, k) + 2))
        # without history a step from the teacher is the solver's first step: the same matrix for every
        # level with the same order cap (all of them but for Heun's Euler step)
        key = None if orders is None else orders[k]
        if key not in mats:
            own = torch.arange(end)[:, None]  # each point is its own path
            mats[key] = _pair_costs(partial(_local_error, model, solver, orders, steps, k, 0, traj, den, sig, own),
                                    end, 2 * per_item)
        return (lambda a, j: mats[key][nodes[a], j]), 1

    return level_cost


def cost(opts: Options, solver: str, nfe: int, n: int) -> int:
    """At most M * K * B to measure the candidate schedules (M distinct among the pairs, about half of them),
    plus Heun's corrector call per candidate pair, G^2 * B."""
    b, pairs = min(n, opts.warmup or n), len(opts.coeffs()) * len(opts.propagations())
    return (pairs + 1) // 2 * nfe * b + (opts.grid ** 2 * b if get_solver(solver).calls_per_step == 2 else 0)


@register("gits", Options, tune_options={"grid": 40, "warmup": 16}, cost=cost)
@torch.no_grad()
def gits(ctx: Calibration, solver: str, nfe: int, opts: Options) -> Schedule:
    """GITS schedule of exactly ``nfe`` calls with ``solver``, picked from an ``opts.grid``-point grid:
    the DP for every (coeff, p) pair (``Options``), and the schedule with the least warm-up error."""
    steps, sopts = plan(solver, nfe)
    check_steps(steps, opts.grid)
    n = ctx.x.shape[0] if opts.warmup is None else min(int(opts.warmup), ctx.x.shape[0])
    ctx = ctx.subset(slice(None, n))
    sig = candidate_grid(ctx.sigma_min, ctx.sigma_max, opts.grid)
    end, orders, model = opts.grid, sopts.get("orders"), Counter(ctx.denoiser)
    traj, den, final, weight = _on_teacher(ctx, sig, opts.substeps)
    history = opts.history if get_solver(solver).calls_per_step == 1 else 0  # a two-call solver (Heun) has none
    level_cost = _level_costs(model, solver, orders, steps, history, traj, den, sig)
    pairs = {(c, p): tuple(_dp(steps, end, c, weight ** p, final, level_cost))
             for c, p in itertools.product(opts.coeffs(), opts.propagations())}

    def errors(path, part):  # a candidate's per-sample errors on the warm-up noises ``part``, its rows counted
        sub = ctx.subset(part)
        count = Counter(sub.denoiser)
        out = sample(count, sub.x, Schedule(sig[list(path)], solver=solver, solver_options=sopts))
        model.samples += count.samples
        return rmse(out, traj[-1][part])

    measured = _measure(errors, set(pairs.values()), n)
    tried = [[c, p, float(measured[path].mean()), len(measured[path])] for (c, p), path in pairs.items()]
    c, p, calib, _ = min(tried, key=lambda t: (-t[3], t[2]))  # the least error among those measured on all
    path = list(pairs[(c, p)])
    return Schedule(sig[path], solver=solver, solver_options=sopts, method="gits",
                    provenance={"grid": {"size": opts.grid, "rho": RHO, "substeps": opts.substeps, "indices": path},
                                "coeff": c, "propagation": p, "candidates": tried, "warmup": n,
                                "candidate_rows": model.samples, "calib_error": calib})


def _measure(errors: Callable, paths: set, n: int) -> dict:
    """Per-sample errors of each candidate path (``errors(path, part)`` on the warm-up noises ``part``): all
    on the first half, the rest only for those not clearly worse there than the best (a small race, as the
    tune's: ``metrics.clearly_worse``)."""
    half = slice(None, max(2, n // 2))
    out = {path: errors(path, half) for path in sorted(paths)}
    best = out[min(out, key=lambda q: out[q].mean())]
    if n > len(best):
        for path in [q for q in out if not clearly_worse(out[q] - best)]:
            out[path] = torch.cat([out[path], errors(path, slice(len(best), n))])
    return out
