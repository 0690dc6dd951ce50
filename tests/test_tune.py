import base64
import html.parser
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import fewstep
from fewstep.tuning import tune

PNG = b"\x89PNG\r\n\x1a\n"
KW = dict(nfe=[3, 5], solvers=["euler", "dpmpp_2m", "heun"], n_calib=16, n_test=32, progress=False)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    den = fewstep.load_model("gmm2d")
    summary = tune(den, methods=["karras", "logsnr_uniform", "oss"], outdir=out, **KW)
    return out, summary, den


def test_outputs_and_best_schedules(tuned):
    out, summary, den = tuned
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 2 * 3 * 3
    for k in (3, 5):
        best = fewstep.Schedule.load(out / "best" / f"nfe-{k}.json")
        win = summary["best"][str(k)]["winner"]
        assert best.metadata["held_out"]["mean"] == win["mean"]
        assert best.metadata["runner_up"]["mean"] >= win["mean"]
        calls = []
        fewstep.sample(lambda x, s: calls.append(1) or den(x, s), fewstep.noise(2, den.shape, 80, 9), best)
        assert len(calls) == k == fewstep.nfe(best)
        assert all(c["mean"] >= win["mean"] for c in results["cells"] if c["nfe"] == k and c["status"] == "ok"
                   and "sigmas" in c)
    ok = [c for c in results["cells"] if c["status"] == "ok"]
    assert all(c["mean_ci95"][0] <= c["mean"] <= c["mean_ci95"][1] for c in ok)
    assert all(c["evaluations"]["method"] > 0 for c in ok if c["method"] == "oss")


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_report_is_self_contained_with_valid_pngs(tuned):
    out, summary, _ = tuned
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    assert len(parser.srcs) >= 5  # error vs NFE, 2 heat maps, sigmas, trajectories
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    md = (out / "report.md").read_text()
    for name in [line.split("](plots/")[1].rstrip(")") for line in md.splitlines() if "](plots/" in line]:
        assert (out / "plots" / name).read_bytes().startswith(PNG)
    assert "ratio" in md and "95%" in md


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method"):
        tune(fewstep.load_model("gmm2d"), methods=["nope"], progress=False)


def test_tune_names_bad_budgets_and_skips_refused_cells():
    """An NFE that is no positive integer is named before any work; a cell a method refuses is skipped."""
    for bad in ([0], [2.5], [-1], []):
        with pytest.raises(ValueError, match="nfe must be positive integers"):
            tune(fewstep.load_model("gmm2d"), nfe=bad, methods=["karras"], solvers=["euler"], progress=False)
    summary = tune(fewstep.load_model("gmm2d"), nfe=[1], methods=["oss"], solvers=["euler"], n_calib=4,
                   n_test=8, progress=False, report=False)
    (cell,) = summary["cells"]
    assert cell["status"] == "skipped" and "nothing to optimize" in cell["reason"]


def test_a_solver_that_runs_exactly_as_another_at_an_nfe_is_left_out_there(tmp_path):
    """At 4 calls UniPC-3 is UniPC (solvers.twins): its cells are pruned with that reason and cost nothing, in
    the race and exhaustively; at 5 calls it runs. The report lists them."""
    gmm = fewstep.load_model("gmm2d")
    for exhaustive in (False, True):
        out = tmp_path / str(exhaustive)
        summary = tune(gmm, nfe=[4, 5], methods=["karras", "gits"], solvers=["unipc", "unipc_3"], n_calib=8,
                       n_test=16, exhaustive=exhaustive, outdir=out, progress=False)
        cells = {(c["nfe"], c["method"], c["solver"]): c for c in summary["cells"]}
        for m in ("karras", "gits"):
            assert cells[4, m, "unipc_3"]["status"] == "pruned" and "evaluations" not in cells[4, m, "unipc_3"]
            assert "computes exactly what unipc does" in cells[4, m, "unipc_3"]["reason"]
            assert cells[4, m, "unipc"]["status"] == cells[5, m, "unipc_3"]["status"] == "ok"
        assert "NFE 4 gits + unipc_3: at NFE 4 unipc_3 computes exactly" in (out / "report.md").read_text()


