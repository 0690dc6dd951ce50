"""LD3: one global schedule learned by gradient descent through the solver.

Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025 (code: vinhsuhi/LD3).
The timesteps are a cumulative softmax of logits in lambda = -log sigma, so any logits give a valid,
strictly decreasing schedule; the few-step student from x_T is trained to land on the teacher's x0,
where the student may start from x'_T in a small ball around x_T (the "soft teacher", LD3 Sec. 3.3).
``fit`` (the training loop) is shared with the instance-aware method (``methods/instance.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..corrections import corrected
from ..schedules import BASELINES, Schedule, builtin, logits_from_sigmas, sigmas_from_logits
from ..solvers import get_solver, plan
from .base import Calibration, filed, option_items, register
from .gits import Options as GITSOptions, gits as gits_schedule
from .grid import DEFAULT_SIZE
from .oss import Options as OSSOptions, oss as oss_schedule


@dataclass(frozen=True)
class Training:
    """How ``fit`` trains (LD3's defaults, shared by every gradient-trained method).

    Per-sample ``loss`` 'l2' | 'l1' | 'rmse' (the root of the L2: fewstep's evaluation metric, less
    dominated by the worst samples); ``radius`` of the soft-teacher ball ||x'_T - x_T|| / sigma_max
    (None or 0: a hard teacher); AdamW ``lr`` with decoupled ``weight_decay``, at most ``iters`` steps;
    after ``patience`` steps without a better validation error the best parameters are restored and the
    learning rate halved, and after ``decays`` such restarts training stops; ``valid``: the fraction of
    the calibration batch held out for it; ``valid_every``: validate after every this many steps (and
    after the last; patience counts steps), so the validation part costs 1/valid_every of its forward
    passes; ``seed``.
    """

    loss: str = "rmse"
    radius: float | None = None
    lr: float = 0.1
    iters: int = 50
    patience: int = 10
    decays: int = 3
    valid: float = 0.5
    valid_every: int = 1
    seed: int = 0
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.loss not in ("l2", "l1", "rmse"):
            raise ValueError(f"loss must be 'l2', 'l1' or 'rmse', got {self.loss!r}")
        if not 0 < self.valid < 1:
            raise ValueError(f"valid must be a fraction in (0, 1), got {self.valid!r}")
        if isinstance(self.valid_every, bool) or int(self.valid_every) != self.valid_every or self.valid_every < 1:
            raise ValueError(f"valid_every must be a positive integer, got {self.valid_every!r}")

    def split(self, n: int) -> tuple[int, int]:
        """Training and validation sizes of a calibration batch of ``n``."""
        n_valid = int(round(n * self.valid))
        if n_valid < 1 or n - n_valid < 1:
            raise ValueError(f"the calibration batch ({n} samples) is too small to split into train and validation")
        return n - n_valid, n_valid


def n_logits(steps: int, learn_last: bool) -> int:
    """Logits of a ``steps``-step schedule: one per lambda interval between the positive sigmas, plus
    (``learn_last``) a slack interval from the last positive sigma down to sigma_min."""
    return steps if learn_last else steps - 1


def per_sample_loss(out: torch.Tensor, ref: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample L2 (mean squared error over all dimensions), L1 (mean absolute error) or RMSE."""
    diff = (out - ref).reshape(out.shape[0], -1)
    if loss == "l1":
        return diff.abs().mean(1)
    mse = diff.pow(2).mean(1)
    # the root's gradient is infinite at 0, where a memorizing denoiser lands exactly on the teacher: 0 there
    return mse.clamp_min(1e-300).sqrt() if loss == "rmse" else mse


def default_radius(shape, steps: int) -> float:
    """LD3's soft-teacher radius, 0.001 * D / steps^2 in standard-normal units (utils.py, prior_bound)."""
    return 0.001 * math.prod(shape) / steps ** 2


MAX_NONFINITE = 5  # training steps with a non-finite loss or gradient before training stops


class NoGradientError(ValueError):
    """A method that trains through the denoiser got a denoiser whose output carries no gradient."""


class _Best:
    """The best parameters so far by validation error (the initial ones included), and the patience
    schedule: after ``patience`` steps without a better one, restore them and halve the learning rate.
    A step whose loss or gradient is not finite is not taken: the best parameters are restored and the
    learning rate halved (``setback``), at most ``MAX_NONFINITE`` times."""

    def __init__(self, params: Sequence[torch.Tensor], err: float, train: Training):
        self.params, self.train = params, train
        self.err, self.values, self.bad, self.decays = err, [p.detach().clone() for p in params], 0, 0
        self.nonfinite = 0

    def setback(self, opt: torch.optim.Optimizer) -> bool:
        """After a non-finite loss or gradient; False when training should stop."""
        self.nonfinite += 1
        opt.zero_grad()
        self.restore()
        for group in opt.param_groups:
            group["lr"] *= 0.5
        return self.nonfinite < MAX_NONFINITE

    def update(self, err: float, opt: torch.optim.Optimizer) -> bool:
        """Record a validation error; False when training should stop."""
        if err < self.err:
            self.err, self.values, self.bad = err, [p.detach().clone() for p in self.params], 0
            return True
        self.bad += self.train.valid_every
        if self.bad < self.train.patience:
            return True
        self.decays += 1
        if self.decays > self.train.decays:
            return False
        self.restore()
        for group in opt.param_groups:
            group["lr"] *= 0.5
        self.bad = 0
        return True

    def restore(self) -> None:
        with torch.no_grad():
            for p, b in zip(self.params, self.values):
                p.copy_(b)


def fit(ctx: Calibration, solver: str, solver_options: dict, plan_fn: Callable[..., tuple],
        params: Sequence[torch.Tensor], train: Training, desc: str = "ld3",
        penalty: Callable[[], torch.Tensor] | None = None) -> dict:
    """Train ``params`` so that the student from the first part of ``ctx.x`` lands on the teacher's x0
    (``Fit``, all ``train.iters`` steps at once); the parameters are left at the best validation error seen."""
    return Fit(ctx, solver, solver_options, plan_fn, params, train, desc, penalty).run(train.iters).finish()


class Fit:
    """LD3's training loop, run in as many pieces as the caller likes (s4s screens a start; ``fit``).

    ``plan_fn(x, cond)`` gives, for initial states x (and their conditions), the sigmas (``[steps + 1]`` or
    ``[steps + 1, batch]``) and the per-step corrections (shift, scale) of ``corrections.Corrected``, or None
    for none, and optionally a third item: solver options computed from the parameters (``methods/s4s.py``'s
    coefficients). AdamW on the training part (full batch), on its mean loss plus ``penalty()`` if given;
    after every step the validation part is solved from its exact x_T (``Training``), its plain mean loss
    judged (``err``: the best so far). ``finish`` leaves the parameters at the best and gives the record.
    """

    def __init__(self, ctx: Calibration, solver: str, solver_options: dict, plan_fn: Callable[..., tuple],
                 params: Sequence[torch.Tensor], train: Training, desc: str = "ld3",
                 penalty: Callable[[], torch.Tensor] | None = None):
        self.ctx, self.spec, self.plan_fn, self.params, self.train = ctx, get_solver(solver), plan_fn, params, train
        self.opts, self.desc, self.penalty = {**self.spec.options, **solver_options}, desc, penalty
        self.n_train, _ = train.split(ctx.x.shape[0])
        teacher_calls0, student_calls0, start = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
        target = ctx.target()
        self.tr, self.va = ctx.subset(slice(None, self.n_train)), ctx.subset(slice(self.n_train, None))
        self.y_train, self.y_valid = target[:self.n_train], target[self.n_train:]
        self.teacher_calls = ctx.teacher.calls - teacher_calls0
        # x'_T = x_T + sigma_max * delta, the soft teacher
        self.delta = torch.zeros_like(self.tr.x, requires_grad=bool(train.radius))
        first = self.tr.subset(slice(0, 1))
        self.shift_lr = 12.0 / (len(plan_fn(first.x, first.cond)[0]) - 1)  # LD3's 3 * 4 / steps (utils.py)
        self.best = _Best(params, self.valid_error(), train)
        self.init_err, self.iters, self.done = self.best.err, 0, False
        self.opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        self.student_calls, self.seconds = ctx.denoiser.calls - student_calls0, time.perf_counter() - start

    @property
    def err(self) -> float:
        return self.best.err

    def student(self, part: Calibration, x_start: torch.Tensor) -> torch.Tensor:  # phi sees the exact x_T
        sig, corrections, *learned = self.plan_fn(part.x, part.cond)
        return self.spec.fn(corrected(_NeedsGrad(part.denoiser, self.desc), corrections), x_start, sig,
                            **{**self.opts, **(learned[0] if learned else {})})

    def valid_error(self) -> float:
        with torch.no_grad():
            return float(per_sample_loss(self.student(self.va, self.va.x), self.y_valid, self.train.loss).mean())

    def backward(self) -> torch.Tensor:
        """The training part's per-sample losses (detached), with the gradient of their mean plus the penalty
        accumulated, ``max_batch`` samples a pass for a model that has one (else the whole part in one): the loss
        is a mean over samples, so the gradient is the same, each pass holding only its samples' graph."""
        size, n, errs = self.ctx.denoiser.max_batch or self.n_train, self.n_train, []
        for i in range(0, n, size):
            part = self.tr.subset(slice(i, i + size))
            err = per_sample_loss(self.student(part, part.x + self.ctx.sigma_max * self.delta[i:i + size]),
                                  self.y_train[i:i + size], self.train.loss)
            (err.sum() / n).backward()
            errs.append(err.detach())
        if self.penalty is not None:
            self.penalty().backward()
        return torch.cat(errs)

    def run(self, steps: int) -> "Fit":
        """Up to ``steps`` more training steps (fewer when training stops, or at ``train.iters`` in all)."""
        calls0, start, ctx, train = self.ctx.denoiser.calls, time.perf_counter(), self.ctx, self.train
        bar = tqdm(range(max(0, min(steps, train.iters - self.iters))), desc=self.desc, leave=False,
                   disable=not ctx.progress or self.done)
        for _ in bar:
            if self.done:
                break
            self.iters += 1
            self.opt.zero_grad()
            err = self.backward()
            if not _finite(err, self.params, self.delta):  # not taken: back to the best parameters, smaller steps
                self.done = not self.best.setback(self.opt)
                continue
            self.opt.step()
            if train.radius:
                _project(self.delta, self.shift_lr * self.n_train, train.radius)
            if self.iters % train.valid_every and self.iters < train.iters:
                continue
            val = self.valid_error()
            bar.set_postfix(train=f"{float(err.detach().mean()):.3g}", valid=f"{val:.3g}", best=f"{self.best.err:.3g}")
            self.done = not self.best.update(val, self.opt)
        self.student_calls += ctx.denoiser.calls - calls0
        self.seconds += time.perf_counter() - start
        return self

    def finish(self) -> dict:
        """The parameters set to the best validation error seen, and the training record."""
        self.best.restore()
        return {
            "teacher_calls": self.teacher_calls, "student_calls": self.student_calls,
            "seconds": round(self.seconds, 3), "iters": self.iters, "n_train": self.n_train,
            "n_valid": self.ctx.x.shape[0] - self.n_train, "loss": self.train.loss, "radius": self.train.radius,
            "valid_init": self.init_err, "valid_best": self.best.err, "nonfinite_steps": self.best.nonfinite,
        }


def _finite(err: torch.Tensor, params: Sequence[torch.Tensor], delta: torch.Tensor) -> bool:
    """Whether the loss and every gradient (the soft teacher's too) are finite: one host sync."""
    grads = [p.grad for p in (*params, delta) if p.grad is not None]
    return bool(torch.stack([err.detach().sum(), *(g.sum() for g in grads)]).isfinite().all())


class _NeedsGrad:
    """The denoiser while training: an input that requires grad must give an output that does, else the
    denoiser runs under ``torch.no_grad()`` (or detaches) and its gradient would be silently zero."""

    takes_step = True

    def __init__(self, model, method: str):
        self.model, self.method = model, method

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int | None = None) -> torch.Tensor:
        out = self.model(x, sigma, step)
        if torch.is_grad_enabled() and (x.requires_grad or sigma.requires_grad) and not out.requires_grad:
            raise NoGradientError(
                f"{self.method}: the denoiser's output carries no gradient (it runs under torch.no_grad() or "
                "detaches its output), and this method trains its schedule by gradient through the denoiser; "
                "use gits, oss or sdm, or let gradients flow through the denoiser")
        return out


