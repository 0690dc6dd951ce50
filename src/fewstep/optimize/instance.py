"""Instance-aware discretization: a schedule per sample, from a small network phi(x_T).

Yuan et al., "Few-Step Diffusion Sampling Through Instance-Aware Discretizations", arXiv 2603.17671:
one global schedule is a compromise between initial noises whose trajectories differ; phi maps x_T to
that sample's timesteps and is trained through the solver against the teacher, as LD3 trains its logits.
Here phi outputs residual logits on top of the LD3 schedule's (``optimize/ld3.py``), starting at zero,
and the same training loop (``ld3.fit``: soft teacher, validation, early stopping) keeps the best;
phi sees x_T projected on the teacher samples' principal directions, and is kept only if its
validation gain over the global schedule is significant (``gate``). ``policy="route"`` is the
lower-capacity phi: the calibration samples are clustered by their teacher endpoints, each cluster
gets its own LD3 schedule, and a linear classifier sends x_T to a cluster. With ``corrections`` phi
also gives each step the paper's time shift and output scale (``sample.Corrected``), learned first for
the global schedule and then per sample. See docs/methods/instance.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Sequence

import torch

from ..evaluate import noise
from ..policy import SchedulePolicy, corrections_from_raw
from ..sample import corrected, get_solver, plan
from ..schedules import Schedule, as_schedule
from . import Calibration, register
from .grid import DEFAULT_SIZE
from .ld3 import (ITERS, LOSS, LR, PATIENCE, STARTS, check_options, default_radius, fit, learn_global, logits_from_sigmas, n_logits, per_sample_loss,
                  sigmas_from_logits)

HIDDEN, COMPONENTS, SAMPLES, WEIGHT_DECAY, GATE = 64, 16, 0, 0.0, 2.0
POLICY, CLUSTERS = "auto", (2, 3, 4)


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


def kmeans(f: torch.Tensor, k: int, restarts: int = 8, iters: int = 100, seed: int = 0) -> torch.Tensor:
    """Cluster labels [n] of the rows of ``f`` [n, d]: Lloyd's k-means from k-means++ seeds (Arthur &
    Vassilvitskii 2007), the lowest within-cluster sum of squares of ``restarts`` runs."""
    g = torch.Generator().manual_seed(seed)
    best, best_cost = None, float("inf")
    for _ in range(restarts):
        centers = f[torch.randint(f.shape[0], (1,), generator=g)]
        while centers.shape[0] < k:  # k-means++: the next seed with probability ~ squared distance
            d2 = torch.cdist(f, centers).min(1).values.pow(2)
            centers = torch.cat([centers, f[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
        for _ in range(iters):
            labels = torch.cdist(f, centers).argmin(1)
            new = torch.stack([f[labels == j].mean(0) if (labels == j).any() else centers[j] for j in range(k)])
            if torch.equal(new, centers):
                break
            centers = new
        cost = float(torch.cdist(f, centers).min(1).values.pow(2).sum())
        if cost < best_cost:
            best, best_cost = torch.cdist(f, centers).argmin(1), cost
    return best


def fit_classifier(layer: torch.nn.Linear, f: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3) -> None:
    """Multinomial logistic regression of ``labels`` on features ``f``, in place on ``layer``
    (L-BFGS on the mean cross-entropy plus ``l2`` ||W||^2)."""
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = torch.nn.functional.cross_entropy(layer(f), labels) + l2 * layer.weight.pow(2).sum()
        obj.backward()
        return obj

    opt.step(closure)


class Targets:
    """A stand-in teacher for a subset of the calibration batch: its cached x0 (no new teacher calls)."""

    calls = 0

    def __init__(self, y: torch.Tensor):
        self.y = y

    def solve(self, x: torch.Tensor, sigma_max: float | None = None) -> torch.Tensor:
        return self.y


def route(ctx: Calibration, solver: str, opts: dict, policy: SchedulePolicy, start: torch.Tensor, n_train: int,
          *, loss: str, radius: float, learn_last: bool, seed: int) -> dict:
    """Train a route policy in place: cluster the training samples by their teacher endpoints on the
    top principal directions (``kmeans``), fit the classifier x_T -> cluster on phi's features, then
    one LD3 schedule (and its corrections) per cluster (``ld3.fit`` from the global outputs ``start``,
    on the cluster's training samples, validated on the validation samples the classifier sends to
    it). Returns the record."""
    net = policy.net
    k, n_logits = net.cluster_out.shape[0], policy.config["n_logits"]
    y = ctx.teacher.solve(ctx.x, ctx.sigma_max)
    x_t = ctx.x.cpu() / ctx.sigma_max  # phi runs on the CPU (SchedulePolicy.sigmas)
    y_pooled = net.pooled(y.cpu())
    f_end = y_pooled[:n_train] @ principal_directions(y_pooled[:n_train], min(k, y_pooled.shape[1]))
    labels = kmeans(f_end, k, seed=seed)
    with torch.no_grad():  # every cluster starts at the global schedule
        net.cluster_out.copy_(start.expand(k, -1))
    fit_classifier(net.classifier, net.standardized(x_t[:n_train]), labels)
    with torch.no_grad():
        predicted = net.cluster(x_t[n_train:])
    records = []
    for j in range(k):
        train, valid = torch.nonzero(labels == j)[:, 0], n_train + torch.nonzero(predicted == j)[:, 0]
        if len(train) < 2 or len(valid) < 2:  # too few to train and validate: the global schedule
            records.append({"n_train": len(train), "n_valid": len(valid), "kept": "global"})
            continue
        idx = torch.cat([train, valid])
        sub = replace(ctx, x=ctx.x[idx], teacher=Targets(y[idx]))
        out = start.clone().requires_grad_(True)
        rec = fit_outputs(sub, solver, opts, out, n_logits, learn_last, loss=loss, radius=radius,
                          valid=len(valid) / len(idx), seed=seed, desc=f"route cluster {j + 1}/{k}")
        with torch.no_grad():
            net.cluster_out[j].copy_(out)
        records.append({key: rec[key] for key in ("n_train", "n_valid", "iters", "valid_init", "valid_best",
                                                  "student_calls")})
    accuracy = float((net.cluster(x_t[:n_train]) == labels).double().mean())
    return {"clusters": k, "train_accuracy": round(accuracy, 3), "cluster_fits": records}


def fit_outputs(ctx: Calibration, solver: str, opts: dict, out: torch.Tensor, n_logits: int, learn_last: bool,
                iters: int = ITERS, **fit_options) -> dict:
    """``ld3.fit`` of one schedule's outputs ``out`` (in place): ``n_logits`` logits, then (if any) the
    raw corrections of ``policy.corrections_from_raw``, with LD3's learning rate and patience."""
    def schedule(x: torch.Tensor) -> tuple:
        sigmas = sigmas_from_logits(out[:n_logits], ctx.sigma_max, ctx.sigma_min, learn_last)
        if out.numel() == n_logits:
            return sigmas, None
        return sigmas, corrections_from_raw(out[n_logits:], sigmas, ctx.sigma_min, ctx.sigma_max)

    return fit(ctx, solver, opts, schedule, [out], lr=LR, iters=iters, patience=PATIENCE, **fit_options)


