"""diffusers, both directions.

- ``from_diffusers(unet_or_pipeline, scheduler_config)``: a diffusers network + its scheduler config as a
  fewstep denoiser D(x, sigma) (VP: ``VPDiscreteDenoiser``; flow matching: ``FlowDenoiser``), with
  classifier-free guidance fixed at wrap time for conditional pipelines.
- ``FewstepScheduler``: a diffusers scheduler that runs a fewstep Schedule with a fewstep solver inside
  any pipeline: ``pipe.scheduler = FewstepScheduler.from_schedule(schedule, pipe.scheduler.config)``.
- ``to_diffusers(schedule, pipe_or_scheduler)``: the ``sigmas=`` / ``timesteps=`` that a pipeline's own
  scheduler accepts for a schedule, checked by running its ``set_timesteps`` on a copy.

Latents in a pipeline are in the network's own coordinates: x_vp = x / sqrt(1 + sigma^2) for VP models,
x_t = x / (1 + sigma) for flow models (see models/wrappers.py), as DDPM-style and flow-matching
schedulers keep them.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable

import torch
from diffusers import ConfigMixin, DDPMScheduler, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils import logging

from ..models.wrappers import PREDICTIONS, FlowDenoiser, VPDiscreteDenoiser
from ..sampling import sample
from ..schedules import Schedule, ScheduleError, as_schedule, flow_shift
from ..solvers import get_solver

logger = logging.get_logger(__name__)

# Schedulers whose config describes a DDPM-style beta schedule (alphas_cumprod), and flow-matching ones.
VP_SCHEDULERS = {
    "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LMSDiscreteScheduler",
    "PNDMScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LCMScheduler",
    "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler", "SASolverScheduler",
}
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler"}
FLOW_PREDICTION = "flow_prediction"


# --------------------------------------------------------------------------------------------
# Reading a scheduler config

def scheduler_config(config: Any) -> dict:
    """A scheduler's config as a plain dict with its ``_class_name`` (a config built in memory lacks it)."""
    if isinstance(config, ConfigMixin):
        return {**config.config, "_class_name": type(config).__name__}
    return dict(config or {})


def noise_model(config: Any, prediction_type: str | None = None) -> dict:
    """What a scheduler (or its config) says about the network: ``{'kind': 'vp', 'prediction', 'alphas_cumprod'}``
    or ``{'kind': 'flow', 'prediction': 'flow_prediction', 'num_train_timesteps'}``; ValueError if unmappable."""
    cfg = scheduler_config(config)
    cls = cfg.get("_class_name") or "scheduler config"
    betas = "beta_schedule" in cfg or "trained_betas" in cfg
    if cfg.get("kind") in ("vp", "flow"):  # a FewstepScheduler's own config
        kind = cfg["kind"]
    elif cls in FLOW_SCHEDULERS or cfg.get("use_flow_sigmas") or cfg.get("prediction_type") == FLOW_PREDICTION:
        kind = "flow"
    elif cls in VP_SCHEDULERS or (cls == "scheduler config" and betas):
        kind = "vp"
    elif cls == "scheduler config" and "shift" in cfg:  # FlowMatch* config built in memory (no _class_name)
        kind = "flow"
    else:
        raise ValueError(
            f"cannot map {cls} to a fewstep denoiser: fewstep reads DDPM-style configs (beta_schedule / "
            f"trained_betas -> alphas_cumprod; {', '.join(sorted(VP_SCHEDULERS))}) and flow-matching configs "
            f"({', '.join(sorted(FLOW_SCHEDULERS))})"
        )
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"{cls}: timestep_type={cfg['timestep_type']!r} is not supported (only 'discrete')")
    pred = prediction_type or cfg.get("prediction_type") or ("epsilon" if kind == "vp" else FLOW_PREDICTION)
    n = int(cfg.get("num_train_timesteps", 1000))
    if kind == "flow":
        if pred != FLOW_PREDICTION:
            raise ValueError(f"{cls} is a flow-matching config: the network predicts velocity "
                             f"(prediction_type {FLOW_PREDICTION!r}), not {pred!r}")
        if cfg.get("invert_sigmas"):
            raise ValueError(f"{cls}: invert_sigmas=True is not supported")
        return {"kind": "flow", "prediction": FLOW_PREDICTION, "num_train_timesteps": n}
    if pred not in PREDICTIONS:
        raise ValueError(f"{cls}: unknown prediction_type {pred!r}; fewstep maps {', '.join(PREDICTIONS)} "
                         f"(DDPM-style) and {FLOW_PREDICTION!r} (flow matching)")
    return {"kind": "vp", "prediction": pred, "alphas_cumprod": _alphas_cumprod(cfg, cls)}