def _project(delta: torch.Tensor, step: float, radius: float) -> None:
    """A projected SGD step on each sample's own start, back into the ball of ``radius`` (LD3, trainer.py)."""
    with torch.no_grad():
        delta -= step * delta.grad
        norm = delta.reshape(delta.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (delta.ndim - 1)))
        delta *= (radius / norm.clamp_min(radius)).clamp(max=1.0)
        delta.grad = None


@dataclass(frozen=True)
class GlobalStage:
    """The options of LD3's global schedule, shared by ``ld3`` and ``instance`` (its first stage): the
    ``Training`` ones ``loss``, ``radius`` (default 0.001 D / steps^2, 0 for a hard teacher), ``valid``,
    ``valid_every`` and ``seed``; ``learn_last`` (learn the last positive sigma, else it is sigma_min); ``starts``: how
    many schedules to start from (the OSS schedule, on an ``oss_grid``-point grid with ``oss_batch``
    noises, with ``gits`` the GITS schedule, on a ``gits_grid``-point grid with ``gits_warmup`` noises,
    and the baselines, ranked by their training error; the best result is kept)."""

    loss: str = Training.loss
    radius: float | None = None
    learn_last: bool = True
    starts: int = 1
    oss_grid: int = DEFAULT_SIZE
    oss_batch: int | None = None
    gits: bool = False
    gits_grid: int = DEFAULT_SIZE
    gits_warmup: int | None = None
    valid: float = Training.valid
    valid_every: int = Training.valid_every
    seed: int = Training.seed

    def __post_init__(self):
        Training(loss=self.loss, valid=self.valid, valid_every=self.valid_every)  # checks them
        OSSOptions(batch=self.oss_batch)  # checks oss_batch
        GITSOptions(warmup=self.gits_warmup)  # checks gits_warmup
        if int(self.starts) != self.starts or self.starts < 1:
            raise ValueError(f"starts must be a positive integer, got {self.starts!r}")


