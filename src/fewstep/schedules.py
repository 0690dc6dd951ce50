"""Schedules: what a sampler runs, and the built-in sigma sequences.

Sigmas follow the EDM / k-diffusion convention, ``x = x0 + sigma * noise``. A schedule of N steps
has N + 1 strictly decreasing float64 sigmas, from sigma_max down to 0 (or down to a positive sigma_min).

``ScheduleLike`` is the one protocol that ``fewstep.sample``, ``evaluate``, ``tune``, the CLI and
``FewstepScheduler`` use: a global ``Schedule`` (one sigma sequence for every sample, here) and a
per-sample ``policy.SchedulePolicy`` implement it, and a learned-coefficient schedule is a ``Schedule``
whose solver options carry its coefficients. Files carry a ``format`` field; ``load_schedule`` reads any
of them.
"""

from __future__ import annotations

import abc
import io
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, NamedTuple

import torch

from .files import write_atomic

FORMAT = "fewstep.schedule"
FORMAT_VERSION = 2  # the newest version written and read; a file without the options below is written as 1
VERSIONS = (1, 2)
# Solver options that a fewstep reading only version 1 lacks (the learned solver's coefficients, PAS's
# corrections, the analytical first step): a schedule with any of them is a version-2 file, which says so.
VERSION_2_OPTIONS = ("a", "b", "pas", "afs")
REQUIRES_2 = ("a fewstep that reads schedule format version 2: solver 'learned' (learned coefficients a, b; "
              "PAS corrections pas) and the solver option afs (analytical first step)")
RHO = 7.0  # EDM's polynomial exponent (Karras et al. 2022, eq. 5), also GITS's candidate grid's
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM's sigma range (Karras et al. 2022, Sec. 5): the default for a model without one


class ScheduleError(ValueError):
    """A schedule, or a schedule file, is not valid."""


def check_sigmas(sigmas: Any) -> torch.Tensor:
    """Return ``sigmas`` as a 1-d float64 tensor (keeping its autograd graph, so schedules can be
    learned through ``fewstep.sample``), or raise ScheduleError naming what is wrong."""
    if isinstance(sigmas, str):
        raise ScheduleError(f"sigmas must be a list or tensor of numbers, got the string {sigmas!r} (a schedule "
                            "file: fewstep.load_schedule(path); a built-in: fewstep.schedules.karras(steps), ...)")
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ScheduleError(f"sigmas must be a list or tensor of numbers: {e}") from None
    if s.ndim != 1:
        raise ScheduleError(f"sigmas must be one sequence (1-d), got shape {tuple(s.shape)}; per-sample sigmas "
                            "[steps + 1, batch] are a per-sample schedule: an object with sigmas_for(x), or a "
                            "SchedulePolicy")
    if s.numel() < 2:
        raise ScheduleError(f"a schedule needs at least 2 sigmas (1 step), got {s.numel()}")
    values = s.detach()
    if not torch.isfinite(values).all():
        raise ScheduleError(f"sigmas contain NaN or inf: {values.tolist()}")
    if (values < 0).any():
        raise ScheduleError(f"sigmas must be >= 0, got {values.tolist()}")
    bad = (values[1:] >= values[:-1]).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ScheduleError(
            f"sigmas must be strictly decreasing: sigma[{i}]={values[i].item():.6g} "
            f"<= sigma[{i + 1}]={values[i + 1].item():.6g}"
        )
    return s


# --------------------------------------------------------------------------------------------
# The protocol

class BatchPlan(NamedTuple):
    """What a solver runs for one batch: ``sigmas`` ``[steps + 1]`` (every sample) or ``[steps + 1, batch]``
    (per sample), and per-step ``corrections`` (shift, scale) for ``corrections.Corrected``, or None."""

    sigmas: torch.Tensor
    corrections: tuple[torch.Tensor, torch.Tensor] | None = None


_FORMATS: dict[str, type] = {}  # a file's format field -> the class that reads it


