"""ComfyUI: a fewstep schedule as the ``SIGMAS`` of the connected model, and a ``SAMPLER`` running its solver.

ComfyUI's samplers are k-diffusion's (comfy/k_diffusion/sampling.py): ``sampler(model, x, sigmas, extra_args,
callback, disable, **options)`` with ``model(x, sigma, **extra_args) -> denoised`` and ``SIGMAS`` a 1-d float
tensor ending at 0. The model's sampling object (``model.get_model_object("model_sampling")``) fixes what a
sigma is (comfy/model_sampling.py):

- EPS / V_PREDICTION models (SD 1.x, SDXL, ...): x = x0 + sigma n, EDM sigmas: fewstep's own, used as they
  are, within the model's [sigma_min, sigma_max] (rounding clipped, ``ranges.clip_to_range``);
- CONST models (flow matching: SD3, Flux, ...): sigma = t in [0, 1] and x = x_t = (1 - t) x0 + t n
  (``CONST.noise_scaling``), so a fewstep sigma s is t = s / (1 + s) and fewstep's x is x_t (1 + s).

The denoised estimate x0 is the same in both. ``NODE_CLASS_MAPPINGS`` holds the two nodes; the custom-node
folder ``comfyui-fewstep/`` of the repository exports it. ``comfy`` is imported only when a node runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..sampling import nfe, sample
from ..schedules import Schedule, ScheduleError, load_schedule
from ..solvers import PLANNED
from .ranges import clip_to_range

FROM_SCHEDULE = "from schedule"
MATCH_RTOL = 1e-4  # ComfyUI's SIGMAS are float32: t near 1 maps back to s = t / (1 - t) within ~1e-5


def is_flow(model_sampling: Any) -> bool:
    """Whether ComfyUI's model sampling object is a flow model's (its class derives from ComfyUI's CONST)."""
    return any(c.__name__ == "CONST" for c in type(model_sampling).__mro__)


def flow_times(sigmas: torch.Tensor) -> torch.Tensor:
    """Flow time t = s / (1 + s) of EDM sigmas s (0 stays 0)."""
    return sigmas / (1 + sigmas)


def comfy_sigmas(schedule: Schedule, model_sampling: Any) -> torch.Tensor:
    """The ``SIGMAS`` tensor for ``schedule`` on the model whose sampling object this is (see the module doc)."""
    lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    if is_flow(model_sampling):
        t = flow_times(schedule.sigmas)
        if t[0] > hi * (1 + MATCH_RTOL):
            raise ScheduleError(f"flow time {float(t[0]):.6g} is above the model's sigma_max {hi:.6g}")
        return t.to(torch.float32)
    return clip_to_range(schedule, lo, hi).sigmas.to(torch.float32)


def load(path: str | Path, nfe_: int = 0) -> Schedule:
    """A global fewstep schedule from a schedule file, or from a ``fewstep tune`` folder's ``best/nfe-<nfe>.json``;
    ``nfe_`` 0 means the file's own (a folder needs one)."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        budgets = sorted(int(f.stem.split("-")[1]) for f in (path / "best").glob("nfe-*.json"))
        if not budgets:
            raise FileNotFoundError(f"{path} is neither a schedule file nor a fewstep tune folder (no "
                                    "best/nfe-<N>.json)")
        if nfe_ not in budgets:
            raise ValueError(f"{path} has tuned schedules for NFE {budgets}: set nfe to one of them (got {nfe_})")
        path = path / "best" / f"nfe-{nfe_}.json"
    sched = load_schedule(path)
    if sched.per_sample:
        raise ValueError(f"{path} is a per-sample policy: ComfyUI's SIGMAS are one list for the batch; use a "
                         "global schedule (fewstep tune's best/nfe-<N>.json)")
    if nfe_ and sched.solver is not None and nfe(sched) != nfe_:
        raise ValueError(f"{path} spends {nfe(sched)} network calls with {sched.solver}, not nfe={nfe_}")
    return sched


def _run_for(schedule: Schedule, sigmas: torch.Tensor) -> Schedule:
    """The part of ``schedule`` that ``sigmas`` (EDM, float32-rounded) are, with its per-step orders (a whole
    schedule, or a piece cut by SplitSigmas); sigmas from elsewhere run as given when there are no per-step options."""
    full, n = schedule.sigmas, len(sigmas)
    orders = schedule.solver_options.get("orders")
    for i in range(len(full) - n + 1):
        piece = full[i:i + n]
        if torch.allclose(piece, sigmas, rtol=MATCH_RTOL, atol=1e-7):
            options = {**schedule.solver_options, **({"orders": list(orders)[i:i + n - 1]} if orders else {})}
            return Schedule(piece, **{**schedule.metadata, "solver_options": options})
    if orders is not None:
        raise ValueError(f"these SIGMAS are not the schedule's ({full.tolist()}) nor a piece of it, and its solver "
                         "options are per step: connect the FewstepSigmas node of the same schedule")
    return Schedule(sigmas, **schedule.metadata)


def sample_fewstep(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                   callback: Callable | None = None, disable: bool | None = None, schedule: Schedule | None = None,
                   solver: str | None = None) -> torch.Tensor:
    """A ComfyUI sampler function (``comfy.samplers.KSAMPLER``): ``schedule``'s solver and per-step options on
    ``sigmas``, in fewstep's coordinates, the state in float64. ``disable`` (the progress bar) is not used."""
    extra_args = extra_args or {}
    flow = is_flow(model.inner_model.model_patcher.get_model_object("model_sampling"))
    s = sigmas.to(torch.float64).cpu()
    if flow and (s >= 1).any():
        raise ValueError("fewstep's solvers need a finite EDM sigma; these flow SIGMAS start at t = 1: connect "
                         "FewstepSigmas (its times stay below 1)")
    run = _run_for(schedule, s / (1 - s) if flow else s)

    def to_comfy(x_edm, sig):  # (x, sigma) as ComfyUI's model takes them
        sig = sig.to(x_edm.dtype).reshape(-1)
        return (x_edm / (1 + sig).reshape(-1, *[1] * (x.ndim - 1)), flow_times(sig)) if flow else (x_edm, sig)

    def denoiser(x_edm, sig):
        x_c, s_c = to_comfy(x_edm, sig)
        return model(x_c.to(x.dtype), s_c.to(x.dtype).expand(x.shape[0]), **extra_args)

    def report(info):
        callback({**info, "x": to_comfy(info["x"], info["sigma"])[0].to(x.dtype), "sigma_hat": info["sigma"]})

    x_edm = x.to(torch.float64) * (1 + float(run.sigma_max)) if flow else x.to(torch.float64)
    out = sample(denoiser, x_edm, run, solver or run.solver, callback=report if callback else None)
    return to_comfy(out, run.sigmas[-1:])[0].to(x.dtype)


# --------------------------------------------------------------------------------------------
# The nodes (ComfyUI's classic node API: INPUT_TYPES, RETURN_TYPES, FUNCTION, CATEGORY)

SCHEDULE_INPUT = ("STRING", {"default": "fewstep-out", "tooltip": "a fewstep schedule file (.json), or the folder "
                                                                  "of a fewstep tune run"})
NFE_INPUT = ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "network evaluations: which budget of a tune "
                                                                      "folder (0: the schedule file's own)"})


