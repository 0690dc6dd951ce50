"""What fewstep needs to know of a denoiser: sample shape, sigma range, name, device, and its identity
(``fingerprint``: what caches and resume keys are filed under)."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..schedules import SIGMA_MAX, SIGMA_MIN
from .device import model_device


def model_info(den: Callable, shape=None, sigma_min=None, sigma_max=None) -> dict:
    """Shape, sigma range, id and device of a denoiser: explicit values first, then its attributes, then
    EDM defaults (the device: ``models.device.model_device``)."""
    shape = shape if shape is not None else getattr(den, "shape", None)
    if shape is None:
        raise ValueError("the model has no .shape attribute: give the sample shape, e.g. shape=(3, 32, 32)")
    info = {
        "shape": tuple(int(v) for v in shape),
        "sigma_min": float(sigma_min if sigma_min is not None else getattr(den, "sigma_min", SIGMA_MIN)),
        "sigma_max": float(sigma_max if sigma_max is not None else getattr(den, "sigma_max", SIGMA_MAX)),
        "name": str(getattr(den, "name", type(den).__name__)),
        "device": str(model_device(den)),
    }
    if getattr(den, "guidance", None) is not None:  # classifier-free guidance changes the ODE: part of the identity
        info["guidance"] = float(den.guidance)
    if not 0 < info["sigma_min"] < info["sigma_max"]:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {info['sigma_min']} and {info['sigma_max']}")
    return info


def max_batch(denoiser: Callable) -> int | None:
    """The denoiser's ``max_batch`` (at most this many rows a network call: larger batches are split), checked;
    None: no limit."""
    limit = getattr(denoiser, "max_batch", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"the model's max_batch must be a positive integer (rows a network call), got {limit!r}")
    return limit


def _tensors(obj: Any, prefix: str, depth: int, seen: set) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for the tensors a denoiser holds: torch modules' state, tensor attributes, and those
    of the objects and closures it holds, ``depth`` levels down."""
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, nn.Module):
        yield from ((f"{prefix}.{k}", v) for k, v in obj.state_dict().items())
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]", depth - 1, seen)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}[{k!r}]", depth - 1, seen)
    elif not isinstance(obj, (type, str, bytes, int, float, bool)) and obj is not None:
        cells = getattr(obj, "__closure__", None) or ()
        attrs = {**getattr(obj, "__dict__", {}), **{f"<cell {i}>": c.cell_contents for i, c in enumerate(cells)}}
        for k, v in attrs.items():
            yield from _tensors(v, f"{prefix}.{k}", depth - 1, seen)


def fingerprint(den: Any, depth: int = 4, sample: int = 4096) -> str:
    """A short hash of what the denoiser computes with: its class, name and guidance, and every tensor it holds
    (``_tensors``), each by its path, shape, dtype and up to ``sample`` evenly spaced values, so a
    checkpoint changed in place changes it. A ``model_id`` attribute, if the denoiser has one, is used
    instead (a user's own name for exactly these weights)."""
    if getattr(den, "model_id", None):
        return str(den.model_id)
    h = hashlib.sha1(f"{type(den).__qualname__}:{getattr(den, 'name', '')}:{getattr(den, 'guidance', '')}".encode())
    for path, t in _tensors(den, "", depth, set()):
        flat = t.detach().reshape(-1)
        flat = flat[:: max(1, flat.numel() // sample)][:sample]
        h.update(f"{path}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]
