"""LD3: one global schedule learned by gradient descent through the solver.

Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025 (code: vinhsuhi/LD3).
The timesteps are a cumulative softmax of logits in lambda = -log sigma, so any logits give a valid,
strictly decreasing schedule; the few-step student from x_T is trained to land on the teacher's x0,
where the student may start from x'_T in a small ball around x_T (the "soft teacher", LD3 Sec. 3.3).
``fit`` (the training loop) is shared with the instance-aware method (``optimize/instance.py``).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..sample import corrected, get_solver, plan
from ..schedules import Schedule, karras, logsnr_uniform
from . import Calibration, memo_key, register
from .grid import DEFAULT_SIZE
from .oss import oss as oss_schedule

LOSS, STARTS, LR, ITERS, PATIENCE = "rmse", 1, 0.1, 50, 10  # defaults shared with instance's global stage


def n_logits(steps: int, learn_last: bool) -> int:
    """Logits of a ``steps``-step schedule: one per lambda interval between the positive sigmas, plus
    (``learn_last``) a slack interval from the last positive sigma down to sigma_min."""
    return steps if learn_last else steps - 1


def sigmas_from_logits(logits: torch.Tensor, sigma_max: float, sigma_min: float, learn_last: bool) -> torch.Tensor:
    """Sigmas ``[steps + 1, ...]`` from logits ``[..., K]``: sigma_max, the cumulative softmax in lambda, then 0.

    lambda_k = lambda(sigma_max) + u_k (lambda(sigma_min) - lambda(sigma_max)), u = cumsum(softmax(logits))
    (LD3, Sec. 3.2). With ``learn_last`` the last weight is slack, so the last positive sigma is learned
    in (sigma_min, sigma_max); otherwise it is sigma_min exactly.
    """
    u = torch.cumsum(torch.softmax(logits, -1), -1)
    u = u[..., :-1] if learn_last else torch.cat([u[..., :-1], torch.ones_like(u[..., :1])], -1)
    positive = sigma_max * torch.exp(-u * math.log(sigma_max / sigma_min))
    top = torch.full_like(u[..., :1], sigma_max)
    return torch.cat([top, positive, torch.zeros_like(top)], -1).movedim(-1, 0)


def logits_from_sigmas(sigmas: torch.Tensor, sigma_min: float, learn_last: bool, floor: float = 1e-4) -> torch.Tensor:
    """Inverse of ``sigmas_from_logits`` for a schedule ending in 0 (gaps clamped to ``floor`` of the range)."""
    lam = -sigmas[:-1].to(torch.float64).log()
    lam_end = -math.log(sigma_min)
    if learn_last:
        lam = torch.cat([lam, lam.new_tensor([lam_end])])
    gaps = (lam[1:] - lam[:-1]).clamp_min(floor * (lam_end - float(lam[0])))
    return gaps.log() - gaps.log().mean()


def per_sample_loss(out: torch.Tensor, ref: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample L2 (mean squared error over all dimensions), L1 (mean absolute error) or RMSE
    (root of the L2: fewstep's evaluation metric, less dominated by the worst samples)."""
    diff = (out - ref).reshape(out.shape[0], -1)
    if loss == "l1":
        return diff.abs().mean(1)
    mse = diff.pow(2).mean(1)
    return mse.sqrt() if loss == "rmse" else mse


def check_options(loss: str, valid: float, n: int) -> tuple[int, int]:
    if loss not in ("l2", "l1", "rmse"):
        raise ValueError(f"loss must be 'l2', 'l1' or 'rmse', got {loss!r}")
    if not 0 < valid < 1:
        raise ValueError(f"valid must be a fraction in (0, 1), got {valid!r}")
    n_valid = int(round(n * valid))
    if n_valid < 1 or n - n_valid < 1:
        raise ValueError(f"the calibration batch ({n} samples) is too small to split into train and validation")
    return n - n_valid, n_valid


