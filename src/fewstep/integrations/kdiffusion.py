"""k-diffusion and ComfyUI.

k-diffusion uses fewstep's convention (x = x0 + sigma n, denoiser ``model(x, sigma, **extra_args)``,
``sigmas`` a decreasing tensor ending at 0), so a fewstep schedule is a k-diffusion ``sigmas`` tensor
as is, and a k-diffusion model wrapper (``CompVisDenoiser``, ``CompVisVDenoiser``, ``DiscreteEpsDDPMDenoiser``,
a CFG wrapper, ...) is a fewstep denoiser once its ``extra_args`` (``cond``, ...) are fixed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from decimal import Decimal
from typing import Any, Callable

import torch

from ..files import FewstepWarning
from ..schedules import as_schedule
from .comfyui import flow_times


class KDiffusionDenoiser:
    """A k-diffusion model wrapper ``model(x, sigma, **extra_args)`` as a fewstep denoiser D(x, sigma).

    ``sigma_min`` / ``sigma_max`` come from the wrapper when it has them (k-diffusion's DiscreteSchedule
    wrappers do), else from the arguments; ``shape`` (one sample's shape) is needed by fewstep.optimize
    and evaluate when the wrapper does not tell it.
    """

    def __init__(self, model: Callable, extra_args: dict | None = None, shape=None, sigma_min: float | None = None,
                 sigma_max: float | None = None, name: str | None = None):
        self.model, self.extra_args = model, dict(extra_args or {})
        for attr, given in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            value = given if given is not None else getattr(model, attr, None)
            if value is not None:
                setattr(self, attr, float(value))
        if shape is not None:
            self.shape = tuple(int(v) for v in shape)
        self.name = name or type(model).__name__

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.model(x, sigma, **self.extra_args)


def from_kdiffusion(model: Callable, shape=None, sigma_min: float | None = None, sigma_max: float | None = None,
                    **extra_args: Any) -> KDiffusionDenoiser:
    """``from_kdiffusion(CompVisDenoiser(ldm), cond=c)``: the wrapper called as ``model(x, sigma, cond=c)``."""
    if not callable(model):
        raise TypeError(f"from_kdiffusion takes a k-diffusion denoiser, a callable model(x, sigma, **extra_args); "
                        f"got {type(model).__name__}")
    return KDiffusionDenoiser(model, extra_args, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max)


def to_kdiffusion(schedule: Any, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The schedule as the ``sigmas`` tensor k-diffusion's samplers take (``sample_euler(model, x, sigmas)``)."""
    return plain_sigmas(schedule, "k-diffusion's samplers").to(device=device, dtype=dtype)


def plain_sigmas(schedule: Any, where: str) -> torch.Tensor:
    """The sigmas of a global schedule, for a sampler that takes sigmas only (``where``): a per-sample policy
    is an error, solver options that sampler cannot follow (per-step ``orders``, a learned solver's coefficients,
    the analytical first step) a warning naming them; the fewstep nodes and ``fewstep.sample`` run them as made."""
    sched = as_schedule(schedule)
    if sched.per_sample:
        raise ValueError(f"a per-sample policy has no single sigma list for {where}: pass a global Schedule, or run "
                         "the policy with fewstep.sample (in ComfyUI: the FewstepSampler node)")
    lost = [k for k in ("orders", "a", "b", "afs") if k in sched.solver_options]
    if lost:
        what = "coefficients of a learned solver" if sched.solver == "learned" else "solver options"
        warnings.warn(f"the schedule's {what} ({', '.join(lost)}) do not go with its sigmas to {where}, which run "
                      "them with their own solver: run it with fewstep.sample, FewstepScheduler or the FewstepSampler "
                      "node to keep them", FewstepWarning, stacklevel=3)
    return sched.sigmas


def import_kdiffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """k-diffusion's ``sampling`` and ``external`` modules.

    k-diffusion 0.1.1's package ``__init__`` imports its training helpers (torchvision, scikit-image, ...);
    where those are missing (k-diffusion installed with ``--no-deps``, as this repository's tests install it)
    the two files are loaded without it, as the private package ``fewstep._k_diffusion`` next to a ``utils``
    with the one helper they use (``append_dims``); the name ``k_diffusion`` is left alone.
    """
    try:
        from k_diffusion import external, sampling
        return sampling, external
    except ImportError:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion torchdiffeq torchsde") \
                from None
    name = "fewstep._k_diffusion"
    if name not in sys.modules:
        pkg, utils = types.ModuleType(name), types.ModuleType(f"{name}.utils")
        pkg.__path__ = list(spec.submodule_search_locations)
        utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]  # k_diffusion.utils.append_dims
        pkg.utils = utils
        sys.modules.update({name: pkg, f"{name}.utils": utils})
    return importlib.import_module(f"{name}.sampling"), importlib.import_module(f"{name}.external")


def to_comfyui(schedule: Any, flow: bool = False) -> str:
    """The sigmas as the comma-separated text that ComfyUI's custom-sigmas nodes read (e.g. "14.61, 6.47, ..., 0.0").

    Full float precision, never an exponent (ComfyUI's ManualSigmas reads 1e-05 as two numbers). ``flow``:
    the flow times t = sigma / (1 + sigma), the sigmas of ComfyUI's flow models (SD3, Flux). The text carries no
    solver options: a schedule with some (``plain_sigmas``) warns, and runs as made with the fewstep nodes
    (``comfyui-fewstep/``: FewstepSigmas + FewstepSampler).
    """
    sigmas = plain_sigmas(schedule, "ComfyUI's sigma text")
    values = flow_times(sigmas) if flow else sigmas
    return ", ".join(format(Decimal(repr(v)), "f") for v in values.tolist())
