"""k-diffusion and ComfyUI sigmas (docs/integrations.md's examples run in tests/test_docs.py).

k-diffusion 0.1.1 is installed with ``--no-deps`` and its ``__init__`` imports torchvision; where that
import fails, ``fewstep.integrations.kdiffusion.import_kdiffusion`` loads the real ``sampling.py`` and
``external.py`` as a private package with ``append_dims``, the only helper those two files use.
"""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.integrations.kdiffusion import import_kdiffusion
from fewstep.schedules import Schedule, karras

ASSETS = Path(fewstep.__file__).parent / "assets"


@pytest.fixture(scope="module")
def kd():
    """k-diffusion's ``sampling`` and ``external``, through fewstep's loader (the package itself where it imports)."""
    if importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion torchdiffeq torchsde)")
    sampling, external = import_kdiffusion()
    return types.SimpleNamespace(sampling=sampling, external=external)


@pytest.mark.parametrize("solver,k_name", [("euler", "sample_euler"), ("heun", "sample_heun"),
                                           ("dpmpp_2m", "sample_dpmpp_2m")])
def test_schedule_is_a_kdiffusion_sigmas_tensor(kd, solver, k_name):
    """A fewstep schedule and a fewstep denoiser go into k-diffusion's samplers with no glue."""
    den = fewstep.load_model("gmm64")
    sched = karras(7, 0.002, 80.0)
    x = fewstep.noise(8, den.shape, 80.0, seed=1)
    by_k = getattr(kd.sampling, k_name)(den, x, sched.sigmas, disable=True)
    assert torch.allclose(by_k, fewstep.sample(den, x, sched, solver), rtol=1e-10, atol=1e-12)
    as_k = fewstep.to_kdiffusion(sched)
    assert as_k.dtype == torch.float32 and torch.equal(as_k, sched.sigmas.float())


def test_compvis_wrapper_is_a_denoiser(kd):
    """k-diffusion's CompVisDenoiser around the shipped UNet == fewstep.from_diffusers on the same UNet."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(ASSETS / "digits-unet" / "unet").requires_grad_(False)
    config = json.loads((ASSETS / "digits-unet" / "scheduler" / "scheduler_config.json").read_text())
    calls = []

    class LatentDiffusionLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod

        def apply_model(self, x, t, cond):
            calls.append(cond)
            return unet(x, t).sample

    k_model = kd.external.CompVisDenoiser(LatentDiffusionLike())
    den = fewstep.from_kdiffusion(k_model, cond="c", shape=(1, 8, 8))
    ref = fewstep.from_diffusers(unet, config)
    assert den.shape == (1, 8, 8) and den.sigma_min == pytest.approx(ref.sigma_min, rel=1e-6)
    assert den.sigma_max == pytest.approx(ref.sigma_max, rel=1e-6)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for sigma in (0.05, 1.0, 30.0):
        s = torch.full((3,), sigma)
        got, want = den(x * sigma, s), ref(x * sigma, s)
        assert (got - want).norm() <= 1e-5 * want.norm()
    assert calls == ["c"] * 3


def test_extra_args_reach_the_model():
    seen = {}

    def model(x, sigma, cond=None, scale=1.0):
        seen.update(cond=cond, scale=scale)
        return x * scale / (1 + sigma[:, None] ** 2)

    den = fewstep.from_kdiffusion(model, sigma_min=0.01, sigma_max=10.0, cond="text", scale=0.5)
    x = torch.ones(2, 3)
    assert torch.allclose(den(x, torch.full((2,), 1.0)), torch.full((2, 3), 0.25))
    assert seen == {"cond": "text", "scale": 0.5} and (den.sigma_min, den.sigma_max) == (0.01, 10.0)
    with pytest.raises(TypeError, match="got str"):
        fewstep.from_kdiffusion("model")


def test_comfyui_sigmas_text():
    sched = Schedule([14.614642, 6.475, 1 / 3, 0.0291675, 0.0])
    text = fewstep.to_comfyui(sched)
    assert [float(v) for v in text.split(",")] == sched.to_list()
    assert text.endswith(", 0.0") and "\n" not in text