def _alphas_cumprod(cfg: dict, cls: str) -> torch.Tensor:
    """alphas_cumprod from the config's betas, computed by diffusers' own DDPMScheduler (float32, as every
    diffusers scheduler computes them)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    try:
        ac = DDPMScheduler(**{k: cfg[k] for k in keys if cfg.get(k) is not None}).alphas_cumprod.clone()
    except NotImplementedError as e:
        raise ValueError(f"{cls}: cannot compute the noise schedule: {e}") from None
    if cfg.get("rescale_betas_zero_snr"):
        ac[-1] = 2 ** -24  # zero terminal SNR gives sigma = inf; diffusers' EulerDiscreteScheduler does the same
    return ac


def _effective_shift(cfg: dict, mu: float | None) -> float:
    """The SD3 / Flux time shift s in t = s u / (1 + (s - 1) u); Flux's dynamic shift is s = e^mu (or mu)."""
    if cfg.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError(f"{cfg.get('_class_name')} uses dynamic shifting: pass mu= (the value the pipeline "
                             "computes from the image size)")
        return math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else float(mu)
    return float(cfg.get("shift", cfg.get("flow_shift", 1.0)))


def flow_sigma_range(config: Any, mu: float | None = None) -> tuple[float, float]:
    """EDM sigmas at flow times shift(1/N) and shift(1 - 1/N): a flow model's usable range (t = 1 is sigma = inf)."""
    cfg = scheduler_config(config)
    n = int(cfg.get("num_train_timesteps", 1000))
    shift = 1.0 if cfg.get("use_dynamic_shifting") and mu is None else _effective_shift(cfg, mu)
    t = flow_shift(torch.tensor([1 / n, 1 - 1 / n], dtype=torch.float64), shift)
    s = t / (1 - t)
    return float(s[0]), float(s[1])


# --------------------------------------------------------------------------------------------
# diffusers network -> fewstep denoiser

def wrap(spec: dict, net: Callable, name: str = "diffusers") -> Callable:
    """The fewstep wrapper for ``spec`` (from ``noise_model``) around ``net(x_model, t) -> output``."""
    if spec["kind"] == "vp":
        return VPDiscreteDenoiser(net, spec["alphas_cumprod"], spec["prediction"], name=name)
    return FlowDenoiser(net, time_scale=spec["num_train_timesteps"], name=name)


def _expand(v: Any, b: int) -> Any:
    """Conditioning of batch 1 repeated to batch b (tensors, and tensors inside dicts such as SDXL's
    ``added_cond_kwargs``); anything else as is."""
    if isinstance(v, dict):
        return {k: _expand(w, b) for k, w in v.items()}
    return v.expand(b, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v


def _join(u: Any, c: Any) -> Any:
    """One [uncond, cond] batch from two conditioning structures of the same form."""
    if isinstance(c, dict):
        if set(c) != set(u):
            raise ValueError(f"cond and uncond need the same keys, got {sorted(c)} and {sorted(u)}")
        return {k: _join(u[k], c[k]) for k in c}
    return torch.cat([u, c]) if isinstance(c, torch.Tensor) else c


class DiffusersNet:
    """``net(x, t) -> output`` for a diffusers UNet / transformer, with conditioning fixed at wrap time.

    With ``uncond`` and ``guidance_scale`` != 1: classifier-free guidance, computed as the pipelines do:
    one batch [uncond, cond], then out_u + g (out_c - out_u) (Ho & Salimans 2022).
    Conditioning of batch 1 is repeated to the batch of x.
    """

    def __init__(self, net, cond: dict | None = None, uncond: dict | None = None, guidance_scale: float = 1.0):
        self.net, self.cond, self.uncond, self.guidance_scale = net, dict(cond or {}), uncond, float(guidance_scale)
        self.cfg = uncond is not None and self.guidance_scale != 1.0
        if self.cfg:
            _join(uncond, self.cond)  # same keys, or a clear error now
        self.dtype = getattr(net, "dtype", torch.float32)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = x.to(self.dtype)
        t = t.to(torch.float32)
        if not self.cfg:
            return self.net(x, timestep=t, **_expand(self.cond, b)).sample
        kw = _join(_expand(self.uncond, b), _expand(self.cond, b))
        out_u, out_c = self.net(torch.cat([x, x]), timestep=torch.cat([t, t]), **kw).sample.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)


