"""Instance-aware discretization: a schedule per sample, from a small network phi(x_T).

Yuan et al., "Few-Step Diffusion Sampling Through Instance-Aware Discretizations", arXiv 2603.17671:
one global schedule is a compromise between initial noises whose trajectories differ; phi maps x_T to
that sample's timesteps and is trained through the solver against the teacher, as LD3 trains its logits.
Here phi outputs residual logits on top of the LD3 schedule's (``optimize/ld3.py``), starting at zero,
and the same training loop (``ld3.fit``: soft teacher, validation, early stopping) keeps the best;
phi sees x_T projected on the teacher samples' principal directions, and is kept only if its
validation gain over the global schedule is significant (``gate``). See docs/methods/instance.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from ..evaluate import noise
from ..policy import SchedulePolicy
from ..sample import get_solver, plan
from ..schedules import Schedule, as_schedule
from . import Calibration, register
from .grid import DEFAULT_SIZE
from .ld3 import (LOSS, STARTS, check_options, default_radius, fit, learn_global, logits_from_sigmas, n_logits, per_sample_loss,
                  sigmas_from_logits)

HIDDEN, COMPONENTS, SAMPLES, WEIGHT_DECAY, GATE = 64, 16, 0, 0.0, 2.0


def global_logits(init: Schedule, ctx: Calibration, solver: str, nfe: int, learn_last: bool):
    """The logits of a given global schedule, checked against ``solver`` and ``nfe``."""
    steps, opts = plan(solver, nfe)
    sig = as_schedule(init).sigmas
    if len(sig) != steps + 1 or sig[-1] != 0 or abs(float(sig[0]) - ctx.sigma_max) > 1e-9 * ctx.sigma_max:
        raise ValueError(f"init must be a schedule of {steps} steps from sigma_max={ctx.sigma_max} to 0 "
                         f"({solver} at nfe={nfe}), got {sig.tolist()}")
    if n_logits(steps, learn_last) < 2:
        raise ValueError(f"{solver} at nfe={nfe} has {steps} step(s): no interior sigma to learn")
    if not learn_last and abs(float(sig[-2]) - ctx.sigma_min) > 1e-9 * ctx.sigma_min:
        raise ValueError(f"with learn_last=False the last positive sigma must be sigma_min={ctx.sigma_min}")
    return logits_from_sigmas(sig, ctx.sigma_min, learn_last), steps, opts


def principal_directions(y: torch.Tensor, k: int) -> torch.Tensor:
    """The top ``k`` principal directions of samples ``y`` [n, d], as columns [d, k] (zero-padded past
    rank). phi sees x_T projected on the teacher's principal directions: for Gaussian data the ODE maps
    x_T / sigma_max to x0 - mu ~ S x_T / sigma_max (S the data's covariance root), so these are the
    directions of x_T that decide where the sample lands; the rest is noise phi would overfit to."""
    vh = torch.linalg.svd(y - y.mean(0), full_matrices=False).Vh[:k]
    return torch.cat([vh, vh.new_zeros(k - vh.shape[0], vh.shape[1])]).T


def significance(ctx: Calibration, solver: str, opts: dict, policy: SchedulePolicy, glob: torch.Tensor,
                 loss: str, n_train: int) -> float:
    """How many standard errors the policy's mean validation loss lies below the global schedule's
    (paired per-sample differences). The per-sample loss is heavy-tailed (a schedule change can move a
    sample to another mode), so the best validation step alone can be a selection artifact."""
    fn, defaults = get_solver(solver)
    x, y = ctx.x[n_train:], ctx.teacher.solve(ctx.x, sigma_max=ctx.sigma_max)[n_train:]
    with torch.no_grad():
        d = (per_sample_loss(fn(ctx.denoiser, x, glob, **{**defaults, **opts}), y, loss)
             - per_sample_loss(fn(ctx.denoiser, x, policy.sigmas(x), **{**defaults, **opts}), y, loss))
    if d.numel() < 2:
        return 0.0
    return float(d.mean() / (d.std() / math.sqrt(d.numel())).clamp_min(1e-300))


@register("instance", tune_options={"oss_grid": 40, "iters": 100, "patience": 15})  # oss_grid as ld3's: tune's ld3 result is reused
def instance(ctx: Calibration, solver: str, nfe: int, *, loss: str = LOSS, radius: float | None = None,
             learn_last: bool = True, starts: int = STARTS, oss_grid: int = DEFAULT_SIZE,
             init: Schedule | None = None, hidden: int = HIDDEN,
             max_inputs: int = 256, components: int = COMPONENTS, samples: int = SAMPLES, lr: float = 3e-3,
             weight_decay: float = WEIGHT_DECAY, iters: int = 300, patience: int = 30, gate: float = GATE,
             valid: float = 0.5, seed: int = 0) -> SchedulePolicy:
    """A SchedulePolicy for ``solver`` at ``nfe`` calls: LD3's global schedule, then phi trained on top.

    Options: ``init``: a global schedule to start from (e.g. an ``ld3`` result for the same solver and
    nfe, ending at 0) instead of learning one here (on the calibration batch, with the ld3 defaults
    and these ``loss``, ``radius``, ``learn_last``, ``starts``, ``oss_grid``, ``valid``, ``seed``); ``samples``: phi
    trains on the calibration batch extended with fresh seeded noises to at least this many (the
    teacher solves them); ``hidden`` width of phi's MLP, ``max_inputs`` (x_T is average-pooled to at
    most this many features); AdamW ``lr``, ``weight_decay``, ``iters``, ``patience`` for phi;
    ``gate``: phi is kept only if its validation gain over the global schedule is at least ``gate``
    standard errors of the paired per-sample differences (else the policy gives the global schedule).
    """
    if int(samples) != samples or samples < 0:
        raise ValueError(f"samples must be a non-negative integer, got {samples!r}")
    teacher_calls0, student_calls0, start = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
    if init is None:
        logits, steps, opts, global_record = learn_global(ctx, solver, nfe, loss=loss, radius=radius,
                                                          learn_last=learn_last, starts=starts, oss_grid=oss_grid,
                                                          valid=valid, seed=seed)
    else:
        logits, steps, opts = global_logits(init, ctx, solver, nfe, learn_last)
        global_record = {"init": "given schedule", "valid_best": None}
    if ctx.x.shape[0] < samples:  # fresh noises from the calibration seed's stream, after the batch's own
        extra = noise(int(samples), ctx.x.shape[1:], ctx.sigma_max, ctx.seed)[ctx.x.shape[0]:]
        ctx = replace(ctx, x=torch.cat([ctx.x, extra]))
    torch.manual_seed(seed)
    config = {"shape": list(ctx.x.shape[1:]), "steps": steps, "n_logits": logits.numel(), "learn_last": learn_last,
              "hidden": int(hidden), "max_inputs": int(max_inputs), "components": int(components),
              "sigma_min": ctx.sigma_min, "sigma_max": ctx.sigma_max, "solver": solver, "solver_options": opts}
    policy = SchedulePolicy(config)
    net = policy.net
    n_train, _ = check_options(loss, valid, ctx.x.shape[0])
    with torch.no_grad():
        net.basis.copy_(principal_directions(net.pooled(ctx.teacher.solve(ctx.x, ctx.sigma_max)[:n_train]),
                                             net.basis.shape[1]))
        feats = net.features(ctx.x / ctx.sigma_max)
        net.global_logits.copy_(logits)
        net.feat_mean.copy_(feats.mean(0))
        net.feat_std.copy_(feats.std(0).clamp_min(1e-8))
    if radius is None:
        radius = default_radius(ctx.x.shape[1:], steps)
    record = fit(ctx, solver, opts, policy.sigmas, list(net.parameters()), loss=loss, radius=radius, lr=lr,
                 iters=iters, patience=patience, valid=valid, seed=seed, weight_decay=weight_decay,
                 desc=f"instance {solver} nfe={nfe}")
    z = significance(ctx, solver, opts, policy, sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, learn_last),
                     loss, record["n_train"])
    if z < gate:  # not a clear gain on validation: the global schedule (phi's residual set to zero)
        with torch.no_grad():
            net.mlp[-1].weight.zero_()
            net.mlp[-1].bias.zero_()
    record.update(gate_z=round(z, 3), phi_kept=z >= gate, init=f"ld3 ({global_record['init']})", ld3_valid_best=global_record["valid_best"],
                  ld3_reused=global_record.get("reused", False),
                  teacher_calls=ctx.teacher.calls - teacher_calls0, student_calls=ctx.denoiser.calls - student_calls0,
                  seconds=round(time.perf_counter() - start, 3))
    policy.metadata.update(solver=solver, solver_options=opts, training=record)
    return policy
