import pytest
import torch

import fewstep
from fewstep.teacher import Teacher


@pytest.mark.parametrize("name,n", [("gmm2d", 64), ("gmm64", 32), ("digits", 8)])
def test_error_controlled_teacher_meets_its_tolerance(name, n):
    """N doubles until the estimated error is below tol; the answer is then that close to a 4096-step solve
    (a factor 3 of slack: the estimate is made on the check noises, the truth measured on others)."""
    m = fewstep.load_model(name)
    x = fewstep.noise(n, m.shape, m.sigma_max, 1)
    t = Teacher(m, tol=1e-4)
    y = t.solve(x)
    assert t.error() <= 1e-4 and t.steps() % (t.grid - 1) == 0
    true = float(fewstep.rmse(y, Teacher(m, steps=4096).solve(x)).mean())
    assert true < 3e-4
    assert t.rows >= t.calls > 0  # rows are counted
    on_x = t.error_on(x, x0=y)  # every noise, from x_2N: within a factor 2 of the truth (0 where it is 0: digits)
    assert true / 2 <= on_x <= 2 * true


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
    with pytest.warns(fewstep.files.FewstepWarning):
        assert torch.equal(t.solve(x), a) and t.calls > 0


def test_trajectory_comes_with_the_solve_on_the_candidate_grid(small_gmm):
    """The candidate grid's states and the model's outputs there come from the one solve: the same x0,
    no more calls; a grid off the teacher's is solved on its own refinement."""
    x = fewstep.noise(8, (4,), 80, 0)
    t = Teacher(small_gmm, steps=78, grid=40)
    grid = t.candidate_grid(80.0)
    traj, outs = t.with_outputs(x, grid)
    rows = t.rows
    assert traj.shape == (41, 8, 4) and outs.shape == (40, 8, 4) and torch.equal(traj[0], x)
    assert rows == 8 * 79  # one solve: N + 1 calls per sample
    assert torch.allclose(outs[5], small_gmm(traj[5], grid[5].expand(8)), atol=1e-12)  # D at the teacher state
    assert torch.allclose(traj[-1], t.solve(x), atol=1e-12)
    other = torch.tensor([80.0, 5.0, 0.5, 0.002, 0.0], dtype=torch.float64)
    sub = t.trajectory(x, other)
    assert sub.shape == (5, 8, 4) and float(fewstep.rmse(sub[-1], t.solve(x)).max()) < 1e-3