def test_a_solver_a_method_does_not_run_on_is_skipped_and_none_at_all_is_named(tmp_path):
    """s4s learns on one-call solvers: its Heun cell is skipped with that reason (not raced out), and a run in which
    no cell can run is an error before any work."""
    gmm = fewstep.load_model("gmm2d")
    summary = tune(gmm, nfe=[3], methods=["karras", "s4s"], solvers=["heun", "euler"], quick=True, outdir=tmp_path,
                   progress=False, report=False)
    cells = {(c["method"], c["solver"]): c for c in summary["cells"]}
    assert cells["s4s", "heun"]["status"] == "skipped" and "one network call a step" in cells["s4s", "heun"]["reason"]
    assert cells["s4s", "euler"]["status"] == "ok"
    with pytest.raises(ValueError, match="no cell can run on the solvers heun: s4s runs only on solvers of one"):
        tune(gmm, nfe=[3], methods=["s4s"], solvers=["heun"], outdir=tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


SCRIPT = """
import os, signal, sys, fewstep
from fewstep import tuning
if len(sys.argv) > 2:  # SIGKILL itself right after results.json first holds this many cells (however loaded the machine)
    save = tuning._Run.save
    def killing_save(run):
        save(run)
        if len(run.results) >= int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
    tuning._Run.save = killing_save
tuning.tune(fewstep.load_model('gmm2d'), methods=['karras', 'logsnr_uniform', 'oss'], outdir=sys.argv[1], report=False,
            nfe=[3, 5], solvers=['euler', 'dpmpp_2m', 'heun'], n_calib=16, n_test=32, progress=False)
"""


def _errors(path):
    cells = json.loads(path.read_text())["cells"]
    return {(c["nfe"], c["method"], c["solver"]): (c["status"], c.get("mean"), c.get("sigmas")) for c in cells}


def test_killed_run_resumes_to_the_same_results(tmp_path, tuned):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", SCRIPT, str(out), "4"], env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    partial = len(json.loads((out / "results.json").read_text())["cells"])
    assert 4 <= partial < 18, "the run was not interrupted half way"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, check=True)
    assert _errors(out / "results.json") == _errors(tuned[0] / "results.json")


def test_every_evaluation_is_counted_and_the_plan_printed(capsys, counted):
    den = counted(fewstep.load_model("gmm2d"))
    s = tune(den, nfe=[3, 4], methods=["karras", "ays", "oss", "ld3"], solvers=["euler", "dpmpp_2m", "heun"],
             n_calib=8, n_test=32, report=False, progress=True, seconds_per_eval=0.1)
    assert "fewstep tune plan (race)" in capsys.readouterr().out
    cost = s["cost"]
    assert cost["total"] == den.rows == sum(cost["evaluations"].values())
    assert set(cost["evaluations"]) == {"probe", "teacher", "method", "scoring"}
    assert cost["at_seconds_per_eval"]["hours"] == pytest.approx(den.rows * 0.1 / 3600, rel=1e-3)
    assert cost["teacher"]["steps"] > 0 and 0 <= cost["teacher"]["error"] < 0.05
    ok = [c for c in s["cells"] if c["status"] == "ok"]
    assert sum(c["evaluations"]["scoring"] for c in ok) == cost["evaluations"]["scoring"]
    assert all(c["evaluations"]["method"] > 0 for c in ok if c["method"] in ("oss", "ld3"))
    assert all(c["n"] == len(c["errors"]) for c in ok)


def test_the_reports_evaluations_are_counted_too(tmp_path, counted):
    """The report's plots (the winners' samples and trajectories) run the network after the cells: their rows are
    in the summary's cost, results.json's and the report's (before, ~1k rows of every default tune were not)."""
    den = counted(fewstep.load_model("digits-unet"))
    s = tune(den, nfe=[3], methods=["karras", "ays"], solvers=["euler", "dpmpp_2m"], n_calib=8, n_test=8,
             outdir=tmp_path, progress=False, seconds_per_eval=0.1)
    cost = s["cost"]
    assert cost["total"] == den.rows == sum(cost["evaluations"].values())
    assert cost["evaluations"]["report"] == 8 * 3 + 3 * 3  # samples: 8 noises, trajectories: 3 (NFE 3 each)
    assert json.loads((tmp_path / "results.json").read_text())["cost"] == json.loads(json.dumps(cost))
    assert cost["at_seconds_per_eval"]["hours"] == pytest.approx(den.rows * 0.1 / 3600, rel=1e-3)
    assert f"| report | {cost['evaluations']['report']:,} |" in (tmp_path / "report.md").read_text()
    assert f"| total | {den.rows:,} |" in (tmp_path / "report.md").read_text()


