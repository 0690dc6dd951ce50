import json
import math

import pytest
import torch

import fewstep
from fewstep import schedules as S
from fewstep.schedules import Schedule, ScheduleError


def test_karras_matches_published_formula():
    # Karras et al. 2022, eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0.
    n, smin, smax, rho = 6, 0.002, 80.0, 7.0
    expect = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    got = S.karras(n, smin, smax, rho).to_list()
    assert got[-1] == 0.0 and len(got) == n + 1
    assert got[:-1] == pytest.approx(expect, rel=1e-14)


def test_ays_ten_steps_is_the_published_list_with_final_zero():
    for model, published in S.AYS_SIGMAS.items():
        got = S.ays(10, model).to_list()
        assert got[:-1] == pytest.approx(published[:-1], rel=1e-12)
        assert got[-1] == 0.0


def test_ays_interpolation_is_loglinear():
    got = S.ays(20, "sd15").sigmas
    pub = torch.tensor(S.AYS_SIGMAS["sd15"], dtype=torch.float64)
    # every other point of the 21-point interpolation is a published point
    assert torch.allclose(got[:-1:2], pub[:-1], rtol=1e-12)
    assert math.log(got[1]) == pytest.approx(0.5 * (math.log(pub[0]) + math.log(pub[1])), rel=1e-12)


def test_ays_rescaled_to_model_range():
    s = S.ays(6, "sdxl", sigma_min=0.002, sigma_max=80.0)
    assert s.sigmas[0] == pytest.approx(80.0) and s.sigmas[-1] == 0 and len(s) == 7


def test_logsnr_uniform_is_uniform_in_log_sigma():
    s = S.logsnr_uniform(5, 0.01, 10.0).sigmas[:-1].log()
    assert torch.allclose(s.diff(), s.diff()[0].expand(4), atol=1e-12)


def test_time_uniform_endpoints_and_vp_inverse():
    s = S.time_uniform(8, 0.002, 80.0).sigmas
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002) and s[-1] == 0
    t = S.vp_time(s[:-1])
    assert torch.allclose(t.diff(), t.diff()[0].expand(t.numel() - 1), atol=1e-12)
    q = S.vp_time(S.time_quadratic(8, 0.002, 80.0).sigmas[:-1]).sqrt()
    assert torch.allclose(q.diff(), q.diff()[0].expand(q.numel() - 1), atol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_uniform_shift(shift):
    s = S.flow_uniform(6, 0.002, 80.0, shift=shift).sigmas
    assert s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002) and s[-1] == 0
    t = s[:-1] / (1 + s[:-1])
    u = t / (shift - (shift - 1) * t)  # undo the shift: uniform steps
    assert torch.allclose(u.diff(), u.diff()[0].expand(u.numel() - 1), atol=1e-12)


def test_builtin_by_name_and_unknown_name():
    assert len(S.builtin("karras", 4)) == 5
    with pytest.raises(ScheduleError, match="unknown schedule 'cosine'"):
        S.builtin("cosine", 4)


@pytest.mark.parametrize("bad,msg", [
    ([], "at least 2 sigmas"),
    ([80.0], "at least 2 sigmas"),
    ([80.0, 80.0, 0.0], "strictly decreasing: sigma\\[0\\]=80 <= sigma\\[1\\]=80"),
    ([1.0, 2.0, 0.0], "strictly decreasing"),
    ([80.0, float("nan"), 0.0], "NaN or inf"),
    ([1.0, -1.0], ">= 0"),
    (["a", "b"], "list or tensor of numbers"),
])
def test_bad_sigmas_are_named(bad, msg):
    with pytest.raises(ScheduleError, match=msg):
        Schedule(bad)


def test_save_load_roundtrip(tmp_path):
    s = S.karras(5).with_metadata(solver="heun", solver_options={"orders": [1, 2, 2, 2, 1]}, nfe=8)
    path = s.save(tmp_path / "a" / "s.json")
    back = Schedule.load(path)
    assert torch.equal(back.sigmas, s.sigmas) and back.metadata == s.metadata
    assert fewstep.nfe(back) == 8


def test_load_rejects_corrupt_and_wrong_version(tmp_path):
    p = tmp_path / "s.json"
    p.write_text("{not json")
    with pytest.raises(ScheduleError, match="corrupt schedule file"):
        Schedule.load(p)
    d = S.karras(3).to_dict()
    d["version"] = 99
    p.write_text(json.dumps(d))
    with pytest.raises(ScheduleError, match="version 99 is not supported"):
        Schedule.load(p)
    p.write_text(json.dumps({"sigmas": [1, 0]}))
    with pytest.raises(ScheduleError, match="not a fewstep schedule"):
        Schedule.load(p)
    d = S.karras(3).to_dict()
    d["sigmas"] = [1, 2, 0]
    p.write_text(json.dumps(d))
    with pytest.raises(ScheduleError, match="strictly decreasing"):
        Schedule.load(p)
    with pytest.raises(FileNotFoundError, match="schedule file not found"):
        Schedule.load(tmp_path / "missing.json")


def test_save_never_leaves_a_partial_file(tmp_path):
    s = S.karras(3).with_metadata(bad=object())  # not JSON-serializable: fails before writing
    with pytest.raises(TypeError):
        s.save(tmp_path / "s.json")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_cleans_up_on_failure(tmp_path, monkeypatch):
    import os
    target = tmp_path / "x.json"
    target.write_text("old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        S.write_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
