"""Built-in models by name, and loading a user's model from ``path/to/file.py:factory``.

The shipped networks are diffusers models, so this module sits above ``integrations/``."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .models.device import resolve_device, to_device
from .models.reference import ConditionalGaussianMixture, EmpiricalDenoiser, GaussianMixture


def digits() -> EmpiricalDenoiser:
    """Empirical denoiser of scikit-learn's 1797 8x8 digits, pixels scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float64) / 8.0 - 1.0
    return EmpiricalDenoiser(x[:, None], name="digits")


def _rotation(d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    return q * torch.sign(torch.diagonal(r))[None]


def gmm2d() -> GaussianMixture:
    """8 anisotropic modes on a ring of radius 3, their scales spread over 0.05..0.6 (for plots)."""
    g = torch.Generator().manual_seed(2)
    k = 8
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    means = 3 * torch.stack([angles.cos(), angles.sin()], 1)
    scales = torch.logspace(math.log10(0.05), math.log10(0.6), k, dtype=torch.float64)
    covs = []
    for s in scales:
        u = _rotation(2, g)
        covs.append(u @ torch.diag(torch.tensor([1.0, 0.2], dtype=torch.float64) * s ** 2) @ u.T)
    covs = torch.stack(covs)
    return GaussianMixture(means, covs, name="gmm2d")


def gmm64() -> GaussianMixture:
    """10 modes in 64-d with decaying spectra (lambda_j ~ scale^2 j^-1.2) and scales over 0.05..1."""
    g = torch.Generator().manual_seed(64)
    k, d = 10, 64
    means = 0.8 * torch.randn(k, d, dtype=torch.float64, generator=g)
    scales = torch.logspace(math.log10(0.05), 0.0, k, dtype=torch.float64)
    spectrum = torch.arange(1, d + 1, dtype=torch.float64) ** -1.2
    covs = []
    for s in scales:
        u = _rotation(d, g)
        covs.append(u @ torch.diag(s ** 2 * spectrum) @ u.T)
    weights = torch.softmax(0.5 * torch.randn(k, dtype=torch.float64, generator=g), 0)
    return GaussianMixture(means, torch.stack(covs), weights, shape=(1, 8, 8), name="gmm64")


def gmm_scales() -> GaussianMixture:
    """4 isotropic modes in 32-d at the vertices of a regular simplex (3 sqrt 2 apart), scales 0.01..0.3.

    Made to show instance dynamics (docs/models.md): each mode's trajectories bend near its own scale,
    30x apart, and the means are far apart relative to every scale, so the mode a trajectory ends in is
    decided at a high sigma, where the flow is nearly linear: it is predictable from x_T."""
    g = torch.Generator().manual_seed(32)
    k, d = 4, 32
    frame = _rotation(d, g)[:, :k].T
    means = 3 * (frame - frame.mean(0))
    scales = torch.logspace(math.log10(0.01), math.log10(0.3), k, dtype=torch.float64)
    covs = scales[:, None, None] ** 2 * torch.eye(d, dtype=torch.float64)
    return GaussianMixture(means, covs, name="gmm-scales")


def gmm_cond(guidance: float = 1.0) -> ConditionalGaussianMixture:
    """A class-conditional mixture in 16-d (8 modes, spectra decaying, scales 0.05..0.5) for 10 classes
    given as one-hot condition vectors (``class_conditions``): each class moves every mean and reweights
    the modes; ``guidance``: classifier-free guidance with the null condition (the zero vector)."""
    g = torch.Generator().manual_seed(16)
    k, d, m = 8, 16, 10
    means = 0.8 * torch.randn(k, d, dtype=torch.float64, generator=g)
    scales = torch.logspace(math.log10(0.05), math.log10(0.5), k, dtype=torch.float64)
    spectrum = torch.arange(1, d + 1, dtype=torch.float64) ** -1.0
    covs = torch.stack([(u := _rotation(d, g)) @ torch.diag(s ** 2 * spectrum) @ u.T for s in scales])
    cond_means = 0.6 * torch.randn(k, d, m, dtype=torch.float64, generator=g)
    cond_logits = 2.0 * torch.randn(k, m, dtype=torch.float64, generator=g)
    return ConditionalGaussianMixture(means, covs, cond_means, cond_logits, guidance=guidance, shape=(1, 4, 4),
                                      name=f"gmm-cond@w{guidance:g}")


def class_conditions(n: int, classes: int = 10, seed: int = 0) -> torch.Tensor:
    """``n`` one-hot condition vectors of uniformly drawn classes, seeded: a pool for a class-conditional model."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.nn.functional.one_hot(torch.randint(classes, (int(n),), generator=g), classes).to(torch.float64)


def simplex_conditions(n: int, classes: int = 10, seed: int = 0) -> torch.Tensor:
    """``n`` condition vectors drawn on the simplex (softmax of a standard normal), seeded: every one new,
    a pool whose held-out rows are conditions no optimizer saw even in kind."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.softmax(torch.randn(int(n), classes, generator=g, dtype=torch.float64), dim=1)


ASSETS = Path(__file__).resolve().parent / "assets"
NULL_DIGIT = 10  # digits-cond: the null class label, trained for classifier-free guidance (scripts/train_digits.py)


def _guided(factory: Callable) -> bool:
    return "guidance" in inspect.signature(factory).parameters


def _shipped(name: str, guidance: float | None = None, **kwargs) -> Callable:
    """A network shipped in fewstep/assets/<name> (diffusers format, made by scripts/train_digits.py); with
    ``guidance``: named <name>@w<guidance> unless it is 1 (``kwargs``: from_diffusers' conditioning)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ImportError(f"model {name!r} needs diffusers: pip install 'fewstep[diffusers]'") from None
    from .integrations.diffusers import from_diffusers

    folder = ASSETS / name
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is missing: reinstall fewstep, or recreate it with scripts/train_digits.py")
    unet = UNet2DModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if guidance not in (None, 1.0):
        name = f"{name}@w{guidance:g}"
    return from_diffusers(unet, config, name=name, guidance_scale=guidance, **kwargs)


def digits_unet() -> Callable:
    """Trained DDPM UNet (epsilon, linear betas, 1000 steps) on the 8x8 digits, as a VP denoiser."""
    return _shipped("digits-unet")


def digits_cond(guidance: float = 1.0) -> Callable:
    """Trained class-conditional DDPM UNet on the 8x8 digits (labels 0-9, null label 10), as a conditional VP
    denoiser D(x, sigma, cond) with classifier-free guidance ``guidance`` (Ho & Salimans 2022); ``cond`` is
    ``{"class_labels": labels}``, one digit per sample (``class_labels``)."""
    null = {"class_labels": torch.tensor([NULL_DIGIT])}
    return _shipped("digits-cond", float(guidance), uncond=null, per_sample=("class_labels",))


def class_labels(n: int, classes: int = 10, seed: int = 0) -> dict:
    """``n`` uniformly drawn class labels, seeded, as a class-conditional diffusers UNet takes them: a pool for
    ``digits-cond``."""
    g = torch.Generator().manual_seed(int(seed))
    return {"class_labels": torch.randint(classes, (int(n),), generator=g)}


def digits_flow() -> Callable:
    """Trained rectified-flow UNet (velocity) on the 8x8 digits, as a flow denoiser."""
    return _shipped("digits-flow")


BUILTIN_MODELS: dict[str, Callable] = {"digits": digits, "gmm2d": gmm2d, "gmm64": gmm64, "gmm-scales": gmm_scales,
                                       "gmm-cond": gmm_cond,
                                       "digits-unet": digits_unet, "digits-flow": digits_flow,
                                       "digits-cond": digits_cond}
DEFAULT_MODEL = "digits-unet"
# the pools of conditions the command line gives a built-in conditional model when none is given (--conds)
BUILTIN_CONDITIONS: dict[str, Callable[[], Any]] = {"gmm-cond": lambda: simplex_conditions(64, seed=3),
                                                    "digits-cond": lambda: class_labels(64, seed=3)}


def is_pipeline(spec: str) -> bool:
    """Whether ``spec`` names a diffusers pipeline folder (``save_pretrained``: it holds model_index.json)."""
    return (Path(spec) / "model_index.json").is_file()


def load_pipeline(folder: str | Path, device: str | None = None) -> Any:
    """A diffusers pipeline saved with ``save_pretrained``, from local files only (nothing is downloaded), on
    ``device`` ('auto': CUDA when available), its progress bars off."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise ImportError("a pipeline folder needs diffusers: pip install 'fewstep[diffusers]'") from None
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # diffusers' own errors: a missing component, a config it cannot read
        raise ValueError(f"{folder} could not be loaded as a diffusers pipeline: {type(e).__name__}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    dev = resolve_device(device)
    return pipe if dev is None else pipe.to(dev)


def load_model(spec: str, device: str | None = None, guidance: float | None = None) -> Callable:
    """A built-in model by name, a diffusers pipeline folder (a conditional denoiser: ``from_diffusers(pipe,
    guidance_scale=guidance)``), or ``path/to/file.py:factory`` (a function returning a denoiser); moved to
    ``device`` if given ('auto': CUDA when available; ``models.device.to_device``). ``guidance``: for a pipeline,
    or a built-in model whose factory takes it (gmm-cond)."""
    if is_pipeline(spec):
        from .integrations.diffusers import from_diffusers

        return from_diffusers(load_pipeline(spec, device), guidance_scale=guidance)
    if guidance is not None and not (spec in BUILTIN_MODELS and _guided(BUILTIN_MODELS[spec])):
        raise ValueError(f"model {spec!r} takes no guidance scale: it is for a diffusers pipeline folder or a built-in "
                         f"conditional model ({', '.join(n for n, f in BUILTIN_MODELS.items() if _guided(f))}); a "
                         "factory sets its own")
    if spec in BUILTIN_MODELS:
        den = BUILTIN_MODELS[spec]() if guidance is None else BUILTIN_MODELS[spec](guidance=guidance)
        return to_device(den, device)
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}; built-in: {', '.join(BUILTIN_MODELS)}, or give path/to/file.py:factory")
    path, _, factory = spec.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model file not found: {file}")
    mod_name = f"fewstep_user_model_{abs(hash(str(file.resolve())))}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, file)
    if mod_spec is None:
        raise ValueError(f"{file} is not a Python file (give path/to/file.py:factory)")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: a SyntaxError, an ImportError, anything it raises
        sys.modules.pop(mod_name, None)
        raise ValueError(f"model file {file} could not be imported: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, factory, None)):
        raise ValueError(f"{file} has no function {factory!r}")
    try:
        den = getattr(module, factory)()
    except Exception as e:
        raise ValueError(f"the model factory {spec} raised {type(e).__name__}: {e}") from e
    if not callable(den):
        raise ValueError(f"{spec} returned {type(den).__name__}, not a callable denoiser D(x, sigma)")
    if not hasattr(den, "name"):
        try:
            den.name = f"{file.name}:{factory}"
        except AttributeError:
            pass
    return to_device(den, device)