def from_diffusers(model: Any, scheduler_config: Any = None, *, prediction_type: str | None = None,
                   prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                   guidance_scale: float = 1.0, cond: dict | None = None, uncond: dict | None = None,
                   mu: float | None = None, name: str | None = None) -> Callable:
    """A fewstep denoiser D(x, sigma) from a diffusers UNet / transformer and its scheduler (or its config),
    or from a pipeline.

    ``prediction_type`` overrides the config's. Conditioning: ``cond`` / ``uncond`` are keyword arguments
    for the network (e.g. ``{'encoder_hidden_states': emb}``); for a Stable-Diffusion-style pipeline,
    ``prompt`` / ``negative_prompt`` are encoded with ``pipe.encode_prompt``. ``guidance_scale`` > 1
    with ``uncond`` (or a prompt) gives classifier-free guidance. The result has ``.sigma_min``,
    ``.sigma_max``, ``.name`` and, when the network's config tells it, ``.shape``.
    """
    net = model
    if hasattr(model, "scheduler") and (hasattr(model, "unet") or hasattr(model, "transformer")):
        net = model.unet if getattr(model, "unet", None) is not None else model.transformer
        scheduler_config = scheduler_config if scheduler_config is not None else model.scheduler
        if prompt is not None:
            cond, uncond = _encode_prompt(model, prompt, negative_prompt, guidance_scale)
    elif prompt is not None:
        raise ValueError("prompt= needs a pipeline (with encode_prompt); for a bare network pass cond= / uncond=")
    if scheduler_config is None:
        raise ValueError("from_diffusers needs the scheduler config (e.g. pipe.scheduler.config) to know the noise "
                         "schedule and prediction_type")
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs the unconditional inputs: pass uncond= (or a pipeline and prompt=)")
    spec = noise_model(scheduler_config, prediction_type)
    name = name or type(net).__name__
    den = wrap(spec, DiffusersNet(net, cond, uncond, guidance_scale), name=name)
    if spec["kind"] == "flow":
        den.sigma_min, den.sigma_max = flow_sigma_range(scheduler_config, mu)
    shape = _sample_shape(getattr(net, "config", None))
    if shape is not None:
        den.shape = shape
    return den


def _encode_prompt(pipe, prompt, negative_prompt, guidance_scale) -> tuple[dict, dict | None]:
    if not hasattr(pipe, "encode_prompt"):
        raise ValueError(f"{type(pipe).__name__} has no encode_prompt: pass cond= / uncond= network arguments")
    out = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=guidance_scale != 1.0, negative_prompt=negative_prompt)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"{type(pipe).__name__}.encode_prompt does not return (prompt_embeds, negative_embeds) as "
                         "Stable Diffusion's does: pass cond= / uncond= network arguments instead")
    pos, neg = out
    return {"encoder_hidden_states": pos}, ({"encoder_hidden_states": neg} if neg is not None else None)


def _sample_shape(config) -> tuple[int, ...] | None:
    size, channels = getattr(config, "sample_size", None), getattr(config, "in_channels", None)
    if size is None or channels is None:
        return None
    return (int(channels), *((int(size),) * 2 if isinstance(size, int) else tuple(int(v) for v in size)))


def network_inputs(spec: dict, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_in, t): what the network wrapped for ``spec`` sees for the state x at sigma (x_vp or x_t, and its
    timestep), computed by the wrapper's own code."""
    seen = []

    def probe(x_in, t):
        seen.append((x_in, t))
        return torch.zeros_like(x_in)

    wrap(spec, probe)(x, sigma)
    return seen[0]


