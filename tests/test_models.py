import math

import pytest
import torch

import fewstep
from fewstep.models import EmpiricalDenoiser, FlowDenoiser, GaussianMixture, VPContinuousDenoiser, VPDiscreteDenoiser
from fewstep.schedules import vp_sigma


def _x_and_sigma(gmm, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.05), math.log(20), generator=g))
    x0 = gmm.sample(n, generator=g)
    x = x0 + sigma[:, None] * torch.randn(x0.shape, dtype=torch.float64, generator=g)
    return x, sigma


def test_gmm_denoiser_is_tweedie(small_gmm):
    """D(x, s) = x + s^2 grad log p_s(x), with log p_s from the mixture's own density."""
    x, sigma = _x_and_sigma(small_gmm)
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(small_gmm.log_prob(xi, float(sigma[i])).sum(), xi)
        assert torch.allclose(small_gmm(x[i:i + 1], sigma[i:i + 1]), x[i:i + 1] + sigma[i] ** 2 * grad, atol=1e-10)


def test_gmm_sampling_moments(small_gmm):
    xs = small_gmm.sample(40000, generator=torch.Generator().manual_seed(1))
    mean = (small_gmm.weights[:, None] * small_gmm.means).sum(0)
    assert torch.allclose(xs.mean(0), mean, atol=0.05)
    centred = small_gmm.means - mean
    cov = (small_gmm.weights[:, None, None] * (small_gmm.covs + centred[:, :, None] * centred[:, None, :])).sum(0)
    assert torch.allclose(torch.cov(xs.T), cov, atol=0.08)


def test_gmm_bad_input():
    with pytest.raises(ValueError, match="covs must be"):
        GaussianMixture(torch.zeros(2, 3), torch.eye(3).expand(3, 3, 3))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 3), torch.eye(3).expand(2, 3, 3), weights=[0.9, 0.9])


def test_empirical_denoiser_matches_naive_softmax():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(50, 3, 2, 2, dtype=torch.float64, generator=g)
    den = EmpiricalDenoiser(data, chunk_elems=7)  # many chunks: the streaming softmax must be exact
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=g) * 2
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 30.0], dtype=torch.float64)
    flat = data.reshape(50, -1)
    w = torch.softmax(-torch.cdist(x.reshape(5, -1), flat) ** 2 / (2 * sigma[:, None] ** 2), dim=1)
    assert torch.allclose(den(x, sigma), (w @ flat).reshape(x.shape), atol=1e-12)


def test_empirical_denoiser_large_data_runs():
    """N = 10,000 x d = 3,072 in float64 streams through chunks without building N x batch at once."""
    data = torch.randn(10_000, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    den = EmpiricalDenoiser(data)
    x = data[:2].double() + 0.01 * torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = den(x, torch.full((2,), 0.01, dtype=torch.float64))
    assert torch.allclose(out, data[:2].double(), atol=1e-6)


# Analytic models in other parameterizations, built from an exact EDM denoiser D.

def _discrete_model(den, alphas_cumprod, prediction):
    sig_table = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log()

    def model(x_vp, t):
        lo = t.floor().long().clamp(0, len(sig_table) - 2)
        sigma = torch.exp(sig_table[lo] + (t - lo) * (sig_table[lo + 1] - sig_table[lo]))
        return _vp_output(den, x_vp, sigma, prediction)
    return model


def _vp_output(den, x_vp, sigma, prediction):
    alpha = (1 / torch.sqrt(1 + sigma ** 2))[:, None]
    s = sigma[:, None] * alpha
    x = x_vp / alpha
    x0 = den(x, sigma)
    eps = (x - x0) / sigma[:, None]
    return {"epsilon": eps, "v_prediction": alpha * eps - s * x0, "sample": x0}[prediction]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vp_discrete_wrapper_is_exact(small_gmm, prediction):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    ac = torch.cumprod(1 - betas, 0)
    wrapped = VPDiscreteDenoiser(_discrete_model(small_gmm, ac, prediction), ac, prediction)
    x, _ = _x_and_sigma(small_gmm)
    sigma = torch.tensor([0.03, 0.2, 1.0, 3.0, 10.0, 14.0], dtype=torch.float64)
    assert torch.allclose(wrapped(x, sigma), small_gmm(x, sigma), rtol=1e-10, atol=1e-10)


def test_vp_discrete_wrapper_rejects_sigma_outside_range(small_gmm):
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    wrapped = VPDiscreteDenoiser(_discrete_model(small_gmm, ac, "epsilon"), ac)
    with pytest.raises(ValueError, match="outside the model's trained range"):
        wrapped(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([500.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        VPDiscreteDenoiser(lambda x, t: x, ac, "flow")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_vp_continuous_wrapper_is_exact(small_gmm, prediction):
    def model(x_vp, t):
        return _vp_output(small_gmm, x_vp, vp_sigma(t / 1000.0), prediction)
    wrapped = VPContinuousDenoiser(model, prediction, time_scale=1000.0)
    x, sigma = _x_and_sigma(small_gmm)
    assert torch.allclose(wrapped(x, sigma), small_gmm(x, sigma), rtol=1e-10, atol=1e-10)


def test_flow_wrapper_is_exact(small_gmm):
    def velocity(x_t, t):
        sigma = t / (1 - t)
        x = x_t * (1 + sigma)[:, None]
        x0 = small_gmm(x, sigma)
        return (x - x0) / sigma[:, None] - x0  # v = n - x0
    wrapped = FlowDenoiser(velocity)
    x, sigma = _x_and_sigma(small_gmm)
    assert torch.allclose(wrapped(x, sigma), small_gmm(x, sigma), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["digits", "gmm2d", "gmm64"])
def test_builtin_models_load(name):
    m = fewstep.load_model(name)
    x = fewstep.noise(3, m.shape, m.sigma_max, 0)
    assert m(x, torch.full((3,), 1.0, dtype=torch.float64)).shape == x.shape


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        fewstep.load_model("nope")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        fewstep.load_model(str(tmp_path / "missing.py") + ":make")
    f = tmp_path / "m.py"
    f.write_text("def make():\n    return 3\n")
    with pytest.raises(ValueError, match="has no function 'other'"):
        fewstep.load_model(f"{f}:other")
    with pytest.raises(ValueError, match="not a callable denoiser"):
        fewstep.load_model(f"{f}:make")
