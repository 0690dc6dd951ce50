"""LD3: the lambda cumulative-softmax parameterization, its gradient through the solvers, the method."""

import math

import pytest
import torch

import fewstep
from fewstep.schedules import logits_from_sigmas, sigmas_from_logits
from fewstep.methods.ld3 import RERANK
from fewstep.solvers import SOLVERS

SMAX, SMIN = 80.0, 0.002


def small_gmm():
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], dtype=torch.float64)
    covs = torch.stack([torch.diag(torch.tensor(v, dtype=torch.float64)) for v in ([0.01, 0.04], [0.3, 0.1], [0.05, 0.5])])
    return fewstep.GaussianMixture(means, covs, name="small")


@pytest.mark.parametrize("learn_last", [True, False])
def test_sigmas_from_logits_valid_schedule(learn_last):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 4, generator=g, dtype=torch.float64)  # 5 samples, K = 4 logits
    sig = sigmas_from_logits(logits, SMAX, SMIN, learn_last)
    steps = 4 if learn_last else 5
    assert sig.shape == (steps + 1, 5)
    assert (sig[1:] < sig[:-1]).all()
    assert (sig[0] == SMAX).all() and (sig[-1] == 0).all()
    if learn_last:
        assert (sig[-2] > SMIN).all()
    else:
        assert torch.allclose(sig[-2], torch.full((5,), SMIN, dtype=torch.float64))
    for i in range(5):  # the batched form is the per-sample form
        fewstep.Schedule(sig[:, i])
        assert torch.equal(sigmas_from_logits(logits[i], SMAX, SMIN, learn_last), sig[:, i])


def test_logits_roundtrip_karras():
    sched = fewstep.schedules.karras(5, SMIN, SMAX).sigmas
    back = sigmas_from_logits(logits_from_sigmas(sched, SMIN, False), SMAX, SMIN, False)
    assert torch.allclose(back, sched, rtol=1e-10)
    longer = fewstep.schedules.karras(5, SMIN, SMAX, final_zero=False).sigmas
    up = torch.cat([longer[:-1], longer.new_zeros(1)])  # last positive sigma above sigma_min
    assert torch.allclose(sigmas_from_logits(logits_from_sigmas(up, SMIN, True), SMAX, SMIN, True), up, rtol=1e-10)


def _loss(den, solver, x, target, logits):
    fn, opts = SOLVERS[solver]
    out = fn(den, x, sigmas_from_logits(logits, SMAX, SMIN, True), **opts)
    return (out - target).pow(2).mean()


