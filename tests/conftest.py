"""Shared tolerances and helpers: docs/design.md §5 error measure against a float64 reference."""
import math
import os

import pytest
import torch
from torch.utils._device import _device_constructors  # the factories `with torch.device(...)` places

from hen_kernels import backends, constants, reference
from hen_kernels.constants import TOLERANCE  # noqa: F401  (re-exported: docs/design.md §5 error budgets)

# On a GPU, Triton's autotuning would compile every kept config (up to 24) of each new launch key before its
# first result: the suite checks answers, so each key runs the first kept config (HEN_TRITON_AUTOTUNE=all to
# time them all; tests/test_triton.py's test_every_kept_config runs each one).  Under the interpreter the
# config lists are one or two long and all of them run.
if torch.cuda.is_available():
    os.environ.setdefault(constants.AUTOTUNE_ENV, "first")

DTYPES = list(constants.KERNEL_DTYPES)  # what every backend takes; float64 is the reference's
SIMILARITIES = list(constants.SIMILARITIES)


def kernel_backends():
    """Every backend except the reference itself, available or not (unavailable ones skip with the reason)."""
    return [name for name in backends.BACKENDS if name != "torch"]


def require(name: str, *sizes: int) -> None:
    """Skip unless backend ``name`` is usable; ``sizes`` (e.g. B, N, D) bound the work for the Triton interpreter."""
    reason = backends.BACKENDS[name].unavailable_reason
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    if sizes and interpreted(name) and math.prod(sizes) > INTERPRETER_WORK:
        pytest.skip(f"{name!r} runs under TRITON_INTERPRET=1 here: sizes {sizes} are for a GPU")


# Under the interpreter a Triton kernel runs in numpy, ~1 s per 1e5 of B·N·D:
# the suite keeps interpreted cases below this and leaves large ones to the GPU.
INTERPRETER_WORK = 200_000


def interpreted(name: str) -> bool:
    return name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    diff = (got.double() - ref).norm().item()
    return diff if denom == 0 else diff / denom


def device_of(backend: str) -> str:
    """Where a backend's inputs live: CUDA for the GPU backends (Triton only when not interpreted)."""
    return "cuda" if backend == "cuda" or (backend == "triton" and not interpreted(backend)) else "cpu"


# The device `make` puts tensors on; tests/test_kernels.py sets it per test from its backend.
MAKE_DEVICE = {"device": "cpu"}


def make(shape, dtype, seed, scale=1.0):
    """Standard-normal data, drawn on the CPU (the same numbers on every device), then moved."""
    g = torch.Generator().manual_seed(seed)
    draw = torch.randn(shape, generator=g, dtype=torch.float64, device="cpu")  # (whatever the default device)
    return (draw * scale).to(dtype).to(MAKE_DEVICE["device"])


def ref64(query, memory, beta, similarity, values=None, offset=0):
    """The reference on float64 copies of the (already rounded) inputs."""
    b = beta.double() if isinstance(beta, torch.Tensor) else beta
    return reference.partial(
        query.double(), memory.double(), b, similarity, None if values is None else values.double(), offset
    )


# Logit spreads of O(c) for standard-normal data: sim·beta must stay well
# conditioned for a float32 error of 1e-5 to be a fair demand of any code.
BETA_LEVELS = [1e-3, 1.0, 4.0]


def beta_for(similarity: str, d: int, level: float) -> float:
    return level if similarity == "l2" else level / d**0.5


@pytest.fixture(autouse=True)
def _inputs_on_the_backends_device(request):
    """A test run for a GPU backend (cuda, compiled Triton) makes its tensors on the GPU: `make` puts its draws
    there, and, where a GPU is visible, so does every factory call without a device (torch's default device)
    -- a backend refuses tensors on a device it does not serve."""
    params = getattr(request.node, "callspec", None)
    backend = params.params.get("backend") if params else None
    on_gpu = module_on_gpu(request.module) if backend is None else device_of(backend) == "cuda"
    MAKE_DEVICE["device"] = "cuda" if on_gpu else "cpu"
    try:
        if on_gpu and torch.cuda.is_available():
            with MadeOn("cuda"):
                yield
        else:
            yield
    finally:
        MAKE_DEVICE["device"] = "cpu"


class MadeOn(torch.overrides.TorchFunctionMode):
    """torch's default device (as `with torch.device(...)`), except that a draw from a CPU generator is made on
    the CPU and then moved: the same numbers as on a CPU machine, where the device would refuse the generator."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is None and func in _device_constructors():
            g = kwargs.get("generator")
            if g is None or g.device.type == self.device.type:
                kwargs["device"] = self.device
            else:
                grad = kwargs.pop("requires_grad", False)
                return func(*args, **kwargs).to(self.device).requires_grad_(grad)
        return func(*args, **kwargs)


def module_on_gpu(module) -> bool:
    """Whether a module's tests without a backend parameter run a GPU backend (tests/test_triton.py says so)."""
    return device_of(getattr(module, "GPU_BACKEND", "torch")) == "cuda"


@pytest.fixture(autouse=True)
def _seeded_global_generator():
    """A test that draws from torch's global generator draws the same numbers whatever ran before it:
    a failure found in one order of the suite is found again alone (one such, an ill-conditioned sum
    of unseeded gradients, failed on a CI machine and passed here)."""
    torch.manual_seed(0)


# ---- the interpreted Triton cases: a sample by default ------------------------------------------------
#
# Under TRITON_INTERPRET=1 a Triton case costs seconds (numpy per program), and the full cross products
# of shapes, dtypes, similarities and paths took ~60 % of the suite on these CPUs.  The default run keeps,
# for each test function, interpreted Triton cases that hold every value of every parameter at least
# once, and every combination of the parameters the test names in ``@pytest.mark.interpreter_cross``
# (the ones that choose a kernel path); the other cases are marked slow: ``-m slow`` runs them, and a GPU,
# where nothing is interpreted, runs every case by default.


def _is_interpreted_triton(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    module = getattr(getattr(item, "module", None), "__name__", "")
    return interpreted("triton") and (params.get("backend") == "triton" or module.endswith("test_triton"))


def covering_sample(cases: list) -> set:
    """Indices of a subset of ``cases`` (dicts: parameter name -> hashable value) that holds every
    (name, value) the whole list holds: greedy, the case with most values not yet held first, ties to
    the earlier case."""
    held = [set(c.items()) for c in cases]
    todo = set().union(*held) if held else set()
    kept = set()
    while todo:
        best = max(range(len(cases)), key=lambda i: (len(held[i] & todo), -i))
        kept.add(best)
        todo -= held[best]
    return kept


def _case(item) -> dict:
    params = {k: repr(v) for k, v in getattr(getattr(item, "callspec", None), "params", {}).items() if k != "backend"}
    cross = item.get_closest_marker("interpreter_cross")
    if cross is not None:
        params["+".join(cross.args)] = tuple(params.pop(name) for name in cross.args)
    return params


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marks added here
def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        if _is_interpreted_triton(item) and item.get_closest_marker("slow") is None:
            groups.setdefault((item.module.__name__, getattr(item, "originalname", item.name)), []).append(item)
    for group in groups.values():
        # (an unparametrized test holds no values: its one case is kept, not marked slow)
        kept = covering_sample([_case(item) for item in group]) or {0}
        for i, item in enumerate(group):
            if i not in kept:
                item.add_marker(pytest.mark.slow)
