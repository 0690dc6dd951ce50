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


def _modules(obj: Any, depth: int = 3) -> Iterator[nn.Module]:
    """The torch modules a denoiser is or wraps: itself, or its attributes ``depth`` levels down
    (a fewstep wrapper holds the network, e.g. ``den.model.net`` for a diffusers UNet)."""
    seen, todo = set(), [(obj, 0)]
    while todo:
        o, d = todo.pop(0)
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, nn.Module):
            yield o
        elif d < depth and hasattr(o, "__dict__") and not isinstance(o, type):
            todo += [(v, d + 1) for v in vars(o).values()]


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
