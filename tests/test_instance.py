"""Instance-aware schedules: the policy phi(x_T) -> per-sample sigmas, its training, saving and loading."""

import torch
import pytest

import fewstep
from fewstep.policy import SchedulePolicy
from fewstep.schedules import ScheduleError


def config(shape=(2,), steps=3, **kw):
    return {"shape": list(shape), "steps": steps, "n_logits": steps, "learn_last": True, "hidden": 16,
            "max_inputs": 256, "components": 4, "sigma_min": 0.002, "sigma_max": 80.0, "solver": "ipndm", "solver_options": {}, **kw}


def _ld3_and_policy(model: str, teacher_steps: int, n: int, policy: str):
    """A model, its teacher, and the ld3 schedule and instance policy for ipndm at NFE 3 (seed-0 noises)."""
    den = fewstep.load_model(model)
    teacher = fewstep.Teacher(den, steps=teacher_steps)
    calib = fewstep.noise(n, den.shape, den.sigma_max, seed=0)
    ld3 = fewstep.optimize(den, "ld3", "ipndm", 3, calib=calib, teacher=teacher)
    pol = fewstep.optimize(den, "instance", "ipndm", 3, calib=calib, teacher=teacher, policy=policy)
    return den, teacher, ld3, pol


@pytest.fixture(scope="module")
def trained():
    return _ld3_and_policy("gmm2d", 256, 256, "residual")


def test_untrained_policy_is_the_global_schedule():
    pol = SchedulePolicy(config())
    glob = fewstep.schedules.karras(3, 0.002, 80.0, final_zero=False).sigmas
    glob = torch.cat([glob[:-1], glob.new_zeros(1)])
    from fewstep.schedules import logits_from_sigmas

    pol.net.global_out.copy_(logits_from_sigmas(glob, 0.002, True))
    sig = pol.sigmas_for(fewstep.noise(5, (2,), 80.0, seed=0))
    assert sig.shape == (4, 5)
    assert torch.allclose(sig, glob[:, None].expand(4, 5), rtol=1e-10)


def test_instance_policy_beats_ld3_held_out(trained):
    den, teacher, ld3, pol = trained
    test = fewstep.noise(256, den.shape, den.sigma_max, seed=1)
    sig = pol.sigmas_for(test)
    assert sig.shape == (4, 256) and (sig[0] == den.sigma_max).all() and (sig[-1] == 0).all()
    assert (sig[1:] < sig[:-1]).all()
    assert (sig[1:-1].std(1) > 0).all()  # a schedule per sample, not one for all
    out = fewstep.sample(den, test, pol)  # the policy names its solver
    assert out.shape == test.shape and torch.isfinite(out).all()
    tr = pol.metadata["training"]
    assert tr["valid_best"] < tr["valid_init"] and tr["student_calls"] > 0 and tr["seconds"] > 0
    assert pol.metadata["method"] == "instance" and pol.metadata["nfe"] == 3 and tr["policy"] == "residual"
    assert tr["phi_kept"] and tr["gate_z"] >= 2.0
    assert tr["ld3_reused"]  # the global stage is the ld3 result above, not trained again
    err = fewstep.evaluate(den, pol, x=test, teacher=teacher, distribution=False)["mean"]
    err_ld3 = fewstep.evaluate(den, ld3, "ipndm", x=test, teacher=teacher, distribution=False)["mean"]
    assert err < err_ld3