def test_the_teacher_counts_as_teacher_whoever_asks(tmp_path):
    """The teacher's solves inside a method (GITS's warm-up trajectories, SDM's checks) are teacher evaluations:
    a run whose teacher comes from a warm disk cache spends the same method evaluations per cell, fewer teacher."""
    kw = dict(nfe=[4], methods=["karras", "gits", "sdm", "ld3"], solvers=["euler", "dpmpp_2m"], n_calib=16,
              n_test=16, report=False, progress=False)
    cold = tune(fewstep.load_model("gmm2d"), outdir=tmp_path / "cold", **kw)
    shutil.copytree(tmp_path / "cold" / "teacher", tmp_path / "warm" / "teacher")
    warm = tune(fewstep.load_model("gmm2d"), outdir=tmp_path / "warm", **kw)
    spent = [{(c["method"], c["solver"]): c.get("evaluations") for c in s["cells"]} for s in (cold, warm)]
    assert spent[0] == spent[1]
    assert warm["cost"]["evaluations"].get("teacher", 0) < cold["cost"]["evaluations"]["teacher"]
    assert warm["cost"]["evaluations"]["method"] == cold["cost"]["evaluations"]["method"] > 0


def test_a_budget_is_never_exceeded_and_what_is_left_out_is_said(tmp_path, counted):
    den = counted(fewstep.load_model("gmm2d"))
    s = tune(den, nfe=[4, 6], outdir=tmp_path, budget=6000, n_calib=16, n_test=64, progress=False)
    assert den.rows <= 6000 and s["cost"]["total"] <= 6000
    pruned = [c for c in s["cells"] if c["status"] == "pruned"]
    assert pruned and s["best"]  # something was left out, and a winner was found with the rest
    md = (tmp_path / "report.md").read_text()
    assert "Cells left out" in md and "budget" in md.lower()


def test_the_race_finds_the_exhaustive_winner_or_one_as_good():
    den = fewstep.load_model("gmm2d")
    kw = dict(nfe=[5], methods=["karras", "logsnr_uniform", "time_quadratic", "oss", "gits"],
              solvers=["euler", "dpmpp_2m", "unipc", "heun"], n_calib=16, n_test=128, report=False, progress=False)
    full, race = tune(den, exhaustive=True, **kw), tune(den, **kw)
    assert race["cost"]["total"] < full["cost"]["total"]
    win, ref = race["best"]["5"]["winner"], full["best"]["5"]["winner"]
    cells = {(c["method"], c["solver"]): c for c in full["cells"]}
    assert cells[(win["method"], win["solver"])]["mean"] <= ref["mean_ci95"][1]  # within the winner's interval


def test_the_race_compares_the_cells_still_in_it_on_every_noise_they_share():
    """A cell left out in an earlier round (fewer noises, a lucky mean) is neither the leader nor back in;
    the survivors are judged on all the noises they share, not the first round's."""
    from fewstep.tuning import _alive

    def row(method, errors):
        return {"nfe": 4, "method": method, "solver": "euler", "status": "ok", "n": len(errors),
                "mean": sum(errors) / len(errors), "errors": errors, "sigmas": [80.0, 0.0]}

    same = [1.0 + 0.01 * (i % 3) for i in range(32)]
    later_worse = same[:16] + [v + 0.5 for v in same[16:]]  # as good on the first 16 noises, clearly worse after
    results = {"a": row("karras", same), "b": row("gits", later_worse), "c": row("oss", same),
               "d": row("sdm", [v + 0.001 * (-1) ** i for i, v in enumerate(same)]),
               "lucky": row("ays", [0.1] * 16)}  # left out after the first round: 16 noises only

    class Run:
        def __init__(self):
            self.results = results

    alive = _alive(Run(), 4)
    assert [m for _, m, _ in alive] == ["karras", "oss", "sdm"]  # gits and the lucky ays are out


