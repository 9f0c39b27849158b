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


# --- hflayers' examples on hk.nn -----------------------------------------------------------------------

HFLAYERS_EXAMPLES = ["hflayers_sets", "hflayers_mnist_bags"]


@pytest.mark.parametrize("name", HFLAYERS_EXAMPLES)
def test_hflayers_examples_differ_from_hflayers_code_only_in_the_import(name):
    """The one hen_kernels line is the import; every call of the modules uses hflayers' arguments alone."""
    import ast
    import inspect

    import hen_kernels as hk

    from .test_nn_hflayers import HFLAYERS_HOPFIELD

    tree = ast.parse(open(os.path.join(ROOT, "python", f"{name}.py")).read())
    ours = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            and "hen_kernels" in ((n.module or "") if isinstance(n, ast.ImportFrom) else n.names[0].name)]
    assert len(ours) == 1 and isinstance(ours[0], ast.ImportFrom) and ours[0].module == "hen_kernels.nn"
    imported = {a.name for a in ours[0].names}
    assert imported <= {"Hopfield", "HopfieldLayer", "HopfieldPooling"}
    hflayers_args = set(HFLAYERS_HOPFIELD) | {"lookup_weights_as_separated", "lookup_targets_as_trainable",
                                              "quantity", "trainable"}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) in imported]
    assert calls
    for call in calls:
        names = {k.arg for k in call.keywords if k.arg is not None}
        assert names <= hflayers_args, names - hflayers_args
        assert names <= set(inspect.signature(getattr(hk.nn, call.func.id)).parameters) | set(HFLAYERS_HOPFIELD)


LATCH_TINY = ["--task", "latch_sequence", "--samples", "256", "--epochs", "5", "--lr", "1e-2", "--batch-size", "16",
              "--quiet"]


@pytest.mark.usefixtures("one_thread")
def test_hflayers_latch_example_learns_with_all_six_networks():
    """hflayers' six networks (Hopfield, pooling, lookup; plain and adapted) solve the latch task, fused."""
    require("cpu")
    results = _load("hflayers_sets").main(LATCH_TINY)
    assert len(results) == 6
    for name, history in results.items():
        assert history[-1]["loss"] < 0.5 * history[0]["loss"], name
        assert history[-1]["eval_accuracy"] > 0.9, name


@pytest.mark.usefixtures("one_thread")
def test_hflayers_examples_train_alike_on_the_fused_kernels_and_the_reference(monkeypatch):
    require("cpu")
    mod = _load("hflayers_sets")
    args = ["--task", "bit_pattern", "--samples", "96", "--epochs", "2", "--quiet"]
    runs = {}
    for backend in ("cpu", "torch"):
        monkeypatch.setenv("HEN_KERNELS_BACKEND", backend)
        runs[backend] = mod.main(args)
    assert list(runs["cpu"]) == list(runs["torch"]) and len(runs["cpu"]) == 6
    for name, history in runs["cpu"].items():
        ref = runs["torch"][name]
        # Same data, same initialisation: the first epoch agrees to rounding (dropout draws alike on both).
        assert abs(history[0]["loss"] - ref[0]["loss"]) <= 1e-4 * ref[0]["loss"], name


@needs_fashion
@pytest.mark.usefixtures("one_thread")
def test_hflayers_mnist_bags_example_runs():
    out = _load("hflayers_mnist_bags").main(["--train-bags", "8", "--test-bags", "4", "--epochs", "2", "--quiet"])
    assert len(out["history"]) == 2
    assert all(0 < h["loss"] < 10 and 0 <= h["test_accuracy"] <= 1 for h in out["history"])


def test_hflayers_sets_runs_as_a_script():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "python", "hflayers_sets.py"), "--samples", "32",
                          "--epochs", "1", "--networks", "pooling"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert "latch_sequence pooling" in out.stdout
