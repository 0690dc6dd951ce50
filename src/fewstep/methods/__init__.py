"""``fewstep.optimize``: schedules tuned to a model, one module per method, one entry point.

Each method module registers itself (``base.register``); the imports below are the registry's entries,
so ``METHODS`` is complete on import and a new method is one file plus one line here.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch

from .. import conditions
from ..distributed import on_every_rank
from ..files import FewstepWarning
from ..models.info import model_info
from ..noises import CALIB_SEED, noise
from ..sampling import CheckedDenoiser, nfe as count_nfe, probe_denoiser
from ..schedules import ScheduleLike
from ..solvers import get_solver, plan
from ..teacher import Teacher
from ..version import __version__
from .base import METHODS, Calibration, filed
from . import gits, oss, sdm, ld3, instance, s4s, pas  # noqa: F401,E402  (the registry's entries)

__all__ = ["METHODS", "Calibration", "optimize"]


def _calibration(denoiser: Callable, calib, shape, n: int, seed: int, sigma_min, sigma_max, teacher, progress,
                 cond=None):
    """The Calibration context: the model's facts, the calibration states at sigma_max (given, or drawn from
    ``seed``) on the denoiser's device, and the teacher; and the rows the denoiser's probe evaluated."""
    if shape is None and getattr(denoiser, "shape", None) is None and isinstance(calib, torch.Tensor):
        shape = tuple(calib.shape[1:])  # the calibration batch gives the shape only if the model has none
    info = model_info(denoiser, shape, sigma_min, sigma_max)
    conditions.check_model(denoiser, cond)
    probed = probe_denoiser(denoiser, info, cond)
    if calib is None:
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n (calibration noises) must be a positive integer, got {n!r}")
        calib = noise(n, info["shape"], info["sigma_max"], seed, device=info["device"])
    elif not isinstance(calib, torch.Tensor) or tuple(calib.shape[1:]) != info["shape"] or calib.shape[0] < 1:
        got = tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise ValueError(f"calibration batch must have shape [n, {', '.join(map(str, info['shape']))}], got {got}")
    else:
        _check_scale(calib, info["sigma_max"])
    conditions.check(cond, calib.shape[0], "the calibration batch")
    cond = conditions.to(cond, info["device"])
    teacher = teacher or Teacher(denoiser, sigma_min=info["sigma_min"], model_id=info["name"], progress=progress,
                                 shape=info["shape"], check_cond=cond)
    ctx = Calibration(CheckedDenoiser(denoiser, cond), calib.to(info["device"], torch.float64), info["sigma_min"],
                      info["sigma_max"], teacher, seed, progress, cond)
    return ctx, info, probed


def _check_scale(calib: torch.Tensor, sigma_max: float) -> None:
    """Initial states are x_T = sigma_max * noise (plus the data, small beside it): a batch whose spread is
    far from sigma_max was most likely not scaled (a warning, since data far larger than sigma_max is legal)."""
    if not torch.isfinite(calib).all():
        raise ValueError("the calibration batch contains NaN or inf")
    spread = float(calib.double().std()) if calib.numel() > 1 else sigma_max
    if not 0.5 * sigma_max <= spread <= 2 * sigma_max:
        warnings.warn(f"the calibration batch has standard deviation {spread:.4g}, but states at sigma_max="
                      f"{sigma_max:g} have about {sigma_max:g}: pass noise * sigma_max (fewstep.noise(n, shape, "
                      "sigma_max, seed) does)", FewstepWarning, stacklevel=4)


def optimize(denoiser: Callable, method: str, solver: str, nfe: int, calib: torch.Tensor | None = None, *,
             shape=None, n: int = 64, seed: int = CALIB_SEED, sigma_min: float | None = None,
             sigma_max: float | None = None, teacher: Teacher | None = None, progress: bool = False,
             cond=None, **options: Any) -> ScheduleLike:
    """Optimize a schedule of exactly ``nfe`` denoiser calls with ``solver`` for ``denoiser``.

    ``calib``: initial states at sigma_max (``noise * sigma_max``), or give ``shape``/``n``/``seed``;
    ``cond``: for a conditional denoiser D(x, sigma, cond=c), one condition per calibration state (a
    schedule good over a distribution of conditions is calibrated on many of them).
    ``options``: the method's options (its ``Options`` dataclass, e.g. ``fewstep.methods.gits.Options``).
    Returns a ScheduleLike carrying its solver, solver options and a record of how it was made.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    get_solver(solver)
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    entry = METHODS[method]
    opts = entry.make_options(method, options)
    if plan(solver, int(nfe))[0] < 2:  # every method learns interior sigmas: said before the teacher's work
        raise ValueError(f"{solver} at nfe={nfe} makes 1 step: the only schedule is [sigma_max, 0], nothing to "
                         "optimize; ask for a larger nfe")
    ctx, info, probed = _calibration(denoiser, calib, shape, n, seed, sigma_min, sigma_max, teacher, progress, cond)
    teacher_rows0, start = ctx.teacher.rows, time.perf_counter()
    # The same request on the same denoiser and batch (e.g. a method that starts from another's
    # schedule, inside fewstep.tune) is answered from memory.
    result = filed(ctx, method, solver, nfe, opts, lambda: on_every_rank(lambda: entry.fn(ctx, solver, int(nfe), opts)))
    record = {  # a method may make a schedule for another solver than it was asked for (s4s: 'learned')
        "method": method, "solver": result.solver or solver, "nfe": int(nfe), "model": info["name"],
        "params": {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        "provenance": {
            **result.metadata.get("provenance", {}),
            "calib_n": int(ctx.x.shape[0]), "calib_seed": seed, "seconds": round(time.perf_counter() - start, 3),
            "evaluations": {"probe": probed, "teacher": ctx.teacher.rows - teacher_rows0, "method": ctx.denoiser.rows,
                            "total": probed + ctx.teacher.rows - teacher_rows0 + ctx.denoiser.rows},
            "teacher_steps": ctx.teacher.steps(ctx.sigma_max), "sigma_min": info["sigma_min"], "sigma_max": info["sigma_max"],
            "fewstep": __version__,
        },
    }
    result = result.with_metadata(**record)
    got = count_nfe(result)
    if got != nfe:
        raise RuntimeError(f"internal error: method {method!r} made a schedule of {got} calls, asked {nfe}")
    return result