def test_the_race_takes_at_most_alive_cells_on_besides_the_best_baseline():
    """On a heavy-tailed model many cells stay 'not clearly worse'; the closest ALIVE go on, and the best
    baseline (the reference) with them, even when it is not among the closest."""
    from fewstep.tuning import ALIVE, _alive

    def row(method, solver, j):  # a few large errors each, on other noises: none clearly worse than another
        errors = [1.0 + 1e-4 * j + (5.0 if (i + j) % 8 == 0 else 0.0) for i in range(32)]
        return {"nfe": 4, "method": method, "solver": solver, "status": "ok", "n": 32,
                "mean": sum(errors) / 32, "errors": errors, "sigmas": [80.0, 0.0]}

    results = {f"gits-{i}": row("gits", f"s{i}", i) for i in range(ALIVE + 4)}
    results["karras"] = row("karras", "euler", ALIVE + 5)  # the only baseline, the worst cell

    class Run:
        def __init__(self):
            self.results = results

    alive = _alive(Run(), 4)
    assert [s for _, _, s in alive] == [f"s{i}" for i in range(ALIVE)] + ["euler"]


def _retry_run(s4s_error: float, kept_start: bool = False):
    """A race's state at NFE 4: karras on four solvers (heun the best, s4s does not run on it) and one s4s cell
    on UniPC with ``s4s_error`` on every one of 32 test noises (learned, or a copy of karras + UniPC's samples)."""
    from fewstep.tuning import _cell_name, baseline

    class Run:
        exhaustive, out, info = False, None, {"sigma_min": 0.002, "sigma_max": 80.0}

        def __init__(self):
            self.results, self.schedules = {}, {}

        def rounds(self):
            return [16, 32]

    run = Run()

    def add(method, solver, error, v, **training):
        sched = (baseline("karras", solver, 4, run.info) if v is None else  # None: karras's own samples
                 fewstep.Schedule(torch.tensor([80.0, v, 0.0], dtype=torch.float64), solver=solver))
        sched = sched.with_metadata(training=training) if training else sched
        name = _cell_name(4, method, solver)
        run.results[name] = {"nfe": 4, "method": method, "solver": solver, "status": "ok", "n": 32,
                             "mean": error, "errors": [error] * 32, "sigmas": sched.to_list()}
        run.schedules[name] = sched

    for solver, error in (("heun", 0.5), ("unipc", 1.0), ("dpmpp_2m", 1.1), ("dpmpp_3m", 1.2)):
        add("karras", solver, error, 1.0)
    add("s4s", "unipc", s4s_error, None if kept_start else 2.0, kept="learned", start_solver="unipc",
        tried=[{"solver": "unipc"}])
    run.results[_cell_name(4, "s4s", "dpmpp_2m")] = {"nfe": 4, "method": "s4s", "solver": "dpmpp_2m",
                                                      "status": "pruned", "reason": "not among the best"}
    return run


def test_a_learned_cell_behind_on_the_test_noises_gets_one_more_solver():
    """s4s learned on UniPC and is behind the best cell of another method (karras + Heun) on the test noises:
    one more s4s cell, on the best-ranked solver it runs on and has not tried (not Heun: two calls a step),
    from that solver's schedules only; none when it is ahead, when it kept a start (its cell samples as
    karras + UniPC does), or when it has had its one more."""
    from fewstep.tuning import _cell_name, _retries, _starts

    solvers = ["heun", "unipc", "dpmpp_2m", "dpmpp_3m"]
    run = _retry_run(1.05)
    assert _retries(run, 4, ["karras", "s4s"], solvers) == [(4, "s4s", "dpmpp_2m")]
    assert _cell_name(4, "s4s", "dpmpp_2m") not in run.results  # the pruned row is gone: the cell will be made
    assert [(s.metadata.get("method"), s.solver) for s in _starts(run, 4, "s4s", "dpmpp_2m")] == [("karras", "dpmpp_2m")]
    assert _retries(_retry_run(0.4), 4, ["karras", "s4s"], solvers) == []
    assert _retries(_retry_run(1.0, kept_start=True), 4, ["karras", "s4s"], solvers) == []
    run = _retry_run(1.05)
    run.results[_cell_name(4, "s4s", "dpmpp_3m")] = {**run.results[_cell_name(4, "s4s", "unipc")], "solver": "dpmpp_3m"}
    run.schedules[_cell_name(4, "s4s", "dpmpp_3m")] = run.schedules[_cell_name(4, "s4s", "unipc")]
    assert _retries(run, 4, ["karras", "s4s"], solvers) == []