def test_save_load_identical_sigmas(trained, tmp_path):
    _, _, _, pol = trained
    x = fewstep.noise(32, (2,), 80.0, seed=5)
    path = pol.save(tmp_path / "p.pt")
    back = SchedulePolicy.load(path)
    assert torch.equal(back.sigmas_for(x), pol.sigmas_for(x))
    assert back.solver == "ipndm" and back.metadata["training"]["iters"] == pol.metadata["training"]["iters"]
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_load_errors(tmp_path):
    pol = SchedulePolicy(config())
    good = pol.save(tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ScheduleError, match="corrupt"):
        SchedulePolicy.load(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_text("not a policy")
    with pytest.raises(ScheduleError, match="corrupt"):
        SchedulePolicy.load(tmp_path / "junk.pt")
    sched = fewstep.schedules.karras(3).save(tmp_path / "sched.json")
    with pytest.raises(ScheduleError):
        SchedulePolicy.load(sched)
    d = torch.load(tmp_path / "good.pt", weights_only=True)
    for version in (2, 99):  # 2: before the policy kinds
        torch.save({**d, "version": version}, tmp_path / "old.pt")
        with pytest.raises(ScheduleError, match=f"version {version} is not supported"):
            SchedulePolicy.load(tmp_path / "old.pt")
    torch.save({**d, "format": "other"}, tmp_path / "fmt.pt")
    with pytest.raises(ScheduleError, match="not a fewstep schedule policy"):
        SchedulePolicy.load(tmp_path / "fmt.pt")
    torch.save({**d, "config": d["config"].replace('"hidden": 16', '"hidden": 32')}, tmp_path / "mismatch.pt")
    with pytest.raises(ScheduleError, match="do not match"):
        SchedulePolicy.load(tmp_path / "mismatch.pt")
    with pytest.raises(FileNotFoundError):
        SchedulePolicy.load(tmp_path / "missing.pt")


def test_wrong_sample_shape():
    pol = SchedulePolicy(config())
    with pytest.raises(ValueError, match="shape"):
        pol.sigmas_for(torch.zeros(4, 3))


@pytest.mark.parametrize("shape", [(3, 32, 32), (4, 64, 64), (1000,), (1, 8, 8)])
def test_features_stay_small_for_any_shape(shape):
    pol = SchedulePolicy(config(shape))
    x = fewstep.noise(3, shape, 80.0, seed=0)
    assert pol.net.features(x / 80.0).shape[1] <= 257
    sig = pol.sigmas_for(x)
    assert sig.shape == (4, 3) and (sig[1:] < sig[:-1]).all()


def test_principal_directions():
    from fewstep.methods.instance import principal_directions

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([5.0, 0.1, 2.0, 0.1, 0.1], dtype=torch.float64)
    y = torch.randn(200, 5, generator=g, dtype=torch.float64) * scale
    basis = principal_directions(y, 2)
    assert basis.shape == (5, 2) and torch.allclose(basis.T @ basis, torch.eye(2, dtype=torch.float64))
    assert torch.allclose(basis.abs()[[0, 2]], torch.eye(2, dtype=torch.float64), atol=0.05)  # the two wide axes
    assert principal_directions(y[:2], 3)[:, 2:].abs().max() == 0  # past the rank: zero columns


def test_more_samples_for_phi(trained):
    den, teacher, ld3, _ = trained
    calib = fewstep.noise(16, den.shape, den.sigma_max, seed=0)
    pol = fewstep.optimize(den, "instance", "ipndm", 3, calib=calib, teacher=teacher, init=ld3, samples=48, iters=2,
                           gate=float("inf"))
    tr = pol.metadata["training"]
    assert tr["n_train"] + tr["n_valid"] == 48 and tr["init"] == "ld3 (given schedule)"
    assert not tr["phi_kept"]  # no gain passes an infinite gate: the policy is the global schedule
    x = fewstep.noise(8, den.shape, den.sigma_max, seed=1)
    assert torch.allclose(pol.sigmas_for(x), ld3.sigmas[:, None].expand(4, 8), rtol=1e-9)
    with pytest.raises(ValueError, match="samples"):
        fewstep.optimize(den, "instance", "ipndm", 3, calib=calib, teacher=teacher, init=ld3, samples=-1)


def test_init_must_match(trained):
    den, teacher, _, _ = trained
    with pytest.raises(ValueError, match="init must be a schedule of 3 steps"):
        fewstep.optimize(den, "instance", "ipndm", 3, n=16, teacher=teacher,
                         init=fewstep.schedules.karras(5, den.sigma_min, den.sigma_max), iters=1)


def test_gmm_scales_mode_predictable_from_noise():
    """gmm-scales (docs/models.md): modes 30x apart in scale, means far apart, so the mode a trajectory
    ends in can be read off x_T (what a per-sample schedule needs); gmm64's could not (57%)."""
    from sklearn.linear_model import LogisticRegression

    from fewstep.methods.instance import principal_directions

    den = fewstep.load_model("gmm-scales")
    stds = den.evals.sqrt()
    assert den.shape == (32,) and stds.max() / stds.min() > 25
    assert torch.cdist(den.means, den.means).add(torch.eye(4) * 1e9).min() > 10 * stds.max()
    x = fewstep.noise(512, den.shape, den.sigma_max, seed=0)
    y = fewstep.Teacher(den, steps=64).solve(x)
    mode = torch.cdist(y, den.means).argmin(1)
    assert torch.bincount(mode, minlength=4).min() > 64
    f = (x @ principal_directions(y[:256], 4)).numpy()  # x_T on the data's top directions, as phi sees it
    clf = LogisticRegression(max_iter=2000).fit(f[:256], mode[:256].numpy())
    assert clf.score(f[256:], mode[256:].numpy()) > 0.85


def test_kmeans_finds_separated_clusters():
    from fewstep.methods.instance import kmeans

    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    truth = torch.arange(90) % 3
    f = centers[truth] + torch.randn(90, 2, generator=g, dtype=torch.float64)
    labels = kmeans(f, 3)
    assert labels.shape == (90,)
    for j in range(3):  # each true group is one cluster, the three clusters distinct
        assert labels[truth == j].unique().numel() == 1
    assert labels.unique().numel() == 3


@pytest.fixture(scope="module")
def routed():
    return _ld3_and_policy("gmm-scales", 128, 512, "route")


def test_route_policy_beats_ld3_on_gmm_scales(routed):
    """gmm-scales (docs/models.md): each mode has its own best schedule and the mode is readable from
    x_T, so one LD3 schedule per cluster of teacher endpoints, chosen by a classifier, beats LD3 held out
    (measured 0.069 vs 0.075 with 512 calibration / 1024 held-out noises)."""
    den, teacher, ld3, pol = routed
    tr = pol.metadata["training"]
    assert tr["policy"] == "route" and tr["phi_kept"] and tr["clusters"] in (2, 3, 4)
    assert tr["train_accuracy"] > 0.8 and tr["ld3_reused"]
    test = fewstep.noise(512, den.shape, den.sigma_max, seed=1)
    sig = pol.sigmas_for(test)
    assert (sig[0] == den.sigma_max).all() and (sig[-1] == 0).all() and (sig[1:] < sig[:-1]).all()
    assert sig[1:-1].unique(dim=1).shape[1] == tr["clusters"]  # one schedule per cluster
    err = fewstep.evaluate(den, pol, x=test, teacher=teacher, distribution=False)["mean"]
    err_ld3 = fewstep.evaluate(den, ld3, "ipndm", x=test, teacher=teacher, distribution=False)["mean"]
    assert err < 0.95 * err_ld3


def test_route_save_load_and_fallback(routed, tmp_path):
    den, _, ld3, pol = routed
    x = fewstep.noise(64, den.shape, den.sigma_max, seed=5)
    back = SchedulePolicy.load(pol.save(tmp_path / "route.pt"))
    assert back.config["policy"] == "route" and torch.equal(back.sigmas_for(x), pol.sigmas_for(x))
    calib = fewstep.noise(64, den.shape, den.sigma_max, seed=0)
    gated = fewstep.optimize(den, "instance", "ipndm", 3, calib=calib, init=ld3, clusters=[2], gate=float("inf"),
                             teacher=fewstep.Teacher(den, steps=32))
    tr = gated.metadata["training"]  # the default policy, auto: both kinds trained, the lower validation kept
    assert set(tr["valid_by_policy"]) == {"route", "residual"}
    assert tr["policy"] == min(tr["valid_by_policy"], key=tr["valid_by_policy"].get)
    assert not tr["phi_kept"]  # no gain passes an infinite gate: the global schedule
    assert torch.allclose(gated.sigmas_for(x), ld3.sigmas[:, None].expand(4, 64), rtol=1e-9)
    with pytest.raises(ValueError, match="clusters"):
        fewstep.optimize(den, "instance", "ipndm", 3, calib=calib, init=ld3, clusters=[1])
    with pytest.raises(ValueError, match="policy"):
        fewstep.optimize(den, "instance", "ipndm", 3, calib=calib, init=ld3, policy="mlp")


def test_auto_keeps_the_policy_that_passes_the_gate(routed, monkeypatch):
    """auto: a kind whose gain fails the gate loses to one that passes, whatever their validation errors."""
    from fewstep.methods import instance as inst

    den, _, ld3, _ = routed
    calib = fewstep.noise(64, den.shape, den.sigma_max, seed=0)
    for iters, passing in ((5, "route"), (6, "residual")):  # other iters: not answered from optimize's memo
        monkeypatch.setattr(inst, "significance",
                            lambda ctx, solver, opts, pol, *a, passing=passing: 3.0 if pol.config["policy"] == passing else 0.0)
        tr = fewstep.optimize(den, "instance", "ipndm", 3, calib=calib, init=ld3, clusters=[2], iters=iters,
                              teacher=fewstep.Teacher(den, steps=32)).metadata["training"]
        assert tr["policy"] == passing and tr["phi_kept"] and tr["gate_z"] == 3.0
        assert tr["gate_z_by_policy"] == {"route": 3.0 if passing == "route" else 0.0,
                                          "residual": 3.0 if passing == "residual" else 0.0}


# --------------------------------------------------------------------------------------------
# Per-step corrections: evaluation-time shift and epsilon scale (corrections.Corrected)

def test_corrected_calls_and_outputs():
    """A call at step j (sigmas[j]) evaluates D at sigmas[j] * exp(shift[j]) and returns x + scale[j] (D - x)."""
    from fewstep.corrections import Corrected

    gmm = fewstep.load_model("gmm2d")
    seen = []

    def spy(x, sigma):
        seen.append(sigma.clone())
        return gmm(x, sigma)

    sigmas = fewstep.schedules.karras(3, 0.002, 80.0).sigmas
    shift = torch.tensor([-1.0, 0.5, 0.0], dtype=torch.float64)
    scale = torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64)
    x = fewstep.noise(4, gmm.shape, 80.0, seed=0)
    model = Corrected(spy, shift, scale)
    for j in range(3):
        out = model(x, sigmas[j], j)
        assert torch.allclose(seen[-1], sigmas[j] * torch.exp(shift[j]))
        assert torch.allclose(out, x + scale[j] * (gmm(x, seen[-1].expand(4)) - x))
        assert torch.equal(model(x, sigmas[j].clone(), j), out)  # the step is passed: a copy of the sigma is the same
    rows = sigmas[:, None].expand(-1, 4).contiguous()  # per-sample sigmas, [steps + 1, batch]
    per_sample = Corrected(gmm, shift[:, None].expand(-1, 4), scale[:, None].expand(-1, 4))
    for j in range(3):
        assert torch.allclose(per_sample(x, rows[j], j), model(x, sigmas[j], j))
    none = Corrected(gmm, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert torch.equal(fewstep.sample(none, x, sigmas, "ipndm"), fewstep.sample(gmm, x, sigmas, "ipndm"))


def test_correction_gradient_matches_finite_differences():
    """d loss / d shift and d loss / d scale through the solver, against central differences."""
    from fewstep.corrections import Corrected
    from fewstep.solvers import ipndm

    gmm = fewstep.load_model("gmm2d")
    x = fewstep.noise(8, gmm.shape, 80.0, seed=0)
    sigmas = fewstep.schedules.karras(3, 0.002, 80.0).sigmas
    y = fewstep.Teacher(gmm, steps=64).solve(x)

    def loss(shift, scale):
        return (ipndm(Corrected(gmm, shift, scale), x, sigmas) - y).pow(2).mean()

    shift = torch.tensor([-0.3, 0.2, 0.1], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.9, 1.1, 1.0], dtype=torch.float64, requires_grad=True)
    loss(shift, scale).backward()
    eps = 1e-6
    for p, grad in ((shift, shift.grad), (scale, scale.grad)):
        for i in range(3):
            e = torch.zeros(3, dtype=torch.float64)
            e[i] = eps
            args = lambda d: (shift.detach() + d, scale.detach()) if p is shift else (shift.detach(), scale.detach() + d)  # noqa: E731
            fd = (loss(*args(e)) - loss(*args(-e))) / (2 * eps)
            assert torch.isclose(grad[i], fd, rtol=1e-5, atol=1e-9), (i, float(grad[i]), float(fd))


