"""diffusers, both directions.

- ``from_diffusers(unet_or_pipeline, scheduler_config)``: a diffusers network + its scheduler config as a
  fewstep denoiser D(x, sigma) (VP: ``VPDiscreteDenoiser``; flow matching: ``FlowDenoiser``), with
  classifier-free guidance fixed at wrap time for conditional pipelines.
- ``FewstepScheduler``: a diffusers scheduler that runs a fewstep Schedule with a fewstep solver inside
  any pipeline: ``pipe.scheduler = FewstepScheduler.from_schedule(schedule, pipe.scheduler.config)``, or a
  whole tune run (``from_tune``), or built-in sigmas (``from_config``); img2img, inpainting and callbacks
  that edit latents included. What each pipeline family feeds its network is in ``pipelines.py``.
- ``to_diffusers(schedule, pipe_or_scheduler)``: the ``sigmas=`` / ``timesteps=`` that a pipeline's own
  scheduler accepts for a schedule, checked by running its ``set_timesteps`` on a copy.

Latents in a pipeline are in the network's own coordinates: x_vp = x / sqrt(1 + sigma^2) for VP models,
x_t = x / (1 + sigma) for flow models (see models/wrappers.py), as DDPM-style and flow-matching
schedulers keep them.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import ConfigMixin, DDPMScheduler, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils import logging

from ..models.wrappers import PREDICTIONS, Conditional, FlowDenoiser, VPDiscreteDenoiser
from ..sampling import nfe, sample
from ..schedules import BUILTIN_SCHEDULES, Schedule, ScheduleError, ScheduleLike, as_schedule, builtin, flow_shift
from ..solvers import get_solver
from .pipelines import Conditioning, encode, encode_prompts, flow_time_scale, network, per_prompt
from .ranges import clip_to_range

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
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # the shipped diffusers models (zoo.py)


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
    try:
        ac = DDPMScheduler(**_beta_keys(cfg)).alphas_cumprod.clone()
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
    """The fewstep wrapper for ``spec`` (from ``noise_model``) around ``net(x_model, t) -> output``; a flow network
    takes t * ``spec['time_scale']`` (default: the scheduler's timesteps, t * num_train_timesteps)."""
    if spec["kind"] == "vp":
        return VPDiscreteDenoiser(net, spec["alphas_cumprod"], spec["prediction"], name=name)
    return FlowDenoiser(net, time_scale=spec.get("time_scale", spec["num_train_timesteps"]), name=name)


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
    """``net(x, t, cond=None) -> output`` for a diffusers UNet / transformer, with conditioning fixed at wrap time
    and, as ``cond``, per-sample inputs (a dict of network arguments, one row per sample) on top of it.

    With ``uncond`` and ``guidance_scale`` != 1: classifier-free guidance, out_u + g (out_c - out_u)
    (Ho & Salimans 2022), computed as the pipelines do: one batch [uncond, cond] (``batched``, SD / SD3), or
    two calls (Flux's true CFG, whose image and text ids are not batched). Conditioning of batch 1 is
    repeated to the batch of x.
    """

    def __init__(self, net, cond: dict | None = None, uncond: dict | None = None, guidance_scale: float = 1.0,
                 batched: bool = True, rows: tuple[str, ...] = ()):
        self.net, self.cond, self.uncond, self.guidance_scale = net, dict(cond or {}), uncond, float(guidance_scale)
        self.cfg, self.batched = uncond is not None and self.guidance_scale != 1.0, batched
        if self.cfg and batched:  # same keys, or a clear error now
            _join(uncond, {**self.cond, **{k: uncond[k] for k in rows if k in uncond}})
        self.dtype = getattr(net, "dtype", torch.float32)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        b = x.shape[0]
        x = x.to(self.dtype)
        t = t.to(torch.float32)
        if cond is not None and not isinstance(cond, dict):
            raise ValueError("cond for a diffusers network is a dict of its keyword arguments, one row per sample "
                             f"(e.g. fewstep.encode_prompts(pipe, prompts)), got {type(cond).__name__}")
        kw_c = {**_expand(self.cond, b), **(cond or {})}
        if not self.cfg:
            return self.net(x, timestep=t, **kw_c).sample
        if not self.batched:
            out_c = self.net(x, timestep=t, **kw_c).sample
            out_u = self.net(x, timestep=t, **_expand(self.uncond, b)).sample
        else:
            kw = _join(_expand(self.uncond, b), kw_c)
            out_u, out_c = self.net(torch.cat([x, x]), timestep=torch.cat([t, t]), **kw).sample.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)


