"""Instance-aware discretization: a schedule per sample, from a small network phi(x_T).

Yuan et al., "Few-Step Diffusion Sampling Through Instance-Aware Discretizations", arXiv 2603.17671:
one global schedule is a compromise between initial noises whose trajectories differ; phi maps x_T to
that sample's timesteps and is trained through the solver against the teacher, as LD3 trains its logits.
Here phi outputs residual logits on top of the LD3 schedule's (``optimize/ld3.py``), starting at zero,
and the same training loop (``ld3.fit``: soft teacher, validation, early stopping) keeps the best.
"""

from __future__ import annotations

import time

import torch

from ..policy import SchedulePolicy
from ..sample import plan
from ..schedules import Schedule, as_schedule
from . import Calibration, register
from .ld3 import default_radius, fit, learn_global, logits_from_sigmas, n_logits


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


@register("instance")
def instance(ctx: Calibration, solver: str, nfe: int, *, loss: str = "l2", radius: float | None = None,
             learn_last: bool = True, starts: int = 4, init: Schedule | None = None, hidden: int = 64,
             max_inputs: int = 256, lr: float = 3e-3, iters: int = 1000, patience: int = 100, valid: float = 0.5,
             seed: int = 0) -> SchedulePolicy:
    """A SchedulePolicy for ``solver`` at ``nfe`` calls: LD3's global schedule, then phi trained on top.

    Options: ``init``: a global schedule to start from (e.g. an ``ld3`` result for the same solver and
    nfe, ending at 0) instead of learning one here; ``hidden`` width of phi's MLP, ``max_inputs`` (x_T is average-pooled to at most this many
    features); Adam ``lr``, ``iters``, ``patience`` for phi; ``loss``, ``radius``, ``learn_last``,
    ``starts``, ``valid``, ``seed`` as for ``ld3`` (the global stage uses LD3's own learning rate).
    Calibration: phi generalizes from the training part of the batch, so give it hundreds of samples.
    """
    teacher_calls0, student_calls0, start = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
    if init is None:
        logits, steps, opts, global_record = learn_global(ctx, solver, nfe, loss=loss, radius=radius,
                                                          learn_last=learn_last, starts=starts, valid=valid, seed=seed)
    else:
        logits, steps, opts = global_logits(init, ctx, solver, nfe, learn_last)
        global_record = {"init": "given schedule", "valid_best": None}
    torch.manual_seed(seed)
    config = {"shape": list(ctx.x.shape[1:]), "steps": steps, "n_logits": logits.numel(), "learn_last": learn_last,
              "hidden": int(hidden), "max_inputs": int(max_inputs), "sigma_min": ctx.sigma_min,
              "sigma_max": ctx.sigma_max, "solver": solver, "solver_options": opts}
    policy = SchedulePolicy(config)
    net = policy.net
    with torch.no_grad():
        feats = net.features(ctx.x / ctx.sigma_max)
        net.global_logits.copy_(logits)
        net.feat_mean.copy_(feats.mean(0))
        net.feat_std.copy_(feats.std(0).clamp_min(1e-8))
    if radius is None:
        radius = default_radius(ctx.x.shape[1:], steps)
    record = fit(ctx, solver, opts, policy.sigmas, list(net.parameters()), loss=loss, radius=radius, lr=lr,
                 iters=iters, patience=patience, valid=valid, seed=seed, desc=f"instance {solver} nfe={nfe}")
    record.update(init=f"ld3 ({global_record['init']})", ld3_valid_best=global_record["valid_best"],
                  teacher_calls=ctx.teacher.calls - teacher_calls0, student_calls=ctx.denoiser.calls - student_calls0,
                  seconds=round(time.perf_counter() - start, 3))
    policy.metadata.update(solver=solver, solver_options=opts, training=record)
    return policy
