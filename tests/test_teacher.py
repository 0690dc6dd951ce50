import pytest
import torch

import fewstep
from fewstep.teacher import DEFAULT_STEPS, Teacher


@pytest.mark.parametrize("name,n", [("gmm2d", 64), ("gmm64", 32), ("digits", 8)])
def test_teacher_refinement_moves_less_than_1e4(name, n):
    m = fewstep.load_model(name)
    x = fewstep.noise(n, m.shape, m.sigma_max, 1)
    a = Teacher(m, steps=DEFAULT_STEPS).solve(x)
    b = Teacher(m, steps=2 * DEFAULT_STEPS).solve(x)
    assert float(fewstep.rmse(a, b).mean()) < 1e-4


def test_teacher_caches_in_memory_and_on_disk(small_gmm, tmp_path):
    x = fewstep.noise(4, (4,), 80, 0)
    t = Teacher(small_gmm, steps=32, cache_dir=tmp_path, model_id="small")
    a = t.solve(x)
    calls = t.calls
    assert calls > 0 and torch.equal(t.solve(x), a) and t.calls == calls
    t2 = Teacher(small_gmm, steps=32, cache_dir=tmp_path, model_id="small")
    assert torch.equal(t2.solve(x), a) and t2.calls == 0
    # another noise, other settings or another model id -> recomputed
    assert Teacher(small_gmm, steps=16, cache_dir=tmp_path, model_id="small").solve(x).shape == a.shape
    t3 = Teacher(small_gmm, steps=32, cache_dir=tmp_path, model_id="other")
    t3.solve(x)
    assert t3.calls > 0


def test_corrupt_cache_is_recomputed(small_gmm, tmp_path):
    x = fewstep.noise(4, (4,), 80, 0)
    a = Teacher(small_gmm, steps=16, cache_dir=tmp_path, model_id="m").solve(x)
    for f in tmp_path.glob("teacher-*.pt"):
        f.write_bytes(b"garbage")
    t = Teacher(small_gmm, steps=16, cache_dir=tmp_path, model_id="m")
    assert torch.equal(t.solve(x), a) and t.calls > 0


def test_trajectory_states_sit_on_the_grid(small_gmm):
    x = fewstep.noise(8, (4,), 80, 0)
    t = Teacher(small_gmm, steps=256)
    grid = torch.tensor([80.0, 5.0, 0.5, 0.002, 0.0], dtype=torch.float64)
    traj = t.trajectory(x, grid, substeps=128)
    assert traj.shape == (5, 8, 4) and torch.equal(traj[0], x)
    # restarting at the grid point 5.0 from the teacher's state reproduces the rest
    rest = t.trajectory(traj[1], grid[1:], substeps=128)
    assert torch.allclose(rest[-1], traj[-1], atol=1e-12)
    assert float(fewstep.rmse(traj[-1], t.solve(x)).max()) < 1e-3
