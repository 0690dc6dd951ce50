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
