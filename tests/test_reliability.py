"""Nothing breaks a run (issue #15): every bad input named, learned methods that never diverge, a tune
that survives any cell, caches and resume keys that cannot lie."""

import json
import os
import stat
import subprocess
import sys
import warnings

import pytest
import torch

import fewstep
from fewstep.cli import main
from fewstep.files import FewstepWarning
from fewstep.methods.ld3 import NoGradientError
from fewstep.sampling import DenoiserError
from fewstep.tuning import tune

SMALL = dict(n_calib=8, n_test=8, progress=False, report=False)


def _gmm():
    return fewstep.load_model("gmm2d")


# --------------------------------------------------------------------------------------------
# Learned methods on hard denoisers


class _NoGrad:
    """A network wrapped in torch.no_grad(), as many user wrappers are."""

    def __init__(self, den):
        self.den, self.shape, self.sigma_min, self.sigma_max = den, den.shape, den.sigma_min, den.sigma_max

    def __call__(self, x, sigma):
        with torch.no_grad():
            return self.den(x, sigma)


@pytest.mark.parametrize("method", ["ld3", "instance"])
def test_learned_methods_on_an_exact_empirical_denoiser_stay_finite(method):
    """The digits empirical denoiser lands exactly on the teacher: once the loss's gradient was NaN."""
    den = fewstep.load_model("digits")
    sched = fewstep.optimize(den, method, "euler", 4, n=16, iters=20, **({"ld3_iters": 20} if method == "instance" else {}))
    sig = sched.for_batch(fewstep.noise(4, den.shape, den.sigma_max, 3)).sigmas
    assert torch.isfinite(sig).all() and fewstep.nfe(sched) == 4


def test_a_nonfinite_gradient_is_not_taken(monkeypatch):
    """A loss whose gradient turns NaN: the step is undone, the learning rate halved, training ends in bounds."""
    import fewstep.methods.ld3 as ld3

    gmm, calls = _gmm(), {"n": 0}
    original = ld3._finite

    def flaky(err, params, delta):
        calls["n"] += 1
        return calls["n"] % 2 == 0 and original(err, params, delta)  # every other step "non-finite"

    monkeypatch.setattr(ld3, "_finite", flaky)
    sched = fewstep.optimize(gmm, "ld3", "euler", 4, n=16, iters=30, teacher=fewstep.Teacher(gmm, steps=32))
    tr = sched.metadata["training"]
    assert tr["nonfinite_steps"] == ld3.MAX_NONFINITE and torch.isfinite(sched.sigmas).all()
    assert tr["valid_best"] <= tr["valid_init"]


def test_no_grad_denoiser_is_named_for_gradient_methods_and_skipped_by_tune():
    den = _NoGrad(_gmm())
    with pytest.raises(NoGradientError, match="no gradient"):
        fewstep.optimize(den, "ld3", "euler", 4, n=8, teacher=fewstep.Teacher(den, steps=16))
    assert fewstep.optimize(den, "oss", "euler", 4, n=8, grid=10, teacher=fewstep.Teacher(den, steps=16)).steps == 4
    cells = tune(den, nfe=[4], methods=["karras", "ld3"], solvers=["euler"], **SMALL)["cells"]
    ld3_cell = next(c for c in cells if c["method"] == "ld3")
    assert ld3_cell["status"] == "skipped" and "no gradient" in ld3_cell["reason"]


def test_ld3_and_instance_leave_the_global_rng_alone():
    gmm = _gmm()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    fewstep.optimize(gmm, "instance", "euler", 3, n=16, ld3_iters=3, iters=3, corrections_iters=3,
                     teacher=fewstep.Teacher(gmm, steps=16))
    assert torch.equal(torch.random.get_rng_state(), before)


def test_instance_policy_is_the_same_on_1_and_2_threads(tmp_path):
    """gmm64's teacher endpoints have a null direction that rounding used to pick (up to 11 in sigma)."""
    code = ("import sys, torch, fewstep; torch.set_num_threads(int(sys.argv[1])); den = fewstep.load_model('gmm64');"
            "pol = fewstep.optimize(den, 'instance', 'dpmpp_2m', 5, calib=fewstep.noise(32, den.shape, 80.0, 0),"
            " teacher=fewstep.Teacher(den, steps=128), oss_grid=20, ld3_iters=10, iters=10, corrections_iters=10);"
            "torch.save(pol.sigmas_for(fewstep.noise(64, den.shape, 80.0, 1)), sys.argv[2])")
    for threads in (1, 2):
        subprocess.run([sys.executable, "-c", code, str(threads), str(tmp_path / f"{threads}.pt")], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True)
    one, two = (torch.load(tmp_path / f"{t}.pt") for t in (1, 2))
    assert float((one - two).abs().max()) < 1e-6


