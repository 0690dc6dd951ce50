import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_gmm():
    """A 4-d, 3-component GaussianMixture with random full covariances (smooth, cheap)."""
    import fewstep

    g = torch.Generator().manual_seed(0)
    k, d = 3, 4
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) / d + 0.3 * torch.eye(d, dtype=torch.float64)
    return fewstep.GaussianMixture(means, covs, name="small")


class _Rows:
    """The model with an outside count of the rows it evaluates."""

    def __init__(self, den):
        self.den, self.rows = den, 0
        self.shape, self.sigma_min, self.sigma_max, self.name = den.shape, den.sigma_min, den.sigma_max, "rows"

    def __call__(self, x, sigma):
        self.rows += x.shape[0]
        return self.den(x, sigma)


@pytest.fixture
def counted():
    """Wraps a model so that ``.rows`` counts every row it evaluates (what costs, seen from outside fewstep)."""
    return _Rows