def from_diffusers(model: Any, scheduler_config: Any = None, *, prediction_type: str | None = None,
                   prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                   guidance_scale: float | None = None, cond: dict | None = None, uncond: dict | None = None,
                   mu: float | None = None, time_scale: float | None = None, name: str | None = None,
                   per_sample: tuple[str, ...] = (), **pipeline_kwargs: Any) -> Callable:
    """A fewstep denoiser D(x, sigma) from a diffusers UNet / transformer and its scheduler (or its config),
    or from a pipeline.

    ``prediction_type`` overrides the config's. Conditioning: ``cond`` / ``uncond`` are keyword arguments
    for the network (e.g. ``{'encoder_hidden_states': emb}``), ``guidance_scale`` > 1 with ``uncond`` gives
    classifier-free guidance. For a Stable Diffusion, SD3 or Flux pipeline, ``prompt`` / ``negative_prompt``
    / ``guidance_scale`` and ``pipeline_kwargs`` (the pipeline's own arguments: ``height``, ``width``,
    ``prompt_2``, ``max_sequence_length``, ``prompt_embeds``, Flux's ``true_cfg_scale``, ...) mean what they
    mean in ``pipe(...)``: for Flux, ``guidance_scale`` is the distilled guidance the transformer takes
    (default: the pipeline's) and ``true_cfg_scale`` the classifier-free one. A flow network takes its
    timestep in the unit its pipeline uses (SD3: the scheduler's timesteps, Flux: t); ``time_scale``
    overrides it. The result has ``.sigma_min``, ``.sigma_max``, ``.name``, ``.guidance`` and, when known,
    ``.shape``. A text pipeline without ``prompt=`` gives a conditional denoiser D(x, sigma, cond): ``cond`` holds
    each sample's prompt inputs (rows of ``encode_prompts(pipe, prompts)``), the negative prompt (default the
    empty one) is encoded now for the guidance. For a bare network, ``per_sample`` names the network arguments
    given at call time as ``cond`` rows (a class-conditional UNet: ``("class_labels",)``, its null label in
    ``uncond``): the denoiser is then conditional too.
    """
    net, conditioning = model, None
    if hasattr(model, "scheduler") and (hasattr(model, "unet") or hasattr(model, "transformer")):
        net = network(model)
        scheduler_config = scheduler_config if scheduler_config is not None else model.scheduler
        if per_sample:
            raise ValueError("per_sample= is for a bare network: a pipeline wrapped without prompt= takes its prompts "
                             "per sample (cond= rows of encode_prompts)")
        if (cond is not None or uncond is not None) and (prompt is not None or pipeline_kwargs):
            raise ValueError("pass either prompt= (and the pipeline's arguments) or cond= / uncond=, not both")
        if cond is None and uncond is None and not hasattr(model, "encode_prompt"):
            if prompt is not None or pipeline_kwargs:
                raise ValueError(f"{type(model).__name__} has no encode_prompt: pass cond= / uncond= network arguments")
        elif prompt is not None or "prompt_embeds" in pipeline_kwargs:
            conditioning = encode(model, net, prompt, negative_prompt, guidance_scale, pipeline_kwargs)
        elif cond is None and uncond is None:
            conditioning = per_prompt(model, net, negative_prompt, guidance_scale, pipeline_kwargs)
    elif prompt is not None or pipeline_kwargs:
        raise ValueError("prompt= and pipeline arguments need a pipeline (with encode_prompt); for a bare network "
                         f"pass cond= / uncond= (got {sorted(pipeline_kwargs) or 'prompt='})")
    if scheduler_config is None:
        raise ValueError("from_diffusers needs the scheduler config (e.g. pipe.scheduler.config) to know the noise "
                         "schedule and prediction_type")
    if set(per_sample) & set(cond or {}):
        raise ValueError(f"{sorted(set(per_sample) & set(cond))} are given per sample (per_sample=) and fixed (cond=)")
    if conditioning is None:
        conditioning = Conditioning(dict(cond or {}), uncond, 1.0 if guidance_scale is None else guidance_scale,
                                    rows=tuple(per_sample))
        if conditioning.guidance_scale != 1.0 and uncond is None:
            raise ValueError("guidance_scale != 1 needs the unconditional inputs: pass uncond= (or a pipeline and "
                             "prompt=)")
    return _denoiser(net, scheduler_config, prediction_type, conditioning, mu, time_scale, name)


