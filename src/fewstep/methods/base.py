"""What every schedule optimizer shares: the calibration context, the method registry, option parsing.

A method is a function ``method(ctx: Calibration, solver: str, nfe: int, opts: Options) -> ScheduleLike``
registered with ``@register("name", Options)``, where ``Options`` is the method's frozen dataclass of
options (documented once, validated in ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import conditions
from ..noises import noise
from ..sampling import CheckedDenoiser
from ..schedules import ScheduleLike
from ..teacher import Teacher, content_key


def _no_cost(opts: Any, solver: str, nfe: int, n: int) -> int:
    return 0


def any_solver(solver: str) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    """A registry entry: the function, its options class, and the options ``fewstep.tune`` passes by default
    (``tune``: cheaper settings where a method offers them; ``quick``: on top of those for ``tune --quick``;
    the user's ``method_options`` override both). ``cost(opts, solver, nfe, n)``: the network evaluations
    the method is expected to spend with ``n`` calibration noises, beyond the teacher's solve (its
    documented cost formula; ``fewstep tune`` plans and budgets with it). ``tier``: 0 for a method a
    tune runs for its best few solvers per NFE, 1 for one trained by gradient (costly: the best two),
    2 for one trained on top of a tier-1 method's result (the best one). ``accepts(solver)``: whether the
    method runs on that solver (a tune gives it the best solvers it accepts)."""

    fn: Callable
    options: type
    tune: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    cost: Callable = _no_cost
    tier: int = 0
    accepts: Callable[[str], bool] = any_solver

    def make_options(self, name: str, given: dict) -> Any:
        """The options dataclass from keyword options; unknown keys are named."""
        known = [f.name for f in dataclasses.fields(self.options)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for method {name!r}; "
                             f"known: {', '.join(known)}")
        try:
            return self.options(**given)
        except TypeError as e:
            raise ValueError(f"method {name!r}: {e}") from None


METHODS: dict[str, Method] = {}


def register(name: str, options: type, tune_options: dict | None = None, quick_options: dict | None = None,
             cost: Callable = _no_cost, tier: int = 0, accepts: Callable[[str], bool] = any_solver) -> Callable:
    def deco(fn: Callable) -> Callable:
        METHODS[name] = Method(fn, options, dict(tune_options or {}), dict(quick_options or {}), cost, tier, accepts)
        return fn
    return deco


def option_items(opts: Any) -> list[tuple[str, Any]]:
    """An options dataclass as sorted (name, value) pairs, schedules by their sigmas (for memo keys)."""
    def item(v: Any) -> Any:
        if isinstance(v, ScheduleLike):
            return ("schedule", v.describe())
        return tuple(item(e) for e in v) if isinstance(v, (tuple, list)) else v

    return sorted((f.name, item(getattr(opts, f.name))) for f in dataclasses.fields(opts))


# Results shared between calls on the same denoiser and calibration batch (e.g. SDM's step search,
# which does not depend on the solver or the NFE), dropped with the denoiser.
_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


@dataclass
class Calibration:
    """What a method may use: the counted denoiser (bound to ``cond``, the calibration states' conditions
    for a conditional model, else None), the calibration states at sigma_max, the teacher."""

    denoiser: CheckedDenoiser
    x: torch.Tensor
    sigma_min: float
    sigma_max: float
    teacher: Teacher
    seed: int
    progress: bool = False
    cond: Any = None

    def subset(self, index) -> "Calibration":
        """The context of the calibration states ``index`` (a slice or index tensor): their conditions, and
        the denoiser bound to them (the same count)."""
        cond = conditions.rows(self.cond, index)
        return dataclasses.replace(self, x=self.x[index], cond=cond, denoiser=self.denoiser.bind(cond))

    def target(self) -> torch.Tensor:
        """The teacher's x0 for the calibration states."""
        return self.teacher.solve(self.x, self.sigma_max, cond=self.cond)

    def extended(self, n: int) -> "Calibration":
        """The batch extended to at least ``n`` states with fresh noises from the calibration seed's stream,
        after the batch's own (their conditions: the batch's in turn)."""
        if self.x.shape[0] >= n:
            return self
        x = torch.cat([self.x, noise(int(n), self.x.shape[1:], self.sigma_max, self.seed, device=self.x.device)[len(self.x):]])
        cond = conditions.cycle(self.cond, len(x))
        return dataclasses.replace(self, x=x, cond=cond, denoiser=self.denoiser.bind(cond))

    def memo(self, name: str, settings: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per (denoiser, calibration batch and conditions, ``name``, ``settings``); later
        calls on the same denoiser and batch reuse the result (denoisers that cannot be weakly referenced:
        no reuse)."""
        key = (name, content_key(repr(settings), tuple(self.x.shape), self.x, *conditions.parts(self.cond)))
        try:
            table = memo_table(self.denoiser.denoiser)
        except TypeError:
            return compute()
        if key not in table:
            table[key] = compute()
        return table[key]


def memo_table(denoiser: Callable) -> dict:
    """The memo of results on ``denoiser`` (``Calibration.memo``); TypeError if it cannot be weakly referenced."""
    return _MEMO.setdefault(denoiser, {})


def filed(ctx: Calibration, method: str, solver: str, nfe: int, opts: Any, compute: Callable[[], Any]) -> Any:
    """``method``'s result for this request, computed once (``Calibration.memo``) and filed under the request
    with every option's value, as ``optimize`` files it: so a method that starts from another's schedule
    (LD3 from OSS or GITS) finds it whichever way it was asked for."""
    key = (method, solver, int(nfe), ctx.sigma_min, ctx.sigma_max, ctx.teacher.steps(ctx.sigma_max), option_items(opts))
    return ctx.memo("optimize", key, compute)
