"""Learned-coefficient solvers (#19): the 'learned' solver and its chain form, the analytical first step,
the s4s and pas methods, their schedule files (format version 2), fewstep tune and a diffusers pipeline."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import fewstep
from fewstep import schedules as S
from fewstep.files import FewstepWarning
from fewstep.metrics import clearly_worse
from fewstep.report import cell_label
from fewstep.solvers import SOLVERS, PLANNED, chain, pas_basis
from test_solvers import Counting as Counted

ONE_CALL = [s for s in PLANNED if SOLVERS[s].calls_per_step == 1]


def learned_schedule(sigmas, solver, **options) -> fewstep.Schedule:
    a, b = chain(solver, sigmas)
    return fewstep.Schedule(sigmas, solver="learned",
                            solver_options={"a": a.tolist(), "b": [r.tolist() for r in b], **options})


# --------------------------------------------------------------------------------------------
# the learned solver and the chain form

@pytest.mark.parametrize("solver", ONE_CALL)
@pytest.mark.parametrize("afs", [False, True])
def test_chain_coefficients_reproduce_every_one_call_solver(small_gmm, solver, afs):
    """chain(solver) run by 'learned' is the solver itself, with and without the analytical first step."""
    sigmas = S.karras(6).sigmas
    x = fewstep.noise(5, (4,), 80.0, 0)
    want = fewstep.sample(small_gmm, x, sigmas, solver, afs=afs)
    got = fewstep.sample(small_gmm, x, learned_schedule(sigmas, solver, afs=afs))
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    assert not torch.allclose(got, fewstep.sample(small_gmm, x, sigmas, solver, afs=not afs), atol=1e-6)


def test_chain_matches_k_diffusion(small_gmm):
    """chain(dpmpp_2m / dpmpp_3m) in 'learned' against k-diffusion 0.1.1's own samplers (nobody here wrote them)."""
    from test_crosscheck import load_k_sampling

    K = load_k_sampling()
    sigmas = S.karras(7, 0.002, 80.0).sigmas
    x = fewstep.noise(8, (4,), 80.0, 3)
    model = lambda x, s: small_gmm(x, s.expand(x.shape[0]))  # noqa: E731
    for solver, ref in (("dpmpp_2m", K.sample_dpmpp_2m), ("dpmpp_3m", K.sample_dpmpp_3m_sde)):
        want = ref(model, x, sigmas, disable=True, **({"eta": 0.0} if solver == "dpmpp_3m" else {}))
        got = fewstep.sample(small_gmm, x, learned_schedule(sigmas, solver))
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), solver


def test_order_caps_keep_the_newest_outputs(small_gmm):
    """orders[i] = 1: the weights of older outputs move onto the newest, so DPM-Solver++(2M)'s chain capped to
    order 1 is DPM-Solver++ at order 1, which is Euler (DDIM)."""
    sigmas = S.karras(5).sigmas
    x = fewstep.noise(4, (4,), 80.0, 1)
    capped = fewstep.sample(small_gmm, x, learned_schedule(sigmas, "dpmpp_2m"), orders=[1] * 5)
    assert torch.allclose(capped, fewstep.sample(small_gmm, x, sigmas, "euler"), atol=1e-10)
    assert torch.allclose(capped, fewstep.sample(small_gmm, x, sigmas, "dpmpp_2m", orders=[1] * 5), atol=1e-10)


def test_learned_runs_per_sample_sigmas(small_gmm):
    """The coefficients are global; per-sample sigmas only move where each sample's denoiser is evaluated."""
    sched = learned_schedule(S.karras(4).sigmas, "unipc")
    rows = torch.stack([S.karras(4, rho=r).sigmas for r in (3.0, 7.0)], 1)

    class Policy:
        solver, solver_options, steps, sigma_max = "learned", sched.solver_options, 4, 80.0

        def sigmas_for(self, x):
            return rows

    x = fewstep.noise(2, (4,), 80.0, 2)
    joint = fewstep.sample(small_gmm, x, Policy())
    for i in range(2):
        alone = fewstep.sample(small_gmm, x[i:i + 1], fewstep.Schedule(rows[:, i], **sched.metadata))
        assert torch.allclose(joint[i], alone[0], atol=1e-12)


