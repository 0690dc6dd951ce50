"""The machinery GITS and OSS share: running the solver in use on a batch of candidate steps, and one
level of the exactly-K-steps dynamic program over the grid.

Candidate steps go through the core solver functions themselves, so the cost is the step of the solver
actually used, multistep history, UniPC's corrector and per-step ``orders`` included. A :class:`Replay`
stands in for the denoiser: it hands the solver the outputs recorded along each candidate's path (no
model call), then, for a two-call solver (Heun), calls the real denoiser for the step's own extra
evaluation, and stops the solver at the next call, whose input is the state the step landed on. All
candidates run as one batch with per-sample sigmas ``[steps + 1, candidates * batch]``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..solvers import get_solver


class Counter:
    """Wraps a denoiser and counts the samples it evaluates (one call on a batch of n counts n)."""

    def __init__(self, denoiser: Callable):
        self.denoiser, self.samples = denoiser, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.samples += x.shape[0]
        return self.denoiser(x, sigma)


class Captured(Exception):
    """Raised by a Replay to stop the solver; ``x`` is the state it was about to evaluate."""

    def __init__(self, x: torch.Tensor):
        super().__init__("replay reached the captured step")
        self.x = x


class Replay:
    """A stand-in denoiser for the solver: recorded ``outputs`` for its first calls, then ``live_calls``
    calls of ``live`` (the real, counted denoiser), then :class:`Captured` with the input state.

    ``force``: states to put in place of the solver's state at each recorded call (teacher forcing: the
    solver then continues from the teacher's state, with the teacher's outputs as its history).
    """

    takes_step = True

    def __init__(self, outputs: Sequence[torch.Tensor], live: Callable | None = None, live_calls: int = 0,
                 force: Sequence[torch.Tensor] | None = None):
        self.outputs, self.live, self.live_calls, self.force = outputs, live, live_calls, force
        self.calls = 0
        self.recorded: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        c = self.calls
        self.calls += 1
        if c < len(self.outputs):
            if self.force is not None:
                x.copy_(self.force[c])
            return self.outputs[c]
        if c < len(self.outputs) + self.live_calls:
            out = self.live(x, sigma)
            self.recorded.append(out)
            return out
        raise Captured(x)


def step_calls(solver: str, orders: Sequence[int] | None, k: int) -> int:
    """Denoiser calls of step ``k`` (not a step to 0) with ``solver`` and per-step ``orders``."""
    return get_solver(solver).step_calls(None if orders is None else orders[k])


def run_candidates(solver: str, x0: torch.Tensor, sigmas: torch.Tensor, outputs: Sequence[torch.Tensor],
                   live: Callable | None = None, live_calls: int = 0, force: Sequence[torch.Tensor] | None = None,
                   **solver_options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``solver`` from ``x0`` on per-sample ``sigmas`` (``[steps + 1, batch]``) with a Replay; return
    the state it reaches after the recorded and live calls, and the live calls' outputs.

    ``sigmas`` must go on past the captured state (any decreasing values down to 0): the solver sees
    as many remaining steps as in the real schedule, which sets UniPC's lower order at the end.
    """
    spec = get_solver(solver)
    replay = Replay(outputs, live, live_calls, force)
    try:
        spec.fn(replay, x0, sigmas, **{**spec.options, **solver_options})
    except Captured as c:
        return c.x, replay.recorded
    raise RuntimeError(f"internal error: {solver} finished before the candidate step was captured")


def pad_sigmas(head: torch.Tensor, total: int) -> torch.Tensor:
    """``head`` ([n, c], decreasing, > 0) continued by decreasing values to 0, to ``total`` rows."""
    extra = total - head.shape[0]
    frac = torch.linspace(1, 0, extra + 1, dtype=head.dtype)[1:]
    return torch.cat([head, head[-1:] * frac[:, None]])


def per_sample(values: torch.Tensor, batch: int) -> torch.Tensor:
    """Candidate-major ``[..., c]`` to ``[..., c * batch]`` (each candidate's value for its batch)."""
    return values.repeat_interleave(batch, dim=-1)


def chunks(n: int, per_item: int, budget: int = 2 ** 22) -> list[slice]:
    """Slices over ``n`` candidates so one chunk holds about ``budget`` numbers of ``per_item`` each."""
    size = max(1, budget // max(1, per_item))
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def batch_rmse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x``, ``ref`` of shape ``[c, batch, ...]``: per-candidate mean over the batch of per-sample RMSE,
    on the CPU (where the DP's bookkeeping lives, whatever device the model runs on)."""
    diff = (x - ref).reshape(x.shape[0], x.shape[1], -1)
    return diff.pow(2).mean(-1).sqrt().mean(-1).cpu()


def extend(nodes: torch.Tensor, paths: torch.Tensor, hi: int, score: Callable, per_item: int):
    """One level of the exactly-K-steps DP: extend the kept paths (``paths[a]`` ends at grid point
    ``nodes[a]``) by one step to every later point up to ``hi``, and keep the cheapest per point.

    ``score(a, j)`` gives the cost of extending path a to point j for a chunk of pairs (about
    2^22 / ``per_item`` at a time). Returns the points now reached, the winning path for each, its cost
    and the new paths ``[kept, k + 2]``. With additive pairwise costs this is Bellman's recursion and
    the result is the exact shortest path of K edges (GITS, gits_utils.py); with a cost that depends on
    the whole path (OSS, or a solver's history) it keeps the best predecessor per point.
    """
    a, j = (torch.arange(hi + 1)[None] > nodes[:, None]).nonzero(as_tuple=True)
    cost = torch.empty(a.numel(), dtype=torch.float64)
    for s in chunks(a.numel(), per_item):
        cost[s] = score(a[s], j[s])
    table = torch.full((nodes.numel(), hi + 1), torch.inf, dtype=torch.float64)
    table[a, j] = cost
    best, arg = table.min(0)
    kept = torch.isfinite(best).nonzero().flatten()
    if kept.numel() == 0:
        raise ValueError("no finite cost for any candidate step: the denoiser or the grid is unusable")
    return kept, arg[kept], best[kept], torch.cat([paths[arg[kept]], kept[:, None]], 1)
