"""SDM: Wasserstein-bounded step search, N-step resampling, the adaptive-order gate (issue 6)."""

import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep.methods import sdm
from fewstep.sampling import CheckedDenoiser
from fewstep.schedules import karras


@pytest.fixture(scope="module")
def gmm2d():
    return fewstep.load_model("gmm2d")


def _local_errors(den, sigmas, x, teacher):
    """Per interval, the RMS gap between one Euler step from the teacher's state and the teacher."""
    traj = teacher.trajectory(x, sigmas, substeps=16)
    out = []
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (traj[i] - den(traj[i], torch.full((x.shape[0],), s, dtype=torch.float64))) / s
        out.append(float(fewstep.rmse(traj[i] + (s_next - s) * d, traj[i + 1]).mean()))
    return torch.tensor(out)


def test_tolerance_bounds_local_error_and_sets_path_length(gmm2d):
    x = fewstep.noise(32, gmm2d.shape, gmm2d.sigma_max, 0)
    teacher = fewstep.Teacher(gmm2d, steps=256)
    lengths, errors = [], []
    for eta_max in (4e-3, 2e-3, 1e-3):
        path, etas, _ = sdm.search(CheckedDenoiser(gmm2d), x, gmm2d.sigma_min, gmm2d.sigma_max,
                                eta_min=eta_max / 10, eta_max=eta_max)
        assert path[0] == gmm2d.sigma_max and path[-1] == gmm2d.sigma_min and (path[1:] < path[:-1]).all()
        lengths.append(len(path) - 1)
        errors.append(_local_errors(gmm2d, path, x, teacher).mean())
        # the measured eta of the steps taken stays near the tolerance (0.95^2 of it where the secant is exact)
        tol = torch.tensor([sdm.eta_of(float(s), gmm2d.sigma_max, eta_max / 10, eta_max, 1.0) for s in path[:-1]])
        assert (etas <= 2 * tol).float().mean() > 0.9
    assert lengths[0] < lengths[1] < lengths[2]
    assert errors[0] > errors[1] > errors[2]


def test_rms_secant_takes_smaller_steps_than_mean(gmm2d):
    # the RMS over the batch is >= the mean, so the W2 (RMS) search takes more, smaller steps
    x = fewstep.noise(32, gmm2d.shape, gmm2d.sigma_max, 0)
    lengths = [len(sdm.search(CheckedDenoiser(gmm2d), x, gmm2d.sigma_min, gmm2d.sigma_max, batch=b)[0])
               for b in ("mean", "rms")]
    assert lengths[0] < lengths[1]


def test_resample_exact_steps_and_endpoints():
    path = karras(50, 0.002, 80.0, final_zero=False).sigmas
    etas = torch.ones(50)
    for steps in (2, 7, 30):
        s = sdm.resample(path, etas, steps, q=0.0)
        assert len(s) == steps + 1 and s[0] == path[0] and s[-2] == path[-1] and s[-1] == 0
        assert (s[1:] < s[:-1]).all()
    # equal weights on a rho-grid path give back the rho-grid; q > 0 moves nodes to lower sigma
    assert torch.allclose(sdm.resample(path, etas, 11, q=0.0), karras(11, 0.002, 80.0).sigmas, rtol=1e-9)
    assert (sdm.resample(path, etas, 11, q=0.5)[1:-2] < sdm.resample(path, etas, 11, q=0.0)[1:-2]).all()


@pytest.mark.parametrize("name, solver, nfe, held_out", [("gmm2d", "heun", 10, 64), ("digits", "heun", 10, 64),
                                                           ("gmm64", "unipc", 20, 256)])
def test_heldout_beats_karras(name, solver, nfe, held_out):
    den = fewstep.load_model(name)
    teacher = fewstep.Teacher(den, steps=256)
    xt = fewstep.noise(held_out, den.shape, den.sigma_max, 1)
    sched = fewstep.optimize(den, "sdm", solver, nfe, n=32, teacher=teacher)
    assert fewstep.nfe(sched) == nfe and sched.solver == solver
    steps, opts = fewstep.plan("heun", nfe)
    err = fewstep.evaluate(den, sched, x=xt, teacher=teacher, distribution=False)["mean"]
    heun = fewstep.evaluate(den, karras(steps).with_metadata(solver_options=opts), "heun", x=xt, teacher=teacher,
                            distribution=False)["mean"]
    euler = fewstep.evaluate(den, karras(nfe), "euler", x=xt, teacher=teacher, distribution=False)["mean"]
    assert err < min(heun, euler)


def test_stored_gate_matches_online_gate_and_nfe(gmm2d):
    teacher = fewstep.Teacher(gmm2d, steps=256)
    x = fewstep.noise(32, gmm2d.shape, gmm2d.sigma_max, 0)
    for solver, nfe in (("heun", 20), ("dpmpp_2m", 8)):
        sched = fewstep.optimize(gmm2d, "sdm", solver, nfe, calib=x, teacher=teacher)
        info = sched.metadata["sdm"]
        orders = sched.solver_options["orders"]
        assert fewstep.nfe(sched) == nfe and len(orders) == sched.steps and orders[-1] == 1
        switch = orders.index(2) if 2 in orders else len(orders)
        assert switch == info["switch"] or (switch == len(orders) and info["switch"] >= len(orders) - 1)
        # on the calibration batch the online gate with the stored tau makes the same decisions
        stored = fewstep.sample(gmm2d, x, sched)
        online, calls = sdm.sample_adaptive(gmm2d, x, sched)
        assert calls == nfe and torch.allclose(stored, online)


