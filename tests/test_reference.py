"""The reference against float64 and against the formulas of docs/design.md §1-§2 written out by hand;
the merge of hen_kernels.streaming against one Partial over the whole bank."""
import math

import pytest
import torch

from hen_kernels import reference, streaming
from hen_kernels.constants import TOLERANCE, output_tolerance

from .conftest import BETA_LEVELS, SIMILARITIES, beta_for, make, rel_err


def direct_update(query, memory, beta, similarity, values):
    """The update for one query, a loop over stored patterns in float64: no expansion of ‖x - s‖²."""
    out = []
    for s in query:
        sims = []
        for x in memory:
            if similarity == "dot":
                sims.append(float(x @ s))
            elif similarity == "l2":
                sims.append(-float((x - s).norm()))
            else:
                sims.append(-0.5 * float(((x - s) ** 2).sum()))
        t = torch.tensor(sims, dtype=torch.float64) * beta
        w = torch.softmax(t, 0)
        out.append(w @ values)
    return torch.stack(out)


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 5), (4, 33, 64)])
def test_reference_matches_direct_formula(similarity, shape):
    b, n, d = shape
    q, x, v = make((b, d), torch.float64, 1), make((n, d), torch.float64, 2), make((n, 7), torch.float64, 3)
    got = reference.update(q, x, 0.4, similarity, v)
    want = direct_update(q, x, 0.4, similarity, v)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("level", BETA_LEVELS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 3), (17, 129, 64), (2, 64, 1024)])
def test_reference_float32_close_to_float64(similarity, level, shape):
    b, n, d = shape
    beta = beta_for(similarity, d, level)
    q, x = make((b, d), torch.float32, 4), make((n, d), torch.float32, 5)
    p32 = reference.partial(q, x, beta, similarity)
    p64 = reference.partial(q.double(), x.double(), beta, similarity)
    assert p32.out.dtype == torch.float32 and p64.out.dtype == torch.float64
    assert rel_err(p32.out, p64.out) <= 1e-5
    assert rel_err(p32.lse, p64.lse) <= 1e-5
    assert torch.equal(p32.top_index, p64.top_index)


@pytest.mark.parametrize("similarity", ["l2", "l2sq"])
def test_the_float32_floor_is_what_rounding_the_exact_logits_costs(similarity):
    """constants.output_tolerance: at large logits (5 x 300 x 4096, beta level 4: |t| ~ 350) rounding the
    exact logits once to float32 moves the output by a sixteenth of the floor or more (2.4e-6 and 5.2e-6
    here, where 1e-5 alone leaves room for two such roundings), and the floor holds that and the float32
    reference."""
    b, n, d = 5, 300, 4096
    q, x = make((b, d), torch.float32, 1).double(), make((n, d), torch.float32, 2).double()
    beta = beta_for(similarity, d, 4.0)
    exact = reference.partial(q, x, beta, similarity)
    once = torch.softmax(reference.scores(q, x, beta, similarity).float().double(), -1) @ x
    floor = output_tolerance(torch.float32, exact.lse)
    rounded_once = rel_err(once, exact.out)
    assert floor / 16 <= rounded_once <= floor
    assert rel_err(reference.partial(q.float(), x.float(), beta, similarity).out, exact.out) <= floor
    assert output_tolerance(torch.float32, exact.lse / 100) == TOLERANCE[torch.float32]
    assert output_tolerance(torch.bfloat16, exact.lse) == TOLERANCE[torch.bfloat16]


def test_partial_fields_and_offset():
    q, x = make((3, 4), torch.float64, 6), make((10, 4), torch.float64, 7)
    p = reference.partial(q, x, 0.7, "dot", offset=100)
    t = 0.7 * q @ x.T
    torch.testing.assert_close(p.lse, torch.logsumexp(t, -1))
    torch.testing.assert_close(p.top_score, t.max(-1).values)
    assert torch.equal(p.top_index, t.argmax(-1) + 100)
    torch.testing.assert_close(p.top_weight, torch.softmax(t, -1).max(-1).values)


def test_empty_chunk_is_the_identity_of_merge():
    q, x = make((3, 4), torch.float64, 8), make((10, 4), torch.float64, 9)
    p = reference.partial(q, x, 0.7, "l2")
    empty = reference.partial(q, x[:0], 0.7, "l2", offset=10)
    assert torch.all(torch.isneginf(empty.lse)) and torch.all(empty.top_index == -1)
    for merged in (streaming.merge_partials([p, empty]), streaming.merge_partials([empty, p])):
        torch.testing.assert_close(merged.out, p.out)
        torch.testing.assert_close(merged.lse, p.lse)
        assert torch.equal(merged.top_index, p.top_index)
    both_empty = streaming.merge_partials([empty, empty])
    assert torch.all(both_empty.out == 0) and torch.all(torch.isneginf(both_empty.lse))