class ScheduleLike(abc.ABC):
    """A schedule as the rest of fewstep sees it.

    ``for_batch(x, cond)`` gives the sigmas (and any per-step corrections) for initial states x (and their
    conditions, None for an unconditional model: a per-sample policy may read them); ``solver`` and
    ``solver_options`` say how to run them (read from ``_run_settings()``: the metadata, unless a subclass
    keeps them elsewhere); ``steps``, ``sigma_max`` and ``final_zero`` (ends at sigma 0) are the same for
    every batch, so ``fewstep.nfe`` needs no batch. ``per_sample``: whether the sigmas
    depend on x. Files: ``save(path)``, and ``load_schedule(path)`` dispatching on the ``format`` field
    (each subclass names its ``FORMAT`` and implements ``from_payload``).
    """

    FORMAT: ClassVar[str]
    SUFFIX: ClassVar[str] = ".json"
    per_sample: ClassVar[bool] = False
    metadata: dict

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "FORMAT" in cls.__dict__:
            _FORMATS[cls.FORMAT] = cls

    steps: int  # a property in each subclass, like the two below
    sigma_max: float
    final_zero: bool

    def _run_settings(self) -> dict:
        """Where this kind of schedule keeps ``solver`` and ``solver_options``."""
        return self.metadata

    @property
    def solver(self) -> str | None:
        return self._run_settings().get("solver")

    @property
    def solver_options(self) -> dict:
        return dict(self._run_settings().get("solver_options") or {})

    @abc.abstractmethod
    def for_batch(self, x: torch.Tensor, cond=None) -> BatchPlan: ...

    @abc.abstractmethod
    def with_metadata(self, **metadata: Any) -> "ScheduleLike": ...

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> Path: ...

    @classmethod
    @abc.abstractmethod
    def from_payload(cls, payload: Any, source: str) -> "ScheduleLike": ...

    @abc.abstractmethod
    def describe(self) -> dict:
        """A JSON-serializable description (what the CLI prints with --json)."""

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScheduleLike":
        """Read a schedule file; it must be of this class's format."""
        obj = load_schedule(path)
        if not isinstance(obj, cls):
            raise ScheduleError(f"{path}: a {obj.FORMAT} file, not a {cls.FORMAT}: read it with "
                                "fewstep.load_schedule")
        return obj


def load_schedule(path: str | os.PathLike) -> ScheduleLike:
    """Any fewstep schedule file (a JSON ``Schedule``, a torch ``SchedulePolicy``), by its format field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"schedule file not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":
        try:
            payload = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ScheduleError(f"{path}: corrupt schedule file ({e})") from None
    else:
        try:
            payload = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:  # torch raises several types for a truncated or foreign file
            raise ScheduleError(f"{path}: corrupt or unreadable schedule file ({type(e).__name__}: {e})") from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(fmt, str) or fmt not in _FORMATS:
        what = "schedule" if data.lstrip()[:1] == b"{" else "schedule policy or other schedule"
        raise ScheduleError(f"{path}: not a fewstep {what} file (format {fmt!r}; known: {', '.join(_FORMATS)})")
    return _FORMATS[fmt].from_payload(payload, str(path))


class _SigmasFor(ScheduleLike):
    """An object with ``sigmas_for(x)`` (and optionally ``plan_for(x) -> (sigmas, corrections)``): the
    per-sample protocol of fewstep 0.1, adapted. Not saved: it is the user's own object."""

    per_sample = True

    def __init__(self, obj: Any):
        self.obj, self.metadata = obj, dict(getattr(obj, "metadata", None) or {})

    final_zero = True

    def _run_settings(self) -> dict:
        return {"solver": getattr(self.obj, "solver", None), "solver_options": getattr(self.obj, "solver_options", None)}

    @property
    def steps(self) -> int:
        if not hasattr(self.obj, "steps"):
            raise ScheduleError(f"{type(self.obj).__name__} has sigmas_for but no .steps: fewstep cannot count its NFE")
        return int(self.obj.steps)

    @property
    def sigma_max(self) -> float:
        return float(self.obj.sigma_max)

    def for_batch(self, x: torch.Tensor, cond=None) -> BatchPlan:  # the 0.1 protocol sees x only
        return BatchPlan(*self.obj.plan_for(x)) if hasattr(self.obj, "plan_for") else BatchPlan(self.obj.sigmas_for(x))

    def with_metadata(self, **metadata: Any) -> "_SigmasFor":
        self.metadata.update(metadata)
        return self

    def save(self, path):
        raise ScheduleError(f"{type(self.obj).__name__} is not a fewstep schedule: it cannot be saved")

    @classmethod
    def from_payload(cls, payload, source):
        raise ScheduleError(f"{source}: not readable as a schedule")

    def describe(self) -> dict:
        return {"per_sample": True, "object": repr(self.obj)}