def test_given_tau_is_used(gmm2d):
    x = fewstep.noise(16, gmm2d.shape, gmm2d.sigma_max, 0)
    zero = fewstep.optimize(gmm2d, "sdm", "dpmpp_2m", 6, calib=x, tau=0.0)
    assert zero.solver_options["orders"] == [2] * 5 + [1]
    huge = fewstep.optimize(gmm2d, "sdm", "dpmpp_2m", 6, calib=x, tau=1e30)
    assert huge.solver_options["orders"] == [1] * 6


def test_switch_is_chosen_on_gate_samples_noises(gmm2d):
    """The calibration batch (8 noises) is extended with seeded noises to gate_samples for the choice, or cut
    to its first gate_samples."""
    batches = []

    def spy(x, sigma):
        batches.append(x.shape[0])
        return gmm2d(x, sigma)

    spy.shape, spy.sigma_min, spy.sigma_max = gmm2d.shape, gmm2d.sigma_min, gmm2d.sigma_max
    sched = fewstep.optimize(spy, "sdm", "heun", 12, n=8, gate_samples=24, teacher=fewstep.Teacher(spy, steps=32))
    assert fewstep.nfe(sched) == 12 and 24 in batches and max(batches) == 24
    batches.clear()  # fewer than the batch: kappa and the choice on its first gate_samples noises only
    teacher = fewstep.Teacher(spy, steps=32)
    sched = fewstep.optimize(spy, "sdm", "heun", 12, n=8, gate_samples=3, search_samples=2, teacher=teacher)
    assert fewstep.nfe(sched) == 12 and sched.metadata["sdm"]["switch"] is not None
    assert set(batches) <= {2, 3, 8} and 3 in batches  # search on 2, gate on 3, the teacher's solve of the 8
    assert teacher.calls == batches.count(8)  # one solve of the batch: the gate takes its first 3 answers


@pytest.mark.parametrize("switch, nfe", [(0, 11), (1, 12), (3, 12)])  # Heun from step 0 spends an odd NFE
def test_given_switch_is_used(gmm2d, switch, nfe):
    x = fewstep.noise(16, gmm2d.shape, gmm2d.sigma_max, 0)
    sched = fewstep.optimize(gmm2d, "sdm", "heun", nfe, calib=x, switch=switch)
    orders = sched.solver_options["orders"]
    assert orders == [1] * switch + [2] * (len(orders) - 1 - switch) + [1] and fewstep.nfe(sched) == nfe
    assert sched.metadata["sdm"]["switch"] == switch


@pytest.mark.parametrize("opts, match", [
    ({"eta_min": 0.3, "eta_max": 0.2}, "eta_min <= eta_max"),
    ({"tau": -1e-4}, "tau must be >= 0"),
    ({"norm": "l1"}, "norm must be"),
    ({"batch": "max"}, "batch must be"),
    ({"switch": -1}, "switch must be"),
    ({"gate_samples": 0}, "gate_samples must be"),
    ({"resampling": "rk4"}, "resampling must be"),
    ({"switch": 1, "tau": 1e-4}, "not given with tau"),
])
def test_bad_options(gmm2d, opts, match):
    with pytest.raises(ValueError, match=match):
        fewstep.optimize(gmm2d, "sdm", "heun", 8, n=4, **opts)


def test_nfe_below_minimum(gmm2d):
    with pytest.raises(ValueError, match="nothing to optimize"):
        fewstep.optimize(gmm2d, "sdm", "dpmpp_2m", 1, n=4)
    with pytest.raises(ValueError, match="tau"):
        sdm.sample_adaptive(gmm2d, torch.zeros(2, 2), karras(4))
    assert math.isclose(sdm.eta_of(80.0, 80.0, 0.02, 0.2, 1.0), 0.2)


@pytest.mark.parametrize("low, high", [(0, 5), (2, 6), (5, 1), (4, 0)])
def test_resample_orders_exact_steps(gmm2d, low, high):
    """low first-order then high second-order steps, decreasing from sigma_max to sigma_min, then 0."""
    x = fewstep.noise(16, gmm2d.shape, gmm2d.sigma_max, 0)
    path, etas, second = sdm.search(CheckedDenoiser(gmm2d), x, gmm2d.sigma_min, gmm2d.sigma_max)
    assert second.shape == etas.shape and (second >= 0).all()
    sig = sdm.resample_orders(path, etas, second, low, high)
    assert len(sig) == low + high + 2 and sig[0] == gmm2d.sigma_max and sig[-2] == gmm2d.sigma_min and sig[-1] == 0
    assert (sig[1:] < sig[:-1]).all()
    if high == 0:  # all first order: the plain resampled schedule
        assert torch.equal(sig, sdm.resample(path, etas, low + 1))


def test_second_order_part_equidistributes_heun_error(gmm2d):
    """Below the split, every second-order step carries the same weight sum (T/12)^(1/3) h (q = 0)."""
    x = fewstep.noise(16, gmm2d.shape, gmm2d.sigma_max, 0)
    path, etas, second = sdm.search(CheckedDenoiser(gmm2d), x, gmm2d.sigma_min, gmm2d.sigma_max)
    sig = sdm.resample_orders(path, etas, second, 0, 8, q=0.0)[:-1]
    w = (second / 12) ** (1 / 3) * (path[:-1] - path[1:])
    cum = torch.cat([w.new_zeros(1), w.cumsum(0)])
    at = [float(np.interp(-float(s), -path.numpy(), cum.numpy())) for s in sig]  # weight above each node
    parts = torch.tensor([at[i + 1] - at[i] for i in range(8)])
    assert float(parts.std() / parts.mean()) < 0.02  # equal up to interpolation (the Euler density: 0.17)