@dataclass(frozen=True)
class Options(GlobalStage):
    """LD3's options: ``GlobalStage``'s, ``oss`` (start from the OSS schedule), and the ``Training`` ones
    ``lr``, ``iters``, ``patience``."""

    oss: bool = True
    lr: float = Training.lr
    iters: int = Training.iters
    patience: int = Training.patience

    def training(self, radius: float | None) -> Training:
        return Training(loss=self.loss, radius=radius, lr=self.lr, iters=self.iters, patience=self.patience,
                        valid=self.valid, valid_every=self.valid_every, seed=self.seed)


def initial_logits(ctx: Calibration, solver: str, nfe: int, solver_options: dict, steps: int, opts: Options,
                   n_train: int, rerank: int = 0) -> list[tuple[float, str, torch.Tensor]]:
    """Starting schedules as logits, (error, name, logits), best first: every built-in baseline
    (``schedules.BASELINES``) ending at sigma_min and (``learn_last``) with sigma_min dropped so the last
    positive sigma is one grid step up; with ``oss``, the OSS schedule (``methods/oss.py``: the dynamic
    programming optimum of the batch's error over a fine grid, for this solver), and with ``gits`` the GITS
    schedule, each taken from ``fewstep.optimize``'s memo when that method already ran on this model and
    batch with these options (inside a tune: its own cells). Ranked by the error on the first ``n_train``
    states; the best ``rerank`` of them then by the error on the whole batch (a start that training cannot
    move, an exact model's piecewise-constant loss, is the result: chosen on every state there is)."""
    candidates = {}
    for name in BASELINES:
        candidates[name] = builtin(name, steps, ctx.sigma_min, ctx.sigma_max).sigmas
        if opts.learn_last and name != "ays":  # AYS is a fixed table: no variant without sigma_min
            longer = builtin(name, steps, ctx.sigma_min, ctx.sigma_max, final_zero=False).sigmas
            candidates[f"{name}_up"] = torch.cat([longer[:-1], longer.new_zeros(1)])
    if opts.oss:
        oss_opts = OSSOptions(grid=opts.oss_grid, batch=opts.oss_batch)
        candidates["oss"] = filed(ctx, "oss", solver, nfe, oss_opts,
                                  lambda: oss_schedule(ctx, solver, nfe, oss_opts)).sigmas
    if opts.gits:
        gits_opts = GITSOptions(grid=opts.gits_grid, warmup=opts.gits_warmup)
        candidates["gits"] = filed(ctx, "gits", solver, nfe, gits_opts,
                                   lambda: gits_schedule(ctx, solver, nfe, gits_opts)).sigmas
    logits = {name: logits_from_sigmas(sig, ctx.sigma_min, opts.learn_last) for name, sig in candidates.items()}
    y = ctx.target()
    error = lambda part, name: _error(ctx, part, y[part], solver, solver_options, logits[name], opts)  # noqa: E731
    ranked = sorted((error(slice(None, n_train), name), name) for name in logits)
    n = ctx.x.shape[0]
    top = sorted(((e * n_train + error(slice(n_train, None), name) * (n - n_train)) / n, name)
                 for e, name in ranked[:rerank if n > n_train else 0])
    return [(e, name, logits[name]) for e, name in top + ranked[len(top):]]


