"""S4S: the solver's coefficients and its timesteps learned together, against the teacher.

Frankel et al., "S4S: Solving for a Diffusion Model Solver", ICML 2025, arXiv 2502.17423 (S4S-Alt: solver
coefficients and timesteps learned together; no public code); the same idea as DS-Solver (arXiv 2505.21114,
MCG-NJU/NeuralSolver). A one-call solver with N steps is x_{i+1} = a_i x_i + sum_{j<=i} b_ij D_j
(``solvers.learned``; ``solvers.chain`` writes DPM-Solver++, UniPC, iPNDM, DEIS and Euler that way). Here
the coefficients are the start solver's on the current timesteps plus learned deltas,

    a_i = a0_i(sigma) (1 + s alpha_i),   b_ij = b0_ij(sigma) + (1 - a0_i(sigma)) s beta_ij,   s = COEF_SCALE,

(a0, b0: ``chain(solver, sigma)``; 1 - a0_i is the step's size in the data-prediction form, so every beta
moves its step alike; the step to 0 has a0 = 0 and learns a = s alpha, a share of x in the result) and the timesteps are LD3's logits (``schedules.sigmas_from_logits``). The start is
the LD3 schedule for the same solver (``ld3.learn_global``, memoized: in ``tune`` the ld3 cell's), and with
``afs`` the best baseline with the analytical first step (one step more for the same calls). Training is
LD3's loop (``ld3.fit``: RMSE to the teacher's x0, soft teacher, train/validation split, early stopping,
best validation kept) with a penalty toward the start solver, reg * L0 / n_train * ||s alpha, s beta||^2
(L0 the start's training loss: the penalty is relative to the error, and weighs more with fewer noises).
The learned solver is kept only if its validation gain over its start passes ``gate`` standard errors
of the paired per-sample differences; otherwise the start is returned, unless another given start on another
solver learns something that does (``fallback``). See docs/methods/s4s.md.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, fields, replace

import torch

from ..files import FewstepWarning
from ..metrics import clearly_worse, significance
from ..schedules import Schedule, logits_from_sigmas, sigmas_from_logits
from ..solvers import PLANNED, chain, get_solver, plan
from .base import Calibration, register
from . import ld3
from .ld3 import Fit, Training, default_radius, initial_logits, learn_global, per_sample_loss

COEF_SCALE = 0.1  # coefficient deltas per unit of a parameter: AdamW's lr 0.1 moves them by ~0.01 a step


@dataclass(frozen=True)
class LearnedStage(ld3.GlobalStage):
    """The options s4s and pas share: ``ld3.GlobalStage``'s (their LD3 start, with ``ld3_iters`` as its
    ``iters``); ``gate``: what is learned is kept only if its validation gain over its start is at least
    this many standard errors (else the start is returned); ``start``: schedules to start from instead of
    LD3's, each on its own one-call solver, in order of preference (``given_start``: the first of ``nfe`` calls
    unless another is clearly ahead on validation; its solver is then the one learned on; ``fewstep tune``
    passes every global schedule it has at that NFE for a one-call solver, best first by its test noises, so
    the start is the best it found so far, whichever solver it is for)."""

    ld3_iters: int = Training.iters
    gate: float = 1.0
    start: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        check_starts(self.start)

    def ld3_options(self) -> ld3.Options:
        stage = {f.name: getattr(self, f.name) for f in fields(ld3.GlobalStage)}
        return ld3.Options(**stage, iters=self.ld3_iters)


@dataclass(frozen=True)
class Options(LearnedStage):
    """S4S's options: ``LearnedStage``'s and these.

    ``lr``, ``iters``, ``patience``: AdamW on the logits and the coefficient deltas (LD3's loop);
    ``reg``: the penalty toward the start solver (above); ``afs``: True, False or 'auto' (train from both
    starts, with and without the analytical first step, and keep the better on validation); ``screen``: with
    both, the plain start stops after this share of ``iters`` if the AFS start's validation error is then
    lower (1: both train to the end); ``fallback``: when what is kept is a start (nothing learned passed the gate and
    beat it), learn once more on the best given start of another solver (a solver whose coefficients do not
    improve on its start is not the only one tried); a number: up to that many other solvers, while a start is
    still what would be kept (True: 1); ``min_valid``:
    with fewer validation noises than this the start is returned untrained (with a few noises the
    validation cannot see a learned solver's losses: docs/methods/s4s.md); ``learn_sigmas``: learn the
    timesteps too (else only the coefficients, on the start's timesteps).
    """

    lr: float = 0.1
    iters: int = 200
    patience: int = 20
    reg: float = 10.0
    afs: bool | str = "auto"
    screen: float = 1 / 3
    fallback: bool | int = True
    min_valid: int = 16
    learn_sigmas: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.afs not in (True, False, "auto"):
            raise ValueError(f"afs must be true, false or 'auto', got {self.afs!r}")
        if not (isinstance(self.screen, (int, float)) and 0 < self.screen <= 1):
            raise ValueError(f"screen must be a fraction in (0, 1], got {self.screen!r}")
        if not (self.reg >= 0 and math.isfinite(self.reg)):
            raise ValueError(f"reg must be a finite number >= 0, got {self.reg!r}")
        if not isinstance(self.fallback, int) or self.fallback < 0:
            raise ValueError(f"fallback must be true, false or a number of solvers >= 0, got {self.fallback!r}")
        for name in ("iters", "patience", "ld3_iters", "min_valid"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


class Learner:
    """The trained parameters: LD3 logits and the coefficient deltas (alpha [N], beta [N (N + 1) / 2],
    row i of b in beta[i (i + 1) / 2 : (i + 1) (i + 2) / 2]), and what they give."""

    def __init__(self, ctx: Calibration, solver: str, sopts: dict, logits: torch.Tensor, o: Options):
        self.ctx, self.solver, self.sopts, self.o = ctx, solver, sopts, o
        steps = len(sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, o.learn_last)) - 1
        self.start = logits.detach().clone()
        self.logits = logits.detach().clone().requires_grad_(o.learn_sigmas)
        self.alpha = torch.zeros(steps, dtype=torch.float64, requires_grad=True)
        self.beta = torch.zeros(steps * (steps + 1) // 2, dtype=torch.float64, requires_grad=True)
        self.params = [p for p in (self.logits, self.alpha, self.beta) if p.requires_grad]

    def sigmas(self) -> torch.Tensor:
        return sigmas_from_logits(self.logits, self.ctx.sigma_max, self.ctx.sigma_min, self.o.learn_last)

    def coefficients(self, sigmas: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(a, b) of the module docstring on ``sigmas``."""
        a0, b0 = chain(self.solver, sigmas, **self.sopts)
        a = a0 + COEF_SCALE * self.alpha * torch.where(a0 > 0, a0, 1.0)  # relative; the step to 0: absolute
        b = [row + (1 - a0[i]) * COEF_SCALE * self.beta[i * (i + 1) // 2:(i + 1) * (i + 2) // 2]
             for i, row in enumerate(b0)]
        return a, b

    def plan(self, x: torch.Tensor, cond=None) -> tuple:
        """``ld3.fit``'s plan: the sigmas, no corrections, and the learned solver's options."""
        sigmas = self.sigmas()
        a, b = self.coefficients(sigmas)
        return sigmas, None, {"a": a, "b": b, "afs": bool(self.sopts.get("afs", False))}

    def penalty(self, scale: float):
        """``scale`` times the squared distance from the start, every parameter in units of COEF_SCALE."""
        return lambda: scale * COEF_SCALE ** 2 * (self.alpha.pow(2).sum() + self.beta.pow(2).sum()
                                                 + (self.logits - self.start).pow(2).sum())

    def schedule(self) -> Schedule:
        """The learned solver as a Schedule (plain lists: a JSON file, a diffusers config)."""
        with torch.no_grad():
            sigmas = self.sigmas()
            a, b = self.coefficients(sigmas)
        options = {"a": a.tolist(), "b": [row.tolist() for row in b], **({"afs": True} if self.sopts.get("afs") else {})}
        return Schedule(sigmas, solver="learned", solver_options=options)


def losses(part: Calibration, sched: Schedule, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample losses of a schedule (its own solver and options) from the states of ``part`` (a subset of the
    calibration batch, with its conditions) against y."""
    spec = get_solver(sched.solver)
    with torch.no_grad():
        out = spec.fn(part.denoiser, part.x, sched.sigmas, **{**spec.options, **sched.solver_options})
    return per_sample_loss(out, y, loss)


def check_starts(starts) -> None:
    """``start`` options are a tuple (or list) of schedules."""
    if not isinstance(starts, (tuple, list)) or not all(isinstance(s, Schedule) for s in starts):
        raise ValueError(f"start must be a tuple of Schedules (each for the solver at the nfe), got {starts!r}")


def given_start(ctx: Calibration, nfe: int, starts, loss: str, n_train: int) -> tuple | None:
    """(schedule, name) of the given starts that make ``nfe`` calls on a planned one-call solver (not a learned
    one: its coefficients are no start), each on its own solver (from sigma_max to 0, that solver's options for
    ``nfe``): the first of them, unless the one with the least mean loss on the validation part is CLEARLY
    standard errors ahead of it there (paired per-sample losses); None if none fits. The starts come in order
    of preference (in a tune, best first by its test noises, many more than the validation part: the least of
    several means on a few noises is mostly the luckiest). The start's solver is the one learned on: a start is
    a schedule and its solver together. The losses are memoized (in a tune, s4s and pas are given the same
    starts on the same batch)."""
    fits = []
    for s in starts:
        if s.solver not in PLANNED or not one_call(s.solver):  # a learned solver's schedule is no start
            continue
        steps, sopts = plan(s.solver, nfe)
        if (s.steps == steps and float(s.sigmas[-1]) == 0
                and math.isclose(float(s.sigmas[0]), ctx.sigma_max, rel_tol=1e-9)):
            fits.append((Schedule(s.sigmas, solver=s.solver, solver_options=sopts), s))
    if not fits:
        return None
    valid, y = ctx.subset(slice(n_train, None)), ctx.target()[n_train:]
    settings = ([sched.describe() for sched, _ in fits], loss, n_train, ctx.teacher.steps(ctx.sigma_max))
    errors = ctx.memo("given_start", settings, lambda: [losses(valid, sched, y, loss) for sched, _ in fits])
    i = min(range(len(fits)), key=lambda i: (float(errors[i].mean()), i))
    i = i if clearly_worse(errors[0] - errors[i]) else 0
    return fits[i][0], str(fits[i][1].metadata.get("method", f"given start {i}"))


def _start(ctx: Calibration, solver: str, nfe: int, o: Options, afs: bool, n_train: int, given) -> tuple:
    """A start (logits, solver options, name, LD3's record): ``given`` (the best given start, on ``solver``),
    else the LD3 schedule; with ``afs`` the best baseline (by training error) of one step more with the
    analytical first step."""
    if given is not None and not afs:
        sched, name = given
        return logits_from_sigmas(sched.sigmas, ctx.sigma_min, o.learn_last), sched.solver_options, name, {}
    if not afs:
        logits, _, sopts, record = learn_global(ctx, solver, nfe, o.ld3_options())
        return logits, sopts, f"ld3 ({record['init']})", record
    steps, sopts = plan(solver, nfe, afs=True)
    _, name, logits = initial_logits(ctx, solver, nfe, sopts, steps, replace(o.ld3_options(), oss=False), n_train)[0]
    return logits, sopts, f"{name} + afs", {}


def single_noise(ctx: Calibration, solver: str, nfe: int, ld3_options: ld3.Options, method: str) -> Schedule:
    """With one calibration noise nothing can be validated, so nothing is learned: the start, the baseline
    with the least error on that noise (``ld3.initial_logits``), with a warning."""
    warnings.warn(f"{method}: one calibration noise cannot be split into training and validation, so no "
                  "coefficients are learned: returning the best baseline schedule for that noise (give at least "
                  "2 noises; 32 or more to learn)", FewstepWarning, stacklevel=2)
    steps, sopts = plan(solver, nfe)
    _, name, logits = initial_logits(ctx, solver, nfe, sopts, steps, replace(ld3_options, oss=False), 1)[0]
    sigmas = sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, ld3_options.learn_last)
    return Schedule(sigmas, solver=solver, solver_options=sopts,
                    training={"kept": "start", "init": name, "n_train": 1, "n_valid": 0})


def one_call(solver: str) -> bool:
    """one network call a step (the solvers a learned-coefficient method starts from)."""
    return get_solver(solver).calls_per_step == 1


def unlearnable(ctx: Calibration, solver: str, nfe: int, ld3_options: ld3.Options, method: str) -> Schedule | None:
    """What a learned-coefficient method checks first: ``solver`` makes one call a step (else ValueError);
    with one calibration noise, the start untrained (``single_noise``). None: go on and learn."""
    if not one_call(solver):
        raise ValueError(f"{method} learns on a solver of one call a step; {solver} makes "
                         f"{get_solver(solver).calls_per_step}")
    return single_noise(ctx, solver, nfe, ld3_options, method) if ctx.x.shape[0] == 1 else None


def _prepare(ctx: Calibration, solver: str, nfe: int, o: Options, afs: bool, n_train: int, train: bool,
             given) -> tuple:
    """From one start: (the Learner, its training loop ``ld3.Fit`` or None if not ``train``, the start's
    schedule, record)."""
    logits, sopts, name, ld3_record = _start(ctx, solver, nfe, o, afs, n_train, given)
    learner = Learner(ctx, solver, sopts, logits, o)
    with torch.no_grad():
        start = Schedule(learner.sigmas(), solver=solver, solver_options=sopts)
    record = {"init": name, "afs": afs, "solver": solver, "ld3_reused": ld3_record.get("reused")}
    if not train:
        return learner, None, start, record
    radius = default_radius(ctx.x.shape[1:], start.steps) if o.radius is None else o.radius
    training = Training(loss=o.loss, radius=radius, lr=o.lr, iters=o.iters, patience=o.patience, valid=o.valid,
                        valid_every=o.valid_every, seed=o.seed)
    l0 = float(losses(ctx.subset(slice(None, n_train)), start, ctx.target()[:n_train], o.loss).mean())
    loop = Fit(ctx, "learned", {}, learner.plan, learner.params, training,
               desc=f"s4s {solver} nfe={nfe} from {name}", penalty=learner.penalty(o.reg * l0 / n_train))
    record["penalty_weight"] = o.reg * l0 / n_train
    return learner, loop, start, record


def _learn(ctx: Calibration, solver: str, nfe: int, o: Options, n_train: int, train: bool, given) -> list[tuple]:
    """Per start (with and without AFS for afs='auto'): (learned schedule or None, the start's schedule, record).
    With both, the plain start stops after ``screen`` of the steps if the AFS start is ahead by then."""
    runs = [_prepare(ctx, solver, nfe, o, afs, n_train, train, given)
            for afs in ((False, True) if o.afs == "auto" else (o.afs,))]
    loops = [r[1] for r in runs if r[1] is not None]
    if len(loops) == 2 and o.screen < 1:
        plain, with_afs = (loop.run(math.ceil(o.screen * o.iters)) for loop in loops)
        if plain.err >= with_afs.err:  # the plain start is behind: it stops here
            plain.done = runs[0][3]["screened"] = True
    for loop in loops:
        loop.run(o.iters)  # Fit.run takes no more steps once done, and at most iters in all
    out = []
    for learner, loop, start, record in runs:
        if loop is not None:
            record = {**loop.finish(), **record}
        out.append((None if loop is None else learner.schedule(), start, record))
    return out


def _candidates(ctx: Calibration, solver: str, nfe: int, o: Options, n_train: int, train: bool, given) -> tuple:
    """(validation mean, kind, schedule, record) of the starts and of what they learned that passed the
    gate; the records."""
    valid, y_valid = ctx.subset(slice(n_train, None)), ctx.target()[n_train:]
    candidates, records = [], []
    for learned, start, record in _learn(ctx, solver, nfe, o, n_train, train, given):
        start_losses = losses(valid, start, y_valid, o.loss)
        candidates.append((float(start_losses.mean()), "start", start, record))
        if learned is not None:
            learned_losses = losses(valid, learned, y_valid, o.loss)
            record["gate_z"] = round(significance(start_losses - learned_losses), 3)
            if record["gate_z"] >= o.gate:
                candidates.append((float(learned_losses.mean()), "learned", learned, record))
        records.append(record)
    return candidates, records


def _fall_back(ctx: Calibration, nfe: int, o: Options, n_train: int, train: bool, given, candidates: list,
               records: list) -> tuple:
    """While what would be kept is a start (nothing learned passed the gate and beat it), learn once more on the
    best given start of a solver not tried yet, up to ``fallback`` more solvers."""
    tried_solvers = {given[0].solver} if given is not None else set()
    for _ in range(int(o.fallback) if train and given is not None else 0):
        if min(candidates, key=lambda c: c[0])[1] != "start":
            break
        other = given_start(ctx, nfe, [s for s in o.start if s.solver not in tried_solvers], o.loss, n_train)
        if other is None:
            break
        tried_solvers.add(other[0].solver)
        more, tried = _candidates(ctx, other[0].solver, nfe, o, n_train, train, other)
        for r in tried:
            r["fallback"] = True
        candidates, records = candidates + more, records + tried
    return candidates, records


def cost(o: Options, solver: str, nfe: int, n: int) -> int:
    """Per start (two with afs='auto'), up to ``iters`` steps on the whole batch (the training part forward
    and backward, the validation part forward): starts * iters * B * NFE; each fallback (when a start would be
    returned) as much again, not counted: it is the exception. The LD3 start's (``ld3.cost``) is reused
    inside tune, not counted here."""
    return (2 if o.afs == "auto" else 1) * o.iters * n * nfe


# tune: ld3's OSS grid (its start is the ld3 cell's, reused) and fewer steps (measured: same error, half the time);
# up to 2 more solvers where a start would be kept (digits-unet, NFE 5: the third, UniPC, learned; docs/tune.md);
# the plain start screened after 18 of the 60 steps (at 10 or 15 AFS was not yet ahead in some cells there)
# tier 2: tune runs it for the best one-call solver so far at each NFE (its LD3 start is that solver's ld3 cell's)
@register("s4s", Options, tune_options={"oss_grid": 40, "iters": 60, "patience": 10, "fallback": 2, "screen": 0.3},
          quick_options={"ld3_iters": 10, "iters": 20, "patience": 5}, cost=cost, tier=2, accepts=one_call)
def s4s(ctx: Calibration, solver: str, nfe: int, o: Options) -> Schedule:
    """S4S (arXiv 2502.17423): a 'learned' solver of exactly ``nfe`` calls, started from ``solver`` (one call
    a step) on its LD3 schedule, or from the best given ``start`` on that start's solver (and, with ``afs``,
    from a baseline with the analytical first step); the start is returned where the learned solver's
    validation gain does not pass the gate (with ``fallback``, after one more try on another given start's solver)."""
    untrained = unlearnable(ctx, solver, nfe, o.ld3_options(), "s4s")
    if untrained is not None:
        return untrained
    teacher_calls0, student_calls0, begin = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
    n_train, n_valid = Training(valid=o.valid).split(ctx.x.shape[0])
    train = n_valid >= o.min_valid
    given = given_start(ctx, nfe, o.start, o.loss, n_train)
    solver = given[0].solver if given is not None else solver  # a given start brings its solver
    candidates, records = _candidates(ctx, solver, nfe, o, n_train, train, given)
    candidates, records = _fall_back(ctx, nfe, o, n_train, train, given, candidates, records)
    best, kind, sched, record = min(candidates, key=lambda c: c[0])
    keys = ("init", "solver", "afs", "valid_init", "valid_best", "gate_z", "iters", "screened", "fallback")
    summary = {**record, "kept": kind, "valid_kept": best, "n_train": n_train, "n_valid": n_valid,
               "tried": [{k: r[k] for k in keys if k in r} for r in records], "start_solver": record["solver"],
               "teacher_calls": ctx.teacher.calls - teacher_calls0, "student_calls": ctx.denoiser.calls - student_calls0,
               "seconds": round(time.perf_counter() - begin, 3)}
    if n_valid < o.min_valid:
        summary["untrained"] = f"{n_valid} validation noises < min_valid={o.min_valid}: the start is returned"
    return sched.with_metadata(training=summary)