def test_tail_share_tells_even_errors_from_a_few_large_ones():
    from fewstep.metrics import tail_share

    even = torch.full((100,), 0.02, dtype=torch.float64)
    flips = torch.cat([torch.full((96,), 0.002, dtype=torch.float64), torch.ones(4, dtype=torch.float64)])
    assert tail_share(even) == pytest.approx(0.05)
    assert tail_share(flips) == pytest.approx((4 + 0.002) / (4 + 96 * 0.002))  # the worst 5: the 4 flips, one more
    assert tail_share(torch.zeros(8, dtype=torch.float64)) == 0.0


def test_report_says_how_sure_each_winner_is(tuned):
    """The paired lead of each winner over the best baseline (on the noises both were scored on) and the share
    of its mean in its worst 5% of samples; a heavy tail is named with what settles it."""
    from fewstep.report import _certainty_lines, improvement_rows

    out, summary, _ = tuned
    rows = improvement_rows(summary)
    for r in rows:
        entry = summary["best"][str(r["nfe"])]
        win, base = torch.tensor(entry["winner"]["errors"]), torch.tensor(entry["best_baseline"]["errors"])
        m = min(len(win), len(base))
        assert r["diff_n"] == m and r["diff"] == pytest.approx(float((win[:m] - base[:m]).mean()))
        assert (r["z"] > 0) == (r["diff"] < 0) or r["diff"] == 0
    assert "## How sure" in (out / "report.md").read_text()
    def with_errors(errors):  # the summary with every winner's per-sample errors replaced
        return {**summary, "best": {k: {**v, "winner": {**v["winner"], "errors": errors}}
                                    for k, v in summary["best"].items()}}

    text = "\n".join(_certainty_lines(improvement_rows(with_errors([0.001] * 31 + [1.0]))))
    assert "over 50% of the winner's mean error" in text and "--n-test" in text
    assert "over 50%" not in "\n".join(_certainty_lines(improvement_rows(with_errors([0.01] * 32))))


def test_a_cell_that_samples_as_an_earlier_one_takes_its_errors_unsampled(monkeypatch):
    """A method that returns a schedule an earlier cell has (here: karras itself, as a method that kept its start
    does) is not sampled again: it gets that cell's errors, at no scoring evaluation."""
    from dataclasses import dataclass

    from fewstep.methods import METHODS, base
    from fewstep.schedules import builtin

    @dataclass(frozen=True)
    class NoOptions:
        pass

    monkeypatch.setitem(METHODS, "kept_karras", None)  # so that monkeypatch removes it afterwards
    base.register("kept_karras", NoOptions)(
        lambda ctx, solver, nfe, opts: builtin("karras", nfe, ctx.sigma_min, ctx.sigma_max).with_metadata(solver="euler"))
    s = tune(fewstep.load_model("gmm2d"), nfe=[4], methods=["karras", "ays", "kept_karras"], solvers=["euler"],
             n_calib=8, n_test=32, report=False, progress=False, exhaustive=True)
    cells = {c["method"]: c for c in s["cells"] if c["status"] == "ok"}
    assert cells["kept_karras"]["sigmas"] == cells["karras"]["sigmas"]
    assert cells["kept_karras"]["errors"] == cells["karras"]["errors"] and len(cells["karras"]["errors"]) == 32
    assert cells["kept_karras"]["evaluations"]["scoring"] == 0 < cells["karras"]["evaluations"]["scoring"]
    assert s["cost"]["evaluations"]["scoring"] == cells["karras"]["evaluations"]["scoring"] + cells["ays"]["evaluations"]["scoring"]
