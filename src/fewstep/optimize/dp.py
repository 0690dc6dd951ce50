"""The machinery GITS and OSS share: running the solver in use on a batch of candidate steps, and the
exact-K-steps shortest path.

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

from ..sample import get_solver, nfe


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

    def __init__(self, outputs: Sequence[torch.Tensor], live: Callable | None = None, live_calls: int = 0,
                 force: Sequence[torch.Tensor] | None = None):
        self.outputs, self.live, self.live_calls, self.force = outputs, live, live_calls, force
        self.calls = 0
        self.recorded: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
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
    return nfe([2.0, 1.0], solver, orders=None if orders is None else [orders[k]])


def run_candidates(solver: str, x0: torch.Tensor, sigmas: torch.Tensor, outputs: Sequence[torch.Tensor],
                   live: Callable | None = None, live_calls: int = 0, force: Sequence[torch.Tensor] | None = None,
                   **solver_options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``solver`` from ``x0`` on per-sample ``sigmas`` (``[steps + 1, batch]``) with a Replay; return
    the state it reaches after the recorded and live calls, and the live calls' outputs.

    ``sigmas`` must go on past the captured state (any decreasing values down to 0): the solver sees
    as many remaining steps as in the real schedule, which sets UniPC's lower order at the end.
    """
    fn, defaults = get_solver(solver)
    replay = Replay(outputs, live, live_calls, force)
    try:
        fn(replay, x0, sigmas, **{**defaults, **solver_options})
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
    """``x``, ``ref`` of shape ``[c, batch, ...]``: per-candidate mean over the batch of per-sample RMSE."""
    diff = (x - ref).reshape(x.shape[0], x.shape[1], -1)
    return diff.pow(2).mean(-1).sqrt().mean(-1)


def shortest_path(cost: torch.Tensor, steps: int, coeff: float = 1.0) -> tuple[list[int], float]:
    """Path of exactly ``steps`` edges from node 0 to the last node minimizing sum_m coeff^m cost[s_m, s_m+1].

    Bellman recursion on the cost to go, V_1(j) = C(j, end), V_k(j) = min_i C(j, i) + coeff V_{k-1}(i)
    (GITS, Chen et al. 2024; diff-sampler gits_utils.py): step m, counted from the noise end, weighs
    coeff^m. ``cost[i, j]`` must be inf where i -> j is not a step (j <= i). One [n, n] min per step.
    """
    end = cost.shape[0] - 1
    v = cost[:, end].clone()
    choices = []
    for _ in range(steps - 1):
        v, arg = (cost[:, :end] + coeff * v[None, :end]).min(1)
        choices.append(arg)
    if not torch.isfinite(v[0]):
        raise ValueError(f"no path of {steps} steps through the grid: use a larger grid")
    path = [0]
    for arg in reversed(choices):
        path.append(int(arg[path[-1]]))
    return path + [end], float(v[0])
