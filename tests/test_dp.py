"""GITS and OSS (fewstep.optimize): the shared DP machinery, the schedules' contract, bad input, and
held-out wins over the karras / logSNR baselines at a small size (bench/dp.py prints the full table)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fewstep
from fewstep import schedules
from fewstep.methods.dp import extend, run_candidates
from fewstep.methods.grid import candidate_grid
from fewstep.sampling import DenoiserError

SOLVERS = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3", "ipndm", "deis"]


def test_level_dp_is_the_exact_shortest_path():
    """With pairwise costs, extending level by level finds the best path of exactly K steps."""
    g = torch.Generator().manual_seed(0)
    n, steps, coeff = 10, 4, 1.15
    cost = torch.rand(n, n, generator=g, dtype=torch.float64) - 0.3  # signed costs, as GITS's 'dev' allows
    nodes, paths, total = torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1)
    for k in range(steps - 1):
        nodes, _, total, paths = extend(nodes, paths, n - 1 - steps + k + 1,
                                        lambda a, j: total[a] + coeff ** k * cost[nodes[a], j], 1)
    final = total + coeff ** (steps - 1) * cost[nodes, n - 1]
    path = paths[int(final.argmin())].tolist() + [n - 1]

    def weight(p):
        return sum(coeff ** m * float(cost[a, b]) for m, (a, b) in enumerate(zip(p, p[1:])))

    best = min(([0, *mid, n - 1] for mid in itertools.combinations(range(1, n - 1), steps - 1)), key=weight)
    assert path == best and math.isclose(float(final.min()), weight(best))


@pytest.mark.parametrize("solver", SOLVERS)
def test_replay_reproduces_the_solver(solver):
    """Replaying the recorded outputs of a real run lands on the state the run evaluates next."""
    den = fewstep.load_model("gmm2d")
    x = fewstep.noise(8, den.shape, 80.0, 3)
    sig = schedules.karras(6, 0.002, 80.0).sigmas
    inputs, outputs = [], []

    def recording(x_, s):
        inputs.append(x_.clone())
        outputs.append(den(x_, s))
        return outputs[-1]

    fewstep.sample(recording, x, sig, solver)
    per_sample = sig[:, None].expand(-1, x.shape[0])
    for calls in (1, 3, len(outputs) - 2):
        got, _ = run_candidates(solver, x.clone(), per_sample, outputs[:calls])
        torch.testing.assert_close(got, inputs[calls], rtol=1e-12, atol=1e-12)


def _grid_teacher_final(teacher, calib, grid):  # the teacher's x0 as GITS and OSS see it (with its outputs)
    sig = candidate_grid(0.002, 80.0, grid)
    return teacher.with_outputs(calib, sig)[0][-1]


@pytest.mark.parametrize("method,solver,nfe,opts", [("oss", "ipndm", 5, {}), ("oss", "unipc", 5, {}),
                                                    ("oss", "heun", 6, {}), ("gits", "dpmpp_2m", 4, {}),
                                                    ("gits", "heun", 5, {}), ("gits", "ipndm", 6, {"history": 3})])
def test_schedule_contract(method, solver, nfe, opts):
    """Starts at sigma_max, ends at 0, costs exactly nfe calls; OSS's DP error is the solver's real error."""
    den = fewstep.load_model("gmm2d")
    teacher = fewstep.Teacher(den, steps=128)
    calib = fewstep.noise(16, den.shape, 80.0, 0)
    s = fewstep.optimize(den, method, solver, nfe, calib=calib, teacher=teacher, grid=24, **opts)
    assert s.sigmas[0] == 80.0 and s.sigmas[-1] == 0 and fewstep.nfe(s) == nfe and s.solver == solver
    assert s.solver_options == fewstep.plan(solver, nfe)[1]
    prov = s.metadata["provenance"]
    assert prov["grid"]["size"] == 24 and prov["calib_n"] == 16 and prov["evaluations"]["total"] > 0
    assert prov["candidate_rows"] > 0 and s.metadata["method"] == method
    real = fewstep.rmse(fewstep.sample(den, calib, s), _grid_teacher_final(teacher, calib, 24)).mean()
    assert math.isclose(prov["calib_error"], float(real), rel_tol=1e-9)
    if method == "gits":  # coeff and propagation 'auto': of those measured on the whole batch, the least error
        full = [c for c in prov["candidates"] if c[3] == 16]
        assert len(prov["candidates"]) > 1 and prov["calib_error"] == min(c[2] for c in full)
        assert [prov["coeff"], prov["propagation"], prov["calib_error"], 16] in prov["candidates"]


def test_gits_measures_only_the_close_candidates_on_the_whole_batch():
    """Each candidate schedule is measured on half the warm-up noises; only those not clearly worse than the
    best there (metrics.clearly_worse) on the rest: fewer rows, the same choice as measuring all on all."""
    from fewstep.methods.gits import _measure

    rng = torch.Generator().manual_seed(0)
    level = {"a": 1.0, "b": 1.02, "c": 3.0, "d": 5.0}  # per-sample errors: a level and independent noise
    noise = {p: torch.rand(16, generator=rng, dtype=torch.float64) * 0.1 for p in level}
    calls = []

    def errors(path, part):
        calls.append((path, part))
        return level[path] + noise[path][part]

    got = _measure(errors, set(level), 16)
    assert {p: len(e) for p, e in got.items()} == {"a": 16, "b": 16, "c": 8, "d": 8}
    assert min((p for p in got if len(got[p]) == 16), key=lambda p: got[p].mean()) == "a"
    assert len(calls) == 6
    for p in level:
        assert torch.equal(got[p], (level[p] + noise[p])[:len(got[p])])


def test_bad_input():
    den = fewstep.load_model("gmm2d")
    kw = dict(n=4, grid=12, teacher=fewstep.Teacher(den, steps=24))
    for method in ("gits", "oss"):
        with pytest.raises(ValueError, match="nothing to optimize"):
            fewstep.optimize(den, method, "dpmpp_2m", 1, **kw)
        with pytest.raises(ValueError, match="too small for 20 steps"):
            fewstep.optimize(den, method, "euler", 20, **kw)
        with pytest.raises(ValueError, match="sigma_min"):
            fewstep.optimize(den, method, "euler", 4, sigma_min=80.0, sigma_max=1.0, **kw)
        with pytest.raises(ValueError, match="calibration batch must have shape"):
            fewstep.optimize(den, method, "euler", 4, calib=torch.zeros(4, 3), **kw)
        with pytest.raises(ValueError, match="grid"):
            fewstep.optimize(den, method, "euler", 4, n=4, grid=1)

    def nan_at_low_noise(x, sigma):
        out = den(x, sigma)
        return torch.where(sigma[:, None] < 1, torch.nan, out)

    nan_at_low_noise.shape = den.shape
    for method in ("gits", "oss"):
        with pytest.raises(DenoiserError, match="NaN"):
            fewstep.optimize(nan_at_low_noise, method, "euler", 4, **kw)
    with pytest.raises(ValueError, match="coeff"):
        fewstep.optimize(den, "gits", "euler", 4, coeff=0, **kw)
    with pytest.raises(ValueError, match="propagation"):
        fewstep.optimize(den, "gits", "euler", 4, propagation=-1, **kw)
    with pytest.raises(ValueError, match="warmup"):
        fewstep.optimize(den, "gits", "euler", 4, warmup=0, **kw)
    # more warm-up noises than the batch holds: all of them (fewstep tune asks for 16 of any batch)
    assert fewstep.optimize(den, "gits", "euler", 4, warmup=5, **kw).metadata["provenance"]["warmup"] == 4
    with pytest.raises(ValueError, match="history"):
        fewstep.optimize(den, "gits", "ipndm", 4, history=4, **kw)


CASES = {  # model -> (solver, nfe) pairs, calibration batch, grid size
    "gmm64": ([("dpmpp_2m", 4), ("ipndm", 8)], 32, 40),
    "gmm2d": ([("euler", 5), ("dpmpp_2m", 8), ("ipndm", 10)], 32, 40),
    "digits": ([("dpmpp_2m", 6)], 16, 30),
}


@pytest.mark.parametrize("model", list(CASES))
def test_held_out_beats_baselines(model):
    """Optimized on seed-0 noises, evaluated on seed-1 noises: lower mean RMSE than karras and logSNR."""
    den = fewstep.load_model(model)
    pairs, n_calib, grid = CASES[model]
    teacher = fewstep.Teacher(den, steps=128)
    x = fewstep.noise(48, den.shape, den.sigma_max, seed=1)
    for solver, nfe in pairs:
        steps, opts = fewstep.plan(solver, nfe)
        base = min(fewstep.evaluate(den, schedules.builtin(b, steps, den.sigma_min, den.sigma_max)
                                    .with_metadata(solver_options=opts), solver, x=x, teacher=teacher,
                                    distribution=False)["mean"] for b in ("karras", "logsnr_uniform"))
        for method in ("gits", "oss"):
            s = fewstep.optimize(den, method, solver, nfe, n=n_calib, seed=0, teacher=teacher, grid=grid)
            err = fewstep.evaluate(den, s, x=x, teacher=teacher, distribution=False)["mean"]
            assert err < base, f"{method} {solver} nfe={nfe} on {model}: {err:.4g} >= baseline {base:.4g}"


@pytest.mark.parametrize("method", ["gits", "oss"])
def test_every_row_through_the_network_is_in_the_provenance(method, counted):
    """provenance.evaluations counts what an outside counter sees, the denoiser's probe included."""
    den = counted(fewstep.load_model("gmm2d"))
    s = fewstep.optimize(den, method, "dpmpp_2m", 4, calib=fewstep.noise(8, den.shape, 80.0, 0), grid=16)
    ev = s.metadata["provenance"]["evaluations"]
    assert ev["total"] == den.rows == ev["probe"] + ev["teacher"] + ev["method"] and ev["probe"] == 4
