"""Cross-checks against code nobody here wrote, on the same denoiser and sigmas, in float64.

- k-diffusion 0.1.1's ``sampling.py`` (Katherine Crowson): euler, heun, dpmpp_2m, dpmpp_3m (its 3M SDE
  sampler with eta = 0 is the ODE solver), and its Karras / exponential sigmas.
- diffusers 0.42's multistep schedulers, driven on fewstep's sigmas: UniPC (bh2, orders 2 and 3),
  DEIS (tAB, order 3), DPM-Solver++ (2M); and diffusers' Align Your Steps lists.

k-diffusion is installed with ``--no-deps`` (its dependencies pull a CUDA torch) and its ``__init__``
imports torchvision, so ``sampling.py`` is loaded on its own next to a stub ``utils`` module.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

import fewstep
from fewstep import schedules

RTOL = 1e-5
STEPS = (3, 5, 10)
KD_VERSION = "0.1.1"
KD_INSTALL = "pip install --no-deps -r requirements-test-nodeps.txt"

# diffusers' DEIS / DPM-Solver call numpy on torch tensors (NumPy 2 deprecation noise, not ours).
pytestmark = [pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


def load_k_sampling() -> types.ModuleType:
    """k-diffusion's ``k_diffusion/sampling.py`` as module ``_kdiffusion_ref.sampling``, without its package
    ``__init__``; ``utils.append_dims`` (the only helper it uses) is a stub. Raises ImportError saying
    how to install it when k-diffusion, or a package sampling.py imports, is missing."""
    if "_kdiffusion_ref.sampling" in sys.modules:
        return sys.modules["_kdiffusion_ref.sampling"]
    try:
        version = importlib.metadata.version("k-diffusion")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"k-diffusion {KD_VERSION} is not installed; install it with: {KD_INSTALL}") from None
    if version != KD_VERSION:
        raise ImportError(f"k-diffusion {version} is installed, the cross-checks need {KD_VERSION}: {KD_INSTALL}")
    path = importlib.util.find_spec("k_diffusion").submodule_search_locations[0] + "/sampling.py"
    pkg = types.ModuleType("_kdiffusion_ref")
    pkg.__path__ = []
    utils = types.ModuleType("_kdiffusion_ref.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    spec = importlib.util.spec_from_file_location("_kdiffusion_ref.sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.update({"_kdiffusion_ref": pkg, "_kdiffusion_ref.utils": utils})
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        del sys.modules["_kdiffusion_ref"], sys.modules["_kdiffusion_ref.utils"]
        raise ImportError(f"k_diffusion/sampling.py needs {e.name!r}: {KD_INSTALL}") from e
    sys.modules["_kdiffusion_ref.sampling"] = module
    return module


@pytest.fixture(scope="module")
def K():
    try:
        return load_k_sampling()
    except ImportError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def den():
    return fewstep.load_model("gmm2d")


def random_sigmas(steps: int, lo: float, hi: float, final_zero: bool, seed: int) -> torch.Tensor:
    """sigma_max, then steps - 1 (or steps) random log-uniform values below it, then 0 (or lo)."""
    g = torch.Generator().manual_seed(seed)
    inner = torch.exp(torch.empty(steps - 1, dtype=torch.float64).uniform_(np.log(lo), np.log(hi), generator=g))
    end = [0.0] if final_zero else [lo]
    return torch.cat([torch.tensor([hi], dtype=torch.float64), inner.sort(descending=True).values,
                      torch.tensor(end, dtype=torch.float64)])


SCHEDULES = ("karras", "logsnr_uniform", "random", "random_to_sigma_min")


def make_sigmas(name: str, steps: int, den) -> torch.Tensor:
    lo, hi = den.sigma_min, den.sigma_max
    if name.startswith("random"):
        return random_sigmas(steps, lo, hi, final_zero=name == "random", seed=steps)
    return schedules.builtin(name, steps, sigma_min=lo, sigma_max=hi).sigmas


def x_init(den, sigma_max: float, n: int = 16) -> torch.Tensor:
    return fewstep.noise(n, den.shape, sigma_max, seed=1)


def run_fewstep(den, x, sigmas, solver, **options):
    """fewstep's output and its states before every step (from the callback)."""
    states = []
    out = fewstep.sample(den, x, sigmas, solver, callback=lambda d: states.append(d["x"]), **options)
    return out, states


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype == torch.float64, what
    err = float((got - want).norm() / want.norm())
    assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL}"


