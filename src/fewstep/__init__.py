"""fewstep: good samples from a pretrained diffusion or flow-matching model in 3-10 network evaluations.

The pipeline, one module each (docs/architecture.md): ``models`` (denoisers) -> ``schedules`` ->
``solvers`` -> ``sampling`` -> ``teacher``, ``metrics``, ``evaluation`` -> ``methods`` (one module per
optimizer) -> ``tuning`` / ``report`` -> ``cli``; ``integrations`` for diffusers and k-diffusion;
``zoo`` for the built-in models by name.
"""

from . import models, schedules, solvers
from .evaluation import evaluate
from .integrations.kdiffusion import from_kdiffusion, to_comfyui, to_kdiffusion
from .methods import METHODS, optimize
from .metrics import rmse, summarize
from .models import EmpiricalDenoiser, FlowDenoiser, GaussianMixture, VPContinuousDenoiser, VPDiscreteDenoiser
from .noises import noise
from .policy import SchedulePolicy
from .sampling import DenoiserError, nfe, sample
from .schedules import Schedule, ScheduleError, ScheduleLike, load_schedule
from .solvers import SOLVERS, plan
from .teacher import Teacher
from .tuning import tune
from .version import __version__
from .zoo import load_model

_DIFFUSERS = ("from_diffusers", "encode_prompts", "FewstepScheduler", "to_diffusers")  # need diffusers: imported on first use


def __getattr__(name):
    if name in _DIFFUSERS:
        from .integrations import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


__all__ = [
    "models", "schedules", "solvers", "evaluate", "noise", "rmse", "summarize", "EmpiricalDenoiser",
    "FlowDenoiser", "GaussianMixture", "VPContinuousDenoiser", "VPDiscreteDenoiser", "load_model",
    "DenoiserError", "METHODS", "optimize", "nfe", "plan", "sample", "Schedule", "ScheduleError", "ScheduleLike",
    "SchedulePolicy", "load_schedule", "SOLVERS", "Teacher", "tune", "from_kdiffusion", "to_comfyui",
    "to_kdiffusion", *_DIFFUSERS,
]
