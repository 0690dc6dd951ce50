"""Instance-aware discretization: a schedule per sample, from a small network phi(x_T).

Yuan et al., "Few-Step Diffusion Sampling Through Instance-Aware Discretizations", arXiv 2603.17671:
one global schedule is a compromise between initial noises whose trajectories differ; phi maps x_T to
that sample's timesteps and is trained through the solver against the teacher, as LD3 trains its logits.
Here phi outputs residual logits on top of the LD3 schedule's (``methods/ld3.py``), starting at zero,
and the same training loop (``ld3.fit``: soft teacher, validation, early stopping) keeps the best;
phi sees x_T projected on the teacher samples' principal directions (and, for a conditional model, the
condition projected on the calibration conditions' own), and is kept only if its
validation gain over the global schedule is significant (``gate``). ``policy="route"`` is the
lower-capacity phi: the calibration samples are clustered by their teacher endpoints, each cluster
gets its own LD3 schedule, and a linear classifier sends x_T to a cluster. With ``corrections`` phi
also gives each step the paper's time shift and output scale (``corrections.Corrected``), learned first for
the global schedule and then per sample. See docs/methods/instance.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch

from ..corrections import corrected, corrections_from_raw
from ..metrics import significance as paired_significance
from .. import conditions
from ..policy import SchedulePolicy, cond_spec
from ..schedules import Schedule, as_schedule, logits_from_sigmas, sigmas_from_logits
from ..solvers import get_solver, plan
from .base import Calibration, register
from . import ld3
from .ld3 import Training, default_radius, fit, learn_global, n_logits, per_sample_loss

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
    """The top ``k`` principal directions of samples ``y`` [n, d], as columns [d, k], each signed so its
    largest entry is positive, and zero past the numerical rank (singular values below 1e-9 of the
    largest span no direction of the data: rounding picks them, differently on every machine). phi sees
    x_T projected on the teacher's principal directions: for Gaussian data the ODE maps x_T / sigma_max
    to x0 - mu ~ S x_T / sigma_max (S the data's covariance root), so these are the directions of x_T
    that decide where the sample lands; the rest is noise phi would overfit to."""
    _, sv, vh = torch.linalg.svd(y - y.mean(0), full_matrices=False)
    vh = vh[:k] * (sv[:k] > 1e-9 * sv[:1].clamp_min(1e-300))[:, None]
    vh = vh * torch.where(vh.gather(1, vh.abs().argmax(1, keepdim=True)) < 0, -1.0, 1.0)
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

    def solve(self, x: torch.Tensor, sigma_max: float | None = None, cond=None) -> torch.Tensor:
        return self.y


def route(ctx: Calibration, solver: str, opts: dict, policy: SchedulePolicy, start: torch.Tensor, n_train: int,
          train: Training, learn_last: bool) -> dict:
    """Train a route policy in place: cluster the training samples by their teacher endpoints on the
    top principal directions (``kmeans``), fit the classifier x_T -> cluster on phi's features, then
    one LD3 schedule (and its corrections) per cluster (``ld3.fit`` from the global outputs ``start``,
    on the cluster's training samples, validated on the validation samples the classifier sends to
    it). Returns the record."""
    net = policy.net
    k, n_logits = net.cluster_out.shape[0], policy.config["n_logits"]
    y = ctx.target()
    x_t = ctx.x.cpu() / ctx.sigma_max  # phi runs on the CPU (SchedulePolicy.sigmas)
    c_train, c_valid = conditions.rows(ctx.cond, slice(None, n_train)), conditions.rows(ctx.cond, slice(n_train, None))
    y_pooled = net.pooled(y.cpu())
    f_end = y_pooled[:n_train] @ principal_directions(y_pooled[:n_train], min(k, y_pooled.shape[1]))
    labels = kmeans(f_end, k, seed=train.seed)
    with torch.no_grad():  # every cluster starts at the global schedule
        net.cluster_out.copy_(start.expand(k, -1))
    fit_classifier(net.classifier, net.standardized(x_t[:n_train], c_train), labels)
    with torch.no_grad():
        predicted = net.cluster(x_t[n_train:], c_valid)
    records = []
    for j in range(k):
        mine, checks = torch.nonzero(labels == j)[:, 0], n_train + torch.nonzero(predicted == j)[:, 0]
        if len(mine) < 2 or len(checks) < 2:  # too few to train and validate: the global schedule
            records.append({"n_train": len(mine), "n_valid": len(checks), "kept": "global"})
            continue
        idx = torch.cat([mine, checks])
        sub = replace(ctx.subset(idx), teacher=Targets(y[idx]))
        out = start.clone().requires_grad_(True)
        rec = fit_outputs(sub, solver, opts, out, n_logits, learn_last, replace(train, valid=len(checks) / len(idx)),
                          desc=f"route cluster {j + 1}/{k}")
        with torch.no_grad():
            net.cluster_out[j].copy_(out)
        records.append({key: rec[key] for key in ("n_train", "n_valid", "iters", "valid_init", "valid_best",
                                                  "student_calls")})
    accuracy = float((net.cluster(x_t[:n_train], c_train) == labels).double().mean())
    return {"clusters": k, "train_accuracy": round(accuracy, 3), "cluster_fits": records}


def fit_outputs(ctx: Calibration, solver: str, opts: dict, out: torch.Tensor, n_logits: int, learn_last: bool,
                train: Training, desc: str) -> dict:
    """``ld3.fit`` of one schedule's outputs ``out`` (in place): ``n_logits`` logits, then (if any) the
    raw corrections of ``corrections.corrections_from_raw``."""
    def schedule(x: torch.Tensor, cond=None) -> tuple:
        sigmas = sigmas_from_logits(out[:n_logits], ctx.sigma_max, ctx.sigma_min, learn_last)
        if out.numel() == n_logits:
            return sigmas, None
        return sigmas, corrections_from_raw(out[n_logits:], sigmas, ctx.sigma_min, ctx.sigma_max)

    return fit(ctx, solver, opts, schedule, [out], train, desc=desc)


def valid_losses(ctx: Calibration, solver: str, opts: dict, sigmas: torch.Tensor | SchedulePolicy, loss: str,
                 n_train: int) -> torch.Tensor:
    """Per-sample losses on the validation part of the calibration batch, for a schedule or a policy."""
    spec = get_solver(solver)
    va, y = ctx.subset(slice(n_train, None)), ctx.target()[n_train:]
    with torch.no_grad():
        sig, corrections = sigmas.plan_for(va.x, va.cond) if isinstance(sigmas, SchedulePolicy) else (sigmas, None)
        out = spec.fn(corrected(va.denoiser, corrections), va.x, sig, **{**spec.options, **opts})
        return per_sample_loss(out, y, loss)


def significance(ctx: Calibration, solver: str, opts: dict, policy: SchedulePolicy, glob: torch.Tensor,
                 loss: str, n_train: int) -> float:
    """How many standard errors the policy's mean validation loss lies below the global schedule's
    (paired per-sample differences). The per-sample loss is heavy-tailed (a schedule change can move a
    sample to another mode), so the best validation step alone can be a selection artifact."""
    return paired_significance(valid_losses(ctx, solver, opts, glob, loss, n_train)
                               - valid_losses(ctx, solver, opts, policy, loss, n_train))


@dataclass(frozen=True)
class Options(ld3.GlobalStage):
    """The instance method's options: ``ld3.GlobalStage``'s (its first stage), and these.

    ``policy``: 'route' (cluster the training samples by their teacher endpoints, one LD3 schedule per
    cluster, a linear classifier x_T -> cluster; the number of clusters is the one of ``clusters`` with
    the lowest validation error), 'residual' (an MLP's residual logits, ``hidden`` wide, trained with
    AdamW ``lr``, ``weight_decay``, ``iters``, ``patience``) or 'auto' (both; of those whose gain passes
    the gate, the lower validation error); 'global' is the baseline with no per-sample part: the LD3
    schedule with corrections learned for the whole batch.
    ``init``: a global schedule to start from (e.g. an ``ld3`` result for the same solver and nfe,
    ending at 0) instead of learning one here (with the ld3 defaults, these ``GlobalStage`` options and
    ``ld3_iters`` as its ``iters``);
    ``samples``: phi trains on the calibration batch extended with fresh seeded noises to at least this
    many (the teacher solves them); ``max_inputs`` (x_T is average-pooled to at most this many
    features), ``components`` (principal directions phi's features are projected on); ``gate``: phi is
    kept only if its validation gain over the global schedule is at least ``gate`` standard errors of
    the paired per-sample differences (else the policy gives the global schedule). ``corrections``: phi
    also learns, per step, a shift of the sigma the denoiser is evaluated at and a scale of its epsilon
    (the paper's time shift and output scale; ``corrections.Corrected``), first for the global schedule
    (at most ``corrections_iters`` steps, LD3's learning rate and patience).
    """

    policy: str = POLICY
    clusters: Sequence[int] | int = CLUSTERS
    ld3_iters: int = Training.iters
    init: Schedule | None = None
    hidden: int = HIDDEN
    max_inputs: int = 256
    components: int = COMPONENTS
    samples: int = SAMPLES
    lr: float = 3e-3
    weight_decay: float = WEIGHT_DECAY
    iters: int = 300
    patience: int = 30
    gate: float = GATE
    corrections: bool = True
    corrections_iters: int = Training.iters

    def __post_init__(self):
        super().__post_init__()
        if int(self.corrections_iters) != self.corrections_iters or self.corrections_iters < 1:
            raise ValueError(f"corrections_iters must be a positive integer, got {self.corrections_iters!r}")
        if int(self.samples) != self.samples or self.samples < 0:
            raise ValueError(f"samples must be a non-negative integer, got {self.samples!r}")
        if self.policy not in ("route", "residual", "auto", "global"):
            raise ValueError(f"policy must be 'route', 'residual', 'auto' or 'global', got {self.policy!r}")
        if self.policy == "global" and not self.corrections:
            raise ValueError("policy='global' is LD3's schedule with global corrections: it needs corrections=True")
        if self.policy != "residual" and (not self.cluster_counts() or min(self.cluster_counts()) < 2):
            raise ValueError(f"clusters must be numbers of clusters >= 2, got {self.clusters!r}")

    def cluster_counts(self) -> list[int]:
        return [int(k) for k in ([self.clusters] if isinstance(self.clusters, int) else self.clusters)]

    def training(self, radius: float, **kw) -> Training:
        """LD3's training settings with this method's loss, radius, valid and seed (``kw`` on top)."""
        return Training(loss=self.loss, radius=radius, valid=self.valid, valid_every=self.valid_every, seed=self.seed,
                        **kw)

    def ld3_options(self) -> ld3.Options:
        stage = {f.name: getattr(self, f.name) for f in fields(ld3.GlobalStage)}
        return ld3.Options(**stage, iters=self.ld3_iters)


@dataclass
class _Trainer:
    """The state shared by the stages of ``instance``: the (extended) calibration context, the global
    schedule's logits and the outputs phi starts from, and the policy config."""

    ctx: Calibration
    solver: str
    nfe: int
    sopts: dict
    o: Options
    logits: torch.Tensor
    radius: float
    n_train: int
    config: dict = field(default_factory=dict)
    y_train: torch.Tensor | None = None
    start_out: torch.Tensor | None = None
    glob: torch.Tensor | None = None

    def new_policy(self, **kind) -> SchedulePolicy:
        """A policy of this config and ``kind``, with phi's input statistics from the calibration batch."""
        pol = SchedulePolicy({**self.config, **kind})
        net = pol.net
        with torch.no_grad():
            net.basis.copy_(principal_directions(net.pooled(self.y_train), net.basis.shape[1]))
            if self.ctx.cond is not None:  # the training conditions' principal directions
                c_train = net.cond_pooled(conditions.rows(self.ctx.cond, slice(None, self.n_train)))
                net.cond_basis.copy_(principal_directions(c_train, net.cond_basis.shape[1]))
            feats = net.features(self.ctx.x.cpu() / self.ctx.sigma_max, self.ctx.cond)
            net.feat_mean.copy_(feats.mean(0))
            net.feat_std.copy_(feats.std(0).clamp_min(1e-8))
        return pol

    def valid_mean(self, pol) -> float:
        return float(valid_losses(self.ctx, self.solver, self.sopts, pol, self.o.loss, self.n_train).mean())

    def train_route(self) -> tuple[SchedulePolicy, dict]:
        tried = []
        for k in self.o.cluster_counts():
            pol = self.new_policy(policy="route", clusters=k)
            rec = route(self.ctx, self.solver, self.sopts, pol, self.start_out, self.n_train,
                        self.o.training(self.radius), self.o.learn_last)
            rec["valid_best"] = self.valid_mean(pol)
            tried.append((rec["valid_best"], k, pol, rec))
        _, _, pol, record = min(tried, key=lambda t: t[:2])
        record.update(n_train=self.n_train, n_valid=self.ctx.x.shape[0] - self.n_train,
                      valid_init=self.valid_mean(self.glob), valid_by_clusters={k: round(v, 6) for v, k, _, _ in tried})
        return pol, record

    def global_policy(self) -> SchedulePolicy:  # a residual phi at zero: the global outputs for every sample
        pol = self.new_policy(policy="residual", hidden=int(self.o.hidden))
        with torch.no_grad():
            pol.net.global_out.copy_(self.start_out)
        return pol

    def train_residual(self) -> tuple[SchedulePolicy, dict]:
        pol, o = self.global_policy(), self.o
        train = o.training(self.radius, lr=o.lr, iters=o.iters, patience=o.patience, weight_decay=o.weight_decay)
        return pol, fit(self.ctx, self.solver, self.sopts, pol.plan, list(pol.net.parameters()), train,
                        desc=f"instance {self.solver} nfe={self.nfe}")

    def no_phi(self, pol: SchedulePolicy) -> None:
        """Set ``pol`` to the LD3 schedule with no correction (phi's gain did not pass the gate)."""
        ld3_out = torch.cat([self.logits, self.logits.new_zeros(self.start_out.numel() - self.logits.numel())])
        with torch.no_grad():
            if pol.config["policy"] == "route":
                pol.net.cluster_out.copy_(ld3_out.expand_as(pol.net.cluster_out))
            else:  # phi's residual to zero
                pol.net.global_out.copy_(ld3_out)
                pol.net.mlp[-1].weight.zero_()
                pol.net.mlp[-1].bias.zero_()


def _global_stage(ctx: Calibration, solver: str, nfe: int, o: Options) -> tuple:
    """The global schedule phi starts from: (logits, steps, solver options, record), learned by LD3 or given."""
    if o.init is None:
        return learn_global(ctx, solver, nfe, o.ld3_options())
    logits, steps, sopts = global_logits(o.init, ctx, solver, nfe, o.learn_last)
    return logits, steps, sopts, {"init": "given schedule", "valid_best": None}


def _setup(ctx: Calibration, solver: str, nfe: int, o: Options) -> tuple[_Trainer, dict]:
    """The trainer: the global stage, the batch extended to ``samples``, the policy config, and (with
    ``corrections``) the global corrections phi starts from. Returns it and the global stage's record."""
    logits, steps, sopts, global_record = _global_stage(ctx, solver, nfe, o)
    ctx = ctx.extended(int(o.samples))  # fresh noises from the calibration seed's stream, after the batch's own
    radius = default_radius(ctx.x.shape[1:], steps) if o.radius is None else o.radius
    n_train, _ = o.training(radius).split(ctx.x.shape[0])
    torch.manual_seed(o.seed)
    config = {"shape": list(ctx.x.shape[1:]), "steps": steps, "n_logits": logits.numel(), "learn_last": o.learn_last,
              "max_inputs": int(o.max_inputs), "components": int(o.components), "corrections": bool(o.corrections),
              "sigma_min": ctx.sigma_min, "sigma_max": ctx.sigma_max, "solver": solver, "solver_options": sopts,
              "cond": cond_spec(ctx.cond)}
    t = _Trainer(ctx, solver, nfe, sopts, o, logits, radius, n_train, config,
                 y_train=ctx.target()[:n_train].cpu(),  # phi's statistics: on the CPU
                 glob=sigmas_from_logits(logits, ctx.sigma_max, ctx.sigma_min, o.learn_last))
    # phi starts from the global outputs: the LD3 logits and, with corrections, the global corrections
    # learned for that schedule on the whole batch (the per-sample part then only adds what varies)
    start_out = logits.detach().clone()
    if o.corrections:
        start_out = torch.cat([start_out, start_out.new_zeros(2 * steps)]).requires_grad_(True)
        global_record = {**global_record, "corrections": fit_outputs(
            ctx, solver, sopts, start_out, logits.numel(), o.learn_last,
            o.training(radius, iters=int(o.corrections_iters)), desc="instance global corrections")}
        start_out = start_out.detach()
    t.start_out = start_out
    return t, global_record


def cost(o: Options, solver: str, nfe: int, n: int) -> int:
    """LD3's global stage (shared with the ld3 method), then the global corrections and phi, each up to
    its iterations on the whole batch: (corrections_iters + iters * kinds) * max(B, samples) * NFE."""
    kinds = 2 if o.policy == "auto" else 1
    return (o.corrections_iters * o.corrections + o.iters * kinds) * max(n, o.samples) * nfe


@register("instance", Options,
          tune_options={**ld3.TUNE_STARTS, "policy": "residual", "iters": 5, "patience": 5,
                        "corrections_iters": 5, "ld3_iters": 10}, cost=cost, tier=2)
def instance(ctx: Calibration, solver: str, nfe: int, o: Options) -> SchedulePolicy:
    """A SchedulePolicy for ``solver`` at ``nfe`` calls: LD3's global schedule, then phi trained on top
    (``Options``); phi is kept only where its validation gain passes the gate. phi's initialisation is
    seeded by ``o.seed``; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _train(ctx, solver, nfe, o)


def _train(ctx: Calibration, solver: str, nfe: int, o: Options) -> SchedulePolicy:
    teacher_calls0, student_calls0, start = ctx.teacher.calls, ctx.denoiser.calls, time.perf_counter()
    t, global_record = _setup(ctx, solver, nfe, o)
    stages = (("route", t.train_route), ("residual", t.train_residual),
              ("global", lambda: (t.global_policy(), dict(global_record["corrections"]))))
    trained = []  # (gate z, kind, policy, record) per kind trained
    for kind, train in stages:
        if o.policy == kind or (o.policy == "auto" and kind != "global"):
            pol, record = train()
            trained.append((significance(t.ctx, solver, t.sopts, pol, t.glob, o.loss, t.n_train), kind, pol, record))
    # auto: the lower validation error among the policies whose gain passes the gate (else among all)
    passing = [p for p in trained if p[0] >= o.gate] or trained
    z, kind, pol, record = min(passing, key=lambda p: p[3]["valid_best"])
    if o.policy == "auto":
        record["valid_by_policy"] = {k: r["valid_best"] for _, k, _, r in trained}
        record["gate_z_by_policy"] = {k: round(zp, 3) for zp, k, _, _ in trained}
    if z < o.gate:  # not a clear gain on validation: the LD3 schedule, no correction
        t.no_phi(pol)
    record.update(policy=kind, gate_z=round(z, 3), phi_kept=z >= o.gate, init=f"ld3 ({global_record['init']})",
                  ld3_valid_best=global_record["valid_best"], ld3_reused=global_record.get("reused", False),
                  teacher_calls=ctx.teacher.calls - teacher_calls0, student_calls=ctx.denoiser.calls - student_calls0,
                  seconds=round(time.perf_counter() - start, 3))
    pol.metadata.update(solver=solver, solver_options=t.sopts, training=record)
    return pol
