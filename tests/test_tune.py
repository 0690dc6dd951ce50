import base64
import html.parser
import json
import os
import signal
import subprocess
import sys
import time

import pytest

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


SCRIPT = """
import sys, fewstep
from fewstep.tuning import tune
tune(fewstep.load_model('gmm2d'), methods=['karras', 'logsnr_uniform', 'oss'], outdir=sys.argv[1], report=False,
     nfe=[3, 5], solvers=['euler', 'dpmpp_2m', 'heun'], n_calib=16, n_test=32, progress=False)
"""


def _errors(path):
    cells = json.loads(path.read_text())["cells"]
    return {(c["nfe"], c["method"], c["solver"]): (c["status"], c.get("mean"), c.get("sigmas")) for c in cells}


def test_killed_run_resumes_to_the_same_results(tmp_path, tuned):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            n = len(json.loads((out / "results.json").read_text())["cells"])
        except (FileNotFoundError, json.JSONDecodeError):
            n = 0
        if n >= 4:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(json.loads((out / "results.json").read_text())["cells"])
    assert 4 <= partial < 18, "the run was not interrupted half way"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, check=True)
    assert _errors(out / "results.json") == _errors(tuned[0] / "results.json")