# --------------------------------------------------------------------------------------------
# fewstep schedule + solver -> a diffusers scheduler

class _Pause(Exception):
    """Raised by the replay denoiser at the first call whose network output is not known yet."""

    def __init__(self, x: torch.Tensor, sigma: torch.Tensor):
        self.x, self.sigma = x, sigma


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Runs a fewstep Schedule with a fewstep solver inside a diffusers pipeline.

    The pipeline calls the network once per entry of ``timesteps`` (one per solver call: a Heun step
    takes two). Each ``step`` re-runs ``fewstep.sample`` from the initial latents, feeding it the network
    outputs received so far, up to the next call it needs: the solver math lives only in fewstep.solvers,
    and the pipeline gets exactly what ``fewstep.sample`` on ``from_diffusers(...)`` computes.

    Latents are the network's input (x_vp for VP models, x_t for flow models), so ``init_noise_sigma``
    is 1 and ``scale_model_input`` is the identity, as with DDPM / flow-matching schedulers; this works in
    DDPMPipeline-style loops, which never call ``scale_model_input``, and in Stable Diffusion / SD3
    pipelines. The latents returned by the last ``step`` are the solver's final state (x0 when the
    schedule ends at 0). The solver keeps its own state: latents changed between steps raise an error.
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, sigmas: list[float] | None = None, solver: str = "euler", solver_options: dict | None = None,
                 kind: str = "vp", prediction_type: str = "epsilon", num_train_timesteps: int = 1000,
                 beta_start: float = 0.0001, beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: list[float] | None = None, rescale_betas_zero_snr: bool = False):
        if sigmas is None:
            raise ValueError("FewstepScheduler needs sigmas: build it with "
                             "FewstepScheduler.from_schedule(schedule, config)")
        self.schedule = Schedule(sigmas)
        get_solver(solver)
        self._spec = noise_model(self.config)
        if (solver_options or {}).get("afs") and self._spec["kind"] == "flow":
            raise ValueError("a schedule with the analytical first step (afs) runs in VP pipelines only: its first "
                             "network call is on the initial latents in VP coordinates, not a flow model's; make "
                             "the schedule with afs=False or run it with fewstep.sample")
        self._call_sigmas = self._dry_run()
        # the network's timestep at each call, for a float32 state (as pipelines run)
        self._timesteps = torch.cat([network_inputs(self._spec, torch.zeros(1, 1), s.to(torch.float32).reshape(1))[1]
                                     for s in self._call_sigmas]).to(torch.float32)
        self.init_noise_sigma = 1.0
        self.set_timesteps()

    @classmethod
    def from_schedule(cls, schedule: Any, config: Any, solver: str | None = None, **solver_options: Any):
        """A scheduler running ``schedule`` with ``solver`` (default: the schedule's) for the network that
        ``config`` (a diffusers scheduler config, e.g. ``pipe.scheduler.config``, or the scheduler) describes."""
        sched = as_schedule(schedule)
        if sched.per_sample:
            raise ValueError("a per-sample policy sets each sample's sigmas from its initial noise, which a diffusers "
                             "pipeline draws after fixing its timesteps: give FewstepScheduler a global Schedule "
                             "(fewstep tune's best/nfe-<N>.json)")
        solver = solver or sched.solver
        if solver is None:
            raise ValueError("no solver given and the schedule names none: pass solver=..., e.g. solver='dpmpp_2m'")
        spec = noise_model(config)
        cfg = scheduler_config(config)
        vp = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                  "rescale_betas_zero_snr") if cfg.get(k) is not None}
        if cfg.get("trained_betas") is not None:
            vp["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
        return cls(sigmas=sched.to_list(), solver=solver, solver_options={**sched.solver_options, **solver_options},
                   kind=spec["kind"], prediction_type=spec["prediction"], **vp)

    def _opts(self) -> dict:
        return dict(self.config.solver_options or {})

    def _dry_run(self) -> torch.Tensor:
        """The sigma of every network call the solver makes on this schedule (they do not depend on x)."""
        calls = []

        def record(x, sigma):
            calls.append(sigma[0])
            return torch.zeros_like(x)

        sample(record, torch.zeros(1, 1, dtype=torch.float64), self.schedule, self.config.solver, **self._opts())
        return torch.stack(calls)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, timesteps=None, mu=None, **kwargs):
        """Reset for a new run. The schedule is fixed at construction: ``num_inference_steps`` must be its
        number of steps (or of network calls); ``sigmas`` / ``timesteps`` / ``mu`` that pipelines pass by
        default are ignored."""
        calls = len(self._call_sigmas)
        if num_inference_steps is not None and num_inference_steps not in (self.schedule.steps, calls):
            raise ValueError(
                f"this FewstepScheduler runs a fixed {self.schedule.steps}-step schedule ({calls} network calls with "
                f"{self.config.solver}); call the pipeline with num_inference_steps={self.schedule.steps}"
            )
        if sigmas is not None or timesteps is not None:
            logger.warning("FewstepScheduler ignores the sigmas/timesteps passed to set_timesteps: "
                           "it runs its own schedule")
        self.num_inference_steps = calls
        self.timesteps = self._timesteps.to(device) if device is not None else self._timesteps.clone()
        self.sigmas = self.schedule.sigmas.to(torch.float32)
        self._x_init, self._outputs, self._returned = None, [], None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ValueError("FewstepScheduler runs its whole schedule: begin_index must be 0 (img2img-style partial "
                             "runs are not supported)")

    def _state_dtype(self, t: torch.Tensor) -> torch.dtype:
        return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32

    def _replay(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the solver with the outputs received so far: (next query state, its sigma), or (final state, None)."""
        outputs, spec, seen = self._outputs, self._spec, []

        def replay(x, sigma):
            k = len(seen)
            if k == len(outputs):
                raise _Pause(x, sigma)
            seen.append(k)
            return wrap(spec, lambda x_in, t: outputs[k])(x, sigma)

        try:
            x = sample(replay, self._x_init, self.schedule, self.config.solver, **self._opts())
        except _Pause as p:
            return p.x, p.sigma
        return x, None

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
             **kwargs: Any):
        """Take the network output for the current call; return the latents for the next call (or the result)."""
        j = len(self._outputs)
        if j >= len(self._call_sigmas):
            raise ValueError(f"step() called {j + 1} times for {len(self._call_sigmas)} network calls: call "
                             "set_timesteps before a new run")
        dtype = self._state_dtype(sample)
        if j == 0:  # the initial latents: the state at the schedule's first sigma (afs: one before the first call)
            sigma0 = self.schedule.sigmas[0].to(dtype).expand(sample.shape[0])
            scale = network_inputs(self._spec, torch.ones_like(sample, dtype=dtype), sigma0)[0]
            self._x_init = sample.to(dtype) / scale
        elif not torch.allclose(sample.to(self._returned.dtype), self._returned, rtol=1e-3, atol=1e-5):
            raise ValueError("the latents were changed between steps; FewstepScheduler's solver keeps its own state "
                             "and cannot follow (inpainting-style pipelines are not supported)")
        self._outputs.append(model_output.to(dtype))
        x, sigma = self._replay()
        out = x if sigma is None else network_inputs(self._spec, x, sigma)[0]
        self._returned = out.to(sample.dtype)
        if not return_dict:
            return (self._returned,)
        return SchedulerOutput(prev_sample=self._returned)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# --------------------------------------------------------------------------------------------
# fewstep schedule -> a pipeline's own scheduler (sigmas= / timesteps=)

def to_diffusers(schedule: Any, target: Any, mu: float | None = None, rtol: float = 0.05) -> dict:
    """The ``sigmas=`` or ``timesteps=`` to pass to ``target`` (a pipeline or scheduler) for ``schedule``.

    Flow-matching schedulers (SD3 / Flux) shift the sigmas they are given; the sigmas returned here are
    pre-shifted by the inverse shift, so that after the scheduler's shift they are the schedule's
    (``mu``: Flux's dynamic shift, as the pipeline computes it). Schedulers that take only integer
    ``timesteps=`` get the nearest ones; if that moves a sigma by more than ``rtol`` (relative) it is an
    error. Every answer is checked by running ``set_timesteps`` on a copy of the scheduler.
    """
    sched = as_schedule(schedule)
    scheduler = getattr(target, "scheduler", target)
    sname = type(scheduler).__name__
    hint = ("run the schedule with "
            "pipe.scheduler = fewstep.FewstepScheduler.from_schedule(schedule, pipe.scheduler.config)")
    accepts = {k for k in ("sigmas", "timesteps") if k in inspect.signature(scheduler.set_timesteps).parameters}
    if target is not scheduler:
        accepts &= set(inspect.signature(target.__call__).parameters)
        if not accepts:
            raise ValueError(f"{type(target).__name__} passes neither sigmas= nor timesteps= to its scheduler; {hint}")
    if isinstance(scheduler, FewstepScheduler):
        raise ValueError(f"the target already uses a FewstepScheduler; {hint}")
    cfg = scheduler_config(scheduler)
    spec = noise_model(cfg)
    if spec["kind"] == "flow":
        if "sigmas" not in accepts or (sname not in FLOW_SCHEDULERS and not cfg.get("use_flow_sigmas")):
            raise ValueError(f"{sname} takes no custom flow sigmas; {hint}")
        if cfg.get("shift_terminal") or any(cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                                                 "use_beta_sigmas")):
            raise ValueError(f"{sname} rewrites any sigmas it is given (shift_terminal / karras / exponential / beta "
                             f"sigmas in its config); {hint}")
        if sched.sigma_final != 0:
            raise ScheduleError(f"{sname} always ends at sigma 0; the schedule ends at {sched.sigma_final:.4g}")
        t = sched.sigmas[:-1] / (1 + sched.sigmas[:-1])
        kwargs = {"sigmas": flow_shift(t, 1 / _effective_shift(cfg, mu)).tolist()}  # the inverse of shift s is 1/s
        want, tol = t, 1e-5
    else:
        den = VPDiscreteDenoiser(None, spec["alphas_cumprod"])
        t = den.sigma_to_t(sched.sigmas[sched.sigmas > 0])  # raises for sigmas outside the trained range
        if "sigmas" in accepts and "use_flow_sigmas" not in cfg:  # UniPC-style: sigmas= only for flow models
            kwargs, tol = {"sigmas": sched.to_list()}, 1e-5
        elif "timesteps" in accepts:
            if sched.sigma_final != 0:
                raise ScheduleError(f"with timesteps=, {sname} ends at sigma 0; the schedule ends at "
                                    f"{sched.sigma_final:.4g}")
            ti = t.round().long()
            if (ti[1:] >= ti[:-1]).any():
                raise ScheduleError(f"the schedule's sigmas round to repeated integer timesteps {ti.tolist()} "
                                    f"for {sname}; {hint}")
            kwargs, tol = {"timesteps": ti.tolist()}, rtol
        else:
            raise ValueError(f"{sname} takes neither sigmas= nor timesteps=; {hint}")
        want = sched.sigmas
    got = _resulting_sigmas(scheduler, kwargs, spec, cfg, mu)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=1e-6):
        raise ScheduleError(f"{sname} turned the schedule into sigmas {got.tolist()} instead of {want.tolist()} "
                            f"(tolerance {tol:g}); {hint}")
    return kwargs


def _resulting_sigmas(scheduler, kwargs: dict, spec: dict, cfg: dict, mu) -> torch.Tensor:
    """Run set_timesteps on a copy; the distinct sigmas it will use (flow: times t, without the final 0)."""
    probe = copy.deepcopy(scheduler)
    extra = {"mu": mu} if cfg.get("use_dynamic_shifting") else {}
    probe.set_timesteps(**kwargs, **extra)
    if getattr(probe, "sigmas", None) is not None:
        s = torch.as_tensor(probe.sigmas, dtype=torch.float64).flatten()
    else:  # DDPM-style schedulers keep only timesteps; the last step goes to sigma 0
        ac = spec["alphas_cumprod"].to(torch.float64)[probe.timesteps.long()]
        s = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1, dtype=torch.float64)])
    s = torch.unique_consecutive(s)  # Heun-style schedulers repeat every inner sigma
    return s[:-1] if spec["kind"] == "flow" else s