# --------------------------------------------------------------------------------------------
# tune survives any cell


class _FailsAt:
    """gmm2d, but raising RuntimeError whenever a call's sigma is within [lo, hi]."""

    def __init__(self, lo, hi):
        self.den = _gmm()
        self.lo, self.hi = lo, hi
        self.shape, self.sigma_min, self.sigma_max, self.name = (2,), 0.002, 80.0, "fails-at"

    def __call__(self, x, sigma):
        if ((sigma >= self.lo) & (sigma <= self.hi)).any():
            raise RuntimeError(f"boom at sigma {float(sigma.max()):.4g}")
        return self.den(x, sigma)


def test_a_failing_cell_is_recorded_and_the_run_goes_on(tmp_path):
    """The denoiser fails at logsnr_uniform(4)'s second sigma only (off the teacher's polynomial grids): that
    cell fails; a rerun keeps it failed unless retried."""
    mid = float(fewstep.schedules.logsnr_uniform(4).sigmas[1])
    den = _FailsAt(mid * (1 - 1e-12), mid * (1 + 1e-12))
    kw = dict(nfe=[3, 4], methods=["karras", "logsnr_uniform"], solvers=["euler"], outdir=tmp_path, n_calib=4,
              n_test=8, progress=False)
    summary = tune(den, **kw)
    status = {(c["nfe"], c["method"]): c for c in summary["cells"]}
    failed = status[(4, "logsnr_uniform")]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError" and "boom" in failed["reason"]
    assert failed["seconds"] >= 0 and status[(4, "karras")]["status"] == "ok"
    assert status[(3, "logsnr_uniform")]["status"] == "ok"
    assert "Failed cells" in (tmp_path / "report.md").read_text()
    den.lo = den.hi = -1.0  # fixed: a plain rerun keeps the recorded failure, --retry-failed recomputes it
    again = {(c["nfe"], c["method"]): c for c in tune(den, **kw)["cells"]}
    assert again[(4, "logsnr_uniform")]["status"] == "failed"
    retried = {(c["nfe"], c["method"]): c for c in tune(den, **kw, retry_failed=True)["cells"]}
    assert retried[(4, "logsnr_uniform")]["status"] == "ok"


def test_tune_inputs_are_checked_before_any_work(tmp_path):
    gmm = _gmm()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        tune(gmm, nfe=[3], methods=["karras"], solvers=["euler"], outdir=tmp_path / "file", **SMALL)
    for kw, match in (({"n_calib": 0}, "n_calib"), ({"n_test": 0}, "n_test"), ({"nfe": [2.5]}, "nfe"),
                      ({"methods": []}, "methods is empty"), ({"solvers": ()}, "solvers is empty"),
                      ({"seconds_per_eval": -1}, "seconds_per_eval"), ({"seconds_per_eval": float("nan")}, "seconds")):
        with pytest.raises(ValueError, match=match):
            tune(gmm, **{**dict(nfe=[3], methods=["karras"], solvers=["euler"], **SMALL), **kw})
    cells = tune(gmm, nfe=[3], methods="karras", solvers="euler", **SMALL)["cells"]  # a name, not letters
    assert [(c["method"], c["solver"]) for c in cells] == [("karras", "euler")]


def test_resume_key_covers_the_sigma_range(tmp_path):
    gmm = _gmm()
    kw = dict(nfe=[3], methods=["karras"], solvers=["euler"], outdir=tmp_path, **SMALL)
    first = tune(gmm, **kw)["cells"][0]
    with pytest.warns(FewstepWarning, match="sigma_max"):
        other = tune(gmm, sigma_max=40.0, **kw)["cells"][0]
    assert other["sigmas"][0] == 40.0 and first["sigmas"][0] == 80.0


# --------------------------------------------------------------------------------------------
# Caches and model identity


