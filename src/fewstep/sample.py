"""``fewstep.sample``: run a schedule with a solver; ``fewstep.nfe``: what it costs in denoiser calls."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .schedules import ScheduleError, as_schedule
from .solvers import SOLVERS


class DenoiserError(RuntimeError):
    """The denoiser returned something unusable (wrong shape, NaN or inf)."""


def get_solver(name: str) -> tuple[Callable, dict]:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}")
    return SOLVERS[name]


# Solvers that spend two calls on a step (except a step to sigma = 0, or where orders[i] == 1).
TWO_STAGE = {"heun"}


def nfe(schedule: Any, solver: str | None = None, **options: Any) -> int:
    """Exact number of denoiser calls ``fewstep.sample`` makes for ``schedule`` with ``solver``."""
    sched = as_schedule(schedule)
    name = _solver_name(sched, solver)
    get_solver(name)
    orders = {**sched.solver_options, **options}.get("orders")
    steps = sched.steps
    if name not in TWO_STAGE:
        return steps
    final_zero = sched.sigma_final == 0
    two = [not (final_zero and i == steps - 1) and (orders is None or orders[i] >= 2) for i in range(steps)]
    return steps + sum(two)


def plan(solver: str, nfe: int, final_zero: bool = True) -> tuple[int, dict]:
    """Steps and solver options that spend exactly ``nfe`` calls with ``solver``.

    Single-call solvers: ``nfe`` steps. Heun: 2 calls a step and 1 on a final step to 0; for an NFE
    that this leaves over by one, the first step (at the highest noise, where the path is straightest)
    is an Euler step, recorded as ``orders``.
    """
    get_solver(solver)
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if solver not in TWO_STAGE:
        return int(nfe), {}
    if final_zero:
        if nfe % 2 == 1:
            return (nfe + 1) // 2, {}
        steps = nfe // 2 + 1
        return steps, {"orders": [1] + [2] * (steps - 2) + [1]}
    if nfe % 2 == 0:
        return nfe // 2, {}
    steps = (nfe + 1) // 2
    return steps, {"orders": [1] + [2] * (steps - 1)}


def _solver_name(sched: Any, solver: str | None) -> str:
    name = solver or getattr(sched, "solver", None)
    if name is None:
        raise ValueError("no solver given and the schedule names none: pass solver=..., e.g. solver='dpmpp_2m'")
    return name


class CheckedDenoiser:
    """Calls the user's denoiser with sigma of shape [batch], checks and counts what comes back."""

    def __init__(self, denoiser: Callable):
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sig = sigma.to(device=x.device, dtype=x.dtype)
        sig = sig.expand(x.shape[0]) if sig.ndim == 0 else sig
        out = self.denoiser(x, sig)
        self.calls += 1
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DenoiserError(f"denoiser returned shape {got} for input of shape {tuple(x.shape)}")
        # A sum of finite values is finite unless it overflows: only then check every element.
        if not math.isfinite(float(out.detach().sum())) and not torch.isfinite(out).all():
            raise DenoiserError(
                f"denoiser returned NaN or inf at sigma={float(sig.detach().flatten()[0]):.6g} (call {self.calls})"
            )
        return out.to(x.dtype)


class Corrected:
    """A denoiser with per-step corrections (Yuan et al., arXiv 2603.17671: time shift and output scale).

    A call at the schedule's sigma ``sigmas[j]`` (a row, for per-sample sigmas) evaluates the denoiser
    at ``sigma * exp(shift[j])`` and returns ``x + scale[j] (D - x)``, i.e. the epsilon (x - D) / sigma
    scaled by ``scale[j]``; the solver's coefficients still use ``sigmas[j]`` (LD3's decoupled
    evaluation times are the shift alone). ``shift``, ``scale``: ``[steps]`` or ``[steps, batch]``.
    """

    def __init__(self, model: Callable, sigmas: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        self.model, self.sigmas, self.shift, self.scale = model, sigmas, shift, scale

    def _step(self, sigma: torch.Tensor) -> int:
        """Index j of the schedule row the solver passed. The solvers pass views ``sigmas[j]``, found by
        address without reading the device; any other tensor is matched by value (one host sync)."""
        rows = self.sigmas[:-1]
        if (sigma.device == rows.device and sigma.dtype == rows.dtype and sigma.shape == rows.shape[1:]
                and sigma.is_contiguous() and rows.is_contiguous() and rows.numel()):
            offset, size = sigma.data_ptr() - rows.data_ptr(), rows[0].numel() * rows.element_size()
            if offset % size == 0 and 0 <= offset // size < len(rows):
                return offset // size
        hits = (rows.reshape(len(rows), -1) == sigma.reshape(1, -1)).all(1).nonzero().flatten().tolist()
        if not hits:
            raise RuntimeError("internal error: the solver called the denoiser at a sigma not on its schedule")
        return hits[0]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        j = self._step(sigma)
        shift, scale = (v[j].to(device=x.device, dtype=x.dtype) for v in (self.shift, self.scale))
        denoised = self.model(x, sigma.to(device=x.device, dtype=x.dtype) * torch.exp(shift))
        return x + scale.reshape(-1, *([1] * (x.ndim - 1))) * (denoised - x)


def corrected(model: Callable, sigmas: torch.Tensor, corrections: tuple | None) -> Callable:
    """``model`` with a schedule policy's ``corrections`` applied (``Corrected``); as is for None."""
    return model if corrections is None else Corrected(model, sigmas, *corrections)


def sample(denoiser: Callable, x: torch.Tensor, schedule: Any, solver: str | None = None, *,
           callback: Callable[[dict], None] | None = None, progress: bool = False, **options: Any) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x`` (the state at sigma_max: ``noise * sigmas[0]``).

    ``schedule``: a Schedule, a list/tensor of sigmas, or a per-sample policy (an object with
    ``sigmas_for(x) -> [steps + 1, batch]``, or ``plan_for(x) -> (sigmas, corrections)``, see ``Corrected``).
    ``solver`` defaults to the one the schedule was made
    for; ``options`` override the schedule's ``solver_options``.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError("x must be a tensor of shape [batch, ...] with batch >= 1")
    corrections = None
    if hasattr(schedule, "sigmas_for"):
        sigmas, corrections = schedule.plan_for(x) if hasattr(schedule, "plan_for") else (schedule.sigmas_for(x), None)
        opts = dict(getattr(schedule, "solver_options", {}) or {})
    else:
        sched = as_schedule(schedule)
        sigmas = sched.sigmas
        opts = sched.solver_options
    name = _solver_name(schedule, solver)
    fn, defaults = get_solver(name)
    opts = {**defaults, **opts, **options}
    orders = opts.get("orders")
    if orders is not None and len(orders) != len(sigmas) - 1:
        raise ScheduleError(f"solver option 'orders' has {len(orders)} entries for {len(sigmas) - 1} steps")
    sigmas = sigmas.to(x.device)
    model = corrected(CheckedDenoiser(denoiser), sigmas, corrections)
    if progress:
        bar = tqdm(total=len(sigmas) - 1, desc=f"sample ({name})", leave=False)
        user_cb = callback

        def callback(info: dict) -> None:
            bar.update(1)
            if user_cb is not None:
                user_cb(info)
    try:
        return fn(model, x, sigmas, callback=callback, **opts)
    finally:
        if progress:
            bar.close()