def fit(ctx: Calibration, solver: str, solver_options: dict, plan_fn: Callable[[torch.Tensor], tuple],
        params: Sequence[torch.Tensor], *, loss: str = "l2", radius: float | None = None, lr: float = 0.05,
        iters: int = 400, patience: int = 40, decays: int = 3, valid: float = 0.5, seed: int = 0,
        weight_decay: float = 0.0, desc: str = "ld3") -> dict:
    """Train ``params`` so that the student from the first part of ``ctx.x`` lands on the teacher's x0.

    ``plan_fn(x)`` gives, for initial states x, the sigmas (``[steps + 1]`` or ``[steps + 1, batch]``)
    and the per-step corrections (shift, scale) of ``sample.Corrected``, or None for none.
    AdamW (decoupled ``weight_decay``) on the training part (full batch); after every step the
    validation part is solved from its exact x_T. After ``patience`` steps without a better validation error the best parameters are
    restored and the learning rate halved; after ``decays`` such restarts training stops. The
    parameters are left at the best validation error seen (the initial ones included).
    ``radius``: the soft-teacher ball ||x'_T - x_T|| / sigma_max <= radius (LD3's default 0.001 D / steps^2).
    """
    torch.manual_seed(seed)
    fn, defaults = get_solver(solver)
    opts = {**defaults, **solver_options}
    n_train, _ = check_options(loss, valid, ctx.x.shape[0])
    teacher_calls0, student_calls0, start = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
    target = ctx.teacher.solve(ctx.x, sigma_max=ctx.sigma_max)
    x_train, x_valid = ctx.x[:n_train], ctx.x[n_train:]
    y_train, y_valid = target[:n_train], target[n_train:]
    teacher_calls = ctx.teacher.calls - teacher_calls0

    def student(x_start: torch.Tensor, x_phi: torch.Tensor) -> torch.Tensor:  # phi sees the exact x_T
        sig, corrections = plan_fn(x_phi)
        return fn(corrected(ctx.denoiser, sig, corrections), x_start, sig, **opts)

    def valid_error() -> float:
        with torch.no_grad():
            return float(per_sample_loss(student(x_valid, x_valid), y_valid, loss).mean())

    delta = torch.zeros_like(x_train, requires_grad=bool(radius))  # x'_T = x_T + sigma_max * delta
    shift_lr = 12.0 / (len(plan_fn(x_train[:1])[0]) - 1)  # LD3's shift_lr = 3 * 4 / steps (utils.py)
    best_err, best = valid_error(), [p.detach().clone() for p in params]
    init_err, bad, done_decays, it = best_err, 0, 0, 0
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    bar = tqdm(range(iters), desc=desc, leave=False, disable=not ctx.progress)
    for it in bar:
        err = per_sample_loss(student(x_train + ctx.sigma_max * delta, x_train), y_train, loss)
        opt.zero_grad()
        err.mean().backward()
        opt.step()
        if radius:
            with torch.no_grad():  # projected SGD step on each sample's own start (LD3, trainer.py)
                delta -= shift_lr * n_train * delta.grad
                norm = delta.reshape(n_train, -1).norm(dim=1).reshape(-1, *([1] * (delta.ndim - 1)))
                delta *= (radius / norm.clamp_min(radius)).clamp(max=1.0)
                delta.grad = None
        val = valid_error()
        bar.set_postfix(train=f"{float(err.detach().mean()):.3g}", valid=f"{val:.3g}", best=f"{best_err:.3g}")
        if val < best_err:
            best_err, best, bad = val, [p.detach().clone() for p in params], 0
            continue
        bad += 1
        if bad >= patience:
            done_decays += 1
            if done_decays > decays:
                break
            with torch.no_grad():
                for p, b in zip(params, best):
                    p.copy_(b)
            for group in opt.param_groups:
                group["lr"] *= 0.5
            bad = 0
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    return {
        "teacher_calls": teacher_calls, "student_calls": ctx.denoiser.calls - student_calls0,
        "seconds": round(time.perf_counter() - start, 3), "iters": it + 1, "n_train": n_train,
        "n_valid": ctx.x.shape[0] - n_train, "loss": loss, "radius": radius,
        "valid_init": init_err, "valid_best": best_err,
    }