def as_schedule(schedule: Any) -> ScheduleLike:
    """A ScheduleLike as is; an object with ``sigmas_for(x)`` adapted; anything else read as sigmas."""
    if isinstance(schedule, ScheduleLike):
        return schedule
    if hasattr(schedule, "sigmas_for"):
        return _SigmasFor(schedule)
    return Schedule(schedule)


# --------------------------------------------------------------------------------------------
# One sigma sequence for every sample

class Schedule(ScheduleLike):
    """A strictly decreasing float64 sigma sequence with metadata.

    ``Schedule([80, 10, 1, 0], solver="heun", method="karras")``. Metadata keys used by fewstep:
    ``solver`` (the solver it was made for), ``solver_options`` (e.g. per-step ``orders``),
    ``method``, ``nfe``, ``model``, ``params``, ``provenance``; any other JSON-serializable keys are kept.
    """

    FORMAT = FORMAT

    def __init__(self, sigmas: Any, **metadata: Any):
        self.sigmas = check_sigmas(sigmas)
        self.metadata = dict(metadata)

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_final(self) -> float:
        return float(self.sigmas[-1])

    @property
    def final_zero(self) -> bool:
        return self.sigma_final == 0

    def for_batch(self, x: torch.Tensor, cond=None) -> BatchPlan:
        return BatchPlan(self.sigmas)

    def __len__(self) -> int:
        return self.sigmas.numel()

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.4g}" for v in self.sigmas.tolist())
        tags = ", ".join(f"{k}={self.metadata[k]!r}" for k in ("method", "solver", "nfe") if k in self.metadata)
        return f"Schedule([{vals}]{', ' + tags if tags else ''})"

    def with_metadata(self, **metadata: Any) -> "Schedule":
        return Schedule(self.sigmas, **{**self.metadata, **metadata})

    def to_list(self) -> list[float]:
        """The sigmas as a plain list (a k-diffusion ``sigmas`` tensor or a ComfyUI custom-sigmas list)."""
        return self.sigmas.detach().cpu().tolist()

    def to_dict(self) -> dict:
        """The file's content: version 1 unless the solver options need version 2 (``VERSION_2_OPTIONS``),
        whose files name what reads them (``requires``) for a reader that does not."""
        if set(self.solver_options) & set(VERSION_2_OPTIONS):
            return {"format": FORMAT, "version": 2, "requires": REQUIRES_2, "sigmas": self.to_list(),
                    "metadata": self.metadata}
        return {"format": FORMAT, "version": 1, "sigmas": self.to_list(), "metadata": self.metadata}

    describe = to_dict

    @classmethod
    def from_dict(cls, d: Any, source: str = "schedule") -> "Schedule":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ScheduleError(f"{source}: not a fewstep schedule (missing format={FORMAT!r})")
        if d.get("version") not in VERSIONS:
            needs = f"; the file needs {d['requires']}" if isinstance(d.get("requires"), str) else ""
            raise ScheduleError(f"{source}: schedule format version {d.get('version')!r} is not supported (this "
                                f"fewstep reads versions {', '.join(map(str, VERSIONS))}){needs}")
        if "sigmas" not in d:
            raise ScheduleError(f"{source}: no 'sigmas' field")
        meta = d.get("metadata") or {}
        if not isinstance(meta, dict) or not isinstance(meta.get("solver_options") or {}, dict) \
                or not isinstance(meta.get("solver") or "", str):
            raise ScheduleError(f"{source}: 'metadata' must be an object whose 'solver' is a name and 'solver_options' "
                                f"an object, got {meta!r}")
        try:
            return cls(d["sigmas"], **meta)
        except ScheduleError as e:
            raise ScheduleError(f"{source}: {e}") from None

    from_payload = from_dict

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file in the same folder, then rename)."""
        return write_atomic(path, json.dumps(self.to_dict(), indent=2))


# --------------------------------------------------------------------------------------------
# LD3's parameterization: any logits give a valid schedule (Tong et al., ICLR 2025, Sec. 3.2)

MIN_WEIGHT = 1e-6  # each lambda interval's share of the range at least: extreme logits still give distinct sigmas


def sigmas_from_logits(logits: torch.Tensor, sigma_max: float, sigma_min: float, learn_last: bool) -> torch.Tensor:
    """Sigmas ``[steps + 1, ...]`` from logits ``[..., K]``: sigma_max, the cumulative softmax in lambda, then 0.

    lambda_k = lambda(sigma_max) + u_k (lambda(sigma_min) - lambda(sigma_max)), u = cumsum(w),
    w = MIN_WEIGHT + (1 - K MIN_WEIGHT) softmax(logits), lambda = -log sigma (LD3's softmax, with a floor so
    that no logits, however large, make two sigmas equal). With ``learn_last`` the last weight is slack, so
    the last positive sigma is learned in (sigma_min, sigma_max); otherwise it is sigma_min exactly.
    """
    k = logits.shape[-1]
    u = torch.cumsum(MIN_WEIGHT + (1 - k * MIN_WEIGHT) * torch.softmax(logits, -1), -1)
    u = u[..., :-1] if learn_last else torch.cat([u[..., :-1], torch.ones_like(u[..., :1])], -1)
    positive = sigma_max * torch.exp(-u * math.log(sigma_max / sigma_min))
    top = torch.full_like(u[..., :1], sigma_max)
    return torch.cat([top, positive, torch.zeros_like(top)], -1).movedim(-1, 0)


def logits_from_sigmas(sigmas: torch.Tensor, sigma_min: float, learn_last: bool, floor: float = 1e-4) -> torch.Tensor:
    """Inverse of ``sigmas_from_logits`` for a schedule ending in 0 (gaps clamped to ``floor`` of the range)."""
    lam = -sigmas[:-1].to(torch.float64).log()
    lam_end = -math.log(sigma_min)
    if learn_last:
        lam = torch.cat([lam, lam.new_tensor([lam_end])])
    span = lam_end - float(lam[0])
    share = (lam[1:] - lam[:-1]).clamp_min(floor * span) / span
    w = (share - MIN_WEIGHT) / (1 - share.numel() * MIN_WEIGHT)
    return w.log() - w.log().mean()


# --------------------------------------------------------------------------------------------
# Built-in schedules. Each returns a Schedule of ``steps`` steps (steps + 1 sigmas).

def _finish(sigmas: Iterable[float] | torch.Tensor, final_zero: bool, method: str, ends: tuple | None = None,
            **params: Any) -> Schedule:
    """The Schedule, its first and last points set to ``ends`` = (sigma_max, sigma_min) exactly (the
    formulas round them by an ulp or so), then the final 0 if ``final_zero``."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).clone()
    if ends is not None and len(s) > 1:
        s[0], s[-1] = ends
    if final_zero:
        s = torch.cat([s, s.new_zeros(1)])
    return Schedule(s, method=method, params=params)