def test_merge_ties_go_to_the_smaller_row():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    a = reference.partial(q, x[1:], 1.0, "dot", offset=1)
    b = reference.partial(q, x[:1], 1.0, "dot", offset=0)
    assert streaming.merge_partials([a, b]).top_index.item() == 0
    assert reference.partial(q, x, 1.0, "dot").top_index.item() == 0


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_identical_rows_tie_to_the_first_wherever_they_sit(similarity, dtype, weighted):
    """Copies of a row at every offset in a tile: the first wins (docs/design.md §5.1).  A float64 matmul
    rounds a row's product by where it sits, so copies scored a rounding apart and a later one won."""
    g = torch.Generator().manual_seed(64037)
    base = torch.randn(12, 64, generator=g, dtype=torch.float64)
    x = base[torch.randint(0, 12, (257,), generator=g)]
    q = torch.cat([x[torch.randint(0, 257, (6,), generator=g)], base[:4] + 0.05 * torch.randn(4, 64, generator=g)])
    w = torch.rand(q.shape, generator=g) + 0.5 if weighted else None
    p = reference.partial(q.to(dtype), x.to(dtype), beta_for(similarity, 64, 1.0), similarity, weights=w)
    first = [int((x == x[i]).all(1).nonzero()[0]) for i in p.top_index.tolist()]
    assert p.top_index.tolist() == first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_a_nan_query_has_no_best_row(similarity, dtype):
    """As the kernels answer it: NaN never wins, so no row (-1) and score -inf; argmax alone said row 0."""
    q, x = make((3, 8), dtype, 12), make((20, 8), dtype, 13)
    q[1, 2] = float("nan")
    p = reference.partial(q, x, 0.5, similarity)
    assert p.top_index[1] == -1 and torch.isneginf(p.top_score[1])
    assert torch.equal(p.top_index[[0, 2]], reference.partial(q[[0, 2]], x, 0.5, similarity).top_index)


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_energy_formula(similarity):
    q, x = make((5, 6), torch.float64, 10), make((9, 6), torch.float64, 11)
    beta = 0.8
    lse = torch.logsumexp(beta * reference.similarity(q, x, similarity), -1)
    e = reference.energy(q, x, beta, similarity)
    want = -lse / beta
    if similarity == "dot":
        want = want + 0.5 * (q * q).sum(-1) + math.log(9) / beta + 0.5 * (x * x).sum(-1).max()
    torch.testing.assert_close(e, want)


@pytest.mark.parametrize("beta", [1e-9, 1e-20, 1e-300])
def test_dot_energy_takes_its_small_beta_limit(beta):
    """As beta -> 0 the "dot" energy tends to ½‖s‖² - meanₙ x·s + ½ maxₙ‖xₙ‖²: the reference keeps the
    difference -lse/beta + log(N)/beta would round away even in float64 (1e-20: a unit of E lost)."""
    q, x = make((5, 6), torch.float64, 10), make((9, 6), torch.float64, 11)
    sims = q @ x.T
    limit = 0.5 * (q * q).sum(-1) - sims.mean(-1) + 0.5 * (x * x).sum(-1).max()
    # ... less beta/2 · varₙ(sim), the next term of -(1/beta) log meanₙ exp(beta (sim - mean sim))
    want = limit - beta / 2 * sims.var(-1, unbiased=False)
    torch.testing.assert_close(reference.energy(q, x, beta, "dot"), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("beta", [1e-9, 0.3, 40.0])
def test_energy_in_blocks_of_rows_equals_one_block(monkeypatch, similarity, beta):
    """The running max and Σ expm1 merge over blocks of rows exactly: 7-row blocks (the last one short, the max moving
    between them at large beta) against the whole bank at once."""
    q, x = make((2, 5, 6), torch.float64, 12), make((2, 30, 6), torch.float64, 13)
    whole = reference.energy(q, x, beta, similarity)
    monkeypatch.setattr(reference, "_ENERGY_ROWS", 7)
    torch.testing.assert_close(reference.energy(q, x, beta, similarity), whole, rtol=1e-12, atol=1e-12)


def test_per_leading_beta_and_bank():
    q, x = make((2, 3, 4, 5), torch.float64, 12), make((2, 3, 7, 5), torch.float64, 13)
    beta = torch.tensor([[0.1, 0.5, 2.0], [1.0, 3.0, 0.2]], dtype=torch.float64)
    got = reference.update(q, x, beta, "l2sq")
    for i in range(2):
        for j in range(3):
            want = reference.update(q[i, j], x[i, j], float(beta[i, j]), "l2sq")
            torch.testing.assert_close(got[i, j], want)
