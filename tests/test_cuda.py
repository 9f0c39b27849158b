"""The CUDA C++ backend on a device: forced plans against the reference, and
launches on the caller's current stream.  The shared parametrized cases of
tests/test_kernels.py run it too; without a GPU everything here skips."""
import pytest
import torch

import hen_kernels as hk
from hen_kernels.constants import SIMILARITY_CODES

from .conftest import DTYPES, SIMILARITIES, TOLERANCE, beta_for, make, ref64, rel_err, require

# hen::cuda::PlanHints, as the keyword arguments of the test op hen_kernels::partial_with_plan_hints.
PLANS = [{}, {"kernel": "simt"}, {"kernel": "simt", "splits": 7}, {"kernel": "simt", "query_block": 1},
         {"kernel": "mma"}, {"kernel": "mma", "splits": 3}]


def planned_partial(q, x, v, beta, similarity, offset, hints):
    """hk.hopfield_partial(..., backend="cuda") with the planner's choices forced."""
    out, lse, top_score, top_index = torch.ops.hen_kernels.partial_with_plan_hints(
        q[None], x[None], v[None], torch.tensor([beta], device=q.device), SIMILARITY_CODES[similarity], offset,
        **hints)
    return hk.Partial(out[0], lse[0], top_score[0], top_index[0])


@pytest.mark.parametrize("plan", PLANS, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "auto")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shape", [(1, 5000, 64), (70, 1000, 100), (3, 777, 4096)], ids=lambda s: "B%d-N%d-D%d" % s)
def test_every_plan_matches_reference(plan, dtype, similarity, shape):
    require("cuda")
    b, n, d = shape
    if plan.get("kernel") == "mma" and (dtype == torch.float32 or d > 256):
        pytest.skip("the tensor-core kernel takes 16-bit inputs with D <= 256")
    q, x = make((b, d), dtype, 1).cuda(), make((n, d), dtype, 2).cuda()
    v = make((n, 33), dtype, 3).cuda()
    beta = beta_for(similarity, d, 1.0)
    p = planned_partial(q, x, v, beta, similarity, 5, plan)
    ref = ref64(q, x, beta, similarity, v, offset=5)
    tol = TOLERANCE[dtype]
    assert rel_err(p.out, ref.out) <= tol and rel_err(p.lse, ref.lse) <= tol
    close = (p.top_score.double() - ref.top_score).abs() <= tol * ref.top_score.abs().clamp_min(1)
    assert torch.all((p.top_index == ref.top_index) | close)


def test_launches_on_the_current_stream():
    """A CUDA graph records only work issued on the capturing stream: a launch on
    the legacy default stream fails the capture, one on any other stream is
    missing from the graph, so replay would not recompute the op."""
    require("cuda")
    q = make((4, 128), torch.float16, 4).cuda()
    x = make((200_000, 128), torch.float16, 5).cuda()
    eager = hk.hopfield_partial(q, x, 0.1, backend="cuda")  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = hk.hopfield_partial(q, x, 0.1, backend="cuda")
    q.copy_(make((4, 128), torch.float16, 6).cuda())
    graph.replay()
    torch.cuda.synchronize()
    want = hk.hopfield_partial(q, x, 0.1, backend="cuda")
    torch.testing.assert_close(captured.out, want.out, rtol=0, atol=0)
    assert not torch.equal(captured.out, eager.out)


def test_recall_is_the_automatic_choice_for_few_queries():
    require("cuda")
    from hen_kernels import backends

    q, x = make((2, 64), torch.float16, 7).cuda(), make((1000, 64), torch.float16, 8).cuda()
    inp = hk.validation.check_inputs(q, x, 1.0, "dot")
    assert backends.resolve(None, inp).name == "cuda"
