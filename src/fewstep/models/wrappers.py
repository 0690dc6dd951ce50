"""Wrappers that turn other parameterizations into an EDM denoiser D(x, sigma) -> x0_hat.

EDM convention: x = x0 + sigma n. A variance-preserving (VP) model sees x_vp = alpha x0 + s n with
alpha = 1 / sqrt(1 + sigma^2), s = sigma alpha, so x_vp = x / sqrt(1 + sigma^2) (Karras et al. 2022,
Table 1). A flow-matching model sees x_t = (1 - t) x0 + t n with t = sigma / (1 + sigma), so
x_t = x / (1 + sigma).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..schedules import vp_time, VP_BETA_D, VP_BETA_MIN
from .device import model_dtype, model_inputs

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction_type {prediction!r}; expected one of {PREDICTIONS}")
    return prediction


def _bshape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def vp_output_to_x0(out: torch.Tensor, x_vp: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor,
                    prediction: str) -> torch.Tensor:
    """x0 from a VP model output: eps (x0 = (x_vp - s eps) / alpha), v (x0 = alpha x_vp - s v), or x0 itself."""
    if prediction == "epsilon":
        return (x_vp - s * out) / alpha
    if prediction == "v_prediction":
        return alpha * x_vp - s * out
    return out


def _call(model: Callable, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """model(x, t) in the network's dtype (``model_dtype``: a float32 or half network gets its own), with ``cond=``
    passed on only when there is one (an unconditional network need not take it)."""
    x, t = model_inputs(model_dtype(model), x, t)
    return model(x, t) if cond is None else model(x, t, cond=cond)


class _VPDenoiser:
    prediction: str
    dtype = None  # takes any: its arithmetic in the state's dtype, the network called in its own (``_call``)

    def _time(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        alpha = _bshape(1 / torch.sqrt(1 + sigma ** 2), x)
        s = _bshape(sigma, x) * alpha
        x_vp = x * alpha
        out = _call(self.model, x_vp, self._time(sigma), cond)
        return vp_output_to_x0(out.to(x.dtype), x_vp, alpha, s, self.prediction)


class VPDiscreteDenoiser(_VPDenoiser):
    """A DDPM / Stable Diffusion style model ``model(x_vp, t)`` on discrete steps t = 0..T-1.

    sigma_t = sqrt((1 - abar_t) / abar_t); a sigma between two steps maps to a fractional t by linear
    interpolation in log sigma (as k-diffusion's DiscreteSchedule.sigma_to_t does).
    """

    def __init__(self, model: Callable, alphas_cumprod, prediction: str = "epsilon", name: str = "vp-discrete"):
        self.model = model
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.prediction = _check_prediction(prediction)
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])
        self.name = name

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.to(torch.float64).log().to(self.log_sigmas.device)
        if (log_sigma < self.log_sigmas[0] - 1e-6).any() or (log_sigma > self.log_sigmas[-1] + 1e-6).any():
            raise ValueError(
                f"sigma {sigma.min().item():.4g}..{sigma.max().item():.4g} outside the model's trained range "
                f"[{self.sigma_min:.4g}, {self.sigma_max:.4g}]"
            )
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + w).to(sigma.dtype).to(sigma.device)

    _time = sigma_to_t


class VPContinuousDenoiser(_VPDenoiser):
    """A continuous-time VP model ``model(x_vp, t * time_scale)``, t in (0, 1], beta(t) = beta_min + beta_d t."""

    def __init__(self, model: Callable, prediction: str = "epsilon", beta_d: float = VP_BETA_D,
                 beta_min: float = VP_BETA_MIN, time_scale: float = 1.0, name: str = "vp-continuous"):
        self.model, self.prediction = model, _check_prediction(prediction)
        self.beta_d, self.beta_min, self.time_scale = beta_d, beta_min, time_scale
        self.name = name

    def _time(self, sigma: torch.Tensor) -> torch.Tensor:
        return vp_time(sigma.to(torch.float64), self.beta_d, self.beta_min).to(sigma.dtype) * self.time_scale


class FlowDenoiser:
    """A flow-matching velocity model ``model(x_t, t * time_scale) -> v``, x_t = (1 - t) x0 + t n, v = n - x0.

    sigma = t / (1 - t), x_t = x / (1 + sigma), x0 = x_t - t v (rectified flow, as in SD3 / Flux).
    """

    dtype = None  # as _VPDenoiser's

    def __init__(self, model: Callable, time_scale: float = 1.0, name: str = "flow"):
        self.model, self.time_scale, self.name = model, time_scale, name

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        t = sigma / (1 + sigma)
        x_t = x / _bshape(1 + sigma, x)
        v = _call(self.model, x_t, t * self.time_scale, cond).to(x.dtype)
        return x_t - _bshape(t, x) * v


class Conditional:
    """A wrapped denoiser whose network needs a condition: ``D(x, sigma, cond)``, ``cond`` required (so
    fewstep names a missing one, ``conditions.check_model``); its attributes are the wrapped denoiser's."""

    def __init__(self, denoiser: Callable):
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        return self.denoiser(x, sigma, cond=cond)

    def __getattr__(self, name: str):
        if name == "denoiser":  # not set yet (unpickling, copying): no recursion
            raise AttributeError(name)
        return getattr(self.denoiser, name)