def _denoiser(net, config, prediction_type, c: Conditioning, mu, time_scale, name) -> Callable:
    spec = noise_model(config, prediction_type)
    if spec["kind"] == "flow":
        spec["time_scale"] = flow_time_scale(net, spec["num_train_timesteps"], time_scale)
    elif time_scale is not None:
        raise ValueError("time_scale= is for flow-matching networks; a DDPM-style network takes integer timesteps")
    guided = c.guidance_scale if c.uncond is not None else 1.0
    default = type(net).__name__ if guided == 1.0 else f"{type(net).__name__}@w{guided:g}"
    den = wrap(spec, DiffusersNet(net, c.cond, c.uncond, c.guidance_scale, c.batched, c.rows), name=name or default)
    den.guidance = guided
    if spec["kind"] == "flow":
        cfg = scheduler_config(config)
        if mu is None and c.image_seq_len is not None and cfg.get("use_dynamic_shifting"):
            mu = flux_mu(cfg, c.image_seq_len)
        den.sigma_min, den.sigma_max = flow_sigma_range(cfg, mu)
    shape = c.shape if c.shape is not None else _sample_shape(getattr(net, "config", None))
    if shape is not None:
        den.shape = shape
    return Conditional(den) if c.rows else den


def flux_mu(cfg: dict, image_seq_len: int) -> float:
    """Flux's dynamic shift for an image of ``image_seq_len`` packed tokens: linear in the length between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as FluxPipeline's calculate_shift."""
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    return base + (top - base) * (image_seq_len - base_len) / (max_len - base_len)


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


def _step_starts(sched: Schedule) -> list[int]:
    """The index of each step's first network call (a Heun step takes two calls, a step to 0 one)."""
    spec, orders = get_solver(sched.solver), sched.solver_options.get("orders")
    starts, calls = [], 0
    for i in range(sched.steps):
        starts.append(calls)
        last = sched.final_zero and i == sched.steps - 1
        calls += spec.step_calls(None if orders is None else orders[i], to_zero=last)
    return starts


