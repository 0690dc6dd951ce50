import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fewstep
from fewstep import schedules as S
from fewstep.sampling import CheckedDenoiser, DenoiserError


class Counting:
    def __init__(self, den):
        self.den, self.calls = den, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.den(x, sigma)


def _grid(n, lam0, lam1, warm=0, frac=1e-3, var="log"):
    """n uniform steps in lambda = -log sigma (var='log') or in -sigma (var='lin'), with ``warm``
    tiny steps at each end so that lower-order warm-up/final steps do not mask a solver's order."""
    h = (lam1 - lam0) / n
    eps = h * frac
    pts = ([lam0 + i * eps for i in range(warm)]
           + torch.linspace(lam0 + warm * eps, lam1 - warm * eps, n + 1, dtype=torch.float64).tolist()
           + [lam1 - i * eps for i in range(warm - 1, -1, -1)])
    t = torch.tensor(pts, dtype=torch.float64)
    return torch.exp(-t) if var == "log" else -t


# solver, options, grid variable, tiny warm-up steps, expected global order
ORDERS = [
    ("euler", {}, "log", 0, 1.0),
    ("heun", {}, "log", 0, 2.0),
    ("dpmpp_2m", {}, "log", 3, 2.0),
    ("dpmpp_3m", {}, "log", 3, 2.0),  # published D2 weight: second order (see solvers.dpmpp_3m)
    ("dpmpp_3m", {"exact3": True}, "log", 3, 3.0),
    ("unipc", {}, "log", 3, 3.0),  # UniPC-2 with the corrector is order 3 (Zhao et al. 2023, Thm 3.1)
    ("unipc_3", {}, "log", 3, 4.0),
    ("unipc", {"corrector": False}, "log", 3, 2.0),
    ("ipndm", {"max_order": 2}, "lin", 0, 2.0),
    ("ipndm", {"max_order": 3}, "lin", 0, 3.0),
    ("deis", {"order": 2}, "lin", 0, 2.0),
    ("deis", {}, "lin", 0, 3.0),
]


_REFS = {}


