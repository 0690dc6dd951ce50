"""Denoisers: reference models, wrappers for other parameterizations, built-in models by name."""

from .builtin import BUILTIN_MODELS, DEFAULT_MODEL, load_model, model_info
from .reference import EmpiricalDenoiser, GaussianMixture
from .wrappers import FlowDenoiser, VPContinuousDenoiser, VPDiscreteDenoiser

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "load_model", "model_info", "EmpiricalDenoiser", "GaussianMixture",
    "FlowDenoiser", "VPContinuousDenoiser", "VPDiscreteDenoiser",
]
