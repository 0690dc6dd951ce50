"""Conditional denoisers D(x, sigma, cond=c) end to end (issue #17): rows follow the samples through
sampling, the teacher, the optimizers and tune; calibration and scoring use disjoint conditions."""

import pytest
import torch

import fewstep
from fewstep.zoo import class_conditions, gmm_cond


@pytest.fixture(scope="module")
def cg():
    return gmm_cond(guidance=2.0)


def test_the_conditional_mixture_is_exact_and_guided(cg):
    """For a fixed condition the model is a GaussianMixture (its exact denoiser); CFG is D0 + w (Dc - D0)."""
    c = class_conditions(5, seed=1)
    x = fewstep.noise(5, cg.shape, 3.0, seed=2)
    s = torch.full((5,), 3.0, dtype=torch.float64)
    for i in range(5):
        means, logw = cg.given(c[i:i + 1])
        fixed = fewstep.GaussianMixture(means[0], cg.covs, logw[0].exp(), shape=cg.shape)
        null = fewstep.GaussianMixture(cg.means, cg.covs, cg.weights, shape=cg.shape)
        want = null(x[i:i + 1], s[:1]) + 2.0 * (fixed(x[i:i + 1], s[:1]) - null(x[i:i + 1], s[:1]))
        assert torch.allclose(cg(x[i:i + 1], s[:1], cond=c[i:i + 1]), want, atol=1e-12)


def test_rows_follow_the_samples(cg):
    """sample / the teacher with cond equal row-by-row runs, whatever the batch."""
    c, x = class_conditions(6, seed=0), fewstep.noise(6, cg.shape, 80.0, seed=0)
    sched = fewstep.schedules.karras(5)
    joint = fewstep.sample(cg, x, sched, "dpmpp_2m", cond=c)
    teacher = fewstep.Teacher(cg, steps=78, check_cond=c)
    ref = teacher.solve(x, cond=c)
    for i in (0, 3, 5):
        assert torch.allclose(joint[i], fewstep.sample(cg, x[i:i + 1], sched, "dpmpp_2m", cond=c[i:i + 1])[0], atol=1e-10)
        assert torch.allclose(ref[i], fewstep.Teacher(cg, steps=78).solve(x[i:i + 1], cond=c[i:i + 1])[0], atol=1e-10)
    other = teacher.solve(x, cond=class_conditions(6, seed=5))  # the cache key holds the conditions
    assert not torch.allclose(other, ref)


@pytest.mark.parametrize("method,opts", [("gits", {"grid": 16}), ("oss", {"grid": 16, "batch": 6}),
                                         ("sdm", {"search_samples": 4}), ("ld3", {"iters": 5, "oss_grid": 16})])
def test_optimizers_take_conditions(cg, method, opts):
    calib, c = fewstep.noise(12, cg.shape, 80.0, seed=0), class_conditions(12, seed=0)
    sched = fewstep.optimize(cg, method, "dpmpp_2m", 5, calib=calib, cond=c,
                             teacher=fewstep.Teacher(cg, steps=78, check_cond=c), **opts)
    assert fewstep.nfe(sched) == 5 and torch.isfinite(sched.sigmas).all()