def default_radius(shape, steps: int) -> float:
    """LD3's soft-teacher radius, 0.001 * D / steps^2 in standard-normal units (utils.py, prior_bound)."""
    return 0.001 * math.prod(shape) / steps ** 2


def initial_logits(ctx: Calibration, solver: str, nfe: int, solver_options: dict, steps: int, learn_last: bool,
                   loss: str, n_train: int, oss: bool, oss_grid: int = DEFAULT_SIZE) -> list[tuple[float, str, torch.Tensor]]:
    """Starting schedules as logits, (train error, name, logits), best first: karras rho=7 and
    logSNR-uniform, each ending at sigma_min and (``learn_last``) with sigma_min dropped so the last
    positive sigma is one grid step up; with ``oss``, the OSS schedule (``optimize/oss.py``: the dynamic
    programming optimum of the batch's error over a fine grid, for this solver), taken from
    ``fewstep.optimize``'s memo when the ``oss`` method already ran on this model and batch."""
    fn, defaults = get_solver(solver)
    x, y = ctx.x[:n_train], ctx.teacher.solve(ctx.x, sigma_max=ctx.sigma_max)[:n_train]
    candidates = {}
    for name, make in (("karras", karras), ("logsnr_uniform", logsnr_uniform)):
        candidates[name] = make(steps, ctx.sigma_min, ctx.sigma_max).sigmas
        if learn_last:
            longer = make(steps, ctx.sigma_min, ctx.sigma_max, final_zero=False).sigmas
            candidates[f"{name}_up"] = torch.cat([longer[:-1], longer.new_zeros(1)])
    if oss:
        # the key fewstep.optimize(den, "oss", solver, nfe, calib=...) files its result under
        key = memo_key(ctx, "oss", solver, nfe, {"grid": oss_grid})
        candidates["oss"] = ctx.memo("optimize", key, lambda: oss_schedule(ctx, solver, nfe, grid=oss_grid)).sigmas
    ranked = []
    with torch.no_grad():
        for name, sig in candidates.items():
            logits = logits_from_sigmas(sig, ctx.sigma_min, learn_last)
            sig = sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, learn_last)
            out = fn(ctx.denoiser, x, sig, **{**defaults, **solver_options})
            ranked.append((float(per_sample_loss(out, y, loss).mean()), name, logits))
    return sorted(ranked, key=lambda r: r[0])


