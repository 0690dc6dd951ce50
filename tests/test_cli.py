import json
import re
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


def test_demo_json(capsys):
    assert main(["demo", "--model", "gmm2d", "--nfe", "4,6", "--n", "16", "--teacher-steps", "64",
                 "--solvers", "euler,dpmpp_2m", "--schedules", "karras,logsnr_uniform", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(r["nfe"], r["schedule"], r["solver"]) for r in out["rows"]} == {
        (k, s, v) for k in (4, 6) for s in ("karras", "logsnr_uniform") for v in ("euler", "dpmpp_2m")}
    assert all(r["mean"] > 0 and r["nfe"] in (4, 6) and "w2" in r for r in out["rows"])


def test_demo_table(capsys):
    assert main(["demo", "--model", "gmm2d", "--nfe", "3", "--n", "8", "--teacher-steps", "32",
                 "--solvers", "heun", "--schedules", "karras"]) == 0
    out = capsys.readouterr().out
    assert "NFE 3 (best: karras + heun" in out and "mean" in out


def test_sample_and_evaluate_with_a_schedule_file(tmp_path, capsys):
    sched = fewstep.schedules.karras(5).with_metadata(solver="dpmpp_2m")
    sched.save(tmp_path / "s.json")
    assert main(["sample", "--model", "gmm2d", "--schedule", str(tmp_path / "s.json"), "--n", "4",
                 "-o", str(tmp_path / "x.pt")]) == 0
    saved = torch.load(tmp_path / "x.pt", weights_only=False)
    assert saved["samples"].shape == (4, 2)
    assert main(["sample", "--model", "gmm2d", "--schedule", str(tmp_path / "s.json"), "--n", "2",
                 "-o", str(tmp_path)]) == 0  # a folder: samples.pt in it
    assert torch.load(tmp_path / "samples.pt", weights_only=False)["samples"].shape == (2, 2)
    capsys.readouterr()
    assert main(["evaluate", "--model", "gmm2d", "--schedule", str(tmp_path / "s.json"), "--n", "16",
                 "--teacher-steps", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["nfe"] == 5 and res["solver"] == "dpmpp_2m" and res["mean_ci95"][0] <= res["mean"] <= res["mean_ci95"][1]


def test_optimize_sample_and_evaluate_a_policy(tmp_path, capsys):
    """--method instance writes a per-sample policy (.pt); sample and evaluate read it back."""
    opts = '{"oss_grid": 10, "ld3_iters": 2, "iters": 2, "clusters": [2], "policy": "route"}'
    assert main(["optimize", "--model", "gmm2d", "--method", "instance", "--solver", "euler", "--nfe", "3",
                 "--n-calib", "16", "--teacher-steps", "32", "--options", opts, "-o", str(tmp_path / "p.json"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["output"] == str(tmp_path / "p.pt") and (tmp_path / "p.pt").is_file() and not (tmp_path / "p.json").exists()
    assert main(["sample", "--model", "gmm2d", "--schedule", str(tmp_path / "p.pt"), "--n", "4",
                 "-o", str(tmp_path / "x.pt")]) == 0
    saved = torch.load(tmp_path / "x.pt", weights_only=False)
    assert saved["samples"].shape == (4, 2) and saved["sigmas"].shape == (4, 4)  # per-sample sigmas
    capsys.readouterr()
    assert main(["evaluate", "--model", "gmm2d", "--schedule", str(tmp_path / "p.pt"), "--n", "8",
                 "--teacher-steps", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sigmas"] == "per sample" and res["mean"] > 0


def test_user_model_factory(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text("import fewstep\n\ndef make():\n    return fewstep.load_model('gmm2d')\n")
    assert main(["evaluate", "--model", f"{f}:make", "--builtin", "karras", "--nfe", "4", "--solver", "euler",
                 "--n", "8", "--teacher-steps", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 4


@pytest.mark.parametrize("argv,msg", [
    (["evaluate", "--model", "nope.py:make", "--nfe", "4", "--solver", "euler"], "model file not found: nope.py"),
    (["evaluate", "--model", "nosuch", "--nfe", "4", "--solver", "euler"], "unknown model 'nosuch'"),
    (["evaluate", "--model", "gmm2d", "--schedule", "missing.json"], "schedule file not found"),
])
def test_cli_errors_are_named(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_cli_rejects_unknown_solver(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--solvers", "rk45"])
    assert "unknown: rk45" in capsys.readouterr().err


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    cmd = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S).group(1).strip()
    assert cmd in (ROOT / ".ci" / "run").read_text()


def test_tune_tables_without_a_baseline_or_without_any_scored_cell(tmp_path, capsys):
    base = ["tune", "--model", "gmm2d", "--nfe", "3", "--solvers", "euler", "--quick"]
    assert main([*base, "--methods", "gits", "-o", str(tmp_path / "a")]) == 0  # a winner with no baseline beside it
    assert "gits + euler" in capsys.readouterr().out
    assert main([*base, "--methods", "karras", "--budget", "40", "-o", str(tmp_path / "b")]) == 1
    assert "no schedule was scored at any NFE" in capsys.readouterr().out


def test_nfe_lists_take_ranges():
    from fewstep.cli import _ints

    assert _ints("3-6") == [3, 4, 5, 6] and _ints("8,3-4") == [3, 4, 8] and _ints("5") == [5]


def test_sample_writes_an_image_grid_for_an_image_model(tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "grid.png"
    assert main(["sample", "--model", "digits", "--nfe", "4", "--solver", "euler", "--n", "5", "-o", str(out)]) == 0
    img = matplotlib.image.imread(out)  # 3 x 2 images of 8 x 8 pixels, each enlarged 8 times, 1 pixel apart
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[:2] == (2 * 65 - 1, 3 * 65 - 1)
    assert main(["sample", "--model", "gmm2d", "--nfe", "4", "--solver", "euler", "-o", str(tmp_path / "no.png")]) == 2
    assert "are not images" in capsys.readouterr().err and not (tmp_path / "no.png").exists()


def test_a_built_in_conditional_model_runs_on_its_pool_or_the_one_given(tmp_path, capsys):
    """demo / evaluate of a conditional model (the teacher's error check under the pool's conditions): its built-in
    pool when none is given, else the given --conds file's."""
    from fewstep.zoo import class_conditions

    torch.save(class_conditions(6, seed=4), tmp_path / "classes.pt")
    args = ["demo", "--model", "gmm-cond", "--nfe", "3", "--solvers", "euler", "--n", "8", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "built-in pool of 64" in captured.err
    own = {r["schedule"]: r["mean"] for r in json.loads(captured.out)["rows"]}
    assert main([*args, "--conds", str(tmp_path / "classes.pt")]) == 0
    captured = capsys.readouterr()
    given = {r["schedule"]: r["mean"] for r in json.loads(captured.out)["rows"]}
    assert "built-in pool" not in captured.err and given.keys() == own.keys() and given != own
