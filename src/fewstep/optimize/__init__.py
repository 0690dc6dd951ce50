"""``fewstep.optimize``: schedules tuned to a model, one module per method, one entry point.

A method is a function ``method(ctx: Calibration, solver: str, nfe: int, **options) -> Schedule``
registered with ``@register("name")``; it returns the sigmas (and any ``solver_options`` such as
per-step ``orders``) and this module adds the record of how it was made. A method may instead return
an object with ``sigmas_for(x)`` (a per-sample schedule policy).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..distributed import broadcast
from ..evaluate import CALIB_SEED, noise
from ..models.builtin import model_info
from ..sample import CheckedDenoiser, get_solver, nfe as count_nfe
from ..teacher import Teacher, content_key

METHODS: dict[str, Callable] = {}
# Options ``fewstep.tune`` passes to a method by default (cheaper settings where a method offers them;
# the user's ``method_options`` override them).
TUNE_OPTIONS: dict[str, dict] = {}
QUICK_OPTIONS: dict[str, dict] = {}  # and on top of those for ``tune --quick``
# Results shared between calls on the same denoiser and calibration batch (e.g. SDM's step search,
# which does not depend on the solver or the NFE), dropped with the denoiser.
_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def register(name: str, tune_options: dict | None = None, quick_options: dict | None = None) -> Callable:
    def deco(fn: Callable) -> Callable:
        METHODS[name] = fn
        TUNE_OPTIONS[name] = dict(tune_options or {})
        QUICK_OPTIONS[name] = dict(quick_options or {})
        return fn
    return deco


@dataclass
class Calibration:
    """What a method may use: the counted denoiser, the calibration states at sigma_max, the teacher."""

    denoiser: CheckedDenoiser
    x: torch.Tensor
    sigma_min: float
    sigma_max: float
    teacher: Teacher
    seed: int
    progress: bool = False

    def memo(self, name: str, settings: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per (denoiser, calibration batch, ``name``, ``settings``); later calls on
        the same denoiser and batch reuse the result (denoisers that cannot be weakly referenced: no reuse)."""
        key = (name, content_key(repr(settings), tuple(self.x.shape), self.x))
        try:
            table = _MEMO.setdefault(self.denoiser.denoiser, {})
        except TypeError:
            return compute()
        if key not in table:
            table[key] = compute()
        return table[key]


def memo_key(ctx: Calibration, method: str, solver: str, nfe: int, options: dict) -> tuple:
    """What ``optimize`` files a result under: the request with the method's defaults filled in, so a
    method that starts from another's schedule (LD3 from OSS) finds it whichever way it was asked for."""
    params = inspect.signature(METHODS[method]).parameters.values()
    effective = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    effective.update(options)
    return (method, solver, int(nfe), ctx.sigma_min, ctx.sigma_max, ctx.teacher.steps, sorted(effective.items()))


def _load_methods() -> None:
    """Import every module of this package: each method module registers itself, so a new method
    appears in ``optimize`` and ``tune`` without editing either."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def optimize(denoiser: Callable, method: str, solver: str, nfe: int, calib: torch.Tensor | None = None, *,
             shape=None, n: int = 64, seed: int = CALIB_SEED, sigma_min: float | None = None,
             sigma_max: float | None = None, teacher: Teacher | None = None, progress: bool = False,
             **options: Any):
    """Optimize a schedule of exactly ``nfe`` denoiser calls with ``solver`` for ``denoiser``.

    ``calib``: initial states at sigma_max (``noise * sigma_max``), or give ``shape``/``n``/``seed``.
    Returns a Schedule carrying its solver, solver options and a record of how it was made.
    """
    _load_methods()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    get_solver(solver)
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if shape is None and getattr(denoiser, "shape", None) is None and isinstance(calib, torch.Tensor):
        shape = tuple(calib.shape[1:])  # the calibration batch gives the shape only if the model has none
    info = model_info(denoiser, shape, sigma_min, sigma_max)
    if info["sigma_min"] >= info["sigma_max"]:
        raise ValueError(f"sigma_min {info['sigma_min']} must be < sigma_max {info['sigma_max']}")
    if calib is None:
        calib = noise(n, info["shape"], info["sigma_max"], seed, device=info["device"])
    elif not isinstance(calib, torch.Tensor) or tuple(calib.shape[1:]) != info["shape"] or calib.shape[0] < 1:
        got = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise ValueError(f"calibration batch must have shape [n, {', '.join(map(str, info['shape']))}], got {got}")
    teacher = teacher or Teacher(denoiser, sigma_min=info["sigma_min"], model_id=info["name"], progress=progress)
    # The calibration states live where the denoiser computes (a CPU batch is moved to a GPU model).
    ctx = Calibration(CheckedDenoiser(denoiser), calib.to(info["device"], torch.float64), info["sigma_min"], info["sigma_max"],
                      teacher, seed, progress)
    teacher_calls0 = teacher.calls
    start = time.perf_counter()
    # The same request on the same denoiser and batch (e.g. a method that starts from another's
    # schedule, inside fewstep.tune) is answered from memory.
    result = ctx.memo("optimize", memo_key(ctx, method, solver, nfe, options),
                      lambda: broadcast(METHODS[method](ctx, solver, int(nfe), **options)))
    seconds = time.perf_counter() - start
    from .. import __version__ as fewstep_version  # at call time: the package is fully imported by then

    record = {
        "method": method, "solver": solver, "nfe": int(nfe), "model": info["name"],
        "params": {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        "provenance": {
            "calib_n": int(calib.shape[0]), "calib_seed": seed, "seconds": round(seconds, 3),
            "denoiser_calls": ctx.denoiser.calls + teacher.calls - teacher_calls0,
            "teacher_steps": teacher.steps, "sigma_min": info["sigma_min"], "sigma_max": info["sigma_max"],
            "fewstep": fewstep_version,
        },
    }
    if hasattr(result, "sigmas_for"):
        result.metadata = {**getattr(result, "metadata", {}), **record}
        return result
    record["provenance"] = {**result.metadata.get("provenance", {}), **record["provenance"]}
    result = result.with_metadata(**{**{k: v for k, v in result.metadata.items() if k not in record}, **record})
    got = count_nfe(result, solver)
    if got != nfe:
        raise RuntimeError(f"internal error: method {method!r} made a schedule of {got} calls, asked {nfe}")
    return result