def learn_global(ctx: Calibration, solver: str, nfe: int, *, loss: str = LOSS, radius: float | None = None,
                 learn_last: bool = True, starts: int = STARTS, oss: bool = True, oss_grid: int = DEFAULT_SIZE,
                 lr: float = LR, iters: int = ITERS, patience: int = PATIENCE, valid: float = 0.5,
                 seed: int = 0) -> tuple[torch.Tensor, int, dict, dict]:
    """LD3's global logits for ``solver`` at ``nfe`` calls: (logits, steps, solver_options, training record).

    Training starts from the OSS schedule (``oss``) and the best of the baselines by training error,
    ``starts`` in all, and keeps the best validation error: the loss is not convex in the sigmas (a last
    sigma near sigma_min sits in a flat region, where a start stays). Memoized (``ctx.memo``): the same
    calibration batch, model, solver, nfe and options give the stored result (``reused`` in its record),
    so ``ld3`` and ``instance`` (whose global stage this is) train once between them.
    """
    steps, opts = plan(solver, nfe)
    n_train, _ = check_options(loss, valid, ctx.x.shape[0])
    if n_logits(steps, learn_last) < 2:
        raise ValueError(f"{solver} at nfe={nfe} has {steps} step(s): no interior sigma to learn")
    if int(starts) != starts or starts < 1:
        raise ValueError(f"starts must be a positive integer, got {starts!r}")
    if radius is None:
        radius = default_radius(ctx.x.shape[1:], steps)
    options = dict(loss=loss, radius=radius, learn_last=learn_last, starts=starts, oss=oss, oss_grid=oss_grid, lr=lr, iters=iters,
                   patience=patience, valid=valid, seed=seed)
    calls0 = ctx.denoiser.calls + ctx.teacher.calls

    def train():
        teacher_calls0, student_calls0, start = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
        ranked = initial_logits(ctx, solver, nfe, opts, steps, learn_last, loss, n_train, oss, oss_grid)
        chosen = [r for r in ranked if r[1] == "oss"]
        chosen += [r for r in ranked if r[1] != "oss"][:starts - len(chosen)]
        best = None
        for _, init, logits in chosen:
            logits.requires_grad_(True)
            record = fit(ctx, solver, opts,
                         lambda x, logits=logits: (sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, learn_last),
                                                   None),
                         [logits], loss=loss, radius=radius, lr=lr, iters=iters, patience=patience, valid=valid,
                         seed=seed, desc=f"ld3 {solver} nfe={nfe} from {init}")
            if best is None or record["valid_best"] < best[1]["valid_best"]:
                best = logits.detach(), {**record, "init": init}
        logits, record = best
        record.update(learn_last=learn_last, starts=[name for _, name, _ in chosen],
                      teacher_calls=ctx.teacher.calls - teacher_calls0,
                      student_calls=ctx.denoiser.calls - student_calls0, seconds=round(time.perf_counter() - start, 3))
        return logits, record

    logits, record = ctx.memo("ld3.learn_global", (solver, nfe, ctx.sigma_min, ctx.sigma_max, ctx.teacher.steps,
                                                   sorted(options.items())), train)
    reused = ctx.denoiser.calls + ctx.teacher.calls == calls0
    return logits.clone(), steps, opts, {**record, "reused": reused}


# tune: the OSS grid of tune's own oss cells, and (quick) the iters instance's global stage uses: both reused
@register("ld3", tune_options={"oss_grid": 40}, quick_options={"iters": 10})
def ld3(ctx: Calibration, solver: str, nfe: int, *, loss: str = LOSS, radius: float | None = None,
        learn_last: bool = True, starts: int = STARTS, oss: bool = True, oss_grid: int = DEFAULT_SIZE,
        lr: float = LR, iters: int = ITERS,
        patience: int = PATIENCE, valid: float = 0.5, seed: int = 0) -> Schedule:
    """LD3 (Tong et al., ICLR 2025): one schedule for ``solver`` at ``nfe`` calls, learned through the solver.

    Options: ``loss`` 'l2' | 'l1' | 'rmse' (per-sample root of the L2, the evaluation metric);
    ``radius`` of the soft-teacher ball (default 0.001 D / steps^2, 0 for a hard teacher);
    ``learn_last`` (learn the last positive sigma, else it is sigma_min); ``starts``: how many schedules
    to start from (the OSS schedule when ``oss``, on an ``oss_grid``-point grid, then the best baselines;
    the best result is kept);
    Adam ``lr``, at most ``iters`` steps, ``patience`` for the halving / early stop; ``valid`` fraction
    of the calibration batch held out for early stopping; ``seed``.
    """
    logits, steps, opts, record = learn_global(ctx, solver, nfe, loss=loss, radius=radius, learn_last=learn_last,
                                               starts=starts, oss=oss, oss_grid=oss_grid, lr=lr, iters=iters,
                                               patience=patience,
                                               valid=valid, seed=seed)
    sigmas = sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, learn_last)
    return Schedule(sigmas, solver=solver, solver_options=opts, training=record)
