"""The example programs in python/, each run at a tiny size."""
import importlib.util
import os
import subprocess
import sys

import pytest

from .conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "python", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST not found in {FASHION} (apt-get install dataset-fashion-mnist)",
)

TINY = ["--bags", "300", "--bag-size", "8", "--epochs", "3", "--batch-size", "10", "--lr", "5e-3", "--quiet"]


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spinning thread pools."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@needs_fashion
@pytest.mark.usefixtures("one_thread")
def test_train_pooling_loss_falls_alike_with_fused_kernels_and_reference():
    """Multiple-instance learning on real Fashion-MNIST bags: the fused kernels train like the reference."""
    require("cpu")
    mod = _load("train_pooling")
    fused = mod.main(TINY + ["--backend", "cpu", "--similarity", "l2sq"])["history"]
    ref = mod.main(TINY + ["--backend", "torch", "--similarity", "l2sq"])["history"]
    # Same data, same initialisation: the curves start together (rounding differences of the
    # kernels grow through training, as any two float orders of summation do) and fall alike.
    assert abs(fused[0]["loss"] - ref[0]["loss"]) <= 1e-4 * ref[0]["loss"]
    assert abs(fused[1]["loss"] - ref[1]["loss"]) <= 1e-2 * ref[1]["loss"]
    for h in (fused, ref):
        assert h[-1]["loss"] < 0.5 * h[0]["loss"]
        assert h[-1]["test_accuracy"] > 0.8


@needs_fashion
def test_train_pooling_runs_as_a_script():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "python", "train_pooling.py"), "--bags", "20",
                          "--bag-size", "4", "--epochs", "1", "--batch-size", "10"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert "epoch 1: train loss" in out.stdout