def valid_losses(ctx: Calibration, solver: str, opts: dict, sigmas: torch.Tensor | SchedulePolicy, loss: str,
                 n_train: int) -> torch.Tensor:
    """Per-sample losses on the validation part of the calibration batch, for a schedule or a policy."""
    fn, defaults = get_solver(solver)
    x, y = ctx.x[n_train:], ctx.teacher.solve(ctx.x, sigma_max=ctx.sigma_max)[n_train:]
    with torch.no_grad():
        sig, corrections = sigmas.plan_for(x) if isinstance(sigmas, SchedulePolicy) else (sigmas, None)
        return per_sample_loss(fn(corrected(ctx.denoiser, sig, corrections), x, sig, **{**defaults, **opts}), y, loss)


def significance(ctx: Calibration, solver: str, opts: dict, policy: SchedulePolicy, glob: torch.Tensor,
                 loss: str, n_train: int) -> float:
    """How many standard errors the policy's mean validation loss lies below the global schedule's
    (paired per-sample differences). The per-sample loss is heavy-tailed (a schedule change can move a
    sample to another mode), so the best validation step alone can be a selection artifact."""
    d = (valid_losses(ctx, solver, opts, glob, loss, n_train) - valid_losses(ctx, solver, opts, policy, loss, n_train))
    if d.numel() < 2:
        return 0.0
    return float(d.mean() / (d.std() / math.sqrt(d.numel())).clamp_min(1e-300))


@register("instance", tune_options={"oss_grid": 40, "policy": "residual", "iters": 20, "patience": 5,
                                   "corrections_iters": 20},
          quick_options={"ld3_iters": 10, "iters": 10, "patience": 5, "corrections_iters": 10})