def test_policy_corrections_save_load_and_version_3(tmp_path):
    pol = SchedulePolicy(config(corrections=True))
    with torch.no_grad():
        pol.net.global_out[3:].copy_(torch.tensor([-1.0, 0.5, 0.0, 2.0, -2.0, 0.0]))
    x = fewstep.noise(5, (2,), 80.0, seed=0)
    shift, scale = pol.corrections_for(x)
    assert shift.shape == scale.shape == (3, 5)
    assert torch.allclose(shift[:, 0], 2.0 * torch.tanh(torch.tensor([-0.5, 0.25, 0.0], dtype=torch.float64)))
    assert torch.allclose(scale[:, 0], 1 + 0.5 * torch.tanh(torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)))
    back = SchedulePolicy.load(pol.save(tmp_path / "c.pt"))
    assert all(torch.equal(a, b) for a, b in zip(back.corrections_for(x), (shift, scale)))
    assert torch.equal(fewstep.sample(fewstep.load_model("gmm2d"), x, back),
                       fewstep.sample(fewstep.load_model("gmm2d"), x, pol))
    # a version-3 file (no corrections, the global logits under their old name) still loads
    old = SchedulePolicy(config())
    d = torch.load(old.save(tmp_path / "v4.pt"), weights_only=True)
    state = dict(d["state"])
    state["global_logits"] = state.pop("global_out")
    torch.save({**d, "version": 3, "state": state,
                "config": d["config"].replace(', "corrections": false', "")}, tmp_path / "v3.pt")
    v3 = SchedulePolicy.load(tmp_path / "v3.pt")
    assert v3.corrections_for(x) is None and torch.equal(v3.sigmas_for(x), old.sigmas_for(x))