def test_learned_errors_are_named(small_gmm):
    x = fewstep.noise(2, (4,), 80.0, 0)
    with pytest.raises(fewstep.ScheduleError, match="needs its coefficients a and b"):
        fewstep.sample(small_gmm, x, S.karras(3), "learned")
    good = learned_schedule(S.karras(3).sigmas, "euler").solver_options
    for bad, match in (({"a": [0.5, 0.5]}, "a needs 3 values"), ({"b": [[1.0], [0.1], [0.1, 0.2, 0.3]]}, "row 1"),
                       ({"a": [float("nan"), 0.1, 0.0]}, "NaN or inf"), ({"pas": [[0.1]]}, "pas needs one list per step"),
                       ({"afs": "yes"}, "'afs' must be true or false")):
        with pytest.raises(fewstep.ScheduleError, match=match):
            fewstep.sample(small_gmm, x, S.karras(3), "learned", **{**good, **bad})
    with pytest.raises(ValueError, match="'learned' runs the coefficients a method made"):
        fewstep.plan("learned", 4)
    with pytest.raises(ValueError, match="heun is not a one-call-per-step solver"):
        chain("heun", S.karras(3).sigmas)
    with pytest.raises(ValueError, match="unplanned solver"):
        fewstep.tune(small_gmm, solvers=["learned"], progress=False)


# --------------------------------------------------------------------------------------------
# the analytical first step

@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "ipndm", "unipc"])
def test_afs_first_step_follows_the_unit_gaussian_flow(small_gmm, solver):
    """With afs the first step costs no call and lands on x_1 = x_0 sqrt(1 + sigma_1^2) / sqrt(1 + sigma_0^2) (the
    exact flow of N(0, I) data, whose noise estimate at sigma_0 is diff-sampler's x / sqrt(1 + sigma^2)): the
    first call sees x_1, whose VP coordinates x_1 / sqrt(1 + sigma_1^2) are the initial state's."""
    sigmas = S.karras(5).sigmas
    x = fewstep.noise(3, (4,), 80.0, 4)
    seen = []
    fewstep.sample(lambda x, s: seen.append((x.clone(), float(s[0]))) or small_gmm(x, s), x, sigmas, solver, afs=True)
    s0, s1 = float(sigmas[0]), float(sigmas[1])
    assert len(seen) == 4 and seen[0][1] == s1
    assert torch.allclose(seen[0][0], x * math.sqrt(1 + s1 ** 2) / math.sqrt(1 + s0 ** 2), rtol=1e-12)
    assert torch.allclose(seen[0][0] / math.sqrt(1 + s1 ** 2), x / math.sqrt(1 + s0 ** 2), rtol=1e-12)


@pytest.mark.parametrize("solver", PLANNED)
@pytest.mark.parametrize("budget", [1, 2, 3, 4, 7])
def test_afs_plans_and_counts_the_calls(small_gmm, solver, budget):
    steps, opts = fewstep.plan(solver, budget, afs=True)
    assert opts["afs"] is True and steps == fewstep.plan(solver, budget + 1)[0]
    sched = S.karras(steps).with_metadata(solver=solver, solver_options=opts)
    den = Counted(small_gmm)
    out = fewstep.sample(den, fewstep.noise(3, (4,), 80.0, 0), sched)
    assert den.calls == fewstep.nfe(sched) == budget and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# schedule files

def test_learned_schedules_are_version_2_files_and_version_1_still_loads(small_gmm, tmp_path):
    sched = learned_schedule(S.karras(4).sigmas, "deis", afs=True)
    data = json.loads(sched.save(tmp_path / "l.json").read_text())
    assert data["version"] == 2 and "learned" in data["requires"] and "afs" in data["requires"]
    back = fewstep.load_schedule(tmp_path / "l.json")
    x = fewstep.noise(2, (4,), 80.0, 0)
    assert torch.equal(fewstep.sample(small_gmm, x, back), fewstep.sample(small_gmm, x, sched))
    plain = S.karras(4).with_metadata(solver="heun", solver_options={"orders": [1, 2, 2, 1]})
    assert json.loads(plain.save(tmp_path / "p.json").read_text())["version"] == 1  # old readers still read it
    v1 = {"format": "fewstep.schedule", "version": 1, "sigmas": [80.0, 1.0, 0.0], "metadata": {"solver": "euler"}}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert fewstep.load_schedule(tmp_path / "v1.json").solver == "euler"
    (tmp_path / "v3.json").write_text(json.dumps({**data, "version": 3, "requires": "fewstep with flux capacitors"}))
    with pytest.raises(fewstep.ScheduleError, match="version 3 is not supported.*needs fewstep with flux capacitors"):
        fewstep.load_schedule(tmp_path / "v3.json")


