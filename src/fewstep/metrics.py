"""Error measures: per-sample RMSE to the teacher, summaries with bootstrap intervals, W2 distances.

RMSE is computed where the samples are; summaries and distances on the CPU (seeded, scipy)."""

from __future__ import annotations

import math

import torch


CLEARLY = 3.0  # standard errors above 0 that make paired differences "clearly worse" (the races of tune and GITS)


def standard_error(d: torch.Tensor) -> torch.Tensor:
    """The standard error of the mean of per-sample values d (at least two)."""
    return d.std() / math.sqrt(d.numel())


def significance(d: torch.Tensor) -> float:
    """Paired per-sample differences d (worse minus better): how many standard errors their mean is above 0."""
    if d.numel() < 2:
        return 0.0
    return float(d.mean() / standard_error(d).clamp_min(1e-300))


def clearly_worse(d: torch.Tensor) -> bool:
    """Whether paired differences d (candidate minus leader) put the candidate CLEARLY standard errors behind."""
    return significance(d) > CLEARLY


def tail_share(errors: torch.Tensor, fraction: float = 0.05) -> float:
    """The share of the summed (non-negative) errors carried by the largest ceil(fraction * n) of them: near
    ``fraction`` for even errors, near 1 when a few samples (mode flips, outliers) make the mean."""
    total = float(errors.sum())
    if errors.numel() == 0 or total <= 0:
        return 0.0
    k = math.ceil(fraction * errors.numel())
    return float(errors.topk(k).values.sum()) / total


def rmse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square error over all dimensions, float64, shape [batch]."""
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs reference {tuple(ref.shape)}")
    diff = (x.to(torch.float64) - ref.to(torch.float64)).reshape(x.shape[0], -1)
    return diff.pow(2).mean(1).sqrt()


def bootstrap_ci(values: torch.Tensor, stat=torch.mean, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (seeded, so reproducible)."""
    g = torch.Generator().manual_seed(seed)
    v = values.detach().to("cpu", torch.float64).flatten()
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=g)
    boots = stat(v[idx], dim=1) if stat is torch.mean else torch.stack([stat(row) for row in v[idx]])
    lo, hi = torch.quantile(boots, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def summarize(errors: torch.Tensor, ci: bool = False) -> dict:
    """mean / median / p90 (and optionally a bootstrap 95% interval of the mean) of per-sample errors."""
    e = errors.detach().to("cpu", torch.float64).flatten()
    if e.numel() == 0:
        raise ValueError("summarize: no errors (an empty tensor)")
    out = {"mean": float(e.mean()), "median": float(e.median()), "p90": float(torch.quantile(e, 0.9)), "n": e.numel()}
    if ci:
        out["mean_ci95"] = list(bootstrap_ci(e))
    return out


def w2_exact(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 between two equal-size empirical sets (optimal assignment, scipy's Hungarian solver)."""
    from scipy.optimize import linear_sum_assignment

    if a.shape != b.shape:
        raise ValueError(f"W2 needs equal-size sets of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a2, b2 = (t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64) for t in (a, b))
    cost = torch.cdist(a2, b2).pow(2)
    rows, cols = linear_sum_assignment(cost.numpy())
    return float(cost[rows, cols].mean().sqrt())


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced W2: root mean over random directions of the 1-D W2 between the projected sets."""
    if a.shape != b.shape:
        raise ValueError(f"sliced W2 needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    a2, b2 = (t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64) for t in (a, b))
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a2.shape[1], projections, dtype=torch.float64, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a2 @ dirs).sort(0).values, (b2 @ dirs).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())
