"""Conditions: what a conditional denoiser ``D(x, sigma, cond=c)`` is given, row by row.

``cond`` is a tensor, or a dict of tensors (e.g. prompt embeddings and pooled embeddings), whose first
dimension is the batch: row i conditions ``x[i]``. Everything in fewstep that calls the denoiser on a
batch, a slice of one or candidates stacked from one carries the matching rows; these helpers select,
tile and check them. ``None`` is no condition (an unconditional denoiser), and every helper passes it on.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

Cond = Any  # torch.Tensor | dict[str, torch.Tensor] | None


def length(cond: Cond) -> int | None:
    """The number of rows (None for no condition); a dict's tensors must agree."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        if cond.ndim == 0:
            raise ValueError("cond must have a batch dimension: one row per sample, got a 0-d tensor")
        return cond.shape[0]
    if isinstance(cond, dict) and cond and all(isinstance(v, torch.Tensor) and v.ndim for v in cond.values()):
        sizes = {k: v.shape[0] for k, v in cond.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the tensors of cond have different numbers of rows: {sizes}")
        return next(iter(sizes.values()))
    raise ValueError(f"cond must be a tensor or a dict of tensors with a batch dimension, got {type(cond).__name__}")


def rows(cond: Cond, index) -> Cond:
    """The rows ``index`` (a slice, or an index tensor) of cond."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[index] for k, v in cond.items()}
    return cond[index]


def cycle(cond: Cond, n: int) -> Cond:
    """``n`` rows: cond's rows in turn, as often as needed (a pool of conditions for more noises)."""
    if cond is None:
        return None
    return rows(cond, torch.arange(n) % length(cond))


def tile(cond: Cond, times: int) -> Cond:
    """cond repeated ``times`` times along the batch, whole (candidate-major: [c0 rows, c1 rows, ...]), as
    ``x.repeat(times, ...)`` stacks candidates."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: tile(v, times) for k, v in cond.items()}
    return cond.repeat(times, *[1] * (cond.ndim - 1))


def to(cond: Cond, device) -> Cond:
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v.to(device) for k, v in cond.items()}
    return cond.to(device)


def parts(cond: Cond) -> list:
    """cond's tensors in a fixed order (for content hashes)."""
    if cond is None:
        return []
    if isinstance(cond, dict):
        return [x for k in sorted(cond) for x in (k, cond[k])]
    return [cond]


def check(cond: Cond, n: int, what: str = "x") -> None:
    """cond has ``n`` rows, one per row of ``what``, and its floating-point tensors are finite (or it is None)."""
    m = length(cond)
    if m is not None and m != n:
        raise ValueError(f"cond has {m} rows for {n} rows of {what}: give one condition per sample")
    if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all() for t in parts(cond)):
        raise ValueError("cond contains NaN or inf")


def takes_cond(denoiser: Callable) -> bool | None:
    """Whether the denoiser takes ``cond=``: True if required, None if optional, False if not at all."""
    try:
        params = inspect.signature(denoiser).parameters
    except (TypeError, ValueError):
        return None
    if "cond" in params:
        return True if params["cond"].default is inspect.Parameter.empty else None
    return None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else False


def check_model(denoiser: Callable, cond: Cond) -> None:
    """A named error for a condition given to an unconditional denoiser, or none for a conditional one."""
    takes = takes_cond(denoiser)
    if cond is not None and takes is False:
        raise ValueError(f"cond given, but the denoiser {getattr(denoiser, 'name', type(denoiser).__name__)} takes no "
                         "cond= argument: it is unconditional")
    if cond is None and takes is True:
        raise ValueError(f"the denoiser {getattr(denoiser, 'name', type(denoiser).__name__)} is conditional (it needs "
                         "cond=): give one condition per sample (cond=, or conds= to fewstep.tune; on the command "
                         "line --conds FILE, or --prompts FILE for a pipeline folder)")