def instance(ctx: Calibration, solver: str, nfe: int, *, policy: str = POLICY, clusters: Sequence[int] = CLUSTERS,
             loss: str = LOSS, radius: float | None = None,
             learn_last: bool = True, starts: int = STARTS, oss_grid: int = DEFAULT_SIZE, ld3_iters: int = ITERS,
             init: Schedule | None = None, hidden: int = HIDDEN,
             max_inputs: int = 256, components: int = COMPONENTS, samples: int = SAMPLES, lr: float = 3e-3,
             weight_decay: float = WEIGHT_DECAY, iters: int = 300, patience: int = 30, gate: float = GATE,
             corrections: bool = True, corrections_iters: int = ITERS, valid: float = 0.5,
             seed: int = 0) -> SchedulePolicy:
    """A SchedulePolicy for ``solver`` at ``nfe`` calls: LD3's global schedule, then phi trained on top.

    ``policy``: 'route' (cluster the training samples by their teacher endpoints, one LD3 schedule per
    cluster, a linear classifier x_T -> cluster; the number of clusters is the one of ``clusters`` with
    the lowest validation error), 'residual' (an MLP's residual logits, ``hidden`` wide, trained with
    AdamW ``lr``, ``weight_decay``, ``iters``, ``patience``) or 'auto' (both; of those whose gain passes
    the gate, the lower validation error); 'global' is the baseline with no per-sample part: the LD3
    schedule with corrections learned for the whole batch.
    Options: ``init``: a global schedule to start from (e.g. an ``ld3`` result for the same solver and
    nfe, ending at 0) instead of learning one here (on the calibration batch, with the ld3 defaults
    and these ``loss``, ``radius``, ``learn_last``, ``starts``, ``oss_grid``, ``valid``, ``seed``, and
    ``ld3_iters`` as its ``iters``); ``samples``: phi
    trains on the calibration batch extended with fresh seeded noises to at least this many (the
    teacher solves them); ``max_inputs`` (x_T is average-pooled to at most this many features),
    ``components`` (principal directions phi's features are projected on);
    ``gate``: phi is kept only if its validation gain over the global schedule is at least ``gate``
    standard errors of the paired per-sample differences (else the policy gives the global schedule).
    ``corrections``: phi also learns, per step, a shift of the sigma the denoiser is evaluated at and a
    scale of its epsilon (the paper's time shift and output scale; ``sample.Corrected``), first for
    the global schedule (at most ``corrections_iters`` steps, LD3's learning rate and patience).
    """
    if int(corrections_iters) != corrections_iters or corrections_iters < 1:
        raise ValueError(f"corrections_iters must be a positive integer, got {corrections_iters!r}")
    if int(samples) != samples or samples < 0:
        raise ValueError(f"samples must be a non-negative integer, got {samples!r}")
    if policy not in ("route", "residual", "auto", "global"):
        raise ValueError(f"policy must be 'route', 'residual', 'auto' or 'global', got {policy!r}")
    if policy == "global" and not corrections:
        raise ValueError("policy='global' is LD3's schedule with global corrections: it needs corrections=True")
    clusters = [int(k) for k in ([clusters] if isinstance(clusters, int) else clusters)]
    if policy != "residual" and (not clusters or min(clusters) < 2):
        raise ValueError(f"clusters must be numbers of clusters >= 2, got {clusters!r}")
    teacher_calls0, student_calls0, start = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
    if init is None:
        logits, steps, opts, global_record = learn_global(ctx, solver, nfe, loss=loss, radius=radius,
                                                          learn_last=learn_last, starts=starts, oss_grid=oss_grid,
                                                          iters=ld3_iters, valid=valid, seed=seed)
    else:
        logits, steps, opts = global_logits(init, ctx, solver, nfe, learn_last)
        global_record = {"init": "given schedule", "valid_best": None}
    if ctx.x.shape[0] < samples:  # fresh noises from the calibration seed's stream, after the batch's own
        extra = noise(int(samples), ctx.x.shape[1:], ctx.sigma_max, ctx.seed, device=ctx.x.device)[ctx.x.shape[0]:]
        ctx = replace(ctx, x=torch.cat([ctx.x, extra]))
    if radius is None:
        radius = default_radius(ctx.x.shape[1:], steps)
    n_train, _ = check_options(loss, valid, ctx.x.shape[0])
    torch.manual_seed(seed)
    config = {"shape": list(ctx.x.shape[1:]), "steps": steps, "n_logits": logits.numel(), "learn_last": learn_last,
              "max_inputs": int(max_inputs), "components": int(components), "corrections": bool(corrections),
              "sigma_min": ctx.sigma_min, "sigma_max": ctx.sigma_max, "solver": solver, "solver_options": opts}
    y_train = ctx.teacher.solve(ctx.x, ctx.sigma_max)[:n_train].cpu()  # phi's statistics: on the CPU

    def new_policy(**kind) -> SchedulePolicy:  # phi's input statistics from the calibration batch
        pol = SchedulePolicy({**config, **kind})
        net = pol.net
        with torch.no_grad():
            net.basis.copy_(principal_directions(net.pooled(y_train), net.basis.shape[1]))
            feats = net.features(ctx.x.cpu() / ctx.sigma_max)
            net.feat_mean.copy_(feats.mean(0))
            net.feat_std.copy_(feats.std(0).clamp_min(1e-8))
        return pol

    glob = sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, learn_last)
    # phi starts from the global outputs: the LD3 logits and, with corrections, the global corrections
    # learned for that schedule on the whole batch (the per-sample part then only adds what varies)
    start_out = logits.detach().clone()
    if corrections:
        start_out = torch.cat([start_out, start_out.new_zeros(2 * steps)]).requires_grad_(True)
        global_record = {**global_record, "corrections": fit_outputs(
            ctx, solver, opts, start_out, logits.numel(), learn_last, iters=int(corrections_iters), loss=loss,
            radius=radius, valid=valid, seed=seed, desc="instance global corrections")}
        start_out = start_out.detach()

    def train_route() -> tuple[SchedulePolicy, dict]:
        tried = []
        for k in clusters:
            pol = new_policy(policy="route", clusters=k)
            rec = route(ctx, solver, opts, pol, start_out, n_train, loss=loss, radius=radius, learn_last=learn_last,
                        seed=seed)
            rec["valid_best"] = float(valid_losses(ctx, solver, opts, pol, loss, n_train).mean())
            tried.append((rec["valid_best"], k, pol, rec))
        _, _, pol, record = min(tried, key=lambda t: t[:2])
        record.update(n_train=n_train, n_valid=ctx.x.shape[0] - n_train,
                      valid_init=float(valid_losses(ctx, solver, opts, glob, loss, n_train).mean()),
                      valid_by_clusters={k: round(v, 6) for v, k, _, _ in tried})
        return pol, record

    def global_policy() -> SchedulePolicy:  # a residual phi at zero: the global outputs for every sample
        pol = new_policy(policy="residual", hidden=int(hidden))
        with torch.no_grad():
            pol.net.global_out.copy_(start_out)
        return pol

    def train_residual() -> tuple[SchedulePolicy, dict]:
        pol = global_policy()
        return pol, fit(ctx, solver, opts, pol.plan, list(pol.net.parameters()), loss=loss, radius=radius, lr=lr,
                        iters=iters, patience=patience, valid=valid, seed=seed, weight_decay=weight_decay,
                        desc=f"instance {solver} nfe={nfe}")

    def train_global() -> tuple[SchedulePolicy, dict]:
        return global_policy(), dict(global_record["corrections"])

    trained = []  # (gate z, kind, policy, record) per kind trained
    for kind, train in (("route", train_route), ("residual", train_residual), ("global", train_global)):
        if policy == kind or (policy == "auto" and kind != "global"):
            pol, record = train()
            trained.append((significance(ctx, solver, opts, pol, glob, loss, n_train), kind, pol, record))
    # auto: the lower validation error among the policies whose gain passes the gate (else among all)
    passing = [t for t in trained if t[0] >= gate] or trained
    z, kind, pol, record = min(passing, key=lambda t: t[3]["valid_best"])
    if policy == "auto":
        record["valid_by_policy"] = {k: r["valid_best"] for _, k, _, r in trained}
        record["gate_z_by_policy"] = {k: round(zp, 3) for zp, k, _, _ in trained}
    if z < gate:  # not a clear gain on validation: the LD3 schedule, no correction
        ld3_out = torch.cat([logits, logits.new_zeros(start_out.numel() - logits.numel())])
        with torch.no_grad():
            if pol.config["policy"] == "route":
                pol.net.cluster_out.copy_(ld3_out.expand_as(pol.net.cluster_out))
            else:  # phi's residual to zero
                pol.net.global_out.copy_(ld3_out)
                pol.net.mlp[-1].weight.zero_()
                pol.net.mlp[-1].bias.zero_()
    record.update(policy=kind, gate_z=round(z, 3), phi_kept=z >= gate, init=f"ld3 ({global_record['init']})",
                  ld3_valid_best=global_record["valid_best"], ld3_reused=global_record.get("reused", False),
                  teacher_calls=ctx.teacher.calls - teacher_calls0, student_calls=ctx.denoiser.calls - student_calls0,
                  seconds=round(time.perf_counter() - start, 3))
    pol.metadata.update(solver=solver, solver_options=opts, training=record)
    return pol
