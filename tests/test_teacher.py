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
    no more calls; a grid off the teacher's comes from them too (dense output), with no more calls."""
    x = fewstep.noise(8, (4,), 80, 0)
    t = Teacher(small_gmm, steps=78, grid=40)
    grid = t.candidate_grid(80.0)
    traj, outs = t.with_outputs(x, grid)
    rows = t.rows
    assert traj.shape == (41, 8, 4) and outs.shape == (40, 8, 4) and torch.equal(traj[0], x)
    assert rows == 8 * 79  # one solve: N + 1 calls per sample
    assert torch.allclose(outs[5], small_gmm(traj[5], grid[5].expand(8)), atol=1e-12)  # D at the teacher state
    assert torch.allclose(traj[-1], t.solve(x), atol=1e-12)
    other, rows = torch.tensor([80.0, 5.0, 0.5, 0.002, 0.0], dtype=torch.float64), t.rows
    sub = t.trajectory(x, other)
    assert sub.shape == (5, 8, 4) and torch.equal(sub[-1], traj[-1]) and t.rows == rows
    assert torch.equal(sub[3], traj[-2])  # sigma_min is a candidate point: its state as solved


def test_dense_output_is_as_accurate_as_the_solve(small_gmm):
    """States between the candidate points from the solve's states and outputs there (Lagrange in log sigma,
    the exact integral of the probability-flow ODE): against a 16x finer solve, at most the error a solve on
    the requested grid's own refinement (as many steps) makes."""
    x = fewstep.noise(16, (4,), 80, 0)
    t, fine = Teacher(small_gmm, steps=78, grid=40), Teacher(small_gmm, steps=78 * 16, grid=40)
    other = torch.tensor([80.0, 17.3, 3.1, 0.71, 0.093, 0.0041, 0.0], dtype=torch.float64)
    dense, truth = t.trajectory(x, other), fine.trajectory(x, other, substeps=64)
    own = t.trajectory(x, other, substeps=13)  # 78 steps on the grid's own refinement
    for i in range(1, 6):
        err, own_err = (float(fewstep.rmse(a[i], truth[i]).mean()) for a in (dense, own))
        assert err <= own_err, (i, err, own_err)
    odd = Teacher(small_gmm, steps=100, grid=40)  # the candidate points are not on its fine grid: from the fine grid
    assert torch.allclose(odd.trajectory(x, other)[-1], odd.solve(x), rtol=0, atol=1e-12)


def test_a_conditional_models_teacher_checks_its_error_under_the_conditions_it_is_given():
    from fewstep.zoo import simplex_conditions

    den = fewstep.load_model("gmm-cond")
    with pytest.raises(ValueError, match="needs conditions for its error check"):
        fewstep.Teacher(den).steps()
    c = simplex_conditions(8, seed=1)
    x = fewstep.noise(8, den.shape, 80.0, 0)
    given = fewstep.Teacher(den, check_cond=c)
    assert torch.equal(fewstep.Teacher(den).solve(x, cond=c), given.solve(x, cond=c))  # the first cond= given