def _check_range(steps: int, sigma_min: float, sigma_max: float) -> None:
    if int(steps) != steps or steps < 1:
        raise ScheduleError(f"steps must be a positive integer, got {steps!r}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ScheduleError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _points(steps: int, final_zero: bool) -> int:
    """Number of points spanned from sigma_max to sigma_min (a final 0 is appended separately)."""
    return steps if final_zero else steps + 1


def polynomial(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
               final_zero: bool = True) -> Schedule:
    """Uniform in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    _check_range(steps, sigma_min, sigma_max)
    n = _points(steps, final_zero)
    if n == 1:
        return _finish([sigma_max], final_zero, "polynomial", rho=rho)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return _finish(s, final_zero, "polynomial", (sigma_max, sigma_min), rho=rho)


def karras(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
           final_zero: bool = True) -> Schedule:
    """EDM / Karras schedule (rho = RHO = 7 by default); same formula as k-diffusion's get_sigmas_karras."""
    s = polynomial(steps, sigma_min, sigma_max, rho, final_zero)
    return s.with_metadata(method="karras")


def logsnr_uniform(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, final_zero: bool = True) -> Schedule:
    """Uniform in log sigma, i.e. uniform in logSNR = -2 log sigma (DPM-Solver's 'logSNR' schedule)."""
    _check_range(steps, sigma_min, sigma_max)
    n = _points(steps, final_zero)
    s = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))
    return _finish(s, final_zero, "logsnr_uniform", (sigma_max, sigma_min))


