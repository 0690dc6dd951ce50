"""Fuzzing (hypothesis) over schedules, solvers, policies, CLI arguments and files: every input gives
either a named error or a finite result with the counted NFE."""

import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fewstep
from fewstep.cli import main
from fewstep.files import FewstepWarning, load_cached, save_cached
from fewstep.policy import SchedulePolicy

GMM = fewstep.load_model("gmm2d")
X = fewstep.noise(3, GMM.shape, 80.0, seed=11)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Counted:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        return GMM(x, sigma)


@st.composite
def sigma_lists(draw):
    """Decreasing sigmas with clustered (nearly equal) values, tiny and huge ones, ending at 0 or not."""
    n = draw(st.integers(1, 9))
    top = draw(st.floats(1e-3, 1e3))
    fractions = draw(st.lists(st.one_of(st.floats(1e-12, 1e-6), st.floats(1e-3, 0.999)), min_size=n, max_size=n))
    sigmas = [top]
    for f in fractions:
        sigmas.append(sigmas[-1] * (1 - f))
    if draw(st.booleans()):
        sigmas.append(0.0)
    return sigmas


@FUZZ
@given(sigmas=sigma_lists(), solver=st.sampled_from(fewstep.solvers.PLANNED))
def test_any_schedule_samples_finite_or_is_named(sigmas, solver):
    try:
        sched = fewstep.Schedule(sigmas)
    except fewstep.ScheduleError:
        return  # e.g. two sigmas equal after rounding: named
    den = Counted()
    out = fewstep.sample(den, X * (sigmas[0] / 80.0), sched, solver)
    assert torch.isfinite(out).all() and den.calls == fewstep.nfe(sched, solver)


@FUZZ
@given(kind=st.sampled_from(["residual", "route"]), corrections=st.booleans(), steps=st.integers(2, 6),
       scale=st.floats(0.0, 30.0), seed=st.integers(0, 2 ** 16), solver=st.sampled_from(fewstep.solvers.PLANNED))
def test_any_policy_samples_finite_with_its_nfe(kind, corrections, steps, scale, seed, solver, tmp_path_factory):
    config = {"shape": [2], "steps": steps, "n_logits": steps, "learn_last": True, "max_inputs": 16,
              "components": 2, "corrections": corrections, "sigma_min": 0.002, "sigma_max": 80.0, "solver": solver,
              "solver_options": {}, "policy": kind, "hidden": 8, "clusters": 3}
    pol = SchedulePolicy(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random weights and outputs (not the input statistics), some very large
        for name, p in pol.net.state_dict().items():
            if name not in ("basis", "feat_mean", "feat_std"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    den = Counted()
    out = fewstep.sample(den, X, pol)
    assert torch.isfinite(out).all() and den.calls == fewstep.nfe(pol)
    path = pol.save(tmp_path_factory.mktemp("pol") / "p.pt")
    assert torch.equal(fewstep.load_schedule(path).sigmas_for(X), pol.sigmas_for(X))
    state = {**pol.net.state_dict(), "feat_std": torch.zeros_like(pol.net.feat_std)}
    with pytest.raises(fewstep.ScheduleError, match="feat_std"):
        SchedulePolicy(config, state)


VALUES = st.one_of(st.just("0"), st.just("-3"), st.just("2.5"), st.just("abc"), st.just(""), st.just("1,2"),
                   st.integers(1, 6).map(str), st.just("1e9"))
OPTIONS = ["--nfe", "--n", "--solver", "--builtin", "--teacher-steps", "--sigma-max", "--sigma-min", "--shape"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.sampled_from(OPTIONS), VALUES | st.sampled_from(fewstep.solvers.PLANNED)),
                      max_size=4))
def test_cli_arguments_never_give_a_traceback(pairs, capsys, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path_factory.mktemp("cache")))
    args = {"--nfe": "3", "--n": "4", "--solver": "euler", "--teacher-steps": "8", **dict(pairs)}
    if args["--teacher-steps"].isdigit() and int(args["--teacher-steps"]) > 64:
        args["--teacher-steps"] = "64"  # keep each example fast
    if args.get("--n", "").isdigit() and int(args["--n"]) > 64:
        args["--n"] = "64"
    argv = ["evaluate", "--model", "gmm2d", "--json"] + [v for kv in args.items() for v in kv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a usage error, named
        code = e.code
        assert code == 2 and "error" in capsys.readouterr().err
        return
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and "fewstep: error:" in err), (argv, err)


@FUZZ
@given(blob=st.one_of(st.binary(max_size=200),
                      st.dictionaries(st.sampled_from(["format", "version", "sigmas", "metadata"]),
                                      st.one_of(st.none(), st.integers(), st.text(max_size=8),
                                                st.lists(st.floats(allow_nan=True), max_size=5),
                                                st.just("fewstep.schedule"), st.just(1)), max_size=4)
                      .map(lambda d: json.dumps(d).encode())))
def test_any_file_loads_or_is_named(blob, tmp_path_factory):
    path = tmp_path_factory.mktemp("f") / "s.json"
    path.write_bytes(blob)
    try:
        sched = fewstep.load_schedule(path)
    except fewstep.ScheduleError:
        pass
    else:
        out = fewstep.sample(GMM, X * (sched.sigma_max / 80.0), sched, "euler")
        assert torch.isfinite(out).all()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = load_cached(path, "key", (2,))
    assert got is None and any(issubclass(w.category, FewstepWarning) and str(path) in str(w.message) for w in seen)


def test_a_cache_entry_round_trips(tmp_path):
    t = torch.randn(3, 4, dtype=torch.float64)
    assert save_cached(tmp_path / "c.pt", t, "k")
    assert torch.equal(load_cached(tmp_path / "c.pt", "k", (3, 4)), t)
    with pytest.warns(FewstepWarning, match="another key"):
        assert load_cached(tmp_path / "c.pt", "other", (3, 4)) is None
