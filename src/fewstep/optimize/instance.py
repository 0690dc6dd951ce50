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
from . import Calibration, register
from .ld3 import default_radius, fit, learn_global


@register("instance")
def instance(ctx: Calibration, solver: str, nfe: int, *, loss: str = "l2", radius: float | None = None,
             learn_last: bool = True, starts: int = 4, hidden: int = 64, max_inputs: int = 256,
             lr: float = 3e-3, iters: int = 400, patience: int = 40, valid: float = 0.5,
             seed: int = 0) -> SchedulePolicy:
    """A SchedulePolicy for ``solver`` at ``nfe`` calls: LD3's global schedule, then phi trained on top.

    Options: ``hidden`` width of phi's MLP, ``max_inputs`` (x_T is average-pooled to at most this many
    features); Adam ``lr``, ``iters``, ``patience`` for phi; ``loss``, ``radius``, ``learn_last``,
    ``starts``, ``valid``, ``seed`` as for ``ld3`` (the global stage uses LD3's own learning rate).
    Calibration: phi generalizes from the training part of the batch, so give it hundreds of samples.
    """
    teacher_calls0, student_calls0, start = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
    logits, steps, opts, global_record = learn_global(ctx, solver, nfe, loss=loss, radius=radius,
                                                      learn_last=learn_last, starts=starts, valid=valid, seed=seed)
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