@pytest.mark.parametrize("solver", ["euler", "ipndm", "dpmpp_2m", "unipc_3", "heun"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_schedule_gradient_matches_finite_differences(solver, per_sample):
    den = small_gmm()
    x = fewstep.noise(6, (2,), SMAX, seed=3)
    target = fewstep.Teacher(den, steps=64).solve(x, sigma_max=SMAX)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*((6,) if per_sample else ()), 4, generator=g, dtype=torch.float64, requires_grad=True)
    _loss(den, solver, x, target, logits).backward()
    eps = 1e-6
    fd = torch.zeros_like(logits)
    flat = fd.view(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(logits).view(-1)
        e[i] = eps
        e = e.view_as(logits)
        with torch.no_grad():
            flat[i] = (_loss(den, solver, x, target, logits + e) - _loss(den, solver, x, target, logits - e)) / (2 * eps)
    assert logits.grad.abs().max() > 1e-6  # the check is not vacuous
    assert torch.allclose(logits.grad, fd, rtol=1e-5, atol=1e-9)


@pytest.fixture(scope="module")
def gmm2d_setup():
    den = fewstep.load_model("gmm2d")
    teacher = fewstep.Teacher(den, steps=256)
    return den, teacher, fewstep.noise(128, den.shape, den.sigma_max, seed=1)


@pytest.mark.parametrize("solver,nfe,n", [("ipndm", 3, 64), ("heun", 4, 48)])
def test_ld3_beats_karras_held_out(gmm2d_setup, solver, nfe, n):
    den, teacher, test = gmm2d_setup
    sched = fewstep.optimize(den, "ld3", solver, nfe, n=n, teacher=teacher, iters=80, starts=2)
    assert fewstep.nfe(sched, solver) == nfe and sched.sigma_max == den.sigma_max and sched.sigma_final == 0
    tr = sched.metadata["training"]
    assert tr["teacher_calls"] > 0 and tr["student_calls"] > 0 and tr["seconds"] > 0
    assert tr["valid_best"] <= tr["valid_init"] and tr["n_train"] == tr["n_valid"] == n // 2
    assert tr["radius"] == pytest.approx(0.001 * 2 / fewstep.plan(solver, nfe)[0] ** 2)
    steps, _ = fewstep.plan(solver, nfe)
    base = fewstep.schedules.karras(steps, den.sigma_min, den.sigma_max).with_metadata(
        solver_options=sched.solver_options)
    err = fewstep.evaluate(den, sched, solver, x=test, teacher=teacher, distribution=False)["mean"]
    err_base = fewstep.evaluate(den, base, solver, x=test, teacher=teacher, distribution=False)["mean"]
    assert err < err_base


def start_errors(den, train, y, solver, steps, **named):
    """LD3's starts' training errors: every baseline, (_up) the baseline of one more step without its sigma_min,
    and the ``named`` schedules."""
    def sigmas(name):
        base = name.removesuffix("_up")
        if base in named:
            return named[base]
        if base == name:
            return fewstep.schedules.builtin(name, steps, den.sigma_min, den.sigma_max).sigmas
        longer = fewstep.schedules.builtin(base, steps, den.sigma_min, den.sigma_max, final_zero=False).sigmas
        return torch.cat([longer[:-1], longer.new_zeros(1)])

    names = [*named, *fewstep.schedules.BASELINES] + [f"{b}_up" for b in fewstep.schedules.BASELINES if b != "ays"]
    return {n: float(fewstep.rmse(fewstep.sample(den, train, sigmas(n), solver), y).mean()) for n in names}


def test_ld3_starts_from_the_best_schedule_and_is_memoized(gmm2d_setup):
    """LD3 starts from the candidate (every baseline, OSS) with the least error on the whole calibration batch
    among the RERANK with the least training error; OSS is not rerun."""
    den, teacher, _ = gmm2d_setup
    calib = fewstep.noise(32, den.shape, den.sigma_max, seed=0)
    oss = fewstep.optimize(den, "oss", "euler", 3, calib=calib, teacher=teacher)
    first = fewstep.optimize(den, "ld3", "euler", 3, calib=calib, teacher=teacher)
    tr = first.metadata["training"]
    assert tr["starts"] == [tr["init"]] and not tr["reused"]
    assert tr["valid_best"] <= tr["valid_init"]  # never worse than its start on validation
    train, y = calib[:16], teacher.solve(calib, den.sigma_max)[:16]

    errors = start_errors(den, train, y, "euler", 3, oss=oss.sigmas)
    top = sorted(errors, key=errors.get)[:RERANK]
    whole = start_errors(den, calib, teacher.solve(calib, den.sigma_max), "euler", 3, oss=oss.sigmas)
    assert tr["init"] in top and whole[tr["init"]] <= min(whole[n] for n in top) * (1 + 1e-6)
    # ranking 12 starts on the training part, RERANK on the validation part, training: OSS's DP not rerun
    assert tr["student_calls"] <= (12 + RERANK) * 3 + 3 + tr["iters"] * 6
    valid = calib[16:]
    pol = fewstep.optimize(den, "instance", "euler", 3, calib=calib, teacher=teacher, iters=1, gate=float("inf"))
    assert pol.metadata["training"]["ld3_reused"]  # ld3's global stage, not trained again
    assert torch.allclose(pol.sigmas_for(valid)[:, 0], first.sigmas)
    other = fewstep.optimize(den, "instance", "euler", 3, calib=calib, teacher=teacher, iters=1, lr=0.5)
    assert other.metadata["training"]["ld3_reused"]  # phi's options do not change the global stage


def test_ld3_gits_start_is_the_gits_cell():
    """With ``gits`` the GITS schedule of the same options is one more start, taken from optimize's memo (no new
    calls beyond ranking it); where it is the best start (gmm64, Euler, 3 steps), training starts from it."""
    den = fewstep.load_model("gmm64")
    teacher, calib = fewstep.Teacher(den, steps=256), fewstep.noise(32, den.shape, den.sigma_max, seed=4)
    kw = dict(calib=calib, teacher=teacher, iters=2, oss=False)
    plain = fewstep.optimize(den, "ld3", "euler", 3, **kw).metadata["training"]
    gits = fewstep.optimize(den, "gits", "euler", 3, calib=calib, teacher=teacher, grid=20, warmup=8)
    tr = fewstep.optimize(den, "ld3", "euler", 3, gits=True, gits_grid=20, gits_warmup=8, **kw).metadata["training"]
    assert tr["student_calls"] == plain["student_calls"] + 3  # one more batched run (GITS ranked), GITS not rerun
    train, y = calib[:16], teacher.solve(calib, den.sigma_max)[:16]
    errors = start_errors(den, train, y, "euler", 3, gits=gits.sigmas)
    assert errors[tr["init"]] <= min(errors.values()) * (1 + 1e-6)
    assert tr["init"] == "gits" != plain["init"]  # the case this test is about
    with pytest.raises(ValueError, match="warmup"):
        fewstep.optimize(den, "ld3", "euler", 3, n=8, teacher=teacher, gits=True, gits_warmup=0)


def test_ld3_fixed_last_sigma_and_l1(gmm2d_setup):
    den, teacher, _ = gmm2d_setup
    sched = fewstep.optimize(den, "ld3", "euler", 4, n=32, teacher=teacher, iters=20, starts=1,
                             learn_last=False, loss="l1", radius=0.0, oss=False)
    assert sched.sigmas[-2] == pytest.approx(den.sigma_min) and sched.steps == 4
    assert sched.metadata["training"]["loss"] == "l1"
    assert sched.metadata["training"]["starts"][0] in fewstep.schedules.BASELINES  # no OSS, no _up variants


@pytest.mark.parametrize("options,match", [
    ({"loss": "l3"}, "loss"), ({"valid": 1.5}, "valid"), ({"starts": 0}, "starts"), ({"n": 1}, "too small"),
    ({"valid_every": 0}, "valid_every"), ({"valid_every": 1.5}, "valid_every"),
])
def test_ld3_bad_options(gmm2d_setup, options, match):
    den, teacher, _ = gmm2d_setup
    with pytest.raises(ValueError, match=match):
        fewstep.optimize(den, "ld3", "euler", 3, teacher=teacher, **{"n": 8, "iters": 1, **options})


def test_ld3_validates_every_k_steps(gmm2d_setup):
    """valid_every=k: the validation half is solved after every k-th step and after the last one only, so the
    student makes (iters + validations) * NFE calls in training; patience counts steps, not validations."""
    den, teacher, _ = gmm2d_setup
    calib = fewstep.noise(32, den.shape, den.sigma_max, seed=0)
    spent = {}
    for k in (1, 3):
        sched = fewstep.optimize(den, "ld3", "euler", 3, calib=calib, teacher=teacher, iters=10, patience=100,
                                 oss=False, valid_every=k)
        tr = sched.metadata["training"]
        assert tr["iters"] == 10 and tr["valid_best"] <= tr["valid_init"]
        spent[k] = tr["student_calls"]
    assert spent[1] - spent[3] == (10 - 4) * 3  # batched calls: validations after steps 3, 6, 9, 10, not all ten
    stuck = fewstep.optimize(den, "ld3", "euler", 3, calib=calib, teacher=teacher, iters=200, patience=4,
                             oss=False, valid_every=2, lr=0.0)  # never better: 4 restarts of 4 steps (2 validations)
    assert stuck.metadata["training"]["iters"] == 16


def test_ld3_nothing_to_learn(gmm2d_setup):
    den, teacher, _ = gmm2d_setup
    with pytest.raises(ValueError, match="nothing to optimize"):
        fewstep.optimize(den, "ld3", "euler", 1, n=8, teacher=teacher)


def test_default_radius_formula():
    from fewstep.methods.ld3 import default_radius

    assert default_radius((3, 32, 32), 10) == pytest.approx(0.03072)  # LD3's CIFAR-10 value at 10 steps
    assert math.isclose(default_radius((2,), 3), 0.002 / 9)
