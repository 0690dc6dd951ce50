"""Per-sample schedules: a small network phi(x_T) -> the sigmas of each sample's own schedule.

Yuan et al., "Few-Step Diffusion Sampling Through Instance-Aware Discretizations", arXiv 2603.17671.
Two kinds of phi: ``residual`` (an MLP's residual logits on top of a global LD3 schedule's logits) and
``route`` (a linear classifier sends x_T to one of k clusters, each with its own LD3 logits); the sigmas are LD3's cumulative
softmax in lambda = -log sigma (``optimize.ld3.sigmas_from_logits``), so every sample's schedule is
strictly decreasing from sigma_max to 0. ``fewstep.sample`` accepts a SchedulePolicy in place of a Schedule.
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

from .schedules import ScheduleError, write_atomic

FORMAT = "fewstep.policy"
FORMAT_VERSION = 3  # 3: the policy kind (residual | route); 2: phi's input basis


class Inputs(nn.Module):
    """phi's input features from x_T in standard-normal units: x_T average-pooled to at most
    ``max_inputs`` values (spatially for [C, H, W] data), projected on ``components`` directions
    (``basis``: the principal directions of the teacher's samples, set by the trainer), plus the
    normalized squared norm of x_T, standardized with calibration statistics (``feat_mean``, ``feat_std``)."""

    def __init__(self, shape, max_inputs: int = 256, components: int = 16):
        super().__init__()
        self.shape, self.max_inputs = tuple(shape), int(max_inputs)
        n_pooled = self.pooled(torch.zeros(1, *self.shape, dtype=torch.float64)).shape[1]
        k = min(int(components), n_pooled)
        self.register_buffer("basis", torch.eye(n_pooled, k, dtype=torch.float64))
        self.register_buffer("feat_mean", torch.zeros(k + 1, dtype=torch.float64))
        self.register_buffer("feat_std", torch.ones(k + 1, dtype=torch.float64))

    def pooled(self, z: torch.Tensor) -> torch.Tensor:
        b, d = z.shape[0], z[0].numel()
        if d > self.max_inputs and z.ndim == 4:
            side = max(1, math.isqrt(self.max_inputs // z.shape[1]))
            z = nn.functional.adaptive_avg_pool2d(z, (min(side, z.shape[2]), min(side, z.shape[3])))
        z = z.reshape(b, -1)
        if z.shape[1] > self.max_inputs:
            z = nn.functional.adaptive_avg_pool1d(z[:, None], self.max_inputs)[:, 0]
        return z

    def features(self, z: torch.Tensor) -> torch.Tensor:
        d = z[0].numel()
        sq_norm = (z.reshape(z.shape[0], -1).pow(2).mean(1, keepdim=True) - 1) * math.sqrt(d / 2)
        return torch.cat([self.pooled(z) @ self.basis, sq_norm], 1)

    def standardized(self, z: torch.Tensor) -> torch.Tensor:
        return (self.features(z) - self.feat_mean) / self.feat_std


class PhiNet(Inputs):
    """phi (``residual``): x_T -> logits [batch, K], the global logits plus an MLP's residual on the
    standardized features. The output layer starts at zero, so an untrained phi gives the global schedule."""

    def __init__(self, shape, n_logits: int, hidden: int = 64, max_inputs: int = 256, components: int = 16):
        super().__init__(shape, max_inputs, components)
        k = self.feat_mean.numel()
        self.register_buffer("global_logits", torch.zeros(n_logits, dtype=torch.float64))
        self.mlp = nn.Sequential(nn.Linear(k, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, n_logits)).double()
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.global_logits + self.mlp(self.standardized(z))


class RouteNet(Inputs):
    """phi (``route``): x_T -> the logits of its predicted cluster, ``cluster_logits[argmax(W f + b)]``
    (multinomial logistic regression on the standardized features f). Untrained: every cluster has
    the same (zero) logits, so it gives one schedule."""

    def __init__(self, shape, n_logits: int, clusters: int, max_inputs: int = 256, components: int = 16):
        super().__init__(shape, max_inputs, components)
        self.classifier = nn.Linear(self.feat_mean.numel(), int(clusters)).double()
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer("cluster_logits", torch.zeros(int(clusters), n_logits, dtype=torch.float64))

    def cluster(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.standardized(z)).argmax(1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.cluster_logits[self.cluster(z)]


class SchedulePolicy:
    """Sigmas per sample from its own x_T: ``sigmas_for(x) -> [steps + 1, batch]``.

    ``config``: shape, steps, n_logits, learn_last, max_inputs, components, sigma_min, sigma_max,
    solver, solver_options, ``policy`` ('residual', with ``hidden``: PhiNet; 'route', with ``clusters``:
    RouteNet). ``metadata``: how it was made (method, nfe, training cost, ...).
    """

    def __init__(self, config: dict, state: dict | None = None, **metadata: Any):
        self.config, self.metadata = {"policy": "residual", **config}, dict(metadata)
        kind = self.config["policy"]
        if kind == "residual":
            self.net = PhiNet(config["shape"], config["n_logits"], config["hidden"], config["max_inputs"],
                              config["components"])
        elif kind == "route":
            self.net = RouteNet(config["shape"], config["n_logits"], config["clusters"], config["max_inputs"],
                                config["components"])
        else:
            raise ValueError(f"policy must be 'residual' or 'route', got {kind!r}")
        if state is not None:
            self.net.load_state_dict(state)

    @property
    def solver(self) -> str | None:
        return self.config.get("solver")

    @property
    def solver_options(self) -> dict:
        return dict(self.config.get("solver_options") or {})

    @property
    def steps(self) -> int:
        return int(self.config["steps"])

    @property
    def sigma_max(self) -> float:
        return float(self.config["sigma_max"])

    def sigmas(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable in phi's parameters: [steps + 1, batch] float64 for initial states x."""
        from .optimize.ld3 import sigmas_from_logits

        if tuple(x.shape[1:]) != tuple(self.config["shape"]):
            raise ValueError(f"this policy was trained for samples of shape {tuple(self.config['shape'])}, "
                             f"got x of shape {tuple(x.shape)}")
        logits = self.net(x.detach().to(torch.float64).cpu() / self.sigma_max)
        return sigmas_from_logits(logits, self.sigma_max, float(self.config["sigma_min"]), self.config["learn_last"])

    def sigmas_for(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.sigmas(x)

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
    def load(cls, path: str | os.PathLike) -> "SchedulePolicy":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"policy file not found: {path}")
        try:
            d = torch.load(path, weights_only=True)
        except Exception as e:  # torch raises several types for a truncated or foreign file
            raise ScheduleError(f"{path}: corrupt or unreadable policy file ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ScheduleError(f"{path}: not a fewstep schedule policy (missing format={FORMAT!r})")
        if d.get("version") != FORMAT_VERSION:
            raise ScheduleError(f"{path}: policy format version {d.get('version')!r} is not supported "
                                f"(this fewstep reads version {FORMAT_VERSION})")
        try:
            config, metadata = json.loads(d["config"]), json.loads(d["metadata"])
            return cls(config, d["state"], **metadata)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ScheduleError(f"{path}: policy weights do not match its config ({type(e).__name__}: {e})") from None
