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
from fewstep.solvers import SOLVERS, PLANNED, chain, pas_basis

ONE_CALL = [s for s in PLANNED if SOLVERS[s].calls_per_step == 1]


def learned_schedule(sigmas, solver, **options) -> fewstep.Schedule:
    a, b = chain(solver, sigmas)
    return fewstep.Schedule(sigmas, solver="learned",
                            solver_options={"a": a.tolist(), "b": [r.tolist() for r in b], **options})


class Counted:
    def __init__(self, den):
        self.den, self.calls = den, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.den(x, sigma)


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

def test_afs_first_step_is_the_references_formula(small_gmm):
    """Euler with afs: x_1 = x_0 + (sigma_1 - sigma_0) x_0 / sqrt(1 + sigma_0^2) (diff-sampler's AFS), no call
    at sigma_0; then Euler from x_1 as usual."""
    sigmas = S.karras(5).sigmas
    x = fewstep.noise(3, (4,), 80.0, 4)
    den = Counted(small_gmm)
    got = fewstep.sample(den, x, sigmas, "euler", afs=True)
    x1 = x + (sigmas[1] - sigmas[0]) * x / math.sqrt(1 + 80.0 ** 2)
    assert torch.allclose(got, fewstep.sample(small_gmm, x1, sigmas[1:], "euler"), atol=1e-12)
    assert den.calls == 4


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
