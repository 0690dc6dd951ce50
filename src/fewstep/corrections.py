"""Per-step corrections of the denoiser: a time shift and an output scale per step.

Yuan et al., "Few-Step Diffusion Sampling Through Instance-Aware Discretizations", arXiv 2603.17671.
A call at step j evaluates the denoiser at ``sigma * exp(shift[j])`` and scales its epsilon
(x - D) / sigma by ``scale[j]``; the solver's coefficients still use the schedule's sigma (LD3's
decoupled evaluation times are the shift alone).
"""

from __future__ import annotations

from typing import Callable

import torch

from .solvers import stepped

# Bounds of the corrections, b tanh(o / 2) (arXiv 2603.17671): the evaluation sigma moves by at most a
# factor e^2 either way; the epsilon scale stays in [0.5, 1.5].
SHIFT_BOUND, SCALE_BOUND = 2.0, 0.5


class Corrected:
    """A denoiser with per-step corrections: the solver's call ``(x, sigma, j)`` at the schedule's sigma j
    (a row, for per-sample sigmas) evaluates the denoiser at ``sigma * exp(shift[j])`` and returns
    ``x + scale[j] (D - x)``. ``shift``, ``scale``: ``[steps]`` or ``[steps, batch]``."""

    takes_step = True

    def __init__(self, model: Callable, shift: torch.Tensor, scale: torch.Tensor):
        self.model, self.shift, self.scale = stepped(model), shift, scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        shift, scale = (v[step].to(device=x.device, dtype=x.dtype) for v in (self.shift, self.scale))
        denoised = self.model(x, sigma.to(device=x.device, dtype=x.dtype) * torch.exp(shift), step)
        return x + scale.reshape(-1, *([1] * (x.ndim - 1))) * (denoised - x)


def corrected(model: Callable, corrections: tuple | None) -> Callable:
    """``model`` with per-step ``corrections`` (shift, scale) applied (``Corrected``); as is for None."""
    return model if corrections is None else Corrected(model, *corrections)


def corrections_from_raw(raw: torch.Tensor, sigmas: torch.Tensor, sigma_min: float,
                         sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw outputs ``[2 x steps, ...]`` -> (shift, scale) ``[steps, ...]`` for the schedule ``sigmas``
    ``[steps + 1, ...]``: shift = b tanh(o / 2) in log sigma, scale = b' tanh(o / 2) + 1 (the paper's
    bounded forms; zeros give no correction), the shift also clipped so that every evaluation sigma
    stays in [sigma_min, sigma_max], the range the model was trained on."""
    o_shift, o_scale = raw.chunk(2, 0)
    positive = sigmas[:-1]
    shift = torch.minimum(torch.maximum(SHIFT_BOUND * torch.tanh(o_shift / 2), torch.log(sigma_min / positive)),
                          torch.log(sigma_max / positive))
    return shift, SCALE_BOUND * torch.tanh(o_scale / 2) + 1