def test_bad_conditions_are_named(cg):
    x, c = fewstep.noise(4, cg.shape, 80.0, seed=0), class_conditions(4, seed=0)
    gmm = fewstep.load_model("gmm2d")
    cases = [
        (lambda: fewstep.sample(cg, x, fewstep.schedules.karras(3), "euler", cond=c[:3]), "3 rows for 4"),
        (lambda: fewstep.optimize(cg, "oss", "euler", 3, calib=x, grid=8), "conditional"),
        (lambda: fewstep.optimize(gmm, "oss", "euler", 3, n=4, cond=c, grid=8), "unconditional"),
        (lambda: fewstep.tune(cg, nfe=[3], methods=["karras"], solvers=["euler"], conds=c[:1], progress=False,
                              report=False), "at least 2 conditions"),
        (lambda: fewstep.tune(cg, nfe=[3], methods=["karras"], solvers=["euler"], progress=False, report=False),
         "conditional"),
        (lambda: fewstep.sample(cg, x, fewstep.schedules.karras(3), "euler", cond={"a": c, "b": c[:2]}), "rows"),
        (lambda: fewstep.sample(cg, x, fewstep.schedules.karras(3), "euler", cond=c * float("nan")), "NaN or inf"),
        (lambda: fewstep.sample(cg, x, fewstep.schedules.karras(3), "euler", cond={"c": c}), "got dict"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_tune_calibrates_and_scores_on_disjoint_conditions(cg, tmp_path):
    pool = class_conditions(20, seed=3)
    seen = []

    def spy(x, sigma, cond):
        seen.append(cond)
        return cg(x, sigma, cond=cond)

    spy.shape, spy.sigma_min, spy.sigma_max, spy.name = cg.shape, cg.sigma_min, cg.sigma_max, "spy"
    s = fewstep.tune(spy, nfe=[4], methods=["karras", "oss"], solvers=["dpmpp_2m"], conds=pool, n_calib=8,
                     n_test=16, outdir=tmp_path, progress=False)
    assert s["conditions"] == {"calibration": 10, "test": 10}
    rows = {tuple(r.tolist()) for c in seen for r in c}
    assert rows <= {tuple(r.tolist()) for r in pool}
    p = s["best"]["4"]["per_condition"]
    assert p["conditions"] == 10 and p["min"] <= p["median"] <= p["max"]
    report = (tmp_path / "report.md").read_text()
    assert "## Conditions" in report and "Plots not made" not in report  # the trajectories take their conditions
    oss = fewstep.load_schedule(tmp_path / "schedules" / "nfe4-oss-dpmpp_2m.json")
    test_x = fewstep.noise(16, cg.shape, 80.0, seed=1)  # the test noises are scored with the second half only
    err = fewstep.rmse(fewstep.sample(cg, test_x, oss, cond=fewstep.conditions.cycle(pool[10:], 16)),
                       fewstep.Teacher(cg, steps=s["cost"]["teacher"]["steps"]).solve(test_x, cond=fewstep.conditions.cycle(pool[10:], 16)))
    cell = next(c for c in s["cells"] if c["method"] == "oss")
    assert float(err[:cell["n"]].mean()) == pytest.approx(cell["mean"], rel=1e-6)
    calib = fewstep.noise(8, cg.shape, 80.0, seed=0)  # and the calibration noises with the first half only
    again = fewstep.optimize(cg, "oss", "dpmpp_2m", 4, calib=calib, cond=fewstep.conditions.cycle(pool[:10], 8),
                             teacher=fewstep.Teacher(cg, steps=s["cost"]["teacher"]["steps"]), grid=40, batch=16)
    assert torch.allclose(again.sigmas, oss.sigmas, rtol=1e-12)


def test_cli_tunes_a_class_conditional_model_from_a_conds_file(tmp_path, monkeypatch, capsys):
    import json

    from fewstep import cli, zoo

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    torch.save(zoo.class_conditions(8, seed=3), tmp_path / "classes.pt")
    assert cli.main(["tune", "--model", "gmm-cond", "--conds", str(tmp_path / "classes.pt"), "--guidance-scale", "2",
                     "--nfe", "4", "--methods", "karras,gits", "--solvers", "euler", "--n-calib", "8", "--n-test", "8",
                     "--json", "-o", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"]["guidance"] == 2.0 and results["model"]["name"].endswith("@w2")
    assert {c["method"] for c in results["cells"] if c["status"] == "ok"} == {"karras", "gits"}


def test_the_shipped_class_conditional_network_is_guided_and_knows_its_classes():
    """digits-cond: D_w = D_0 + w (D_1 - D_0) (one network, the null label for D_0); at guidance 3 its samples of
    each class are nearest to training digits of that class; a missing condition is named."""
    import json

    from sklearn.datasets import load_digits

    from fewstep.zoo import ASSETS, class_labels, digits_cond

    record = json.loads((ASSETS / "digits-cond" / "training.json").read_text())
    assert record["seed"] == 0 and record["unet_config"]["num_class_embeds"] == 11
    u, c, g = digits_cond(0.0), digits_cond(1.0), fewstep.load_model("digits-cond", guidance=3.0)
    assert (c.name, g.name, g.guidance) == ("digits-cond", "digits-cond@w3", 3.0)
    labels = class_labels(6, seed=2)
    x, s = fewstep.noise(6, g.shape, 5.0, seed=3), torch.full((6,), 5.0, dtype=torch.float64)
    d0, d1 = u(x, s, cond=labels), c(x, s, cond=labels)
    assert torch.allclose(g(x, s, cond=labels), d0 + 3.0 * (d1 - d0), atol=1e-5)
    assert (d1 - d0).abs().max() > 1e-2  # the label changes the estimate
    with pytest.raises(ValueError, match="cond"):
        fewstep.conditions.check_model(g, None)
    digits = load_digits()
    train = torch.tensor(digits.images, dtype=torch.float64).reshape(-1, 64) / 8 - 1
    want = {"class_labels": torch.arange(10).repeat(5)}
    with torch.no_grad():
        out = fewstep.sample(g, fewstep.noise(50, g.shape, g.sigma_max, seed=4),
                             fewstep.schedules.karras(40, g.sigma_min, g.sigma_max), "heun", cond=want)
    nearest = torch.tensor(digits.target)[torch.cdist(out.reshape(50, 64).double(), train).argmin(1)]
    assert (nearest == want["class_labels"]).float().mean() >= 0.9


def test_cli_tunes_the_shipped_class_conditional_network(tmp_path, monkeypatch):
    import json

    from fewstep import cli
    from fewstep.zoo import class_labels

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    torch.save(class_labels(8, seed=5), tmp_path / "labels.pt")
    assert cli.main(["tune", "--model", "digits-cond", "--conds", str(tmp_path / "labels.pt"), "--guidance-scale", "3",
                     "--nfe", "4", "--methods", "karras,ays,gits", "--solvers", "euler,dpmpp_2m", "--n-calib", "8",
                     "--n-test", "8", "--teacher-steps", "32", "--json", "-o", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"]["name"] == "digits-cond@w3" and results["key"]["conds"]
    assert sum(c["status"] == "ok" for c in results["cells"]) == 6
    assert "Plots not made" not in (tmp_path / "out" / "report.md").read_text()  # samples under their own labels
    assert (tmp_path / "out" / "plots" / "samples.png").stat().st_size > 0


def test_instance_policies_read_the_condition_beside_the_noise(cg, tmp_path):
    """phi's inputs include the condition (one-hot classes for integer labels, numbers otherwise, projected
    on the calibration conditions' principal directions): one noise under two conditions can get two
    schedules; the policy saves and loads with its condition spec, and names a missing condition."""
    from fewstep.policy import SchedulePolicy, cond_rows, cond_spec

    labels = {"class_labels": torch.tensor([0, 3, 1])}
    assert cond_spec(labels) == [["class_labels", "classes", 4]] and cond_spec(None) is None
    assert cond_rows(cond_spec(labels), {"class_labels": torch.tensor([2, 7])}).tolist() == [[0, 0, 1, 0], [0] * 4]
    c = class_conditions(32, seed=1)
    x = fewstep.noise(32, cg.shape, cg.sigma_max, seed=0)
    pol = fewstep.optimize(cg, "instance", "euler", 4, calib=x, cond=c, policy="residual", ld3_iters=5, iters=5,
                           corrections_iters=3, teacher=fewstep.Teacher(cg, steps=32))
    assert pol.config["cond"] == [[None, "values", 10]]
    with torch.no_grad():  # a phi that reads the condition: its residual's output layer made non-zero
        torch.manual_seed(0)
        pol.net.mlp[-1].weight.normal_(0, 0.3)
    one = x[:1].repeat(2, *([1] * (x.ndim - 1)))
    two = torch.nn.functional.one_hot(torch.tensor([2, 5]), 10).double()
    sig = pol.sigmas_for(one, two)
    assert (sig[1:-1, 0] - sig[1:-1, 1]).abs().max() > 1e-3
    back = fewstep.load_schedule(pol.save(tmp_path / "pol.pt"))
    assert torch.equal(back.sigmas_for(one, two), sig)
    with pytest.raises(ValueError, match="trained for a conditional model"):
        fewstep.sample(lambda x, s: x * 0, one, back)
    held = class_conditions(64, seed=9)
    xt = fewstep.noise(64, cg.shape, cg.sigma_max, seed=5)
    assert torch.isfinite(fewstep.sample(cg, xt, back, cond=held)).all()
    assert isinstance(back, SchedulePolicy) and back.per_sample


@pytest.mark.parametrize("method", ["s4s", "pas"])
def test_learned_solvers_calibrate_over_conditions(cg, method):
    """s4s and pas fit on the calibration states with their own conditions (subsets keep their rows)."""
    c = class_conditions(32, seed=1)
    x = fewstep.noise(32, cg.shape, cg.sigma_max, seed=0)
    teacher = fewstep.Teacher(cg, steps=32)
    sched = fewstep.optimize(cg, method, "dpmpp_2m" if method == "s4s" else "ipndm", 4, calib=x, cond=c,
                             teacher=teacher, ld3_iters=5, **({"iters": 5} if method == "s4s" else {}))
    assert fewstep.nfe(sched) == 4 and sched.metadata["training"]["n_train"] > 0
    held = class_conditions(16, seed=9)
    out = fewstep.sample(cg, fewstep.noise(16, cg.shape, cg.sigma_max, seed=5), sched, cond=held)
    assert torch.isfinite(out).all()


def test_sampling_a_conditional_model_without_conditions_is_named():
    den = fewstep.load_model("gmm-cond")
    with pytest.raises(ValueError, match="is conditional"):
        fewstep.sample(den, fewstep.noise(2, den.shape, 80.0, 0), fewstep.schedules.karras(3), "euler")
