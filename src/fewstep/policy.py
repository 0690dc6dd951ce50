"""Per-sample schedules: a small network phi(x_T) -> the sigmas of each sample's own schedule.

Yuan et al., "Few-Step Diffusion Sampling Through Instance-Aware Discretizations", arXiv 2603.17671.
Two kinds of phi: ``residual`` (an MLP's residual logits on top of a global LD3 schedule's logits) and
``route`` (a linear classifier sends x_T to one of k clusters, each with its own LD3 logits); the sigmas are LD3's cumulative
softmax in lambda = -log sigma (``schedules.sigmas_from_logits``), so every sample's schedule is
strictly decreasing from sigma_max to 0. With ``corrections`` (the paper's time shift and output scale),
phi also gives each step a shift of the sigma the denoiser is evaluated at and a scale of its epsilon
(``corrections.Corrected``). For a conditional model phi also sees each sample's condition (``cond_spec``).
A SchedulePolicy is a ``schedules.ScheduleLike``: it samples, evaluates, saves and loads wherever a
Schedule does.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import conditions
from .corrections import corrections_from_raw
from .files import write_atomic
from .schedules import BatchPlan, ScheduleError, ScheduleLike, sigmas_from_logits

FORMAT = "fewstep.policy"
FORMAT_VERSION = 5  # 5: the condition's features; 4: corrections; 3: the policy kind (residual | route)
READS = (3, 4, 5)  # a version-3 file is a policy without corrections, before 5 none sees a condition


def cond_spec(cond) -> list | None:
    """How phi reads a condition like ``cond`` (None: no condition): per part (a tensor, or a dict's keys in
    order), [key, 'classes', n] for integer labels (one-hot over n = the largest label seen + 1; a label past
    it is all zeros) or [key, 'values', d] for d numbers per row."""
    if cond is None:
        return None
    items = sorted(cond.items()) if isinstance(cond, dict) else [(None, cond)]
    return [[k, "classes", int(v.max()) + 1] if not v.is_floating_point() else [k, "values", v[0].numel()]
            for k, v in items]


def cond_rows(spec: list, cond) -> torch.Tensor:
    """The condition as numbers [batch, sum of sizes] float64 on the CPU, read as ``spec`` says."""
    cols = []
    for key, kind, size in spec:
        v = (cond[key] if key is not None else cond).detach().cpu()
        if kind == "classes":
            v = v.reshape(-1).long()
            cols.append(nn.functional.one_hot(v.clamp(0, size), size + 1)[:, :size].double())
        else:
            cols.append(v.reshape(v.shape[0], -1).double())
    return torch.cat(cols, 1)


class Inputs(nn.Module):
    """phi's input features from x_T in standard-normal units: x_T average-pooled to at most
    ``max_inputs`` values (spatially for [C, H, W] data), projected on ``components`` directions
    (``basis``: the principal directions of the teacher's samples, set by the trainer), plus the
    normalized squared norm of x_T, and with a ``cond_spec`` the condition's numbers (``cond_rows``) pooled
    the same way and projected on their own ``components`` directions (``cond_basis``: the calibration
    conditions' principal directions); all standardized with calibration statistics (``feat_mean``, ``feat_std``)."""

    def __init__(self, shape, max_inputs: int = 256, components: int = 16, cond_spec: list | None = None):
        super().__init__()
        self.shape, self.max_inputs, self.cond_spec = tuple(shape), int(max_inputs), cond_spec
        n_pooled = self.pooled(torch.zeros(1, *self.shape, dtype=torch.float64)).shape[1]
        k = min(int(components), n_pooled)
        self.register_buffer("basis", torch.eye(n_pooled, k, dtype=torch.float64))
        kc = 0
        if cond_spec is not None:
            n_cond = self.pooled(torch.zeros(1, sum(size for _, _, size in cond_spec), dtype=torch.float64)).shape[1]
            kc = min(int(components), n_cond)
            self.register_buffer("cond_basis", torch.eye(n_cond, kc, dtype=torch.float64))
        self.register_buffer("feat_mean", torch.zeros(k + 1 + kc, dtype=torch.float64))
        self.register_buffer("feat_std", torch.ones(k + 1 + kc, dtype=torch.float64))

    def pooled(self, z: torch.Tensor) -> torch.Tensor:
        b, d = z.shape[0], z[0].numel()
        if d > self.max_inputs and z.ndim == 4:
            side = max(1, math.isqrt(self.max_inputs // z.shape[1]))
            z = nn.functional.adaptive_avg_pool2d(z, (min(side, z.shape[2]), min(side, z.shape[3])))
        z = z.reshape(b, -1)
        if z.shape[1] > self.max_inputs:
            z = nn.functional.adaptive_avg_pool1d(z[:, None], self.max_inputs)[:, 0]
        return z

    def cond_pooled(self, cond) -> torch.Tensor:
        return self.pooled(cond_rows(self.cond_spec, cond))

    def features(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        d = z[0].numel()
        sq_norm = (z.reshape(z.shape[0], -1).pow(2).mean(1, keepdim=True) - 1) * math.sqrt(d / 2)
        feats = [self.pooled(z) @ self.basis, sq_norm]
        if self.cond_spec is not None:
            if cond is None:
                raise ValueError("this policy was trained for a conditional model: give each sample's cond")
            conditions.check(cond, z.shape[0])
            feats.append(self.cond_pooled(cond) @ self.cond_basis)
        return torch.cat(feats, 1)

    def standardized(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return (self.features(z, cond) - self.feat_mean) / self.feat_std


class PhiNet(Inputs):
    """phi (``residual``): x_T -> outputs [batch, K + C], the global outputs (K logits, then C = 0 or
    2 x steps raw corrections) plus an MLP's residual on the standardized features. The output layer
    starts at zero, so an untrained phi gives the global schedule."""

    def __init__(self, shape, n_logits: int, n_corrections: int = 0, hidden: int = 64, max_inputs: int = 256,
                 components: int = 16, cond_spec: list | None = None):
        super().__init__(shape, max_inputs, components, cond_spec)
        k = self.feat_mean.numel()
        self.register_buffer("global_out", torch.zeros(n_logits + int(n_corrections), dtype=torch.float64))
        self.mlp = nn.Sequential(nn.Linear(k, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, n_logits + int(n_corrections))).double()
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return self.global_out + self.mlp(self.standardized(z, cond))


class RouteNet(Inputs):
    """phi (``route``): x_T -> the outputs (logits, then raw corrections) of its predicted cluster,
    ``cluster_out[argmax(W f + b)]`` (multinomial logistic regression on the standardized features f).
    Untrained: every cluster has the same (zero) outputs, so it gives one schedule."""

    def __init__(self, shape, n_logits: int, clusters: int, n_corrections: int = 0, max_inputs: int = 256,
                 components: int = 16, cond_spec: list | None = None):
        super().__init__(shape, max_inputs, components, cond_spec)
        self.classifier = nn.Linear(self.feat_mean.numel(), int(clusters)).double()
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer("cluster_out", torch.zeros(int(clusters), n_logits + int(n_corrections),
                                                        dtype=torch.float64))

    def cluster(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return self.classifier(self.standardized(z, cond)).argmax(1)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return self.cluster_out[self.cluster(z, cond)]


class SchedulePolicy(ScheduleLike):
    """Sigmas per sample from its own x_T (and condition): ``sigmas_for(x, cond) -> [steps + 1, batch]``.

    ``config``: shape, steps, n_logits, learn_last, max_inputs, components, sigma_min, sigma_max,
    solver, solver_options, ``corrections`` (bool), ``cond`` (``cond_spec`` or None), ``policy`` ('residual', with ``hidden``: PhiNet;
    'route', with ``clusters``: RouteNet). ``metadata``: how it was made (method, nfe, training cost, ...).
    """

    FORMAT = FORMAT
    SUFFIX = ".pt"
    per_sample = True

    def __init__(self, config: dict, state: dict | None = None, **metadata: Any):
        self.config, self.metadata = {"policy": "residual", "corrections": False, "cond": None, **config}, dict(metadata)
        if self.config["policy"] not in ("residual", "route"):
            raise ValueError(f"policy must be 'residual' or 'route', got {self.config['policy']!r}")
        if state is None:  # a new phi: initialised from the global random state (the trainer seeds it)
            self.net = self._new_net()
            return
        bad = [k for k, v in state.items() if not torch.isfinite(v).all() or (k == "feat_std" and not (v > 0).all())]
        if bad:
            raise ScheduleError(f"policy weights {', '.join(bad)} are not finite (and feat_std not positive)")
        with torch.random.fork_rng(devices=[]):  # weights given: the caller's random state is left alone
            self.net = self._new_net()
        self.net.load_state_dict(state)

    def _new_net(self) -> nn.Module:
        config, n_corr = self.config, 2 * self.steps if self.config["corrections"] else 0
        if config["policy"] == "residual":
            return PhiNet(config["shape"], config["n_logits"], n_corr, config["hidden"], config["max_inputs"],
                          config["components"], config["cond"])
        return RouteNet(config["shape"], config["n_logits"], config["clusters"], n_corr, config["max_inputs"],
                        config["components"], config["cond"])

    def _run_settings(self) -> dict:
        return self.config

    @property
    def steps(self) -> int:
        return int(self.config["steps"])

    @property
    def sigma_max(self) -> float:
        return float(self.config["sigma_max"])

    @property
    def final_zero(self) -> bool:
        return True

    def _outputs(self, x: torch.Tensor, cond) -> torch.Tensor:
        if tuple(x.shape[1:]) != tuple(self.config["shape"]):
            raise ValueError(f"this policy was trained for samples of shape {tuple(self.config['shape'])}, "
                             f"got x of shape {tuple(x.shape)}")
        return self.net(x.detach().to(torch.float64).cpu() / self.sigma_max, cond)

    def plan(self, x: torch.Tensor, cond=None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Differentiable in phi's parameters, from one pass of phi: the sigmas [steps + 1, batch] float64
        for initial states x (and their conditions, for a policy trained on a conditional model), and the
        (shift, scale), each [steps, batch], for the calls at each step's sigma (``corrections.Corrected``),
        or None for a policy without corrections."""
        out, k, sigma_min = self._outputs(x, cond), self.config["n_logits"], float(self.config["sigma_min"])
        sigmas = sigmas_from_logits(out[:, :k], self.sigma_max, sigma_min, self.config["learn_last"])
        if not self.config["corrections"]:
            return sigmas, None
        return sigmas, corrections_from_raw(out[:, k:].T, sigmas, sigma_min, self.sigma_max)

    def sigmas(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        """Differentiable in phi's parameters: [steps + 1, batch] float64 for initial states x."""
        return self.plan(x, cond)[0]

    def sigmas_for(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        with torch.no_grad():
            return self.sigmas(x, cond)

    def corrections_for(self, x: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        with torch.no_grad():
            return self.plan(x, cond)[1]

    def plan_for(self, x: torch.Tensor, cond=None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(sigmas_for(x), corrections_for(x))`` from one pass of phi (what ``fewstep.sample`` uses)."""
        with torch.no_grad():
            return self.plan(x, cond)

    def for_batch(self, x: torch.Tensor, cond=None) -> BatchPlan:
        return BatchPlan(*self.plan_for(x, cond))

    def with_metadata(self, **metadata: Any) -> "SchedulePolicy":
        """A copy of the policy (the same weights) with its metadata updated."""
        return SchedulePolicy(self.config, self.net.state_dict(), **{**self.metadata, **metadata})

    def describe(self) -> dict:
        return {"format": FORMAT, "policy": repr(self), "config": self.config, "metadata": self.metadata}

    def __repr__(self) -> str:
        tags = ", ".join(f"{k}={self.metadata[k]!r}" for k in ("method", "nfe") if k in self.metadata)
        return f"SchedulePolicy(solver={self.solver!r}, steps={self.steps}{', ' + tags if tags else ''})"

    def save(self, path: str | os.PathLike) -> Path:
        """Weights, config and metadata in one torch file (format and version fields), written atomically."""
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "version": FORMAT_VERSION, "config": json.dumps(self.config),
                    "metadata": json.dumps(self.metadata, default=str), "state": self.net.state_dict()}, buf)
        return write_atomic(path, buf.getvalue())

    @classmethod
    def from_payload(cls, d: Any, source: str) -> "SchedulePolicy":
        if d.get("version") not in READS:
            raise ScheduleError(f"{source}: policy format version {d.get('version')!r} is not supported "
                                f"(this fewstep reads versions {', '.join(map(str, READS))})")
        try:
            config, metadata, state = json.loads(d["config"]), json.loads(d["metadata"]), dict(d["state"])
            if d["version"] == 3:  # before corrections the outputs were the logits alone
                for old, new in (("cluster_logits", "cluster_out"), ("global_logits", "global_out")):
                    if old in state:
                        state[new] = state.pop(old)
            return cls(config, state, **metadata)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ScheduleError(f"{source}: policy weights do not match its config ({type(e).__name__}: {e})") from None