def assert_states(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} states vs {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, f"{what}, state before step {i}")


# --------------------------------------------------------------------------------------------
# k-diffusion


def test_karras_and_exponential_sigmas_match_k_diffusion(K):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion builds its ramp in the default dtype
    try:
        for steps in STEPS:
            for lo, hi, rho in [(0.002, 80.0, 7.0), (0.03, 14.6, 5.0)]:
                assert_close(schedules.karras(steps, lo, hi, rho).sigmas, K.get_sigmas_karras(steps, lo, hi, rho),
                             f"karras steps={steps}")
                assert_close(schedules.karras(steps, lo, hi, rho, final_zero=False).sigmas,
                             K.get_sigmas_karras(steps + 1, lo, hi, rho)[:-1], f"karras to sigma_min steps={steps}")
                assert_close(schedules.logsnr_uniform(steps, lo, hi).sigmas,
                             K.get_sigmas_exponential(steps, lo, hi), f"exponential steps={steps}")
    finally:
        torch.set_default_dtype(default)


K_SAMPLERS = {
    "euler": lambda K, m, x, s, cb: K.sample_euler(m, x, s, callback=cb, disable=True),
    "heun": lambda K, m, x, s, cb: K.sample_heun(m, x, s, callback=cb, disable=True),
    "dpmpp_2m": lambda K, m, x, s, cb: K.sample_dpmpp_2m(m, x, s, callback=cb, disable=True),
    # eta = 0: the ODE solver DPM-Solver++(3M); it draws no noise, so the noise sampler must stay unused.
    "dpmpp_3m": lambda K, m, x, s, cb: K.sample_dpmpp_3m_sde(m, x, s, callback=cb, disable=True, eta=0.0,
                                                            noise_sampler=_no_noise),
}


def _no_noise(sigma, sigma_next):
    raise AssertionError("sample_dpmpp_3m_sde with eta=0 drew noise")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("solver", list(K_SAMPLERS))
def test_solver_matches_k_diffusion(K, den, solver, schedule):
    for steps in STEPS:
        sigmas = make_sigmas(schedule, steps, den)
        x = x_init(den, float(sigmas[0]))
        want_states = []
        want = K_SAMPLERS[solver](K, den, x, sigmas, lambda d: want_states.append(d["x"]))
        got, got_states = run_fewstep(den, x, sigmas, solver)
        what = f"{solver} vs k-diffusion, {schedule}, {steps} steps"
        assert_states(got_states, want_states, what)
        assert_close(got, want, what)


# --------------------------------------------------------------------------------------------
# diffusers


def drive_diffusers(scheduler, den, x: torch.Tensor, sigmas: torch.Tensor, steps: int | None = None):
    """Run a diffusers multistep scheduler on ``sigmas`` (EDM sigmas are diffusers' VE sigmas
    sqrt((1 - alpha_bar) / alpha_bar), its ``scheduler.sigmas``), the model output being the denoiser's
    x0 (prediction_type='sample'). Diffusers' state is x_vp = alpha x with alpha = 1 / sqrt(1 + sigma^2).
    Returns the EDM states before each of the first ``steps`` steps and the state after them."""
    n = len(sigmas) - 1
    scheduler.set_timesteps(n)
    scheduler.sigmas = sigmas.clone()
    scheduler.timesteps = torch.arange(n - 1, -1, -1)  # only their count matters once the begin index is set
    scheduler.set_begin_index(0)
    alpha = (1 + sigmas ** 2).rsqrt()
    x_vp, states = x * alpha[0], []
    for i in range(n if steps is None else steps):
        x = x_vp / alpha[i]
        states.append(x)
        x_vp = scheduler.step(den(x, sigmas[i].expand(len(x))), scheduler.timesteps[i], x_vp).prev_sample
    return states, x_vp / alpha[len(states)]


