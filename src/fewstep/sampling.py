"""``fewstep.sample``: run a schedule with a solver; ``fewstep.nfe``: what it costs in denoiser calls."""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from . import conditions
from .corrections import corrected
from .files import FewstepWarning
from .models.device import model_dtype, model_inputs
from .models.info import max_batch
from .noises import noise
from .schedules import ScheduleError, ScheduleLike, as_schedule
from .solvers import get_solver, stepped


class DenoiserError(RuntimeError):
    """The denoiser returned something unusable (wrong shape, NaN or inf)."""


def _solver_name(sched: ScheduleLike, solver: str | None) -> str:
    name = solver or sched.solver
    if name is None:
        raise ValueError("no solver given and the schedule names none: pass solver=..., e.g. solver='dpmpp_2m'")
    return name


def _options(sched: ScheduleLike, spec, options: dict, steps: int) -> dict:
    """The solver options in effect (its defaults, the schedule's, then ``options``), checked for ``steps``."""
    opts = {**spec.options, **sched.solver_options, **options}
    try:
        spec.check_options(opts, steps)
    except ValueError as e:
        raise ScheduleError(str(e)) from None
    return opts


def nfe(schedule: Any, solver: str | None = None, **options: Any) -> int:
    """Exact number of denoiser calls ``fewstep.sample`` makes for ``schedule`` with ``solver``."""
    sched = as_schedule(schedule)
    spec = get_solver(_solver_name(sched, solver))
    opts, last = _options(sched, spec, options, sched.steps), sched.steps - 1
    orders = opts.get("orders")
    return sum(spec.step_calls(None if orders is None else orders[i], to_zero=sched.final_zero and i == last)
               for i in range(sched.steps)) - bool(opts.get("afs"))  # afs: the first step's first call is free


class _Count:
    def __init__(self):
        self.calls = self.rows = 0


class CheckedDenoiser:
    """Calls the user's denoiser with sigma of shape [batch] (and the step, if it takes one: ``solvers.stepped``;
    and ``cond=`` rows, if given: ``conditions``), checks what comes back, and counts: ``calls`` (batched
    calls) and ``rows`` (network evaluations: a call on a batch of 128 is 128). A batch of k times the
    condition's rows is k candidates stacked whole (``conditions.tile``). A network computing in another
    dtype than the state (float32, half: ``models.device.model_dtype``) gets its inputs in it and gives its
    output back in the state's. A model with ``max_batch`` gets at most that many rows a call (a larger batch
    is split and the outputs joined). ``bind(cond)``: the same
    denoiser and count for other rows."""

    takes_step = True

    def __init__(self, denoiser: Callable, cond=None, count: _Count | None = None, dtype=...):
        self.denoiser, self._call, self.cond = denoiser, stepped(denoiser), cond
        self._count, self.dtype = count or _Count(), model_dtype(denoiser) if dtype is ... else dtype
        self._n, self.max_batch = conditions.length(cond), max_batch(denoiser)

    calls = property(lambda self: self._count.calls)
    rows = property(lambda self: self._count.rows)

    def bind(self, cond) -> "CheckedDenoiser":
        return CheckedDenoiser(self.denoiser, cond, self._count, self.dtype)

    def _cond(self, b: int):
        if b == self._n:
            return self.cond
        if b % self._n:
            raise ValueError(f"internal error: a batch of {b} rows for {self._n} conditions")
        return conditions.tile(self.cond, b // self._n)

    def _misshapen(self, x: torch.Tensor, e: Exception) -> None:
        """A failed call on states of another sample shape than the model declares: a DenoiserError naming
        both (a network that runs at other shapes, e.g. a UNet at another resolution, is not stopped)."""
        shape = getattr(self.denoiser, "shape", None)
        if shape is not None and tuple(x.shape[1:]) != tuple(shape):
            raise DenoiserError(f"the denoiser failed on states of sample shape {tuple(x.shape[1:])}, and it declares "
                                f"shape {tuple(shape)} (x is [batch, *shape]): {type(e).__name__}: {e}") from e

    def _network(self, x: torch.Tensor, sigma: torch.Tensor, step: int | None, cond) -> torch.Tensor:
        """One call of the user's denoiser on these rows, counted, its output's shape checked."""
        try:
            out = self._call(x, sigma, step) if cond is None else self.denoiser(x, sigma, cond=cond)
        except torch.OutOfMemoryError as e:  # the same error, saying what splits the batch
            raise torch.OutOfMemoryError(f"{e} [fewstep: a call of {x.shape[0]} rows; give the model max_batch "
                                         "(den.max_batch = k, or --max-batch k) to split its batches]") from e
        except Exception as e:
            self._misshapen(x, e)
            raise
        self._count.calls, self._count.rows = self._count.calls + 1, self._count.rows + x.shape[0]
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}, not a tensor,"
            raise DenoiserError(f"denoiser returned {got} for input of shape {tuple(x.shape)} (D(x, sigma) is the "
                                "denoised x0, a tensor of x's shape)")
        return out

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int | None = None) -> torch.Tensor:
        sig = sigma.to(device=x.device, dtype=x.dtype)
        sig = sig.expand(x.shape[0]) if sig.ndim == 0 else sig
        x_in, sig_in = model_inputs(self.dtype, x, sig)  # a float32 (or half) network gets its own dtype
        cond, size = None if self.cond is None else self._cond(x.shape[0]), self.max_batch or x.shape[0]
        outs = [self._network(x_in[i:i + size], sig_in[i:i + size], step, conditions.rows(cond, slice(i, i + size)))
                for i in range(0, x.shape[0], size)]  # at most max_batch rows a call
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        # A sum of finite values is finite unless it overflows: only then check every element.
        if not math.isfinite(float(out.detach().sum())) and not torch.isfinite(out).all():
            raise DenoiserError(
                f"denoiser returned NaN or inf at sigma={float(sig.detach().flatten()[0]):.6g} (call {self.calls})"
            )
        return out.to(x.dtype)