def test_corrections_keep_the_evaluation_sigma_in_the_model_range():
    """Shifts are clipped so the denoiser is never asked outside [sigma_min, sigma_max] (a VP model
    raises there): at sigma_max the shift cannot be positive, at the last sigma not below sigma_min."""
    pol = SchedulePolicy(config(corrections=True))
    with torch.no_grad():
        pol.net.global_out[3:6].copy_(torch.tensor([10.0, 0.0, -10.0]))
    x = fewstep.noise(4, (2,), 80.0, seed=0)
    asked = []
    gmm = fewstep.load_model("gmm2d")
    fewstep.sample(lambda z, s: asked.append(s.clone()) or gmm(z, s), x, pol)
    asked = torch.stack(asked)
    assert (asked <= 80.0 * (1 + 1e-12)).all() and (asked >= 0.002 * (1 - 1e-12)).all()
    assert torch.allclose(asked[0], torch.full((4,), 80.0, dtype=torch.float64))  # +10 at sigma_max: clipped to 0


def test_global_policy_is_one_schedule_with_corrections(routed):
    """policy='global': the LD3 schedule with corrections learned on the whole batch, the same for every
    sample (the baseline for the per-sample part); it needs corrections."""
    den, _, ld3, _ = routed
    calib = fewstep.noise(64, den.shape, den.sigma_max, seed=0)
    pol = fewstep.optimize(den, "instance", "ipndm", 3, calib=calib, init=ld3, policy="global", gate=0.0,
                           teacher=fewstep.Teacher(den, steps=32))
    x = fewstep.noise(16, den.shape, den.sigma_max, seed=3)
    sig, (shift, scale) = pol.plan_for(x)
    assert pol.metadata["training"]["policy"] == "global"
    assert torch.equal(sig, sig[:, :1].expand_as(sig)) and torch.equal(shift, shift[:, :1].expand_as(shift))
    assert torch.equal(scale, scale[:, :1].expand_as(scale))
    with pytest.raises(ValueError, match="needs corrections"):
        fewstep.optimize(den, "instance", "ipndm", 3, calib=calib, init=ld3, policy="global", corrections=False)