def _error(ctx: Calibration, part: slice, y: torch.Tensor, solver: str, solver_options: dict, logits: torch.Tensor,
           opts: Options) -> float:
    """The mean loss of the schedule ``logits`` on the calibration states ``part`` (the teacher's x0 ``y``)."""
    spec, sub = get_solver(solver), ctx.subset(part)
    sig = sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, opts.learn_last)
    with torch.no_grad():
        out = spec.fn(sub.denoiser, sub.x, sig, **{**spec.options, **solver_options})
        return float(per_sample_loss(out, y, opts.loss).mean())


RERANK = 4  # starts ranked on the whole calibration batch (the best by training error)


def _train_starts(ctx: Calibration, solver: str, nfe: int, sopts: dict, steps: int, opts: Options) -> tuple:
    """Train from the OSS schedule and the best baselines (``opts.starts`` in all); the best by validation."""
    train = opts.training(opts.radius)
    teacher_calls0, student_calls0, start = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
    ranked = initial_logits(ctx, solver, nfe, sopts, steps, opts, train.split(ctx.x.shape[0])[0], RERANK)
    chosen = ranked[:opts.starts]
    best = None
    for _, init, logits in chosen:
        logits.requires_grad_(True)
        record = fit(ctx, solver, sopts,
                     lambda x, cond, logits=logits: (sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min,
                                                                        opts.learn_last), None),
                     [logits], train, desc=f"ld3 {solver} nfe={nfe} from {init}")
        if best is None or record["valid_best"] < best[1]["valid_best"]:
            best = logits.detach(), {**record, "init": init}
    logits, record = best
    record.update(learn_last=opts.learn_last, starts=[name for _, name, _ in chosen],
                  teacher_calls=ctx.teacher.calls - teacher_calls0,
                  student_calls=ctx.denoiser.calls - student_calls0, seconds=round(time.perf_counter() - start, 3))
    return logits, record