def _tail(sched: Schedule, step: int) -> Schedule:
    """The schedule from step ``step`` on (img2img / inpainting at strength < 1), its per-step orders with it."""
    if step == 0:
        return sched
    options = sched.solver_options
    if "orders" in options:
        options["orders"] = list(options["orders"])[step:]
    return Schedule(sched.sigmas[step:], **{**sched.metadata, "solver_options": options})


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Runs a fewstep Schedule with a fewstep solver inside a diffusers pipeline.

    Three ways to make one: ``from_schedule(schedule, config)`` (one schedule: call the pipeline with
    ``num_inference_steps`` = its steps, or its network calls), ``from_tune(folder)`` (the best schedule of
    each budget of a ``fewstep tune`` run: ``num_inference_steps`` = the NFE, ``budgets`` lists them), and
    ``from_config(pipe.scheduler.config)`` (no schedule: ``method`` sigmas over the model's trained range for
    whatever ``num_inference_steps`` the pipeline asks, with ``solver``; default Karras / flow-uniform with the
    config's shift, DPM-Solver++(2M)).

    The pipeline calls the network once per entry of ``timesteps`` (one per solver call: a Heun step takes
    two). Each ``step`` re-runs ``fewstep.sample`` from the initial latents, feeding it the network outputs
    received so far, up to the next call it needs: the solver math lives only in fewstep.solvers, and the
    pipeline gets exactly what ``fewstep.sample`` on ``from_diffusers(...)`` computes (the solver work grows
    with the square of the number of calls: nothing next to the network at the few to 50 steps it is for).
    Latents the pipeline changed between steps (a ``callback_on_step_end``, inpainting's mask) are the solver's state from then on,
    its history of network outputs kept, as diffusers' multistep schedulers do (UniPC's corrector recomputes
    the state from the previous one, as diffusers' UniPC does). ``set_begin_index`` / ``add_noise`` /
    ``scale_noise`` run the tail of the schedule, as img2img and inpainting pipelines ask.

    Latents are the network's input (x_vp for VP models, x_t for flow models), so ``init_noise_sigma`` is 1
    and ``scale_model_input`` is the identity, as with DDPM / flow-matching schedulers, but at the first call of
    a schedule whose analytical first step (afs) does not land on the initial latents (a learned solver's first
    step, a PAS correction of it): there it gives the first call's input, kappa times the latents
    (``_dry_run``), so a pipeline must call it (Stable Diffusion's pipelines do; one that does not, as
    DDPMPipeline, gets a ValueError at the first ``step``, before any latents come back). Pure noise n as the
    first latents is x = n sqrt(1 + sigma_max^2) (VP), x = n (1 + sigma_max) (flow). Euler's 'linspace' and
    'trailing' spacings start from x = n sigma_max instead (2.3e-3 relative apart at sigma_max = 14.6).
    The solver's state is float64 whatever the pipeline's dtype; the latents handed back are in its dtype.
    """

    _compatibles = sorted(VP_SCHEDULERS | FLOW_SCHEDULERS)
    order = 1

    @register_to_config
    def __init__(self, sigmas: list[float] | None = None, solver: str = "dpmpp_2m", solver_options: dict | None = None,
                 metadata: dict | None = None, schedules: dict | None = None, method: str | None = None,
                 kind: str = "vp", prediction_type: str = "epsilon", num_train_timesteps: int = 1000,
                 beta_start: float = 0.0001, beta_end: float = 0.02, beta_schedule: str = "linear",
                 trained_betas: list[float] | None = None, rescale_betas_zero_snr: bool = False, shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, time_shift_type: str = "exponential"):
        if sigmas is not None and schedules is not None:
            raise ValueError("FewstepScheduler takes sigmas= (one schedule) or schedules= (one per budget), not both")
        if isinstance(sigmas, ScheduleLike):  # a Schedule or a policy, not its numbers
            raise ValueError("FewstepScheduler's sigmas= are numbers; for a fewstep schedule use "
                             "FewstepScheduler.from_schedule(schedule, pipe.scheduler.config)")
        get_solver(solver)
        if method is not None and method not in BUILTIN_SCHEDULES:
            raise ValueError(f"unknown method {method!r}; known: {sorted(BUILTIN_SCHEDULES)}")
        self._spec = noise_model(self.config)
        if kind == "vp":
            self.alphas_cumprod = self._spec["alphas_cumprod"]
            self.betas = DDPMScheduler(**_beta_keys(self.config)).betas
            vp = VPDiscreteDenoiser(None, self.alphas_cumprod)
            self.sigma_min, self.sigma_max = vp.sigma_min, vp.sigma_max
        else:
            self.sigma_min, self.sigma_max = flow_sigma_range(self.config)
        self._table = self._read_table()
        self.init_noise_sigma = 1.0
        self.timesteps, self._begin_index, self._step_index = None, None, None
        self._kappa, self._scaled = 1.0, False
        if sigmas is not None:
            self.set_timesteps()

    def _read_table(self) -> dict | None:
        """{None: the schedule} (sigmas=), {nfe: schedule} (schedules=), or None (no schedule: built per call)."""
        cfg = self.config
        if cfg.sigmas is not None:
            sched = Schedule(cfg.sigmas, **{**(cfg.metadata or {}), "solver": cfg.solver,
                                            "solver_options": dict(cfg.solver_options or {})})
            return {None: sched}
        if cfg.schedules is not None:
            return {int(k): Schedule.from_dict(v, f"schedules[{k}]") for k, v in cfg.schedules.items()}
        return None

    @property
    def budgets(self) -> list[int] | None:
        """The NFEs this scheduler has schedules for (None: any number of steps)."""
        if self._table is None:
            return None
        return sorted(nfe(s) for s in self._table.values())

    @classmethod
    def from_schedule(cls, schedule: Any, config: Any, solver: str | None = None, **solver_options: Any):
        """A scheduler running ``schedule`` with ``solver`` (default: the schedule's) for the network that
        ``config`` (a diffusers scheduler config, e.g. ``pipe.scheduler.config``, or the scheduler) describes.
        Sigmas beyond the model's trained range by rounding are clipped onto it (``clipped_to_range``)."""
        sched = as_schedule(schedule)
        if sched.per_sample:
            raise ValueError("a per-sample policy sets each sample's sigmas from its initial noise, which a diffusers "
                             "pipeline draws after fixing its timesteps: give FewstepScheduler a global Schedule "
                             "(fewstep tune's best/nfe-<N>.json)")
        solver = solver or sched.solver
        if solver is None:
            raise ValueError("no solver given and the schedule names none: pass solver=..., e.g. solver='dpmpp_2m'")
        kwargs = _model_keys(config)
        sched = _fit(sched, kwargs)
        meta = {k: v for k, v in sched.metadata.items() if k not in ("solver", "solver_options")}
        return cls(sigmas=sched.to_list(), solver=solver, solver_options={**sched.solver_options, **solver_options},
                   metadata=meta, **kwargs)

    @classmethod
    def from_tune(cls, folder: str | Path, config: Any = None):
        """A scheduler holding the best schedule of every budget of a ``fewstep tune`` run (``best/nfe-<N>.json``);
        the pipeline's ``num_inference_steps`` picks one by its NFE. ``config``: the pipeline's scheduler config
        (default: the shipped model the run was made on, read from its ``results.json``)."""
        folder = Path(folder)
        files = sorted((folder / "best").glob("nfe-*.json"))
        if not files:
            raise FileNotFoundError(f"no best/nfe-<N>.json in {folder}: run `fewstep tune -o {folder}` first")
        config = config if config is not None else _tuned_model_config(folder)
        kwargs = _model_keys(config)
        schedules = {str(nfe(s)): _fit(s, kwargs).to_dict() for s in map(Schedule.load, files)}
        return cls(schedules=schedules, **kwargs)

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """ConfigMixin.from_config; another scheduler's config (Euler, FlowMatchEuler, ...) gives a FewstepScheduler
        for the same network, with no schedule of its own (see the class docstring)."""
        cfg = scheduler_config(config)
        if cfg.get("_class_name") != cls.__name__:
            kwargs = {**_model_keys(cfg), **kwargs}
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _select(self, n: int | None, mu: float | None) -> tuple[Schedule, int]:
        """The schedule for ``num_inference_steps`` = n, and ``order``: timesteps per unit of n (img2img pipelines
        skip ``t_start * order`` of them)."""
        table = self._table
        if table is None:
            if n is None:
                raise ValueError("this FewstepScheduler has no schedule of its own: call "
                                 "set_timesteps(num_inference_steps)")
            sched = self._builtin(int(n), mu)
            return sched, get_solver(sched.solver).calls_per_step
        if None in table:
            sched = table[None]
            calls = nfe(sched)
            if n is None or n == sched.steps:
                return sched, get_solver(sched.solver).calls_per_step
            if n == calls:
                return sched, 1
            raise ValueError(f"this FewstepScheduler runs a fixed {sched.steps}-step schedule ({calls} network calls "
                             f"with {sched.solver}); call the pipeline with num_inference_steps={sched.steps}")
        by_nfe = {nfe(s): s for s in table.values()}
        if n not in by_nfe:
            raise ValueError(f"this FewstepScheduler holds tuned schedules for NFE {self.budgets}: call the pipeline "
                             f"with num_inference_steps one of them (got {n})")
        return by_nfe[n], 1

    def _builtin(self, n: int, mu: float | None) -> Schedule:
        """``method`` sigmas over the trained range (flow: uniform in the unshifted time, then the config's shift)."""
        cfg = self.config
        if cfg.kind == "vp":
            sched = builtin(cfg.method or "karras", n, self.sigma_min, self.sigma_max)
        else:
            shift = _effective_shift(dict(cfg), mu)
            lo, hi = flow_sigma_range(cfg, mu)
            extra = {"shift": shift} if (cfg.method or "flow_uniform") == "flow_uniform" else {}
            sched = builtin(cfg.method or "flow_uniform", n, lo, hi, **extra)
        return sched.with_metadata(solver=cfg.solver, solver_options=dict(cfg.solver_options or {}))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, timesteps=None, mu: float | None = None, **kwargs):
        """Pick the schedule for ``num_inference_steps`` and reset for a new run. ``sigmas`` / ``timesteps`` that
        pipelines pass by default (Flux always does) are not run, only counted when ``num_inference_steps`` is
        not given; ``mu`` (Flux's resolution shift) shapes the built-in schedule of a scheduler without one."""
        given = sigmas if sigmas is not None else timesteps
        if num_inference_steps is None and given is not None:
            num_inference_steps = len(given)
        sched, self.order = self._select(num_inference_steps, mu)
        if sched.solver_options.get("afs") and self._spec["kind"] == "flow":
            raise ValueError("a schedule with the analytical first step (afs) runs in VP pipelines only: its first "
                             "network call is on the initial latents in VP coordinates, not a flow model's; make "
                             "the schedule with afs=False or run it with fewstep.sample")
        self.schedule, self._starts = sched, _step_starts(sched)
        self._call_sigmas, self._kappa = self._dry_run(sched)
        self._scaled = False
        # the network's timestep at each call, for a float32 state (as pipelines run)
        ts = torch.cat([network_inputs(self._spec, torch.zeros(1, 1), s.to(torch.float32).reshape(1))[1]
                        for s in self._call_sigmas]).to(torch.float32)
        self.timesteps = ts.to(device) if device is not None else ts
        self.sigmas = sched.sigmas.to(torch.float32)
        self.num_inference_steps = len(ts)
        self._begin_index = self._step_index = None

    def _dry_run(self, sched: Schedule) -> tuple[torch.Tensor, float]:
        """The sigma of every network call the solver makes on this schedule (they do not depend on x), and kappa:
        the first call's input over the initial latents. That is 1 (the call is on them) but for a schedule with the
        analytical first step (afs), whose first step makes x_1 from x alone, linearly (``solvers.afs_denoised``):
        every built-in solver's lands on the Gaussian flow, whose input is the latents themselves, a learned one's
        (or a PAS-corrected one's) on kappa times them."""
        calls, inputs = [], []

        def record(x, sigma):
            calls.append(sigma[0])
            inputs.append(network_inputs(self._spec, x, sigma)[0].flatten()[0])
            return torch.zeros_like(x)

        ones = torch.ones(1, 1, dtype=torch.float64)
        sample(record, ones / network_inputs(self._spec, ones, sched.sigmas[:1])[0], sched)  # latents 1 at sigma_max
        kappa = float(inputs[0])
        return torch.stack(calls), 1.0 if abs(kappa - 1) < 1e-12 else kappa

    def _check_ready(self) -> None:
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_inference_steps) first")

    @property
    def begin_index(self) -> int | None:
        """The index in ``timesteps`` of the run's first network call (img2img: the first one not skipped)."""
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        """The index in ``timesteps`` of the next network call (None before the first ``step``)."""
        return self._step_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at ``timesteps[begin_index]``, which must be a step's first call; the schedule's steps
        before it are skipped (img2img / inpainting at strength < 1 call this with ``t_start * order``)."""
        self._check_ready()
        self._step_start(begin_index)
        self._begin_index = begin_index

    def _step_start(self, index: int) -> int:
        """``index`` if a step's first call is there, else a ValueError saying where the steps start."""
        if index not in self._starts:
            raise ValueError(f"timesteps[{index}] is not the first network call of a step of this "
                             f"{self.schedule.solver} schedule (steps start at calls {self._starts}): a pipeline can "
                             "begin a run (img2img, inpainting) only there; Heun schedules whose steps all take two "
                             "calls (odd NFE) and one-call solvers start at any step")
        return index

    def _index_for_timestep(self, timestep: Any) -> int | None:
        """The call whose timestep this is (a step's first call where a Heun schedule repeats one), or None."""
        t = torch.as_tensor(timestep, dtype=torch.float32).to(self.timesteps.device)
        hits = torch.isclose(self.timesteps, t, rtol=1e-6, atol=1e-6).nonzero().flatten().tolist()
        starts = [h for h in hits if h in self._starts]
        return (starts or hits or [None])[0]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The latents as the network's input: themselves, but at the first call of a schedule whose first step
        does not land on them (``_dry_run``)."""
        if self._step_index is not None or self._kappa == 1.0:
            return sample
        self._scaled = True
        return sample * self._kappa

    def _noise_sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The sigma to noise to, as diffusers' schedulers choose it: the next call's once the run has begun
        (inpainting), the begin index's before it (img2img), else each timestep's own."""
        self._check_ready()
        if self._step_index is not None:
            idx = [self._step_index]
        elif self._begin_index is not None:
            idx = [self._begin_index]
        else:
            idx = [self._index_for_timestep(t) for t in torch.as_tensor(timesteps).flatten()]
            if None in idx:
                raise ValueError(f"timesteps {torch.as_tensor(timesteps).flatten().tolist()} are not all among this "
                                 f"scheduler's timesteps {self.timesteps.tolist()}")
        if idx[0] >= len(self._call_sigmas):
            raise ValueError("add_noise after the last network call: there is no next noise level")
        return self._call_sigmas[idx]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 noised to a call's sigma, in the network's coordinates: alpha x0 + s n (VP), (1 - t) x0 + t n (flow)."""
        dtype = self._state_dtype(original_samples)
        sigma = self._noise_sigmas(timesteps).to(original_samples.device, dtype)
        sigma = sigma.expand(original_samples.shape[0]) if sigma.numel() == 1 else sigma
        x = original_samples.to(dtype) + sigma.reshape(-1, *[1] * (noise.ndim - 1)) * noise.to(dtype)
        return network_inputs(self._spec, x, sigma)[0].to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``add_noise`` with the argument order of flow-matching schedulers (SD3 / Flux img2img and inpainting)."""
        return self.add_noise(sample, noise, timestep)

    @staticmethod
    def _state_dtype(t: torch.Tensor) -> torch.dtype:
        """float64 for the solver's state (a float32 Heun step from sigma 3000 loses 3e-3 to cancellation), except
        on devices without it (MPS)."""
        return torch.float32 if t.device.type == "mps" else torch.float64

    def _begin(self) -> None:
        """The first step of a run: at the begin index (img2img, inpainting), else at the first call."""
        start = self._begin_index or 0
        if start and self.schedule.solver_options.get("afs"):
            raise ValueError("a schedule with the analytical first step (afs) runs from pure noise only; img2img and "
                             "inpainting at strength < 1 start mid-schedule: make the schedule with afs=False")
        step = self._starts.index(self._step_start(start))
        self._step_index, self._first = start, start
        self._run = _tail(self.schedule, step)
        self._x_init, self._outputs, self._edits, self._returned = None, [], {}, None

    def _to_state(self, latents: torch.Tensor, j: int, dtype: torch.dtype, sigma=None) -> torch.Tensor:
        """The solver's state x for latents at call j, or at ``sigma`` (x_vp or x_t divided by the network's input
        scale)."""
        sigma = (self._call_sigmas[j] if sigma is None else sigma).to(dtype).expand(latents.shape[0])
        scale = network_inputs(self._spec, torch.ones_like(latents, dtype=dtype), sigma)[0]
        return latents.to(dtype) / scale

    def _replay(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the solver with the outputs received so far: (next query state, its sigma), or (final state, None).
        At a call whose latents the pipeline changed, the solver's state is set to them (in place, so that the
        solver goes on from there with its history), then the network output there is read."""
        outputs, edits, spec, seen = self._outputs, self._edits, self._spec, []

        def replay(x, sigma):
            k = len(seen)
            if k == len(outputs):
                raise _Pause(x, sigma)
            if k in edits:
                x.copy_(edits[k])
            seen.append(k)
            return wrap(spec, lambda x_in, t: outputs[k])(x, sigma)

        try:
            x = sample(replay, self._x_init.clone(), self._run)
        except _Pause as p:
            return p.x, p.sigma
        return x, None

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
             **kwargs: Any):
        """Take the network output for the current call; return the latents for the next call (or the result).
        The calls follow in order from the begin index; ``timestep`` is not read."""
        self._check_ready()
        if self._step_index is None:
            self._begin()
        j = self._step_index
        if j >= len(self._call_sigmas):
            raise ValueError(f"step() called after the last of {len(self._call_sigmas)} network calls: call "
                             "set_timesteps before a new run")
        dtype = self._state_dtype(sample)
        if j == self._first:  # the initial latents: the state at the run's first sigma (afs: one before its first call)
            if self._kappa != 1.0 and not self._scaled:
                raise ValueError(f"this schedule's first network call is on {self._kappa:.6g} times the initial latents "
                                 "(its analytical first step is learned or corrected), which scheduler.scale_model_input "
                                 "gives: this pipeline does not call it (DDPMPipeline does not; Stable Diffusion's "
                                 "pipelines do). Run the schedule with fewstep.sample, or make it with afs=False")
            self._x_init = self._to_state(sample, j, dtype, self._run.sigmas[0])
        elif not torch.equal(sample, self._returned):  # a callback or inpainting changed the latents
            self._edits[j - self._first] = self._to_state(sample, j, self._x_init.dtype)
        self._outputs.append(model_output.detach().to(dtype))
        x, sigma = self._replay()
        out = x if sigma is None else network_inputs(self._spec, x, sigma)[0]
        self._returned = out.to(sample.dtype)
        self._step_index = j + 1
        if not return_dict:
            return (self._returned,)
        return SchedulerOutput(prev_sample=self._returned)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _beta_keys(cfg: Any) -> dict:
    """The keys of a config that fix a DDPM-style noise schedule (DDPMScheduler's arguments)."""
    keys = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                "rescale_betas_zero_snr") if cfg.get(k) is not None}
    if cfg.get("trained_betas") is not None:
        keys["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
    return keys


FLOW_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
             "max_image_seq_len", "time_shift_type")


