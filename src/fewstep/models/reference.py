"""Exact denoisers: a Gaussian mixture and the empirical (kernel) denoiser of a finite data set."""

from __future__ import annotations

import math

import torch

from ..schedules import SIGMA_MAX, SIGMA_MIN


class GaussianMixture:
    """Mixture of full-covariance Gaussians with an exact denoiser at every sigma.

    With x = x0 + sigma n, x0 ~ sum_k w_k N(mu_k, C_k), the posterior mean is
    D(x, sigma) = sum_k r_k(x) [mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k)], r_k the responsibilities
    under N(mu_k, C_k + sigma^2 I). Computed in the eigenbasis of each C_k, in float64.
    """

    def __init__(self, means, covs, weights=None, shape=None, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 name: str = "gmm"):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(self.means.shape)}")
        k, d = self.means.shape
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must be [K, d, d] = [{k}, {d}, {d}], got {tuple(covs.shape)}")
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-9):
            raise ValueError("weights must be K non-negative numbers summing to 1")
        self.weights = w
        self.covs = 0.5 * (covs + covs.transpose(1, 2))
        self.evals, self.evecs = torch.linalg.eigh(self.covs)
        if (self.evals < -1e-10 * self.evals.abs().max().clamp_min(1)).any():
            raise ValueError("covariances must be positive semi-definite")
        self.evals = self.evals.clamp_min(0)
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold {d} values")
        self.sigma_min, self.sigma_max, self.name = sigma_min, sigma_max, name

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device) -> "GaussianMixture":
        """Move the mixture's tensors to ``device`` (in place)."""
        for attr in ("means", "weights", "covs", "evals", "evecs"):
            setattr(self, attr, getattr(self, attr).to(device))
        return self

    def _components(self, xf: torch.Tensor, s2: torch.Tensor):
        """Eigenbasis coordinates z, variances lam + s2 and log N(x; mu_k, C_k + s2 I) per component."""
        z = torch.einsum("kde,bkd->bke", self.evecs, xf[:, None, :] - self.means[None])
        var = self.evals[None] + s2[:, None, None]
        logn = -0.5 * ((z ** 2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return z, var, logn

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(b) ** 2
        z, var, logn = self._components(xf, s2)
        r = torch.softmax(logn + self.weights.log()[None], dim=1)
        post = self.means[None] + torch.einsum("kde,bke->bkd", self.evecs, self.evals[None] / var * z)
        return (r[:, :, None] * post).sum(1).reshape(x.shape).to(x.dtype)

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """log density of x under the data distribution convolved with N(0, sigma^2 I)."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        s2 = torch.full((xf.shape[0],), float(sigma) ** 2, dtype=torch.float64, device=xf.device)
        return torch.logsumexp(self._components(xf, s2)[2] + self.weights.log()[None], dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of x0, shape [n, *shape], float64."""
        comp = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator).to(self.device)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator).to(self.device)
        scaled = torch.einsum("nde,ne->nd", self.evecs[comp], self.evals[comp].sqrt() * eps)
        return (self.means[comp] + scaled).reshape(n, *self.shape)


class EmpiricalDenoiser:
    """Optimal denoiser of a finite data set: D(x, s) = sum_i softmax_i(-|x - x_i|^2 / 2 s^2) x_i.

    The kernel-estimated model of the geometric-regularity paper (Chen et al., arXiv 2506.10177, Sec. 3).
    Computed in float64 with an online (streaming) softmax over chunks of the data, so memory stays at
    O(batch x chunk) however large the data set.
    """

    def __init__(self, data, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, name: str = "empirical",
                 chunk_elems: int = 2 ** 24):
        data = torch.as_tensor(data, dtype=torch.float64)
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must be [N, ...] with N >= 1, got shape {tuple(data.shape)}")
        self.shape = tuple(data.shape[1:])
        self.data = data.reshape(data.shape[0], -1).contiguous()
        self.sq_norms = (self.data ** 2).sum(1)
        self.sigma_min, self.sigma_max, self.name = sigma_min, sigma_max, name
        self.chunk_elems = chunk_elems

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "EmpiricalDenoiser":
        """Move the data set to ``device`` (in place)."""
        self.data, self.sq_norms = self.data.to(device), self.sq_norms.to(device)
        return self

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(b) ** 2
        x_sq = (xf ** 2).sum(1, keepdim=True)
        chunk = max(1, self.chunk_elems // max(b, 1))
        run_max = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
        run_sum = torch.zeros(b, dtype=torch.float64, device=x.device)
        acc = torch.zeros_like(xf)
        for start in range(0, self.data.shape[0], chunk):
            xi = self.data[start:start + chunk]
            d2 = (x_sq + self.sq_norms[start:start + chunk][None] - 2 * xf @ xi.T).clamp_min(0)
            logits = -d2 / (2 * s2[:, None])
            new_max = torch.maximum(run_max, logits.max(1).values)
            scale = torch.exp(run_max - new_max)
            p = torch.exp(logits - new_max[:, None])
            run_sum = run_sum * scale + p.sum(1)
            acc = acc * scale[:, None] + p @ xi
            run_max = new_max
        return (acc / run_sum[:, None]).reshape(x.shape).to(x.dtype)
