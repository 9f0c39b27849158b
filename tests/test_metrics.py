"""Metrics and the KMN baseline on real Fashion-MNIST images and hand-made cases."""
import numpy as np
import pytest
import torch

pytest.importorskip("skimage")

from hen_kernels.hen import metrics  # noqa: E402
from hen_kernels.hen.data import fashion_mnist_available, load_fashion_mnist, occlude  # noqa: E402
from hen_kernels.hen.kmn import KMN  # noqa: E402

needs_fashion = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST absent "
                                   "(apt-get install dataset-fashion-mnist)")


def test_mse_and_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 16, 16, generator=g)
    assert np.allclose(metrics.mse(a, a), 0)
    assert np.allclose(metrics.one_minus_ssim(a, a), 0, atol=1e-12)
    b = a.clone()
    b[0] = 1 - b[0]
    m = metrics.mse(a, b)
    assert m[0] > 0.1 and np.allclose(m[1:], 0)
    s = metrics.one_minus_ssim(a, b)
    assert s[0] > 0.5 and np.allclose(s[1:], 0, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        metrics.mse(a, b[:2])


def test_identity_accuracy_and_rank():
    assert metrics.identity_accuracy(torch.tensor([0, 1, 5, 3]), torch.arange(4)) == 0.75
    x = torch.randn(10, 50, generator=torch.Generator().manual_seed(1))
    assert metrics.column_rank(x) == 10
    collapsed = x[torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 3])]  # recalls stuck in 4 states
    assert metrics.column_rank(collapsed) == 4


@needs_fashion
def test_separability_of_real_images():
    x, _ = load_fashion_mnist(n=300)
    q = occlude(x, "quarter")
    s, c = metrics.cosine_distributions(q.reshape(300, -1), x.reshape(300, -1))
    assert s.shape == (300,) and c.shape == (300 * 299,)
    assert s.mean() > c.mean() + 0.1  # a query resembles its own image more than the others
    sep = metrics.separability(q.reshape(300, -1), x.reshape(300, -1))
    assert sep["d_prime"] > 0.5 and 0.2 < sep["nn_accuracy"] <= 1.0
    # noise-free queries: every image is its own nearest neighbour
    assert metrics.separability(x.reshape(300, -1), x.reshape(300, -1))["nn_accuracy"] == 1.0


@needs_fashion
def test_kmn_fixed_points_and_recall():
    x, _ = load_fashion_mnist(n=200)
    bank = x.reshape(200, -1)
    r = float(torch.cdist(bank, bank).median())
    kmn = KMN(bank, r=r, alpha=1.0)
    # stored patterns are fixed points of the pseudo-inverse update
    torch.testing.assert_close(kmn.update(bank[:5].double()).float(), bank[:5], atol=1e-3, rtol=0)
    res = kmn.retrieve(bank[:50], max_steps=10)
    assert torch.equal(res.index, torch.arange(50)) and (res.steps <= 2).all()
    # light noise: KMN recovers many, not all (the paper: sensitive to r and alpha); far above chance
    res = kmn.retrieve(occlude(x[:50], "noise", noise_std=0.05).reshape(50, -1), max_steps=10)
    assert metrics.identity_accuracy(res.index, torch.arange(50)) > 0.5
    with pytest.raises(ValueError, match="r, alpha"):
        KMN(bank, r=0.0, alpha=1.0)