@pytest.mark.parametrize("solver,opts,var,warm,order", ORDERS)
def test_order_of_convergence(small_gmm, solver, opts, var, warm, order):
    """Halving the step cuts the global error by ~2^p: catches a wrong coefficient."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64) * 5
    lam0, lam1 = (-math.log(5.0), -math.log(0.5)) if var == "log" else (-5.0, -0.5)
    if var not in _REFS:
        _REFS[var] = fewstep.sample(small_gmm, x, _grid(4096, lam0, lam1, var=var), "unipc_3")
    ref = _REFS[var]
    errs = [float(fewstep.rmse(fewstep.sample(small_gmm, x, _grid(n, lam0, lam1, warm, var=var), solver, **opts),
                               ref).mean()) for n in (16, 32, 64)]
    observed = math.log2(errs[-2] / errs[-1])
    assert abs(observed - order) < 0.35, f"{solver}{opts}: errors {errs}, observed order {observed:.2f}"


@pytest.mark.parametrize("solver", fewstep.solvers.PLANNED)
@pytest.mark.parametrize("budget", [1, 2, 3, 4, 5, 6, 7, 10])
def test_nfe_matches_counted_calls(small_gmm, solver, budget):
    steps, opts = fewstep.plan(solver, budget)
    sched = S.karras(steps).with_metadata(solver=solver, solver_options=opts)
    assert fewstep.nfe(sched) == budget
    counter = Counting(small_gmm)
    fewstep.sample(counter, fewstep.noise(3, (4,), 80, 0), sched)
    assert counter.calls == budget


@pytest.mark.parametrize("solver", fewstep.solvers.PLANNED)
def test_nfe_counts_schedules_ending_above_zero(small_gmm, solver):
    sched = S.karras(5, final_zero=False)
    counter = Counting(small_gmm)
    fewstep.sample(counter, fewstep.noise(2, (4,), 80, 0), sched, solver)
    assert counter.calls == fewstep.nfe(sched, solver)


@st.composite
def schedules(draw):
    n = draw(st.integers(1, 8))
    inner = draw(st.lists(st.floats(0.003, 79.0), min_size=n - 1, max_size=n - 1, unique=True))
    sig = sorted(set(inner), reverse=True)
    return [80.0] + sig + [0.0]


@settings(max_examples=25, deadline=None)
@given(sigmas=schedules(), solver=st.sampled_from(fewstep.solvers.PLANNED))
def test_random_schedules_sample_finite_with_stated_nfe(small_gmm, sigmas, solver):
    counter = Counting(small_gmm)
    out = fewstep.sample(counter, fewstep.noise(4, (4,), 80, 3), sigmas, solver)
    assert torch.isfinite(out).all()
    assert counter.calls == fewstep.nfe(sigmas, solver)


@settings(max_examples=25, deadline=None)
@given(sigmas=schedules(), solver=st.sampled_from(fewstep.solvers.PLANNED))
def test_constant_data_is_denoised_exactly(sigmas, solver):
    c = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(1, 6)
    out = fewstep.sample(lambda x, s: c.expand_as(x), fewstep.noise(3, (6,), 80, 4), sigmas, solver)
    assert torch.allclose(out, c.expand_as(out), atol=1e-10 * 80)


@pytest.mark.parametrize("solver", fewstep.solvers.PLANNED)
def test_per_sample_sigmas_match_separate_runs(small_gmm, solver):
    x = fewstep.noise(3, (4,), 80, 5)
    scheds = [S.karras(5, rho=r).sigmas for r in (3.0, 5.0, 7.0)]
    joint = fewstep.sample(small_gmm, x, _Policy(torch.stack(scheds, 1)), solver)
    for i, s in enumerate(scheds):
        assert torch.allclose(joint[i], fewstep.sample(small_gmm, x[i:i + 1], s, solver)[0], atol=1e-10)


class _Policy:
    def __init__(self, sigmas):
        self.sigmas = sigmas

    def sigmas_for(self, x):
        return self.sigmas


def test_float32_inputs_stay_float32(small_gmm):
    x = fewstep.noise(2, (4,), 80, 0, dtype=torch.float32)
    assert fewstep.sample(small_gmm, x, S.karras(4), "dpmpp_2m").dtype == torch.float32


def test_sigmas_are_differentiable(small_gmm):
    sig = S.karras(4).sigmas.clone().requires_grad_(True)
    out = fewstep.sample(small_gmm, fewstep.noise(2, (4,), 80, 0), sig, "unipc")
    out.sum().backward()
    assert torch.isfinite(sig.grad).all() and sig.grad[1:-1].abs().sum() > 0


def test_callback_sees_every_step(small_gmm):
    seen = []
    fewstep.sample(small_gmm, fewstep.noise(2, (4,), 80, 0), S.karras(5), "euler", callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5))
    assert all(d["denoised"].shape == (2, 4) for d in seen)


def test_denoiser_nan_is_named():
    with pytest.raises(DenoiserError, match="NaN or inf at sigma=80"):
        fewstep.sample(lambda x, s: x * float("nan"), fewstep.noise(2, (3,), 80, 0), S.karras(3), "euler")


def test_denoiser_wrong_shape_is_named():
    with pytest.raises(DenoiserError, match=r"shape \(2, 2\) for input of shape \(2, 3\)"):
        fewstep.sample(lambda x, s: x[:, :2], fewstep.noise(2, (3,), 80, 0), S.karras(3), "euler")
    with pytest.raises(DenoiserError, match=r"returned a tuple, not a tensor"):
        fewstep.sample(lambda x, s: (x, x), fewstep.noise(2, (3,), 80, 0), S.karras(3), "euler")


def test_unknown_solver_is_named(small_gmm):
    with pytest.raises(ValueError, match="unknown solver 'rk9'"):
        fewstep.sample(small_gmm, fewstep.noise(2, (4,), 80, 0), S.karras(3), "rk9")


def test_missing_solver_is_named(small_gmm):
    with pytest.raises(ValueError, match="no solver given"):
        fewstep.sample(small_gmm, fewstep.noise(2, (4,), 80, 0), S.karras(3))


def test_orders_length_must_match(small_gmm):
    with pytest.raises(fewstep.ScheduleError, match="'orders' has 2 entries for 3 steps"):
        fewstep.sample(small_gmm, fewstep.noise(2, (4,), 80, 0), S.karras(3), "heun", orders=[2, 2])


def test_checked_denoiser_counts():
    c = CheckedDenoiser(lambda x, s: x)
    c(torch.zeros(2, 3), torch.tensor(1.0))
    assert c.calls == 1


@pytest.mark.parametrize("solver", fewstep.solvers.PLANNED)
def test_solvers_pass_the_step_of_each_call(small_gmm, solver):
    """Every call a solver makes is at a schedule sigma, with that sigma's index passed as its step."""
    sigmas = S.karras(6).sigmas
    calls = []

    class Stepped:
        takes_step = True

        def __call__(self, x, sigma, step):
            calls.append((float(sigma), step))
            return small_gmm(x, sigma.expand(x.shape[0]))

    spec = fewstep.SOLVERS[solver]
    spec.fn(Stepped(), fewstep.noise(2, (4,), 80, 0), sigmas, **spec.options)
    assert calls and all(s == float(sigmas[j]) for s, j in calls)
    assert [j for _, j in calls] == sorted(j for _, j in calls)  # steps in order
    assert len(calls) == fewstep.nfe(sigmas, solver)