def _model_keys(config: Any) -> dict:
    """FewstepScheduler's arguments describing the network of ``config`` (any mappable scheduler config): kind,
    prediction type, and the noise schedule (betas) or the flow shift."""
    spec, cfg = noise_model(config), scheduler_config(config)
    keys = {"kind": spec["kind"], "prediction_type": spec["prediction"]}
    if spec["kind"] == "vp":
        return {**keys, **_beta_keys(cfg)}
    flow = {k: cfg[k] for k in FLOW_KEYS if cfg.get(k) is not None}
    if "shift" not in flow and cfg.get("flow_shift") is not None:  # UniPC / DPM-Solver with use_flow_sigmas
        flow["shift"] = float(cfg["flow_shift"])
    return {**keys, **flow}


def _fit(sched: Schedule, keys: dict) -> Schedule:
    """A VP schedule clipped onto the model's trained range where it leaves it by rounding (ranges.clip_to_range)."""
    spec = noise_model(keys)
    if spec["kind"] != "vp":
        return sched
    vp = VPDiscreteDenoiser(None, spec["alphas_cumprod"])
    return clip_to_range(sched, vp.sigma_min, vp.sigma_max)


def _tuned_model_config(folder: Path) -> dict:
    """The scheduler config of the shipped model a tune run in ``folder`` was made on."""
    try:  # the model's name (its id in the key also carries the version and its weights' fingerprint)
        model = json.loads((folder / "results.json").read_text())["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        model = None
    path = ASSETS / str(model) / "scheduler" / "scheduler_config.json"
    if model is None or not path.is_file():
        raise ValueError(f"{folder} was tuned on model {model!r}, which is not a shipped diffusers model: pass its "
                         "scheduler config, FewstepScheduler.from_tune(folder, pipe.scheduler.config)")
    return json.loads(path.read_text())


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
    if sched.per_sample:
        raise ValueError("a per-sample policy has no single sigma list for a diffusers scheduler: pass a Schedule")
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
        sched = clip_to_range(sched, den.sigma_min, den.sigma_max)  # raises for sigmas beyond it
        t = den.sigma_to_t(sched.sigmas[sched.sigmas > 0])
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