def learn_global(ctx: Calibration, solver: str, nfe: int, opts: Options) -> tuple[torch.Tensor, int, dict, dict]:
    """LD3's global logits for ``solver`` at ``nfe`` calls: (logits, steps, solver_options, training record).

    Training starts from the OSS schedule (``oss``) and the best of the baselines by training error,
    ``starts`` in all, and keeps the best validation error: the loss is not convex in the sigmas (a last
    sigma near sigma_min sits in a flat region, where a start stays). Memoized (``ctx.memo``): the same
    calibration batch, model, solver, nfe and options give the stored result (``reused`` in its record),
    so ``ld3`` and ``instance`` (whose global stage this is) train once between them.
    """
    steps, sopts = plan(solver, nfe)
    opts.training(None).split(ctx.x.shape[0])
    if n_logits(steps, opts.learn_last) < 2:
        raise ValueError(f"{solver} at nfe={nfe} has {steps} step(s): no interior sigma to learn")
    if opts.radius is None:
        opts = replace(opts, radius=default_radius(ctx.x.shape[1:], steps))
    calls0 = ctx.denoiser.calls + ctx.teacher.calls
    logits, record = ctx.memo("ld3.learn_global", (solver, nfe, ctx.sigma_min, ctx.sigma_max, ctx.teacher.steps(ctx.sigma_max),
                                                   option_items(opts)),
                              lambda: _train_starts(ctx, solver, nfe, sopts, steps, opts))
    reused = ctx.denoiser.calls + ctx.teacher.calls == calls0
    return logits.clone(), steps, sopts, {**record, "reused": reused}


def cost(opts: Options, solver: str, nfe: int, n: int) -> int:
    """Ranking the 11 baselines (6, and 5 without their sigma_min) and OSS's and GITS's schedules on the training
    part and the best RERANK on the validation part too, then up to ``iters`` steps on the whole batch (the
    training part forward and backward, the validation part forward), per start: (11 + oss + gits + RERANK) *
    B/2 * NFE + starts * iters * B * NFE (OSS's and GITS's costs too when their schedules are not there already)."""
    return (11 + opts.oss + opts.gits + RERANK) * n // 2 * nfe + opts.starts * opts.iters * n * nfe


# tune: the OSS start is tune's own oss cell (its grid and batch) and instance's global stage is this one (the
# same options): both reused; 10 steps (digits-unet: the same winners as 20, docs/tune.md); no GITS start
# (exact digits: better at NFE 5, worse at 7, docs/methods/ld3.md)
TUNE_STARTS = {"oss_grid": 40, "oss_batch": 8}


@register("ld3", Options, tune_options={**TUNE_STARTS, "iters": 10}, cost=cost, tier=1)
def ld3(ctx: Calibration, solver: str, nfe: int, opts: Options) -> Schedule:
    """LD3 (Tong et al., ICLR 2025): one schedule for ``solver`` at ``nfe`` calls, learned through the solver."""
    logits, steps, sopts, record = learn_global(ctx, solver, nfe, opts)
    sigmas = sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, opts.learn_last)
    return Schedule(sigmas, solver=solver, solver_options=sopts, training=record)
