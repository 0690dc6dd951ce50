"""What a run costs: network evaluations (rows through the network: a batched call of 128 rows is 128),
counted where the model is called, attributed to stages, and kept within a budget.

``Meter`` wraps the user's denoiser once, below every fewstep wrapper, so nothing escapes the count;
``stage`` names what the rows are for (teacher, method, scoring, probe, report). With a ``budget`` the meter
refuses a call that would exceed it (``BudgetExhausted``), so a run never spends more than it was given.
Under torchrun each rank's meter counts its own rows and keeps to its share of the budget
(``budget / ranks``); ``combined`` sums the ranks' counts.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch

from . import distributed
from .sampling import CheckedDenoiser

STAGES = ("probe", "teacher", "method", "scoring", "report")
FACTS = ("shape", "sigma_min", "sigma_max", "name", "device", "model_id", "guidance", "max_batch")  # passed through to wrappers


class BudgetExhausted(RuntimeError):
    """The next network call would exceed the run's budget of evaluations."""


class Meter:
    """The denoiser, counting the rows it evaluates per stage (and the seconds spent in it)."""

    def __init__(self, denoiser: Callable, budget: int | None = None, ranks: int = 1):
        self.denoiser, self.budget, self.ranks = denoiser, budget, ranks
        self.rows: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.stage = "method"
        _pass_facts(denoiser, self)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def left(self) -> float:
        """Evaluations this meter may still spend: its share of the budget, less its own count."""
        return float("inf") if self.budget is None else self.budget / self.ranks - self.total

    def combined(self) -> "Meter":
        """A meter holding every rank's rows and seconds summed (this one's, without a process group)."""
        out = Meter(None, self.budget)
        for rows, seconds in distributed.gathered((dict(self.rows), dict(self.seconds))):
            for stage, v in rows.items():
                out.rows[stage] += v
            for stage, v in seconds.items():
                out.seconds[stage] += v
        return out

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        if x.shape[0] > self.left():
            raise BudgetExhausted(f"the budget of {self.budget:,} evaluations is spent ({self.total:,} used; a call of "
                                  f"{x.shape[0]} rows would exceed it)")
        start = time.perf_counter()
        out = self.denoiser(x, sigma, **kw)  # kw: cond=, for a conditional denoiser
        self.rows[self.stage] += x.shape[0]
        self.seconds[self.stage] += time.perf_counter() - start
        return out

    @contextlib.contextmanager
    def at(self, stage: str) -> Iterator[None]:
        """Attribute the rows evaluated inside the block to ``stage``."""
        before, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = before

    def report(self, seconds_per_eval: float | None = None) -> dict:
        """Evaluations and seconds per stage; with ``seconds_per_eval``, what the run costs at that speed."""
        out: dict[str, Any] = {"evaluations": {s: self.rows.get(s, 0) for s in STAGES if self.rows.get(s)},
                               "model_seconds": {s: round(v, 2) for s, v in self.seconds.items() if v},
                               "total": self.total, "budget": self.budget}
        if seconds_per_eval:
            out["at_seconds_per_eval"] = {"seconds_per_eval": seconds_per_eval,
                                          "hours": round(self.total * seconds_per_eval / 3600, 3)}
        return out


def with_spent(cost: dict, rows: dict, seconds: dict) -> dict:
    """A cost (``Meter.report``'s) with more evaluations (``rows``, per stage) and seconds: what one rank spent on
    its own after the ranks' counts were summed (the report's plots, on rank 0)."""
    out = {**cost, "evaluations": dict(cost["evaluations"]), "model_seconds": dict(cost["model_seconds"]),
           "total": cost["total"] + sum(rows.values())}
    for stage in (s for s in STAGES if rows.get(s)):
        out["evaluations"][stage] = out["evaluations"].get(stage, 0) + rows[stage]
        out["model_seconds"][stage] = round(out["model_seconds"].get(stage, 0) + seconds.get(stage, 0), 2)
    at = cost.get("at_seconds_per_eval")
    if at:
        out["at_seconds_per_eval"] = {**at, "hours": round(out["total"] * at["seconds_per_eval"] / 3600, 3)}
    return out


def _pass_facts(source: Any, target: Any) -> None:
    for attr in FACTS:
        if getattr(source, attr, None) is not None:
            setattr(target, attr, getattr(source, attr))


class Staged:
    """The meter's denoiser with every row it evaluates attributed to ``stage``, whatever stage is running:
    the teacher's solves count as teacher evaluations also when a method or the scoring asks for them."""

    def __init__(self, meter: Meter, stage: str):
        self.meter, self.stage = meter, stage
        _pass_facts(meter, self)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        with self.meter.at(self.stage):
            return self.meter(x, sigma, **kw)


def seconds_per_row(denoiser: Callable, x: torch.Tensor, sigma: float, cond=None) -> float:
    """Wall seconds per evaluated row, from one timed pass over ``x`` (after one untimed warm-up pass), called as
    every evaluation is (``CheckedDenoiser``: the network's dtype, its ``max_batch``, ``cond`` rows aligned)."""
    model = CheckedDenoiser(denoiser, cond)
    s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    with torch.no_grad():
        model(x, s)
        start = time.perf_counter()
        model(x, s)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) / x.shape[0]
