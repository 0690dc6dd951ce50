"""Where a denoiser computes, and moving one there.

fewstep puts its noises (calibration, held-out, the teacher's states) on the denoiser's device, so a
model on a GPU is optimized and evaluated there with no extra argument. Schedules stay float64 on the
CPU; the solvers cast their coefficients to the state's device and dtype.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Iterator

import torch
from torch import nn


def _walk(obj: Any, depth: int = 3) -> Iterator[Any]:
    """A denoiser and what it wraps, breadth first: itself, then its attributes ``depth`` levels down (a
    fewstep wrapper holds the network, e.g. ``den.model.net`` for a diffusers UNet); tensors not entered."""
    seen, todo = set(), [(obj, 0)]
    while todo:
        o, d = todo.pop(0)
        if id(o) in seen:
            continue
        seen.add(id(o))
        yield o
        if d < depth and hasattr(o, "__dict__") and not isinstance(o, (type, nn.Module, torch.Tensor)):
            todo += [(v, d + 1) for v in vars(o).values()]


def _modules(obj: Any) -> Iterator[nn.Module]:
    """The torch modules a denoiser is or wraps (``_walk``)."""
    return (o for o in _walk(obj) if isinstance(o, nn.Module))


def model_device(den: Any) -> torch.device:
    """The denoiser's ``device`` attribute, else the device of the first parameter or buffer of a torch
    module it is or wraps, else the CPU."""
    dev = getattr(den, "device", None)
    if dev is not None:
        return torch.device(dev)
    for module in _modules(den):
        for t in chain(module.parameters(), module.buffers()):
            return t.device
    return torch.device("cpu")


def model_dtype(den: Any) -> torch.dtype | None:
    """The floating dtype a denoiser's network computes in (its inputs are cast to it): the first ``dtype``
    attribute met (``_walk``; None: the object takes any dtype, as fewstep's wrappers do, which cast at their
    network), else that of the first floating parameter or buffer of a torch module it is or wraps, else None."""
    for o in _walk(den):
        declared = None if isinstance(o, torch.Tensor) else getattr(o, "dtype", ...)
        if declared is None or isinstance(declared, torch.dtype):
            return declared if declared is None or declared.is_floating_point else None
        if isinstance(o, nn.Module):
            for t in chain(o.parameters(), o.buffers()):
                if t.is_floating_point():
                    return t.dtype
    return None


def model_inputs(dtype: torch.dtype | None, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and sigma (or the network's time) cast for a network computing in ``dtype`` (None: as they are): x to
    it, sigma too unless it is a half type (then float32, as diffusers pipelines pass timesteps)."""
    if dtype is None or dtype == x.dtype:
        return x, sigma
    return x.to(dtype), sigma.to(torch.float32 if dtype.itemsize < 4 else dtype)


def release_cached_memory() -> None:
    """The blocks torch's CUDA allocator keeps cached, returned to the device (after an out-of-memory error)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``'auto'``: CUDA when available, else the CPU; None stays None (keep the model where it is)."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device")
    return dev


def to_device(den: Any, device: str | torch.device | None) -> Any:
    """The denoiser moved to ``device`` (in place): its own ``to`` if it has one, else every torch module
    it wraps. A plain function cannot be moved: it is returned as is and must accept tensors there."""
    dev = resolve_device(device)
    if dev is None:
        return den
    if callable(getattr(den, "to", None)):
        moved = den.to(dev)
        return moved if moved is not None else den
    for module in _modules(den):
        module.to(dev)
    return den