def _validate(schedule: str, nfe: int) -> bool | str:
    """ComfyUI's VALIDATE_INPUTS answer: True, or what is wrong with the schedule input."""
    try:
        load(schedule, nfe)
    except (OSError, ValueError) as e:
        return str(e)
    return True


class FewstepSigmas:
    """SIGMAS of a fewstep schedule for the connected model: EDM sigmas (eps / v models) or flow times t."""

    CATEGORY = "sampling/custom_sampling/schedulers"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "schedule": SCHEDULE_INPUT, "nfe": NFE_INPUT}}

    @classmethod
    def VALIDATE_INPUTS(cls, schedule, nfe):
        return _validate(schedule, nfe)

    def get_sigmas(self, model, schedule, nfe):
        return (comfy_sigmas(load(schedule, nfe), model.get_model_object("model_sampling")),)


class FewstepSampler:
    """The schedule's solver with its per-step options (Heun's first-order steps, ...), as a SAMPLER."""

    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"schedule": SCHEDULE_INPUT, "nfe": NFE_INPUT, "solver": ([FROM_SCHEDULE, *PLANNED],)}}

    @classmethod
    def VALIDATE_INPUTS(cls, schedule, nfe):
        return _validate(schedule, nfe)

    def get_sampler(self, schedule, nfe, solver):
        from comfy.samplers import KSAMPLER  # ComfyUI's own; there only when ComfyUI runs the node

        sched = load(schedule, nfe)
        return (KSAMPLER(sample_fewstep, extra_options={"schedule": sched,
                                                        "solver": None if solver == FROM_SCHEDULE else solver}),)


NODE_CLASS_MAPPINGS = {"FewstepSigmas": FewstepSigmas, "FewstepSampler": FewstepSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"FewstepSigmas": "fewstep schedule (sigmas)", "FewstepSampler": "fewstep sampler"}