# Continuous VP (Song et al. 2021): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), t in [eps_t, 1].
VP_BETA_D, VP_BETA_MIN = 19.9, 0.1


def vp_sigma(t: torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    return torch.sqrt(torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def vp_time(sigma: torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """Inverse of vp_sigma (EDM, Karras et al. 2022, Table 1)."""
    return (torch.sqrt(beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)) - beta_min) / beta_d


def _vp_time_schedule(steps, sigma_min, sigma_max, final_zero, power, method, beta_d, beta_min) -> Schedule:
    _check_range(steps, sigma_min, sigma_max)
    n = _points(steps, final_zero)
    t0, t1 = (vp_time(torch.tensor(v, dtype=torch.float64), beta_d, beta_min) for v in (sigma_max, sigma_min))
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    t = (t0 ** (1 / power) + ramp * (t1 ** (1 / power) - t0 ** (1 / power))) ** power
    return _finish(vp_sigma(t, beta_d, beta_min), final_zero, method, (sigma_max, sigma_min), beta_d=beta_d,
                   beta_min=beta_min)


def time_uniform(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, final_zero: bool = True,
                 beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> Schedule:
    """Uniform in the continuous-VP time t (DDIM's 'uniform' skip for VP models)."""
    return _vp_time_schedule(steps, sigma_min, sigma_max, final_zero, 1.0, "time_uniform", beta_d, beta_min)


def time_quadratic(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, final_zero: bool = True,
                   beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> Schedule:
    """Uniform in sqrt(t) of the continuous-VP time (DDIM's 'quadratic' skip)."""
    return _vp_time_schedule(steps, sigma_min, sigma_max, final_zero, 2.0, "time_quadratic", beta_d, beta_min)


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Flux time shift: t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_uniform(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, shift: float = 1.0,
                 final_zero: bool = True) -> Schedule:
    """Uniform in flow-matching time t = sigma / (1 + sigma), after the SD3/Flux shift.

    The unshifted grid runs from u_max = shift^-1(t_max) to u_min, so after the shift it starts
    exactly at sigma_max (t_max = sigma_max / (1 + sigma_max)) and ends at sigma_min (or 0).
    """
    _check_range(steps, sigma_min, sigma_max)
    if shift <= 0:
        raise ScheduleError(f"shift must be > 0, got {shift}")
    n = _points(steps, final_zero)

    def unshift(t: float) -> float:
        return t / (shift - (shift - 1) * t)

    t_max, t_min = sigma_max / (1 + sigma_max), sigma_min / (1 + sigma_min)
    u = torch.linspace(unshift(t_max), unshift(t_min), n, dtype=torch.float64)
    t = flow_shift(u, shift)
    return _finish(t / (1 - t), final_zero, "flow_uniform", (sigma_max, sigma_min), shift=shift)


# Align Your Steps (Sabour et al. 2024): the published 10-step sigma lists, as shipped in diffusers'
# `AysSchedules` (diffusers/schedulers/scheduling_utils.py).
AYS_SIGMAS = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def loglinear_interp(sigmas: list[float], num: int) -> torch.Tensor:
    """AYS rule: interpolate log sigma linearly (on a uniform index axis) onto ``num`` points."""
    ys = torch.tensor(sigmas, dtype=torch.float64).log().flip(0)
    xs = torch.linspace(0, 1, len(sigmas), dtype=torch.float64)
    new_xs = torch.linspace(0, 1, num, dtype=torch.float64)
    idx = torch.searchsorted(xs, new_xs, right=True).clamp(1, len(sigmas) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    new_ys = y0 + (new_xs - x0) / (x1 - x0) * (y1 - y0)
    return new_ys.exp().flip(0)


def ays(steps: int, model: str = "sd15", sigma_min: float | None = None, sigma_max: float | None = None) -> Schedule:
    """Align Your Steps for ``model`` in {'sd15', 'sdxl', 'svd'}, interpolated to ``steps`` steps.

    The published 11-value lists are log-linearly interpolated onto steps + 1 points and the last one
    is set to 0 (the AYS authors' rule). Given ``sigma_min``/``sigma_max``, the log sigmas are mapped
    affinely from the published range onto that range (fewstep's extension for other models).
    """
    if model not in AYS_SIGMAS:
        raise ScheduleError(f"unknown AYS model {model!r}; known: {sorted(AYS_SIGMAS)}")
    if int(steps) != steps or steps < 1:
        raise ScheduleError(f"steps must be a positive integer, got {steps!r}")
    lo, hi = (AYS_SIGMAS[model][-1] if sigma_min is None else sigma_min), (AYS_SIGMAS[model][0] if sigma_max is None else sigma_max)
    if not 0 < lo < hi < math.inf:
        raise ScheduleError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={lo}, sigma_max={hi}")
    s = loglinear_interp(AYS_SIGMAS[model], steps + 1)
    if sigma_min is not None or sigma_max is not None:
        lo, hi = math.log(AYS_SIGMAS[model][-1]), math.log(AYS_SIGMAS[model][0])
        new_lo = math.log(sigma_min if sigma_min is not None else AYS_SIGMAS[model][-1])
        new_hi = math.log(sigma_max if sigma_max is not None else AYS_SIGMAS[model][0])
        s = torch.exp(new_lo + (s.log() - lo) * (new_hi - new_lo) / (hi - lo))
    s[-1] = 0.0
    return Schedule(s, method="ays", params={"model": model})


BUILTIN_SCHEDULES = {
    "karras": karras,
    "logsnr_uniform": logsnr_uniform,
    "time_uniform": time_uniform,
    "time_quadratic": time_quadratic,
    "polynomial": polynomial,
    "flow_uniform": flow_uniform,
    "ays": ays,
}


# The built-in schedules a tune scores as baselines (and LD3 may start from), each for any sigma range.
BASELINES = ["karras", "logsnr_uniform", "time_uniform", "time_quadratic", "ays", "flow_uniform"]


def builtin(name: str, steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, **params: Any) -> Schedule:
    """A built-in schedule by name; see ``BUILTIN_SCHEDULES``."""
    if name not in BUILTIN_SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; known: {sorted(BUILTIN_SCHEDULES)}")
    return BUILTIN_SCHEDULES[name](steps, sigma_min=sigma_min, sigma_max=sigma_max, **params)