# --------------------------------------------------------------------------------------------
# PAS's basis

def test_pas_basis_is_orthonormal_deterministic_and_signed():
    g = torch.Generator().manual_seed(0)
    x_T = 80 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    dirs = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    d, x = torch.randn(3, 6, generator=g, dtype=torch.float64), x_T * 0.3
    U = pas_basis(d, x, x_T, dirs, 4)
    assert torch.allclose(U @ U.transpose(1, 2), torch.eye(4, dtype=torch.float64).expand(3, 4, 4), atol=1e-10)
    assert torch.allclose(U[:, 0], d / d.norm(dim=1, keepdim=True))
    assert ((U[:, 1:] * (x - x_T)[:, None]).sum(-1) >= 0).all()
    assert torch.equal(U, pas_basis(d, x, x_T, dirs, 4))
    short = pas_basis(d, x, x_T, [], 4)  # {x_T, d}: one principal direction, the rest zero
    assert torch.allclose(short[:, 2:], torch.zeros_like(short[:, 2:]))
    assert torch.allclose(short[:, 1].norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_zero_pas_coordinates_are_the_base_solver(small_gmm):
    sigmas = S.karras(4).sigmas
    x = fewstep.noise(3, (4,), 80.0, 5)
    sched = learned_schedule(sigmas, "ipndm", pas=[[0.0] * 4, [], [0.0] * 3, [0.0] * 2])
    assert torch.allclose(fewstep.sample(small_gmm, x, sched), fewstep.sample(small_gmm, x, sigmas, "ipndm"), atol=1e-10)
    moved = learned_schedule(sigmas, "ipndm", pas=[[], [0.1, 0.2, 0.0, 0.0], [], []])
    assert not torch.allclose(fewstep.sample(small_gmm, x, moved), fewstep.sample(small_gmm, x, sched), atol=1e-4)


# --------------------------------------------------------------------------------------------
# the methods

def gauss():
    """One isotropic Gaussian (mean mu, std 0.5): the exact flow map is x0 = mu + 0.5 / sqrt(0.25 + sigma^2) (x_T - mu)."""
    mu = torch.tensor([[1.0, -1.0, 0.5, 0.0]], dtype=torch.float64)
    return fewstep.GaussianMixture(mu, 0.25 * torch.eye(4, dtype=torch.float64)[None], name="gauss"), mu


def test_s4s_finds_the_exact_flow_map_of_a_gaussian():
    """The exact map is linear in x_T and the D's, so some 2-call 'learned' solver is exact: s4s reaches the
    teacher's own accuracy (~1e-4), where the best schedule for DPM-Solver++(2M) (LD3) is at ~0.24."""
    den, mu = gauss()
    teacher = fewstep.Teacher(den, steps=256)
    x = fewstep.noise(256, (4,), 80.0, 1)
    exact = mu + 0.5 / math.sqrt(0.25 + 80.0 ** 2) * (x - mu)
    sched = fewstep.optimize(den, "s4s", "dpmpp_2m", 2, n=32, teacher=teacher)
    ld3 = fewstep.optimize(den, "ld3", "dpmpp_2m", 2, n=32, teacher=teacher)
    err, err_ld3 = (float(fewstep.rmse(fewstep.sample(den, x, s), exact).mean()) for s in (sched, ld3))
    assert sched.solver == "learned" and sched.metadata["training"]["kept"] == "learned"
    assert err < 5e-4 and err_ld3 > 0.1


@pytest.fixture(scope="module")
def gmm2d():
    den = fewstep.load_model("gmm2d")
    teacher = fewstep.Teacher(den, steps=256)
    x = fewstep.noise(512, den.shape, den.sigma_max, 1)
    return den, teacher, x, teacher.solve(x, den.sigma_max)


def held_out(setup, sched) -> float:
    den, _, x, y = setup
    return float(fewstep.rmse(fewstep.sample(den, x, sched), y).mean())


def test_s4s_beats_ld3_at_nfe_3_and_runs_from_its_file(gmm2d, tmp_path):
    den, teacher, x, _ = gmm2d
    sched = fewstep.optimize(den, "s4s", "unipc", 3, n=32, teacher=teacher)
    ld3 = fewstep.optimize(den, "ld3", "unipc", 3, n=32, teacher=teacher)
    tr = sched.metadata["training"]
    assert sched.solver == "learned" and tr["kept"] == "learned" and tr["gate_z"] >= 1.0
    assert tr["start_solver"] == "unipc" and tr["student_calls"] > 0 and {t["afs"] for t in tr["tried"]} == {False, True}
    assert held_out(gmm2d, sched) < 0.75 * held_out(gmm2d, ld3)
    counter = Counted(den)
    fewstep.sample(counter, x[:4], fewstep.load_schedule(sched.save(tmp_path / "s4s.json")))
    assert counter.calls == fewstep.nfe(sched) == 3
    assert torch.equal(fewstep.sample(den, x[:4], fewstep.load_schedule(tmp_path / "s4s.json")),
                       fewstep.sample(den, x[:4], sched))


@pytest.mark.parametrize("method", ["s4s", "pas"])
@pytest.mark.parametrize("n", [1, 8])
def test_few_noises_are_no_worse_than_the_start(gmm2d, method, n):
    """With 1 and 8 calibration noises, held out no worse than the method's own start (what it returns
    when nothing passes: gate = inf); s4s returns its start below min_valid validation noises."""
    den, teacher, _, _ = gmm2d
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = fewstep.optimize(den, method, "dpmpp_2m", 3, n=n, teacher=teacher)
    start = fewstep.optimize(den, method, "dpmpp_2m", 3, n=n, teacher=teacher, gate=math.inf)
    assert held_out(gmm2d, sched) <= held_out(gmm2d, start)
    assert fewstep.nfe(sched) == 3
    if n == 1:
        assert any(issubclass(w.category, FewstepWarning) and "one calibration noise" in str(w.message) for w in caught)
        assert sched.solver == "dpmpp_2m" and sched.metadata["training"]["kept"] == "start"


def test_pas_corrects_the_base_solver_at_nfe_3(gmm2d):
    den, teacher, _, _ = gmm2d
    sched = fewstep.optimize(den, "pas", "euler", 3, n=32, teacher=teacher)
    tr = sched.metadata["training"]
    assert sched.solver == "learned" and tr["kept"] == "corrected" and any(s["kept"] for s in tr["steps"])
    assert len(sched.solver_options["pas"]) == 3 and all(len(c) in (0, 4) for c in sched.solver_options["pas"])
    base = fewstep.optimize(den, "pas", "euler", 3, n=32, teacher=teacher, gate=math.inf)
    assert base.solver == "euler" and held_out(gmm2d, sched) < 0.9 * held_out(gmm2d, base)


def test_method_errors_are_named(gmm2d):
    den, teacher, _, _ = gmm2d
    for method in ("s4s", "pas"):
        with pytest.raises(ValueError, match="one call a step; heun makes 2"):
            fewstep.optimize(den, method, "heun", 4, n=4, teacher=teacher)
    for method, opts, match in (("s4s", {"afs": "sometimes"}, "afs must be"), ("s4s", {"reg": -1.0}, "reg must be"),
                                ("s4s", {"min_valid": 0}, "min_valid must be"), ("pas", {"components": 0}, "components"),
                                ("pas", {"schedule": "nope"}, "schedule must be")):
        with pytest.raises(ValueError, match=match):
            fewstep.optimize(den, method, "euler", 3, n=4, teacher=teacher, **opts)


@pytest.mark.parametrize("method", ["s4s", "pas"])
def test_a_given_start_is_the_base_and_the_result_is_no_worse(gmm2d, method):
    """``start``: of the schedules that fit the solver at that NFE, the best on validation is the start (LD3
    is not trained); the result is no worse than it held out; a wrong kind of start is named."""
    den, teacher, _, _ = gmm2d
    good, other = (fewstep.tuning.baseline(m, "dpmpp_2m", 4, {"sigma_min": den.sigma_min, "sigma_max": den.sigma_max})
                   for m in ("ays", "karras"))
    too_long = fewstep.tuning.baseline("ays", "dpmpp_2m", 5, {"sigma_min": den.sigma_min, "sigma_max": den.sigma_max})
    sched = fewstep.optimize(den, method, "dpmpp_2m", 4, n=32, teacher=teacher, start=(other, good, too_long))
    start = fewstep.optimize(den, method, "dpmpp_2m", 4, n=32, teacher=teacher, start=(good,), gate=math.inf)
    assert start.sigmas.tolist() == pytest.approx(good.sigmas.tolist(), rel=1e-6)
    assert held_out(gmm2d, sched) <= held_out(gmm2d, start) <= held_out(gmm2d, other)
    assert "ld3" not in str(sched.metadata["training"].get("init", ""))
    with pytest.raises(ValueError, match="start must be a tuple of Schedules"):
        fewstep.optimize(den, method, "dpmpp_2m", 4, n=8, teacher=teacher, start="ays")


def test_the_first_given_start_is_kept_unless_another_is_clearly_ahead(gmm2d):
    """Starts come in order of preference: of two that sample almost alike (one's sigmas nudged), the first is
    the start in either order, though one of them has the lower validation mean; one clearly worse is passed
    over (the test above)."""
    den, teacher, _, _ = gmm2d
    a = fewstep.tuning.baseline("ays", "dpmpp_2m", 4, {"sigma_min": den.sigma_min, "sigma_max": den.sigma_max})
    nudged = a.sigmas.clone()
    nudged[1:-1] *= 1.01
    b = fewstep.Schedule(nudged, solver="dpmpp_2m")
    for first, second in ((a, b), (b, a)):
        start = fewstep.optimize(den, "s4s", "dpmpp_2m", 4, n=32, teacher=teacher, start=(first, second),
                                 gate=math.inf, afs=False)
        assert start.sigmas.tolist() == pytest.approx(first.sigmas.tolist(), rel=1e-9)


@pytest.mark.parametrize("method", ["s4s", "pas"])
def test_a_start_brings_its_solver(gmm2d, method):
    """A start on another one-call solver than the one asked for is learned on that solver (a start is a
    schedule and its solver); a start on a two-call solver or a learned one cannot be one, and LD3's schedule is
    the start."""
    den, teacher, _, _ = gmm2d
    facts = {"sigma_min": den.sigma_min, "sigma_max": den.sigma_max}
    other = fewstep.tuning.baseline("ays", "ipndm", 4, facts)
    no_afs = {"afs": False} if method == "s4s" else {}  # else s4s may keep its other start (a baseline with AFS)
    start = fewstep.optimize(den, method, "dpmpp_2m", 4, n=32, teacher=teacher, start=(other,), gate=math.inf, **no_afs)
    assert start.solver == "ipndm" and start.sigmas.tolist() == pytest.approx(other.sigmas.tolist(), rel=1e-6)
    learned = fewstep.optimize(den, method, "dpmpp_2m", 4, n=32, teacher=teacher, start=(other,))
    assert learned.metadata["training"].get("start_solver", learned.metadata["training"].get("base_solver")) == "ipndm"
    heun = fewstep.tuning.baseline("ays", "heun", 4, facts)
    a, b = chain("ipndm", other.sigmas)  # a learned solver's schedule (its coefficients are no start either)
    coefs = fewstep.Schedule(other.sigmas, solver="learned", solver_options={"a": a.tolist(), "b": [r.tolist() for r in b]})
    fallback = fewstep.optimize(den, method, "dpmpp_2m", 4, n=32, teacher=teacher, start=(heun, coefs), gate=math.inf,
                                **no_afs)
    assert fallback.solver == "dpmpp_2m" and "ld3" in str(fallback.metadata["training"].get("init", "ld3"))


def test_training_in_pieces_is_training_in_one_go(gmm2d):
    """ld3.Fit run in two pieces (s4s screens its plain start) takes exactly the steps of one run."""
    from fewstep.methods import _calibration
    from fewstep.methods.ld3 import Fit, Training, fit
    from fewstep.methods.s4s import Learner, Options

    den, teacher, _, _ = gmm2d
    ctx, _, _ = _calibration(den, None, None, 32, 0, None, None, teacher, False)
    start = fewstep.tuning.baseline("ays", "unipc", 4, {"sigma_min": den.sigma_min, "sigma_max": den.sigma_max})
    o, train = Options(), Training(iters=7, patience=7)
    learners = [Learner(ctx, "unipc", {}, S.logits_from_sigmas(start.sigmas, ctx.sigma_min, o.learn_last), o)
                for _ in range(2)]
    one = fit(ctx, "learned", {}, learners[0].plan, learners[0].params, train)
    two = Fit(ctx, "learned", {}, learners[1].plan, learners[1].params, train).run(3).run(100).finish()
    assert one["iters"] == two["iters"] == 7 and one["valid_best"] == two["valid_best"]
    for p, q in zip(learners[0].params, learners[1].params):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("screen", [1 / 3, 1.0])
def test_s4s_screens_its_plain_start_only_when_behind(gmm2d, screen):
    """With both starts, the plain one stops after screen * iters steps if the AFS one is ahead then; the AFS
    start trains to the end; screen=1 trains both to the end."""
    den, teacher, _, _ = gmm2d
    for nfe, behind in ((3, True), (5, False)):  # at NFE 3 the AFS start leads after 3 steps, at 5 it does not
        out = fewstep.optimize(den, "s4s", "unipc", nfe, n=32, teacher=teacher, iters=9, patience=9, screen=screen)
        plain, afs = out.metadata["training"]["tried"]
        assert afs["afs"] and afs["iters"] == 9 and not afs.get("screened")
        screened = behind and screen < 1
        assert bool(plain.get("screened")) == screened and plain["iters"] == (3 if screened else 9)
    with pytest.raises(ValueError, match="screen"):
        fewstep.optimize(den, "s4s", "unipc", 5, n=32, teacher=teacher, screen=0)


def test_s4s_learns_on_another_solver_when_it_would_keep_a_start(gmm2d):
    """When what would be returned is a start (gate=inf: nothing learned counts), the best given start of another
    solver is learned on once more (both starts, with and without AFS), and the best of all is returned."""
    den, teacher, _, _ = gmm2d
    facts = {"sigma_min": den.sigma_min, "sigma_max": den.sigma_max}
    starts = (fewstep.tuning.baseline("ays", "dpmpp_2m", 4, facts), fewstep.tuning.baseline("ays", "ipndm", 4, facts))
    kw = dict(n=32, teacher=teacher, start=starts, iters=9, patience=9)
    out = fewstep.optimize(den, "s4s", "dpmpp_2m", 4, gate=math.inf, **kw)
    tried, training = out.metadata["training"]["tried"], out.metadata["training"]
    first, again = [t for t in tried if not t.get("fallback")], [t for t in tried if t.get("fallback")]
    assert [t["afs"] for t in first] == [t["afs"] for t in again] == [False, True]
    assert {t["solver"] for t in first} != {t["solver"] for t in again}
    assert {t["solver"] for t in tried} == {"dpmpp_2m", "ipndm"}
    assert training["kept"] == "start" and out.solver == training["start_solver"]
    plain = fewstep.optimize(den, "s4s", "dpmpp_2m", 4, gate=math.inf, fallback=False, **kw)
    assert not any(t.get("fallback") for t in plain.metadata["training"]["tried"])
    three = starts + (fewstep.tuning.baseline("ays", "deis", 4, facts),)
    more = fewstep.optimize(den, "s4s", "dpmpp_2m", 4, gate=math.inf, fallback=2, **{**kw, "start": three})
    solvers = [t["solver"] for t in more.metadata["training"]["tried"]]  # every solver once (two starts each)
    assert sorted(set(solvers)) == ["deis", "dpmpp_2m", "ipndm"] and len(solvers) == 6
    for bad in (-1, 1.5, "two"):
        with pytest.raises(ValueError, match="fallback"):
            fewstep.optimize(den, "s4s", "dpmpp_2m", 4, fallback=bad, **kw)


def test_tune_runs_the_new_methods_and_their_best_file_samples(tmp_path):
    den = fewstep.load_model("gmm2d")
    summary = fewstep.tune(den, nfe=[3], methods=["karras", "s4s", "pas"], solvers=["dpmpp_2m", "heun"],
                           n_calib=32, n_test=64, outdir=tmp_path, progress=False, report=False)
    cells = {(c["method"], c["solver"]): c for c in summary["cells"]}
    assert cells[("s4s", "dpmpp_2m")]["status"] == cells[("pas", "dpmpp_2m")]["status"] == "ok"
    # a learned method runs on one-call solvers: heun (two calls a step) is skipped with that reason
    assert cells[("s4s", "heun")]["status"] == "skipped" and "one network call a step" in cells[("s4s", "heun")]["reason"]
    with pytest.raises(ValueError, match="one call a step"):
        fewstep.optimize(den, "s4s", "heun", 3, n=4)
    assert summary["best"]["3"]["winner"]["method"] in ("s4s", "pas")
    best = fewstep.Schedule.load(tmp_path / "best" / "nfe-3.json")
    counter = Counted(den)
    fewstep.sample(counter, fewstep.noise(2, den.shape, 80.0, 9), best)
    assert counter.calls == fewstep.nfe(best) == 3


def _tune_seeing_starts(tmp_path, monkeypatch, **kw) -> tuple[dict, list]:
    """A small s4s tune on gmm2d at NFE 3, and the (solver, starts) tune gave each s4s cell."""
    seen, real = [], fewstep.tuning._starts
    monkeypatch.setattr(fewstep.tuning, "_starts",
                        lambda run, k, m, s: seen.append((s, real(run, k, m, s))) or seen[-1][1])
    summary = fewstep.tune(fewstep.load_model("gmm2d"), nfe=[3], methods=["karras", "ays", "time_uniform", "s4s"],
                           solvers=["dpmpp_2m", "ipndm", "heun"], n_calib=32, n_test=16, outdir=tmp_path,
                           progress=False, report=False, **kw)
    return summary, seen


def test_tune_gives_a_learned_method_the_best_starts_of_every_one_call_solver(tmp_path, monkeypatch):
    """s4s's starts in a tune: the best (first-round error) of each one-call solver, and the other global
    schedules for its cell's solver not clearly worse than the first on the test noises, least error first;
    none for a two-call solver."""
    summary, seen = _tune_seeing_starts(tmp_path, monkeypatch)
    cells = {(c["method"], c["solver"]): c for c in summary["cells"] if c["status"] == "ok"}
    first = {key: sum(c["errors"][:16]) / 16 for key, c in cells.items()}
    (solver, starts), = seen
    other = "ipndm" if solver == "dpmpp_2m" else "dpmpp_2m"
    got = [(s.metadata["method"], s.solver) for s in starts]
    ranked = sorted([(m, solver) for m in ("karras", "ays", "time_uniform")], key=first.get)
    best_other = min((m for m in ("karras", "ays", "time_uniform")), key=lambda m: first[(m, other)])
    lead = min(ranked[0], (best_other, other), key=first.get)

    def behind(key):
        return clearly_worse(torch.tensor(cells[key]["errors"][:16]) - torch.tensor(cells[lead]["errors"][:16]))
    want = [ranked[0], (best_other, other)] + [key for key in ranked[1:] if not behind(key)]
    assert sorted(got) == sorted(want) and len(want) < 4  # here one of them was clearly worse
    assert [first[g] for g in got] == sorted(first[g] for g in got)
    row = next(c for c in summary["cells"] if c["method"] == "s4s" and c["status"] == "ok")
    trained = fewstep.Schedule.load(tmp_path / "schedules" / row["schedule_file"]).metadata["training"]
    assert row.get("start_solver", row["solver"]) == trained["start_solver"]  # results.json says which solver it runs from
    assert cell_label({**row, "start_solver": "deis"}) == f"s4s + {row['solver']} (started on deis)"


def test_an_exhaustive_tune_gives_each_learned_cell_its_own_solvers_starts(tmp_path, monkeypatch):
    """With exhaustive=True s4s runs on every one-call solver from that solver's schedules only, so its cells
    differ (given every solver's best, each would pick the same start and learn the same solver)."""
    summary, seen = _tune_seeing_starts(tmp_path, monkeypatch, exhaustive=True, method_options={"s4s": {"iters": 5}})
    starts = dict(seen)
    assert sorted(starts) == ["dpmpp_2m", "ipndm"]  # heun, two calls a step, is not tried: skipped, with why
    assert {c["status"] for c in summary["cells"] if c["method"] == "s4s" and c["solver"] == "heun"} == {"skipped"}
    cells = {(c["method"], c["solver"]): c for c in summary["cells"] if c["status"] == "ok"}
    for solver in ("dpmpp_2m", "ipndm"):  # the solver's schedules not clearly worse than its best on the test noises
        errors = {m: torch.tensor(cells[(m, solver)]["errors"]) for m in ("ays", "karras", "time_uniform")}
        lead = min(errors.values(), key=lambda e: float(e.mean()))
        assert sorted(x.metadata["method"] for x in starts[solver]) == sorted(
            m for m, e in errors.items() if not clearly_worse(e - lead))
        assert {x.solver for x in starts[solver]} == {solver}
    rows = {c["solver"]: c for c in summary["cells"] if c["method"] == "s4s" and c["status"] == "ok"}
    assert {"dpmpp_2m", "ipndm"} <= set(rows) and all("start_solver" not in rows[s] for s in ("dpmpp_2m", "ipndm"))


# --------------------------------------------------------------------------------------------
# a learned schedule inside a diffusers pipeline

@pytest.mark.parametrize("with_pas", [False, True])
def test_learned_schedule_in_a_ddpm_pipeline_matches_sample_and_counts_unet_calls(with_pas):
    """FewstepScheduler.from_schedule runs a learned schedule (s4s on the shipped UNet, briefly trained; with
    AFS; and with PAS corrections) in DDPMPipeline: the output is fewstep.sample's, the UNet is called exactly
    fewstep.nfe times. Its learned first step does not land on the initial latents: the first call's input comes
    from scale_model_input, which DDPMPipeline does not call (a named error), a loop as Stable Diffusion's runs it."""
    pytest.importorskip("diffusers")
    from pathlib import Path
    from diffusers import DDPMPipeline, UNet2DModel

    assets = Path(fewstep.__file__).parent / "assets" / "digits-unet"
    unet = UNet2DModel.from_pretrained(assets / "unet").eval().requires_grad_(False)
    config = json.loads((assets / "scheduler" / "scheduler_config.json").read_text())
    den = fewstep.load_model("digits-unet")
    # a small lr: at the default 0.1 the first of 8 steps can overshoot on 8 training noises (as on some CPUs)
    sched = fewstep.optimize(den, "s4s", "dpmpp_2m", 4, n=16, min_valid=4, iters=8, afs=True, gate=-math.inf, lr=0.01,
                             teacher=fewstep.Teacher(den, steps=64, sigma_min=den.sigma_min))
    assert sched.solver == "learned" and sched.solver_options["afs"] and sched.steps == 5
    if with_pas:
        pas = [[], [1.01, 0.005, -0.005, 0.0], [], [0.99, 0.0, 0.005, 0.0], []]
        sched = sched.with_metadata(solver_options={**sched.solver_options, "pas": pas})
    n = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = fewstep.sample(fewstep.from_diffusers(unet, config), n * math.sqrt(1 + sched.sigma_max ** 2), sched)
    ref = (ref / 2 + 0.5).clamp(0, 1)
    scheduler = fewstep.FewstepScheduler.from_schedule(sched, config)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="scale_model_input"):
        pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="pt")
    calls = []
    unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    scheduler.set_timesteps(5)
    latents = n.clone()
    for t in scheduler.timesteps:
        latents = scheduler.step(unet(scheduler.scale_model_input(latents, t), t).sample, t, latents).prev_sample
    assert len(calls) == fewstep.nfe(sched) == 4
    out = (latents / 2 + 0.5).clamp(0, 1)
    assert float((out.double() - ref.double()).norm() / ref.double().norm()) <= 1e-5


def test_afs_schedules_are_refused_in_flow_pipelines():
    pytest.importorskip("diffusers")
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
    sched = S.karras(4, 0.01, 100.0).with_metadata(solver="euler", solver_options={"afs": True})
    with pytest.raises(ValueError, match="runs in VP pipelines only"):
        fewstep.FewstepScheduler.from_schedule(sched, config)
