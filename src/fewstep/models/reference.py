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

    def _components(self, xf: torch.Tensor, s2: torch.Tensor, means: torch.Tensor | None = None):
        """Eigenbasis coordinates z, variances lam + s2 and log N(x; mu_k, C_k + s2 I) per component
        (``means``: [1 or batch, K, d], default the mixture's)."""
        means = self.means[None] if means is None else means
        z = torch.einsum("kde,bkd->bke", self.evecs, xf[:, None, :] - means)
        var = self.evals[None] + s2[:, None, None]
        logn = -0.5 * ((z ** 2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return z, var, logn

    def _posterior(self, x: torch.Tensor, sigma: torch.Tensor, means: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
        """E[x0 | x] for means [1 or batch, K, d] and log weights [1 or batch, K]."""
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        s2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(b) ** 2
        z, var, logn = self._components(xf, s2, means)
        r = torch.softmax(logn + logw, dim=1)
        post = means + torch.einsum("kde,bke->bkd", self.evecs, self.evals[None] / var * z)
        return (r[:, :, None] * post).sum(1).reshape(x.shape).to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self._posterior(x, sigma, self.means[None], self.weights.log()[None])

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


class ConditionalGaussianMixture(GaussianMixture):
    """A mixture whose means and weights depend on a condition vector c in R^m, with an exact denoiser for
    every c: mu_k(c) = mu_k + A_k c, log w_k(c) = log w_k + B_k . c (then normalized), C_k fixed.

    ``guidance`` w: classifier-free guidance (Ho & Salimans 2022) with the null condition c = 0,
    D = D(x | 0) + w (D(x | c) - D(x | 0)); w = 1 is the conditional denoiser itself. ``cond_means``
    A: [K, d, m]; ``cond_logits`` B: [K, m]. Called as ``D(x, sigma, cond=c)``, c: [batch, m].
    """

    def __init__(self, means, covs, cond_means, cond_logits, weights=None, guidance: float = 1.0, **kw):
        super().__init__(means, covs, weights, **kw)
        self.cond_means = torch.as_tensor(cond_means, dtype=torch.float64)
        self.cond_logits = torch.as_tensor(cond_logits, dtype=torch.float64)
        k, d = self.means.shape
        if self.cond_means.ndim != 3 or self.cond_means.shape[:2] != (k, d) or self.cond_logits.shape != (k, self.cond_dim):
            raise ValueError(f"cond_means must be [K, d, m] = [{k}, {d}, m] and cond_logits [K, m], got "
                             f"{tuple(self.cond_means.shape)} and {tuple(self.cond_logits.shape)}")
        self.guidance = float(guidance)

    @property
    def cond_dim(self) -> int:
        return self.cond_means.shape[2]

    def to(self, device) -> "ConditionalGaussianMixture":
        super().to(device)
        self.cond_means, self.cond_logits = self.cond_means.to(device), self.cond_logits.to(device)
        return self

    def given(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(means [batch, K, d], log weights [batch, K]) for conditions ``cond`` [batch, m]."""
        if not isinstance(cond, torch.Tensor):
            raise ValueError(f"cond must be a tensor [batch, {self.cond_dim}] of condition vectors, got {type(cond).__name__}")
        c = cond.to(dtype=torch.float64, device=self.means.device)
        if c.ndim != 2 or c.shape[1] != self.cond_dim:
            raise ValueError(f"cond must be [batch, {self.cond_dim}] condition vectors, got {tuple(c.shape)}")
        means = self.means[None] + torch.einsum("kdm,bm->bkd", self.cond_means, c)
        return means, torch.log_softmax(self.weights.log()[None] + c @ self.cond_logits.T, dim=1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        means, logw = self.given(cond)
        if cond.shape[0] != x.shape[0]:
            raise ValueError(f"cond has {cond.shape[0]} rows for {x.shape[0]} samples")
        d_c = self._posterior(x, sigma, means, logw)
        if self.guidance == 1.0:
            return d_c
        d_0 = self._posterior(x, sigma, self.means[None], self.weights.log()[None])
        return d_0 + self.guidance * (d_c - d_0)


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
