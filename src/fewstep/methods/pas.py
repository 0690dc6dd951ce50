"""PAS: a few principal-component coordinates per step correct a base solver's direction.

Wang et al., "Diffusion Sampling Correction via Approximately 10 Parameters", arXiv 2411.06503 (code:
onefly123/PAS, ``search_by_pca.py``, ``pca_utils/utils.py``). A solver's step i moves x along a direction d
(x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d); sampling trajectories lie close to a low-dimensional subspace,
so PAS replaces d by its coordinates on a per-sample basis of that subspace: u_1 = d / |d| and the top
principal directions of the sample's own trajectory so far (``solvers.pas_basis``). Here the corrected
direction is d + |d| sum_k c_k u_k (c = 0: the base solver; the reference's coordinates are absolute, its
first initialised at the batch's mean |d|), with c one vector of ``components`` numbers per step, shared
by every sample. Any one-call solver is the base, written as ``learned``'s coefficients (``solvers.chain``)
on its LD3 schedule (``ld3.learn_global``, memoized) or on a built-in one.

As in the reference, the steps are corrected one after the other, each against the teacher's state at the
step's end (its trajectory on the schedule's sigmas; the last step against the teacher's x0), starting from
the corrected states of the steps before. The reference fits c by Adam on an L1/L2 loss; the squared error
is linear least squares in c, solved exactly here (with a small ``ridge``). A step keeps its correction only
if it lowers the step's error on the validation samples by more than ``tol`` (relative; the reference's
tau thresholds, on its training loss); finally the corrected solver is kept only if its gain in the final
error on validation passes ``gate`` standard errors (else the base solver is returned). See
docs/methods/pas.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..metrics import significance
from ..schedules import BUILTIN_SCHEDULES, Schedule, builtin, sigmas_from_logits
from ..solvers import chain, pas_basis, plan
from .base import Calibration, register
from .ld3 import Training, learn_global
from .s4s import LearnedStage, given_start, losses, one_call, unlearnable


@dataclass(frozen=True)
class Options(LearnedStage):
    """PAS's options: ``s4s.LearnedStage``'s (the LD3 schedule; ``gate``: the standard errors of the final
    validation gain needed to keep any correction; ``start``: base schedules instead of ``schedule``'s) and
    these. ``components``: basis vectors per step (the reference's PCA_num, 4); ``schedule``: the base
    timesteps, 'ld3' or a built-in schedule's name; ``ridge``: the least-squares ridge, relative to the mean
    diagonal of the normal matrix; ``tol``: a step is corrected only if its validation error drops by more
    than this fraction.
    """

    components: int = 4
    schedule: str = "ld3"
    ridge: float = 1e-3
    tol: float = 1e-2

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.components, bool) or int(self.components) != self.components or self.components < 1:
            raise ValueError(f"components must be a positive integer, got {self.components!r}")
        if self.schedule != "ld3" and self.schedule not in BUILTIN_SCHEDULES:
            raise ValueError(f"schedule must be 'ld3' or one of {sorted(BUILTIN_SCHEDULES)}, got {self.schedule!r}")
        if not self.ridge >= 0 or not self.tol >= 0:
            raise ValueError(f"ridge and tol must be >= 0, got {self.ridge!r} and {self.tol!r}")


def _base(ctx: Calibration, solver: str, nfe: int, o: Options, n_train: int) -> Schedule:
    """The base solver's schedule at ``nfe`` calls: the best given ``start`` (on its own solver), else LD3's for
    ``solver``, or the built-in ``o.schedule``."""
    given = given_start(ctx, nfe, o.start, o.loss, n_train)
    if given is not None:
        return given[0]
    if o.schedule == "ld3":
        logits, _, sopts, _ = learn_global(ctx, solver, nfe, o.ld3_options())
        sigmas = sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, o.learn_last)
    else:
        steps, sopts = plan(solver, nfe)
        sigmas = builtin(o.schedule, steps, ctx.sigma_min, ctx.sigma_max).sigmas
    return Schedule(sigmas, solver=solver, solver_options=sopts)


def _fit_step(A: torch.Tensor, r: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_c sum_samples |A c - r|^2 + ridge * mean(diag(A^T A)) |c|^2, for A [n, dim, k], r [n, dim]."""
    gram = torch.einsum("ndk,ndl->kl", A, A)
    scale = gram.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * scale * eye, torch.einsum("ndk,nd->k", A, r))


def _corrections(ctx: Calibration, base: Schedule, o: Options, n_train: int) -> tuple[Schedule, list[dict]]:
    """Fit the steps' coordinates one after the other (module docstring): the 'learned' schedule of the base
    solver's coefficients and the corrections, and per step what was measured."""
    sig = base.sigmas
    a, b = chain(base.solver, sig, **base.solver_options)
    x_T = ctx.x
    states = ctx.teacher.trajectory(x_T, sig, cond=ctx.cond)
    targets = [*states[1:-1], ctx.target()]
    x, ds, dirs, coords, steps = x_T, [], [], [], []
    with torch.no_grad():
        for i, target in enumerate(targets):
            ds.append(ctx.denoiser(x, sig[i]))
            x_base = a[i] * x + sum(w * d for w, d in zip(b[i], ds))
            dt = sig[i + 1] - sig[i]
            d = (x_base - x) / dt
            basis = pas_basis(d, x, x_T, dirs, int(o.components))  # [n, k, dim]
            A = dt * d.reshape(len(d), -1).norm(dim=1)[:, None, None] * basis.transpose(1, 2)  # [n, dim, k]
            r = (target - x_base).reshape(len(d), -1)
            c = _fit_step(A[:n_train], r[:n_train], o.ridge)
            fix = torch.einsum("ndk,k->nd", A, c)
            before, after = (r[n_train:].pow(2).mean().item(), (r - fix)[n_train:].pow(2).mean().item())
            kept = after < (1 - o.tol) * before
            steps.append({"step": i, "valid_before": before, "valid_after": after, "kept": kept})
            coords.append(c.tolist() if kept else [])
            x_next = x_base + fix.reshape(x.shape) if kept else x_base
            dirs.append((x_next - x) / dt)
            x = x_next
    options = {"a": a.tolist(), "b": [row.tolist() for row in b], "pas": coords}
    return Schedule(sig, solver="learned", solver_options=options), steps


def cost(o: Options, solver: str, nfe: int, n: int) -> int:
    """One pass of the base solver over the batch and the gate on its validation half (base and corrected):
    2 * B * NFE; the teacher's trajectory is the teacher's, the LD3 base's reused inside tune."""
    return 2 * n * nfe


@register("pas", Options, tune_options={"oss_grid": 40}, quick_options={"ld3_iters": 10}, cost=cost, tier=2, accepts=one_call)
def pas(ctx: Calibration, solver: str, nfe: int, o: Options) -> Schedule:
    """PAS (arXiv 2411.06503) on ``solver`` (one call a step) at ``nfe`` calls: the base solver's schedule
    with per-step direction corrections, or the base itself where they do not pass the gate."""
    untrained = unlearnable(ctx, solver, nfe, o.ld3_options(), "pas")
    if untrained is not None:
        return untrained
    teacher_calls0, student_calls0, begin = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
    n_train, n_valid = Training(valid=o.valid).split(ctx.x.shape[0])
    base = _base(ctx, solver, nfe, o, n_train)
    corrected, steps = _corrections(ctx, base, o, n_train)
    valid, y_valid = ctx.subset(slice(n_train, None)), ctx.target()[n_train:]
    base_losses, pas_losses = (losses(valid, s, y_valid, o.loss) for s in (base, corrected))
    z = significance(base_losses - pas_losses)
    kept = z >= o.gate and any(s["kept"] for s in steps)
    record = {"steps": steps, "gate_z": round(z, 3), "kept": "corrected" if kept else "base",
              "valid_base": float(base_losses.mean()), "valid_corrected": float(pas_losses.mean()),
              "n_train": n_train, "n_valid": n_valid, "schedule": o.schedule, "base_solver": base.solver,
              "teacher_calls": ctx.teacher.calls - teacher_calls0, "student_calls": ctx.denoiser.calls - student_calls0,
              "seconds": round(time.perf_counter() - begin, 3)}
    return (corrected if kept else base).with_metadata(training=record)