_PROBED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def probe_denoiser(denoiser: Callable, info: dict, cond=None) -> int:
    """Call the denoiser on 2 rows at two sigmas, then on row 1 alone at each: a named error if it fails on
    a batch of this sample shape, returns another shape or NaN; a warning if it answers row 1 at row 0's
    sigma (it reads only sigma[0]; fewstep passes one sigma per row). Once per denoiser object (weakly
    held; ``cond``: conditions for a conditional denoiser, taken in turn). Returns the rows it evaluated (4,
    or 0 when already probed)."""
    try:
        if _PROBED.get(denoiser):
            return 0
    except TypeError:  # not weakly referenceable: probed every time
        pass
    lo, hi = info["sigma_min"], info["sigma_max"]
    mid = math.sqrt(lo * hi)
    s = torch.tensor([mid, min(hi, 4 * mid)], dtype=torch.float64, device=info["device"])
    x = noise(2, info["shape"], 1.0, seed=2 ** 31 - 1, device=info["device"]) * s.reshape(-1, *[1] * len(info["shape"]))
    two = conditions.to(conditions.cycle(cond, 2), info["device"])
    model, second = CheckedDenoiser(denoiser, two), CheckedDenoiser(denoiser, conditions.rows(two, slice(1, None)))
    try:
        with torch.no_grad():
            both, alone, at_first = model(x, s), second(x[1:], s[1:]), second(x[1:], s[:1])
    except DenoiserError:
        raise
    except Exception as e:
        raise DenoiserError(f"the denoiser failed on a batch of shape {tuple(x.shape)} (sample shape "
                            f"{tuple(info['shape'])}): {type(e).__name__}: {e}") from e
    own, first = float((both[1] - alone[0]).abs().max()), float((both[1] - at_first[0]).abs().max())
    if own > 1e-6 * float(alone.abs().max().clamp_min(1e-12)) and first < 1e-3 * own:
        warnings.warn("the denoiser answered row 1 of a batch at row 0's sigma: it seems to read only sigma[0]. "
                      "fewstep passes one sigma per row (per-sample schedules and the DP's candidate batches "
                      "need that): read the whole [batch] tensor", FewstepWarning, stacklevel=3)
    try:
        _PROBED[denoiser] = True
    except TypeError:
        pass
    return 4


@contextlib.contextmanager
def _progress(show: bool, total: int, name: str, callback: Callable | None) -> Iterator[Callable | None]:
    """The solver's callback, with a progress bar ticking once per step when ``show``."""
    if not show:
        yield callback
        return
    bar = tqdm(total=total, desc=f"sample ({name})", leave=False)

    def tick(info: dict) -> None:
        bar.update(1)
        if callback is not None:
            callback(info)

    try:
        yield tick
    finally:
        bar.close()


def sample(denoiser: Callable, x: torch.Tensor, schedule: Any, solver: str | None = None, *, cond=None,
           callback: Callable[[dict], None] | None = None, progress: bool = False, **options: Any) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x`` (the state at sigma_max: ``noise * sigmas[0]``).

    ``schedule``: any ``ScheduleLike`` (a Schedule, a per-sample policy), or a list/tensor of sigmas.
    ``solver`` defaults to the one the schedule was made for; ``options`` override the schedule's
    ``solver_options``. ``cond``: one condition per row of x for a conditional denoiser D(x, sigma, cond=c). Gradients flow only when x, the sigmas or the corrections require them (a
    network whose weights require grad builds no graph here).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError("x must be a tensor of shape [batch, ...] with batch >= 1")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (the noise times sigma_max), got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("the initial states x contain NaN or inf")
    conditions.check(cond, x.shape[0])
    conditions.check_model(denoiser, cond)
    sched = as_schedule(schedule)
    name = _solver_name(sched, solver)
    spec = get_solver(name)
    sigmas, corrections = sched.for_batch(x, cond)
    opts = _options(sched, spec, options, len(sigmas) - 1)
    sigmas = sigmas.to(x.device)
    model = corrected(CheckedDenoiser(denoiser, conditions.to(cond, x.device)), corrections)
    grad = any(t.requires_grad for t in (x, sigmas, *(corrections or ())))
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()), \
            _progress(progress, len(sigmas) - 1, name, callback) as cb:
        return spec.fn(model, x, sigmas, callback=cb, **opts)