def test_registry_declares_what_planning_reads():
    """plan and nfe read the registry: a two-call solver's Heun steps, one-call solvers' steps."""
    for name in fewstep.solvers.PLANNED:
        spec = fewstep.SOLVERS[name]
        steps, opts = fewstep.plan(name, 7)
        assert steps == (4 if spec.calls_per_step == 2 else 7)
        assert fewstep.nfe(S.karras(steps), name, **opts) == 7
    assert fewstep.SOLVERS["unipc_3"].max_order() == 3 and fewstep.SOLVERS["unipc"].max_order({"order": 3}) == 3
    fn, options = fewstep.SOLVERS["ipndm"]  # unpacks as (function, default options)
    assert fn is fewstep.solvers.ipndm and options == {"max_order": 4}


def test_twins_are_the_solvers_that_run_exactly_as_an_earlier_one(small_gmm):
    """UniPC-3 at 3 and 4 calls is UniPC (its order capped), at 2 calls three multistep solvers are DPM-Solver++(2M);
    the claim holds on a real model (the same samples to the bit), and at 5 calls no two solvers agree there."""
    from fewstep.solvers import SOLVERS, plan, twins

    names = tuple(s for s in SOLVERS if s != "learned")
    assert twins(names, 4) == {"unipc_3": "unipc"} and twins(names, 5) == twins(names, 8) == {}
    assert twins(("unipc_3", "unipc"), 4) == {"unipc": "unipc_3"}  # the earlier one in the given order stays
    assert twins(names, 2) == {"heun": "euler", "dpmpp_3m": "dpmpp_2m", "unipc": "dpmpp_2m", "unipc_3": "dpmpp_2m"}
    x = fewstep.noise(4, small_gmm.shape, 80, 0)
    for k in (2, 4, 5):
        outs = {}
        for s in names:
            steps, opts = plan(s, k)
            sched = fewstep.Schedule(S.polynomial(steps).sigmas, solver=s, solver_options=opts)
            outs[s] = fewstep.sample(small_gmm, x, sched)
        for s, t in twins(names, k).items():
            assert torch.equal(outs[s], outs[t]), (k, s, t)
    assert all(not torch.equal(outs[s], outs[t]) for i, s in enumerate(names) for t in names[:i])
