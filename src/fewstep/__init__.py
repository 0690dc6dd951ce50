"""fewstep: good samples from a pretrained diffusion or flow-matching model in 3-10 network evaluations."""

from . import models, schedules, solvers
from .evaluate import evaluate, noise
from .integrations.kdiffusion import from_kdiffusion, to_comfyui, to_kdiffusion
from .metrics import rmse, summarize
from .optimize import METHODS, optimize
from .models import EmpiricalDenoiser, FlowDenoiser, GaussianMixture, VPContinuousDenoiser, VPDiscreteDenoiser, load_model
from .sample import DenoiserError, nfe, plan, sample
from .schedules import Schedule, ScheduleError
from .solvers import SOLVERS
from .teacher import Teacher
from .tune import tune

__version__ = "0.1.0"

_DIFFUSERS = ("from_diffusers", "FewstepScheduler", "to_diffusers")  # need diffusers: imported on first use


def __getattr__(name):
    if name in _DIFFUSERS:
        from .integrations import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")


__all__ = [
    "models", "schedules", "solvers", "evaluate", "noise", "rmse", "summarize", "EmpiricalDenoiser",
    "FlowDenoiser", "GaussianMixture", "VPContinuousDenoiser", "VPDiscreteDenoiser", "load_model",
    "DenoiserError", "METHODS", "optimize", "nfe", "plan", "sample", "Schedule", "ScheduleError", "SOLVERS", "Teacher", "tune",
    "from_kdiffusion", "to_comfyui", "to_kdiffusion", *_DIFFUSERS,
]
