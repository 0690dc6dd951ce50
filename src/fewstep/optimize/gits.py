"""GITS: geometry-inspired time scheduling (Chen et al., ICML 2024, "On the Trajectory Regularity of
ODE-based Diffusion Sampling"; arXiv 2506.10177). Reference: zju-pi/diff-sampler, gits-main/gits_utils.py.

Sampling trajectories are regular enough that a few warm-up teacher trajectories on a fine grid tell
how costly each jump between grid times is. GITS fills a cost matrix C[i, j] with the error of one
step i -> j started on the teacher's trajectory, then picks the path of exactly ``steps`` edges from
sigma_max to 0 minimizing sum_m coeff^m C[s_m, s_m+1] (``coeff`` > 1 weighs the later, low-noise steps
more; 1.15 is the reference's default).

The cost here is the step of the solver in use, scored as the batch's mean RMSE to the teacher at j:
- single-step solvers (Euler, Heun): the step from the teacher state at i, as the solver takes it
  (Heun spends its corrector call on each candidate pair);
- multistep solvers (DPM-Solver++(2M/3M), UniPC, iPNDM, DEIS): their history is taken from the
  teacher at the grid points that a locally regular schedule would have visited before i, i.e. the
  same stride back, i - (j - i), i - 2 (j - i), ... (up to ``HISTORY`` points, fewer near sigma_max,
  where the solver is in warm-up anyway). The solver runs along those points with the teacher's states
  and model outputs forced in (teacher forcing), so the cost is the solver's local error with an exact
  history. For UniPC the corrector recomputes the state at i from the point before it (its corrected
  state), so its local error includes that correction, as in a real run.
The final step to 0 returns the denoised estimate for every solver: its cost is the denoiser's error
at the teacher state.

Differences from the reference: the reference costs every solver with one Euler step along the
teacher's derivative and scores it with a signed trajectory-deviation metric ('dev'); its schedule ends
at sigma_min with no final denoising step; its teacher is iPNDM on the 61-point grid itself. Here the
cost is the solver's own step, the metric is the RMSE the schedule is judged by, the last step goes to 0,
and the teacher is Heun with ``substeps`` per grid interval.

Cost in denoiser calls (G grid points, warm-up batch B): the teacher (G * substeps Heun steps, 2 calls
each, per sample), then one batched call of G * B samples (the model outputs on the teacher states);
Heun adds one corrector call per candidate pair, about G^2 / 2 * B samples. Independent of the NFE: the
shortest path itself is K [G, G] min operations.
"""

from __future__ import annotations

import torch

from ..metrics import rmse
from ..sample import plan, sample
from ..schedules import Schedule
from . import Calibration, register
from .dp import batch_rmse, chunks, pad_sigmas, per_sample, run_candidates, shortest_path, step_calls
from .grid import DEFAULT_SIZE, candidate_grid, check_steps, teacher_on_grid

HISTORY = 3  # teacher points before i given to the solver: enough for every core solver (iPNDM-4 uses 3)
PAD = 3  # steps left after the candidate, so UniPC does not lower its order as on a last step


def _edge_costs(ctx: Calibration, solver: str, cap: int | None, traj: torch.Tensor, den: torch.Tensor,
                sig: torch.Tensor, i: torch.Tensor, j: torch.Tensor, q: int) -> torch.Tensor:
    """Mean RMSE at j of the solver's step i -> j from the teacher, after q teacher-forced history points."""
    c, b = i.numel(), traj.shape[1]
    nodes = i[None] - (j - i)[None] * torch.arange(q, -1, -1)[:, None]  # [q + 1, c], ends at i
    head = torch.cat([sig[nodes], sig[j][None]])
    sigmas = per_sample(pad_sigmas(head, q + 2 + PAD), b)
    orders = None if cap is None else [cap] * (q + 1 + PAD)
    force = [traj[n].flatten(0, 1) for n in nodes]
    x, _ = run_candidates(solver, force[0].clone(), sigmas, [den[n].flatten(0, 1) for n in nodes], ctx.denoiser,
                          step_calls(solver, orders, q) - 1, force=force, orders=orders)
    return batch_rmse(x.view(c, *traj.shape[1:]), traj[j])


def cost_matrix(ctx: Calibration, solver: str, orders, traj: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """C[i, j]: mean RMSE of the step i -> j from the teacher (inf where j <= i); the last node is 0."""
    end, b = len(sig) - 1, traj.shape[1]
    den = ctx.denoiser(traj[:end].flatten(0, 1), per_sample(sig[:end], b)).view_as(traj[:end])
    cost = torch.full((end + 1, end + 1), torch.inf, dtype=torch.float64)
    cost[:end, end] = batch_rmse(den, traj[end].expand_as(den))
    i, j = torch.triu_indices(end, end, 1)
    # history points before i at the same stride; none for a two-call solver (Heun has no history)
    q = torch.clamp(i // (j - i), max=HISTORY if step_calls(solver, None, 0) == 1 else 0)
    # per-step order caps (Heun with an Euler first step): edges from sigma_max are the first step
    first_cap = None if orders is None else orders[0]
    mid_cap = None if orders is None else max(orders[1:-1], default=orders[0])
    for qq in q.unique().tolist():
        for first in (True, False):
            sel = ((q == qq) & ((i == 0) == first)).nonzero().flatten()
            cap = first_cap if first else mid_cap
            for s in chunks(sel.numel(), b * traj[0, 0].numel() * (qq + 2)):
                cost[i[sel[s]], j[sel[s]]] = _edge_costs(ctx, solver, cap, traj, den, sig, i[sel[s]], j[sel[s]], qq)
    return cost


@register("gits")
def gits(ctx: Calibration, solver: str, nfe: int, grid: int = DEFAULT_SIZE, substeps: int | None = None,
         coeff: float = 1.15, warmup: int | None = None) -> Schedule:
    """GITS schedule of exactly ``nfe`` calls with ``solver``, picked from a ``grid``-point candidate grid.

    ``coeff``: weight coeff^m of step m in the path cost (> 0; the reference's 1.15). ``warmup``: the
    number of calibration trajectories used for the cost (default: all of them; the reference uses 256).
    ``substeps``: teacher Heun steps per grid interval.
    """
    steps, opts = plan(solver, nfe)
    check_steps(steps, grid)
    if not coeff > 0:
        raise ValueError(f"coeff must be > 0, got {coeff}")
    n = ctx.x.shape[0] if warmup is None else int(warmup)
    if not 1 <= n <= ctx.x.shape[0]:
        raise ValueError(f"warmup must be between 1 and the calibration batch size {ctx.x.shape[0]}, got {warmup}")
    sig = candidate_grid(ctx.sigma_min, ctx.sigma_max, grid)
    traj, substeps = teacher_on_grid(ctx.teacher, ctx.x[:n], sig, substeps)
    cost = cost_matrix(ctx, solver, opts.get("orders"), traj, sig)
    path, _ = shortest_path(cost, steps, coeff)
    sched = Schedule(sig[path], solver=solver, solver_options=opts, method="gits")
    calib = rmse(sample(ctx.denoiser, ctx.x[:n], sched), traj[-1]).mean()
    return sched.with_metadata(provenance={"grid": {"size": grid, "rho": 7.0, "substeps": substeps, "indices": path},
                                           "warmup": n, "calib_error": float(calib)})
