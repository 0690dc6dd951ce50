"""Denoisers: reference models, wrappers for other parameterizations, what fewstep reads of a model.
Built-in models by name: ``fewstep.zoo`` (``fewstep.load_model``)."""

from .info import model_info
from .reference import ConditionalGaussianMixture, EmpiricalDenoiser, GaussianMixture
from .wrappers import FlowDenoiser, VPContinuousDenoiser, VPDiscreteDenoiser

__all__ = ["model_info", "ConditionalGaussianMixture", "EmpiricalDenoiser", "GaussianMixture", "FlowDenoiser", "VPContinuousDenoiser",
           "VPDiscreteDenoiser"]
