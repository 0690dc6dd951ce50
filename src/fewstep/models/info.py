"""What fewstep needs to know of a denoiser: sample shape, sigma range, name and device."""

from __future__ import annotations

from typing import Callable

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
    if not 0 < info["sigma_min"] < info["sigma_max"]:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {info['sigma_min']} and {info['sigma_max']}")
    return info