def test_teacher_cache_detects_damage(tmp_path):
    gmm, x = _gmm(), fewstep.noise(4, (2,), 80.0, 0)
    good = fewstep.Teacher(gmm, steps=16, cache_dir=tmp_path).solve(x)
    (file,) = tmp_path.glob("teacher-*.pt")
    blob = torch.load(file)
    for damaged in ({**blob, "tensor": torch.zeros_like(blob["tensor"])}, {**blob, "version": 1}):
        torch.save(damaged, file)
        t = fewstep.Teacher(gmm, steps=16, cache_dir=tmp_path)
        with pytest.warns(FewstepWarning, match=str(file.name)):
            assert torch.equal(t.solve(x), good) and t.calls > 0
    raw = bytearray(file.read_bytes())
    for i in range(100):  # 100 flipped bits in the payload
        raw[len(raw) // 2 + i] ^= 1 << (i % 8)
    file.write_bytes(bytes(raw))
    t = fewstep.Teacher(gmm, steps=16, cache_dir=tmp_path)
    with pytest.warns(FewstepWarning):
        assert torch.equal(t.solve(x), good) and t.calls > 0
    file.write_bytes(file.read_bytes()[:100])  # truncated
    with pytest.warns(FewstepWarning, match="unreadable"):
        assert torch.equal(fewstep.Teacher(gmm, steps=16, cache_dir=tmp_path).solve(x), good)


def test_unwritable_cache_is_a_warning(tmp_path):
    gmm, x = _gmm(), fewstep.noise(4, (2,), 80.0, 0)
    (tmp_path / "afile").write_text("")
    with pytest.warns(FewstepWarning, match="could not write"):
        fewstep.Teacher(gmm, steps=16, cache_dir=tmp_path / "afile" / "sub").solve(x)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if not os.access(ro, os.W_OK):  # (root writes anywhere: then only the case above applies)
        with pytest.warns(FewstepWarning, match="could not write"):
            fewstep.Teacher(gmm, steps=16, cache_dir=ro).solve(x)


MODEL_FILE = """
import torch, fewstep
def make():
    gmm = fewstep.load_model('gmm2d')
    gmm.means = gmm.means * torch.load({weights!r})
    return gmm
"""


def test_a_changed_checkpoint_is_a_new_model(tmp_path, monkeypatch, capsys):
    """The teacher cache and the resume key follow the weights a factory loads, not only its .py file."""
    weights, model = tmp_path / "w.pt", tmp_path / "m.py"
    model.write_text(MODEL_FILE.format(weights=str(weights)))
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    args = ["evaluate", "--model", f"{model}:make", "--builtin", "karras", "--nfe", "4", "--solver", "euler", "--n", "8",
            "--teacher-steps", "16", "--json"]
    results = []
    for scale in (1.0, 0.5):
        torch.save(torch.tensor(scale, dtype=torch.float64), weights)
        assert main(args) == 0
        results.append(json.loads(capsys.readouterr().out)["mean"])
    fresh = fewstep.zoo.load_model(f"{model}:make")
    expected = fewstep.evaluate(fresh, fewstep.schedules.karras(4).with_metadata(solver="euler"), n=8,
                                teacher=fewstep.Teacher(fresh, steps=16))["mean"]
    assert results[1] == pytest.approx(expected, rel=1e-12) and results[0] != results[1]


def test_files_get_the_usual_permissions(tmp_path):
    path = fewstep.schedules.karras(3).save(tmp_path / "s.json")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_empty_cache_variable_is_the_default(monkeypatch):
    from fewstep.cli import cache_dir

    monkeypatch.setenv("FEWSTEP_CACHE", "")
    assert cache_dir() == fewstep.cli.Path.home() / ".cache" / "fewstep"


# --------------------------------------------------------------------------------------------
# Input checks at the boundary


def test_suspicious_inputs_warn():
    gmm = _gmm()
    lazy = lambda x, s: gmm(x, s[:1].expand(x.shape[0]))  # noqa: E731  reads sigma[0] only
    lazy.shape = (2,)
    with pytest.warns(FewstepWarning, match="sigma\\[0\\]"):
        fewstep.optimize(lazy, "oss", "euler", 3, n=4, grid=8, teacher=fewstep.Teacher(lazy, steps=8))
    with pytest.warns(FewstepWarning, match="standard deviation"):
        fewstep.optimize(gmm, "oss", "euler", 3, calib=fewstep.noise(4, (2,), 1.0, 0), grid=8,
                         teacher=fewstep.Teacher(gmm, steps=8))


def test_bad_values_are_named():
    gmm, x = _gmm(), fewstep.noise(2, (2,), 80.0, 0)
    cases = [
        (lambda: fewstep.Schedule(torch.ones(3, 2)), "1-d"),
        (lambda: fewstep.schedules.ays(4, sigma_min=-1), "sigma_min"),
        (lambda: fewstep.nfe(fewstep.schedules.karras(3), "heun", orders=[2]), "1 entries for 3 steps"),
        (lambda: fewstep.sample(gmm, x, fewstep.schedules.karras(3), "euler", nope=1), "'nope'"),
        (lambda: fewstep.sample(gmm, x * float("nan"), fewstep.schedules.karras(3), "euler"), "initial states"),
        (lambda: fewstep.optimize(gmm, "oss", "euler", 3, n=0), "positive integer"),
        (lambda: fewstep.optimize(gmm, "oss", "euler", 3, n=4, gridd=8), "unknown option"),
        (lambda: fewstep.evaluate(gmm, fewstep.schedules.karras(3), "euler", n=0), "positive integer"),
        (lambda: fewstep.sample(gmm, x, "karras", "euler"), "the string 'karras'"),
        (lambda: fewstep.sample(gmm, x.long(), fewstep.schedules.karras(3), "euler"), "floating-point"),
        (lambda: fewstep.noise(-1, (2,), 80.0, 0), "n must be"),
        (lambda: fewstep.noise(2, (0,), 80.0, 0), "shape must be"),
        (lambda: fewstep.summarize(torch.zeros(0)), "no errors"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_states_of_another_sample_shape_are_named_when_the_model_fails_on_them():
    gmm, x = _gmm(), fewstep.noise(2, (2,), 80.0, 0)
    with pytest.raises(DenoiserError, match=r"sample shape \(1,\), and it declares shape \(2,\)"):
        fewstep.sample(gmm, x[:, :1], fewstep.schedules.karras(3), "euler")
    wide = lambda x, s: x / (1 + s.reshape(-1, *[1] * (x.ndim - 1)) ** 2)  # noqa: E731  runs at any shape
    wide.shape = (2,)
    assert fewstep.sample(wide, fewstep.noise(2, (3, 4), 80.0, 0), fewstep.schedules.karras(3), "euler").shape == (2, 3, 4)


def test_schedule_files_with_bad_contents_are_named(tmp_path):
    good = fewstep.schedules.karras(3).with_metadata(solver="euler").to_dict()
    for meta in ("junk", {"solver_options": "x"}, {"solver": 3}):
        (tmp_path / "s.json").write_text(json.dumps({**good, "metadata": meta}))
        with pytest.raises(fewstep.ScheduleError, match="metadata"):
            fewstep.load_schedule(tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps({**good, "metadata": {"solver": "euler", "solver_options": {"x": 1}}}))
    sched = fewstep.load_schedule(tmp_path / "s.json")
    with pytest.raises(fewstep.ScheduleError, match="'x'"):
        fewstep.sample(_gmm(), fewstep.noise(2, (2,), 80.0, 0), sched)


@pytest.mark.parametrize("solver", fewstep.solvers.PLANNED)
def test_solvers_stay_finite_on_nearly_equal_sigmas(solver):
    gmm = _gmm()
    x = fewstep.noise(32, gmm.shape, 80.0, 0)
    ref = fewstep.Teacher(gmm, steps=64).solve(x)
    for gap in (1e-4, 1e-9):
        sigmas = [80.0, 10.0, 10 * (1 - gap), 10 * (1 - 2 * gap), 1.0, 0.1, 0.1 * (1 - gap), 0.01, 0.0]
        out = fewstep.sample(gmm, x, sigmas, solver)
        assert torch.isfinite(out).all() and float(fewstep.rmse(out, ref).mean()) < 3.0, gap


CLI_CASES = [
    (["demo", "--n", "-1"], "positive integer"),
    (["demo", "--nfe", "0"], "positive integers"),
    (["tune", "--nfe", "2.5"], "positive integers"),
    (["tune", "--nfe", "6-4"], "or ranges"),
    (["tune", "--nfe", "4-"], "or ranges"),
    (["tune", "--seconds-per-eval", "-1"], "positive number of seconds"),
    (["tune", "--seconds-per-eval", "inf"], "positive number of seconds"),
    (["optimize", "--model", "gmm2d", "--method", "oss", "--solver", "euler", "--nfe", "3", "--options", "{bad"],
     "not valid JSON"),
    (["optimize", "--model", "gmm2d", "--method", "oss", "--solver", "euler", "--nfe", "3", "--options", "[1]"],
     "JSON object"),
]


@pytest.mark.parametrize("argv,match", CLI_CASES)
def test_cli_argument_errors_are_named(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_cli_errors_after_loading_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "syntax.py").write_text("def make(:\n")
    (tmp_path / "imports.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "shaped.py").write_text("import torch\ndef make():\n    w = torch.ones(3, 32, 32)\n"
                                        "    return lambda x, s: x * w / (1 + s.reshape(-1, 1, 1, 1) ** 2)\n")
    (tmp_path / "out").write_text("")
    cases = [
        (["demo", "--model", f"{tmp_path}/syntax.py:make"], "could not be imported: SyntaxError"),
        (["demo", "--model", f"{tmp_path}/imports.py:make"], "could not be imported: ModuleNotFoundError"),
        (["demo", "--model", f"{tmp_path}/shaped.py:make", "--shape", "3"], "failed on a batch of shape (2, 3)"),
        (["optimize", "--model", "gmm2d", "--method", "oss", "--solver", "euler", "--nfe", "3", "--options",
          '{"gridd": 8}'], "unknown option(s) 'gridd'"),
        (["tune", "--model", "gmm2d", "--nfe", "3", "--methods", "karras", "--solvers", "euler", "-o",
          str(tmp_path / "out")], "is a file"),
        (["optimize", "--model", "gmm2d", "--method", "oss", "--solver", "euler", "--nfe", "3", "-o",
          str(tmp_path / "missing" / "s.json")], "is not a writable folder"),
        (["sample", "--model", "gmm2d", "--nfe", "3", "--solver", "euler", "-o", str(tmp_path / "out" / "x.pt")],
         "is not a writable folder"),
        (["sample", "--model", "gmm2d"], "give --schedule FILE"),
        (["sample", "--model", "gmm2d", "--nfe", "3"], "built-in karras schedule is sampled (--builtin): give its --solver"),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        assert match in capsys.readouterr().err, argv


def test_cli_evaluate_and_sample_a_policy_file(tmp_path, capsys):
    gmm = _gmm()
    pol = fewstep.optimize(gmm, "instance", "euler", 3, n=16, ld3_iters=3, iters=3, corrections_iters=3,
                           teacher=fewstep.Teacher(gmm, steps=16))
    path = pol.save(tmp_path / "p.pt")
    assert main(["evaluate", "--model", "gmm2d", "--schedule", str(path), "--n", "8", "--teacher-steps", "16"]) == 0
    assert "on 3 steps, NFE 3" in capsys.readouterr().out
    assert main(["sample", "--model", "gmm2d", "--schedule", str(path), "--n", "4", "-o", str(tmp_path / "s.pt")]) == 0


def test_a_failing_rank_fails_every_rank(tmp_path):
    """Under torchrun, a denoiser that raises on rank 1 ends both processes with the error, not a hang."""
    from test_distributed import _free_port

    (tmp_path / "m.py").write_text(
        "import os, fewstep\ndef make():\n    g = fewstep.load_model('gmm2d')\n"
        "    def den(x, s):\n        if os.environ.get('RANK') == '1' and x.shape[0] > 4:\n"
        "            raise RuntimeError('rank one broke')\n        return g(x, s)\n"
        "    den.shape, den.sigma_min, den.sigma_max = (2,), 0.002, 80.0\n    return den\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), "-m", "fewstep.cli", "optimize", "--model",
                          f"{tmp_path}/m.py:make", "--method", "oss", "--solver", "euler", "--nfe", "3", "--n-calib",
                          "16", "--teacher-steps", "16", "--options", '{"grid": 8}', "-o", str(tmp_path / "s.json")],
                         env=env, capture_output=True, text=True, timeout=120)
    # rank 0 stops with the message (torchrun then ends rank 1, if it has not stopped the same way already);
    # both ranks write to one pipe, so their lines may run together: count the messages, not the lines
    message = "fewstep: error: rank 1 failed: RuntimeError: rank one broke"
    assert run.returncode != 0 and run.stderr.count(message) >= 1, run.stderr[-3000:]
    assert run.stderr.count("fewstep: error:") == run.stderr.count(message), run.stderr[-3000:]


def test_warnings_do_not_hide_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewstepWarning)  # a clean run raises none
        gmm = _gmm()
        fewstep.optimize(gmm, "gits", "euler", 3, n=8, grid=10, teacher=fewstep.Teacher(gmm, steps=16))


def test_an_nfe_with_nothing_to_optimize_is_named_before_any_evaluation():
    gmm, rows = _gmm(), []
    counted = lambda x, s: rows.append(len(x)) or gmm(x, s)  # noqa: E731
    counted.shape = (2,)
    for method in ("gits", "ld3", "s4s"):
        with pytest.raises(ValueError, match="nothing to optimize"):
            fewstep.optimize(counted, method, "heun", 1, n=4)
    assert rows == []
