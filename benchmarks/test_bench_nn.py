"""pytest-benchmark suite for the Hopfield layers (the cases `python -m hen_kernels.bench nn` tables).

    pytest benchmarks/test_bench_nn.py --benchmark-only            # the `bench nn` shapes for this device
    HEN_BENCH_QUICK=1 pytest benchmarks/test_bench_nn.py --benchmark-only   # tiny shapes

"fused" runs the automatic backend with the fused backward; "dense" plain PyTorch
holding the association matrix (bench/nn.py says how); "sdpa" runs PyTorch's scaled_dot_product_attention where the case
is attention (the update with the dot product), and nn.MultiheadAttention (SDPA inside)
for the attention case.  Nothing here asserts on time.
"""
import os

import pytest
import torch

from hen_kernels.bench import nn as bench_nn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = bench_nn.cases(os.environ.get("HEN_BENCH_QUICK", "") not in ("", "0"), DEVICE)


BACKENDS = {"fused": None, "dense": bench_nn.DENSE, "sdpa": bench_nn.SDPA}


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("which", list(BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_nn(benchmark, case, which, grad):
    if which == "sdpa" and not bench_nn.has_sdpa_peer(case):
        pytest.skip("SDPA expresses the update with the dot product and attention only")
    call = bench_nn.build(case, BACKENDS[which], DEVICE)

    def run():
        out = call(grad)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(device=str(DEVICE), backend=which)
    benchmark.pedantic(run, warmup_rounds=1, rounds=3)


# Heads split from a projection's rows ((batch, S, heads * d) viewed as (batch, heads, S, d)): the op's
# forward and backward on the views against the same after .contiguous(), the copy a one-stride backend
# makes (and autograd's copy of the gradients back).  HopfieldPooling's per-bag banks.
SPLIT = (8, 256, 2, 32) if os.environ.get("HEN_BENCH_QUICK", "") not in ("", "0") else (64, 2048, 2, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["view", "copy"])
def test_split_bank_training_step(benchmark, layout, dtype):
    import hen_kernels as hk

    batch, s, heads, d = SPLIT
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(batch, s, heads * d, generator=g).to(DEVICE, dtype).requires_grad_()
    q = torch.randn(batch, heads, 1, d, generator=g).to(DEVICE, dtype).requires_grad_()

    def run():
        bank = rows.view(batch, s, heads, d).transpose(1, 2)
        out = hk.hopfield_update(q, bank if layout == "view" else bank.contiguous(), d ** -0.5)
        out.float().square().sum().backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(device=str(DEVICE), layout=layout)
    benchmark.pedantic(run, warmup_rounds=1, rounds=5)