@pytest.fixture(scope="module")
def diffusers():
    try:
        import diffusers
    except ImportError as e:
        pytest.fail(f"diffusers is a test extra, install it with: pip install -e .[test] ({e})")
    return diffusers


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_matches_diffusers(diffusers, den, order, schedule):
    for steps in STEPS:
        sigmas = make_sigmas(schedule, steps, den)
        x = x_init(den, float(sigmas[0]))
        sch = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type="bh2", predict_x0=True,
                                                lower_order_final=True, prediction_type="sample")
        want_states, want = drive_diffusers(sch, den, x, sigmas)
        got, got_states = run_fewstep(den, x, sigmas, "unipc" if order == 2 else "unipc_3")
        what = f"unipc order {order} vs diffusers, {schedule}, {steps} steps"
        assert_states(got_states, want_states, what)
        assert_close(got, want, what)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_deis_matches_diffusers(diffusers, den, lower_order_final, schedule):
    """Diffusers' DEIS cannot step onto sigma = 0 (its update evaluates 0 * inf there), so on a schedule
    ending at 0 the last step is checked as fewstep's rule: the denoised estimate. With its
    ``lower_order_final`` (orders 2 and 1 on the last two steps, below 15 steps) fewstep gets ``orders``."""
    for steps in STEPS:
        sigmas = make_sigmas(schedule, steps, den)
        x = x_init(den, float(sigmas[0]))
        sch = diffusers.DEISMultistepScheduler(solver_order=3, algorithm_type="deis", solver_type="logrho",
                                               lower_order_final=lower_order_final, prediction_type="sample")
        to_zero = float(sigmas[-1]) == 0
        want_states, want = drive_diffusers(sch, den, x, sigmas, steps=steps - 1 if to_zero else None)
        if to_zero:
            want_states.append(want)
            want = den(want, sigmas[-2].expand(len(x)))
        opts = {"orders": [3] * (steps - 2) + [2, 1][-steps:]} if lower_order_final else {}
        got, got_states = run_fewstep(den, x, sigmas, "deis", **opts)
        what = f"deis (lower_order_final={lower_order_final}) vs diffusers, {schedule}, {steps} steps"
        assert_states(got_states, want_states, what)
        assert_close(got, want, what)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dpmpp_2m_matches_diffusers(diffusers, den, schedule):
    """DPMSolverMultistepScheduler rounds its state to float32 inside every step, so this agrees to about 1e-7."""
    for steps in STEPS:
        sigmas = make_sigmas(schedule, steps, den)
        x = x_init(den, float(sigmas[0]))
        final = "zero" if float(sigmas[-1]) == 0 else "sigma_min"  # 'zero' makes its last step first order
        sch = diffusers.DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++",
                                                    solver_type="midpoint", lower_order_final=False,
                                                    final_sigmas_type=final, prediction_type="sample")
        want_states, want = drive_diffusers(sch, den, x, sigmas)
        got, got_states = run_fewstep(den, x, sigmas, "dpmpp_2m")
        what = f"dpmpp_2m vs diffusers, {schedule}, {steps} steps"
        assert_states(got_states, [s.double() for s in want_states], what)
        assert_close(got, want.double(), what)


def test_ays_matches_diffusers_lists_and_interpolation_rule(diffusers):
    """diffusers ships the 10-step AYS lists with the last sigma already set to 0. Other step counts:
    log sigma interpolated linearly on a uniform index axis (AYS authors' rule), then the last set to 0."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    lists = {"sd15": "StableDiffusionSigmas", "sdxl": "StableDiffusionXLSigmas", "svd": "StableDiffusionVideoSigmas"}
    assert set(lists) == set(schedules.AYS_SIGMAS)
    for model, key in lists.items():
        published = torch.tensor(AysSchedules[key], dtype=torch.float64)
        assert_close(schedules.ays(10, model).sigmas, published, f"ays {model} 10 steps")
        assert torch.equal(torch.tensor(schedules.AYS_SIGMAS[model][:-1], dtype=torch.float64), published[:-1])
        for steps in (3, 5, 7, 20, 32):
            log_rev = np.log(np.array(schedules.AYS_SIGMAS[model])[::-1])
            want = np.exp(np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, len(log_rev)), log_rev))[::-1].copy()
            want[-1] = 0.0
            assert_close(schedules.ays(steps, model).sigmas, torch.from_numpy(want), f"ays {model} {steps} steps")
