"""MemoryBank (issue 5): streamed results equal one call over the whole bank, whatever the chunking.

Files: tests/test_bank_files.py (format, tampering) and tests/test_bank_crash.py (kills, writers).
"""
import os
from pathlib import Path

import pytest
import torch

import hen_kernels as hk
from hen_kernels import backends, ops, reference, streaming
from hen_kernels.bank import CHUNK_BYTES, MemoryBank
from hen_kernels.bank import storage

from .conftest import DTYPES, SIMILARITIES, TOLERANCE, beta_for, make, ref64, rel_err, require

CUDA = torch.cuda.is_available()
STORAGES = ["device", "host", "disk"]


def new_bank(tmp_path, storage, dim, **kw):
    if storage == "disk":
        kw["path"] = tmp_path / f"bank-{len(list(tmp_path.iterdir()))}.hkb"
    return MemoryBank(dim, storage=storage, **kw)


# --- one update over a streamed bank equals one call over the whole bank ---------------

@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("chunk_rows", [None, 1, 13, 64])
def test_update_equals_one_call_over_the_whole_bank(tmp_path, storage, dtype, similarity, chunk_rows):
    n, d, dv, b = 150, 17, 5, 3  # chunk_rows 13 and 64 do not divide N = 150
    x, v, q = make((n, d), dtype, 1), make((n, dv), dtype, 2), make((b, d), dtype, 3)
    beta = beta_for(similarity, d, 4.0)
    bank = new_bank(tmp_path, storage, d, value_dim=dv, dtype=dtype, chunk_rows=chunk_rows)
    bank.add(x[:70], v[:70])  # two adds: the bank grows
    bank.add(x[70:], v[70:])
    got = bank.update(q, beta, similarity=similarity)
    ref = ref64(q, x, beta, similarity, v)
    assert got.dtype == dtype and got.shape == (b, dv)
    assert rel_err(got, ref.out) <= TOLERANCE[dtype]
    p = bank.partial(q, beta, similarity=similarity)
    whole = hk.hopfield_partial(q, x, beta, similarity=similarity, values=v)
    assert rel_err(p.lse, ref.lse) <= TOLERANCE[dtype]
    assert torch.equal(p.top_index, whole.top_index)


@pytest.mark.parametrize("backend", list(backends.BACKENDS))
@pytest.mark.parametrize("storage", ["host", "disk"])
def test_every_backend_serves_the_bank(tmp_path, backend, storage):
    """Built on the public partial/merge API only: any backend for the bank's device serves it."""
    require(backend)
    device = "cpu" if "cpu" in backends.BACKENDS[backend].device_types else "cuda"
    n, d, dv = 90, 17, 6
    x, v, q = make((n, d), torch.float32, 40), make((n, dv), torch.float32, 41), make((3, d), torch.float32, 42)
    bank = new_bank(tmp_path, storage, d, value_dim=dv, device=device, chunk_rows=32, backend=backend)
    bank.add(x, v)
    for similarity in SIMILARITIES:
        beta = beta_for(similarity, d, 4.0)
        got = bank.update(q.to(device), beta, similarity=similarity).cpu()
        tol = TOLERANCE[torch.float32] if device == "cpu" else 1e-3  # docs/design.md §5: tf32 on a GPU
        assert rel_err(got, ref64(q, x, beta, similarity, v).out) <= tol


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_values_are_the_patterns_by_default(tmp_path, storage, similarity):
    n, d = 200, 33
    x, q = make((n, d), torch.float32, 4), make((2, 5, d), torch.float32, 5)  # leading dims
    beta = torch.tensor([beta_for(similarity, d, 1.0), beta_for(similarity, d, 4.0)])  # one beta per lead
    bank = new_bank(tmp_path, storage, d, chunk_rows=37)
    bank.add(x)
    assert bank.value_dim == d and not bank.has_values
    got = bank.update(q, beta, similarity=similarity)
    ref = ref64(q, x, beta, similarity)
    assert got.shape == q.shape
    assert rel_err(got, ref.out) <= TOLERANCE[torch.float32]


def test_results_do_not_depend_on_chunk_rows(tmp_path):
    n, d = 301, 24
    x, q = make((n, d), torch.float32, 6), make((4, d), torch.float32, 7)
    outs = []
    for rows in (1, 2, 7, 100, 300, 301, 1000, None):
        bank = MemoryBank(d, storage="host", chunk_rows=rows)
        bank.add(x)
        outs.append((bank.update(q, 0.3), bank.partial(q, 0.3).top_index))
    ref = ref64(q, x, 0.3, "dot")
    for out, idx in outs:  # even 301 one-row chunks merged one by one stay within docs/design.md §5
        assert rel_err(out, ref.out) <= TOLERANCE[torch.float32]
        assert torch.equal(idx, ref.top_index)


@pytest.mark.parametrize("storage", STORAGES)
def test_one_row_chunks_merge_as_accurately_as_one_call(tmp_path, storage):
    """Issue 13 item 2: 2,500 one-row chunks were 2e-4 off (a float32 rounding per merge); the running
    merge is float64, rounded once, so the error does not grow with the number of chunks."""
    n, d, beta = 2500, 48, 0.7
    x, q = make((n, d), torch.float32, 50), make((8, d), torch.float32, 51)
    ref = ref64(q, x, beta, "dot")
    whole = hk.hopfield_partial(q, x, beta)
    bank = new_bank(tmp_path, storage, d, chunk_rows=1)
    bank.add(x)
    got = bank.partial(q, beta)
    assert got.out.dtype == torch.float32 and got.lse.dtype == torch.float32
    assert rel_err(got.out, ref.out) <= TOLERANCE[torch.float32]
    assert rel_err(got.out, ref.out) <= 2 * rel_err(whole.out, ref.out) + 1e-6  # no worse than one call
    assert rel_err(got.lse, ref.lse) <= TOLERANCE[torch.float32]
    assert torch.equal(got.top_index, whole.top_index)
    assert rel_err(bank.update(q, beta), ref.out) <= TOLERANCE[torch.float32]


def test_streams_in_chunks_and_merges_incrementally(tmp_path, monkeypatch):
    """Each kernel call sees at most chunk_rows rows at its global offset; merges take two Partials."""
    n, d, rows = 100, 8, 30
    bank = new_bank(tmp_path, "disk", d, chunk_rows=rows)
    bank.add(make((n, d), torch.float32, 8))
    calls, merges = [], []
    real_partial, real_merge = ops.hopfield_partial, ops.merge_partials

    def spy_partial(query, memory, beta, **kw):
        calls.append((memory.shape[0], kw["offset"]))
        return real_partial(query, memory, beta, **kw)

    def spy_merge(partials):
        merges.append(len(partials))
        return real_merge(partials)

    monkeypatch.setattr(ops, "hopfield_partial", spy_partial)
    monkeypatch.setattr(ops, "merge_partials", spy_merge)
    bank.update(make((2, d), torch.float32, 9), 1.0)
    assert calls == [(30, 0), (30, 30), (30, 60), (10, 90)]
    assert merges == [2, 2, 2]


def test_default_chunk_rows_comes_from_a_memory_budget(tmp_path):
    disk = new_bank(tmp_path, "disk", 512, dtype=torch.bfloat16)
    assert disk.chunk_rows == CHUNK_BYTES["cpu"] // (512 * 2)
    for storage in ("device", "host"):  # (host rows on a CPU device are the kernel's operand as they lie)
        resident = MemoryBank(4, storage=storage)
        resident.add(torch.zeros(10, 4))
        assert resident.chunk_rows == 10  # one kernel call, the kernel streams it


def test_top_index_counts_from_the_first_add_and_ids_are_returned(tmp_path):
    d = 6
    bank = new_bank(tmp_path, "disk", d, chunk_rows=4)
    x = make((11, d), torch.float32, 10)
    assert torch.equal(bank.add(x[:5]), torch.arange(5))
    assert torch.equal(bank.add(x[5:]), torch.arange(5, 11))
    assert bank.add(x[:0]).numel() == 0 and len(bank) == 11
    r = bank.retrieve(x, 10.0, similarity="l2")  # each stored pattern is its own nearest row
    assert torch.equal(r.top_index, torch.arange(11))


# --- per-query feature weights (issue 14) -----------------------------------------------

def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(shape, generator=g, dtype=torch.float64).to(torch.float32)
    w[..., : shape[-1] // 3] = 0.0  # a hidden part: those features do not count
    return w


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_weights_reach_every_chunk(tmp_path, storage, similarity, monkeypatch):
    n, d, dv = 150, 17, 5
    x, v, q = make((n, d), torch.float32, 60), make((n, dv), torch.float32, 61), make((2, 3, d), torch.float32, 62)
    w = _weights(q.shape, 63)
    beta = beta_for(similarity, d, 4.0)
    bank = new_bank(tmp_path, storage, d, value_dim=dv, chunk_rows=13)
    bank.add(x, v)
    seen = []
    real = ops.hopfield_partial

    def spy(query, memory, beta, **kw):
        seen.append(kw.get("weights"))
        return real(query, memory, beta, **kw)

    monkeypatch.setattr(ops, "hopfield_partial", spy)
    ref = reference.partial(q.double(), x.double(), beta, similarity, v.double(), weights=w.double())
    got = bank.partial(q, beta, similarity=similarity, weights=w)
    assert len(seen) == bank.num_chunks() and all(s is w for s in seen)
    assert rel_err(got.out, ref.out) <= TOLERANCE[torch.float32]
    assert rel_err(got.lse, ref.lse) <= TOLERANCE[torch.float32]
    assert torch.equal(got.top_index, hk.hopfield_partial(q, x, beta, similarity=similarity, values=v,
                                                          weights=w).top_index)
    assert rel_err(bank.update(q, beta, similarity=similarity, weights=w), ref.out) <= TOLERANCE[torch.float32]
    unweighted = bank.update(q, beta, similarity=similarity)
    assert rel_err(unweighted, ref.out) > 1e-3  # the weights changed the answer


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_weighted_retrieve_equals_hopfield_retrieve(tmp_path, similarity):
    n, d, b = 120, 16, 6
    x = make((n, d), torch.float32, 64)
    q = x[:b] + 0.6 * make((b, d), torch.float32, 65)
    w = _weights(q.shape, 66)
    beta = beta_for(similarity, d, 2.0)
    bank = new_bank(tmp_path, "disk", d, chunk_rows=50)
    bank.add(x)
    got = bank.retrieve(q, beta, similarity=similarity, max_steps=20, tol=1e-4, weights=w)
    ref = hk.hopfield_retrieve(q, x, beta, similarity=similarity, max_steps=20, tol=1e-4, weights=w)
    assert torch.equal(got.steps, ref.steps) and torch.equal(got.top_index, ref.top_index)
    assert rel_err(got.state, ref.state) <= 1e-5


def test_weights_are_checked_by_name():
    bank = MemoryBank(4)
    bank.add(make((5, 4), torch.float32, 67))
    q = make((2, 4), torch.float32, 68)
    w = torch.ones(2, 4)
    empty = MemoryBank(4).partial(q, 1.0, weights=w)  # the merge identity takes weights too
    assert torch.isneginf(empty.lse).all()
    cases = [
        (torch.ones(2, 3), ValueError, "weights: expected shape"),
        (torch.ones(2, 4, dtype=torch.float16), TypeError, "weights: expected dtype float32"),
        (-w, ValueError, "weights: expected every entry finite and >= 0"),
        (w.clone().requires_grad_(), ValueError, "weights: no gradient"),
        ([[1.0] * 4] * 2, TypeError, "weights"),
    ]
    for bad, err, match in cases:
        for call in (bank.update, bank.partial, bank.retrieve):
            with pytest.raises(err, match=match):
                call(q, 1.0, weights=bad)


# --- multi-step retrieval -----------------------------------------------------------

@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_retrieve_equals_hopfield_retrieve(tmp_path, storage, similarity):
    n, d, b = 120, 16, 6
    x = make((n, d), torch.float32, 11)
    q = x[:b] + 0.6 * make((b, d), torch.float32, 12)
    beta = beta_for(similarity, d, 2.0)
    bank = new_bank(tmp_path, storage, d, chunk_rows=50)
    bank.add(x)
    got = bank.retrieve(q, beta, similarity=similarity, max_steps=30, tol=1e-3)
    ref = hk.hopfield_retrieve(q, x, beta, similarity=similarity, max_steps=30, tol=1e-3)
    assert torch.equal(got.steps, ref.steps) and torch.equal(got.converged, ref.converged)
    assert torch.equal(got.top_index, ref.top_index)
    assert rel_err(got.state, ref.state) <= 1e-5
    assert torch.allclose(got.top_weight, ref.top_weight, rtol=1e-4, atol=1e-6)
    # l2 at a fixed point is -sqrt(a cancelled difference): ill-conditioned, whatever the chunking
    assert torch.allclose(got.lse, ref.lse, rtol=1e-5, atol=1e-3 if similarity == "l2" else 1e-5)


def test_retrieve_stops_each_query_at_its_tolerance_and_keeps_its_state():
    d = 8
    x = torch.eye(d) * 4
    bank = MemoryBank(d, chunk_rows=3, beta=2.0)
    bank.add(x)
    q = torch.stack([x[0], x[1] * 0.5 + x[2] * 0.45, torch.full((d,), 0.1)])
    r = bank.retrieve(q, max_steps=50, tol=1e-5)
    assert r.steps[0] == 1 and bool(r.converged.all())  # a stored pattern is a fixed point at once
    assert r.steps[1] > 1 and r.steps[2] > 1
    assert r.top_index[0] == 0
    one_more = bank.update(r.state)
    assert (one_more - r.state).abs().amax(-1).max() <= 1e-5
    capped = bank.retrieve(q, max_steps=2, tol=1e-12)
    assert capped.steps.max() == 2
    assert not bool(capped.converged[1])


def test_retrieve_reuses_the_shared_loop(monkeypatch):
    """One loop (streaming.retrieve), fed a step that streams the whole bank."""
    seen = []
    real = streaming.retrieve

    def spy(step, *args, **kw):
        seen.append(step)
        return real(step, *args, **kw)

    monkeypatch.setattr(streaming, "retrieve", spy)
    bank = MemoryBank(4, chunk_rows=2)
    bank.add(make((5, 4), torch.float32, 13))
    bank.retrieve(make((1, 4), torch.float32, 14), 1.0, max_steps=3)
    assert len(seen) == 1


def test_nan_query_leaves_the_others_intact():
    d = 8
    x = make((40, d), torch.float32, 15)
    q = make((3, d), torch.float32, 16)
    q[1, 2] = float("nan")
    bank = MemoryBank(d, storage="host", chunk_rows=7)
    bank.add(x)
    got = bank.update(q, 0.5)
    ref = hk.hopfield_update(q, x, 0.5)
    assert rel_err(got[[0, 2]], ref[[0, 2]]) <= 1e-5


def test_progress_bar_shows_when_asked(capfd):
    bank = MemoryBank(4, chunk_rows=2)
    bank.add(make((9, 4), torch.float32, 17))
    bank.retrieve(make((1, 4), torch.float32, 18), 1.0, max_steps=3, progress=True)
    assert "bank retrieve" in capfd.readouterr().err
    bank.retrieve(make((1, 4), torch.float32, 18), 1.0, max_steps=3, progress=False)
    assert "bank retrieve" not in capfd.readouterr().err


# --- argument checks ----------------------------------------------------------------

def test_constructor_checks_name_the_argument(tmp_path):
    cases = [
        (dict(dim=0), ValueError, "dim"),
        (dict(dim=2.0), TypeError, "dim"),
        (dict(dim=4, value_dim=0), ValueError, "value_dim"),
        (dict(dim=4, dtype=torch.float64), TypeError, "dtype"),
        (dict(dim=4, storage="ram"), ValueError, "storage"),
        (dict(dim=4, storage="disk"), ValueError, "path"),
        (dict(dim=4, path=str(tmp_path / "x")), ValueError, "path"),
        (dict(dim=4, chunk_rows=0), ValueError, "chunk_rows"),
        (dict(dim=4, similarity="cos"), ValueError, "similarity"),
        (dict(dim=4, beta=-1.0), ValueError, "beta"),
        (dict(dim=4, device="tpu"), ValueError, "device"),
        (dict(dim=4, metadata={"dim": "3"}), ValueError, "metadata"),
    ]
    if not CUDA:
        cases.append((dict(dim=4, device="cuda"), ValueError, "device"))
    for kw, err, name in cases:
        with pytest.raises(err, match=name):
            MemoryBank(**kw)
    (tmp_path / "exists.hkb").write_bytes(b"")
    with pytest.raises(ValueError, match="already exists"):
        MemoryBank(4, storage="disk", path=tmp_path / "exists.hkb")


def test_add_and_query_checks_name_the_argument():
    bank = MemoryBank(4, value_dim=2, dtype=torch.float16)
    x16, v16 = torch.zeros(3, 4, dtype=torch.float16), torch.zeros(3, 2, dtype=torch.float16)
    with pytest.raises(TypeError, match="patterns: expected dtype torch.float16"):
        bank.add(torch.zeros(3, 4), v16)
    with pytest.raises(ValueError, match=r"patterns: expected shape \(M, 4\)"):
        bank.add(torch.zeros(3, 5, dtype=torch.float16), v16)
    with pytest.raises(ValueError, match="values: this bank stores values"):
        bank.add(x16)
    with pytest.raises(ValueError, match="values: expected 3 rows"):
        bank.add(x16, v16[:2])
    bad = x16.clone()
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match="patterns: expected finite entries, row 1"):
        bank.add(bad, v16)
    with pytest.raises(TypeError, match="patterns: expected a torch.Tensor"):
        bank.add([[0.0] * 4], v16)
    assert len(bank) == 0  # nothing half-added
    with pytest.raises(ValueError, match="bank: the bank is empty"):
        bank.update(torch.zeros(1, 4, dtype=torch.float16), 1.0)
    empty = bank.partial(torch.zeros(1, 4, dtype=torch.float16), 1.0)
    assert torch.isneginf(empty.lse).all() and (empty.top_index == -1).all()
    bank.add(x16, v16)
    q = torch.zeros(2, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="query: expected dtype torch.float16"):
        bank.update(q.float(), 1.0)
    with pytest.raises(ValueError, match=r"query: expected shape \(..., B, 4\)"):
        bank.update(torch.zeros(2, 3, dtype=torch.float16), 1.0)
    with pytest.raises(ValueError, match="beta: .*no default beta"):
        bank.update(q)
    with pytest.raises(ValueError, match="beta"):
        bank.update(q, 0.0)
    with pytest.raises(ValueError, match="similarity"):
        bank.update(q, 1.0, similarity="cos")
    with pytest.raises(ValueError, match="values: multi-step retrieval"):
        bank.retrieve(q, 1.0, max_steps=2)
    with pytest.raises(ValueError, match="max_steps"):
        bank.retrieve(q, 1.0, max_steps=0)
    with pytest.raises(ValueError, match="tol"):
        bank.retrieve(q, 1.0, tol=-1.0)
    with pytest.raises(TypeError, match="progress"):
        bank.update(q, 1.0, progress="yes")
    no_values = MemoryBank(4)
    with pytest.raises(ValueError, match="values: this bank stores no values"):
        no_values.add(torch.zeros(1, 4), torch.zeros(1, 4))


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("value_dim", [None, 2])
def test_read_returns_rows_the_bank_does_not_share(tmp_path, storage, value_dim):
    x = make((4, 3), torch.float32, 35)
    bank = new_bank(tmp_path, storage, 3, value_dim=value_dim)
    bank.add(x, None if value_dim is None else make((4, 2), torch.float32, 36))
    p, v = bank.read()
    p[0] = float("nan")  # the caller's copy: past add()'s finite check, if it were the bank's
    if v is not None:
        v[0] = -100.0
    assert torch.equal(bank.read()[0], x) and (v is None or not bank.read()[1].eq(-100.0).any())
    bank.close()


# --- disk storage -------------------------------------------------------------------

def test_disk_bank_lives_in_its_file(tmp_path, monkeypatch):
    d, dv = 5, 2
    x, v = make((30, d), torch.float32, 25), make((30, dv), torch.float32, 26)
    path = tmp_path / "live.hkb"
    with MemoryBank(d, value_dim=dv, storage="disk", path=path, chunk_rows=4) as bank:
        bank.add(x[:10], v[:10])
        assert bank.path == str(path.resolve()) or Path(bank.path) == path.resolve()
    reopened = MemoryBank.load(path, storage="disk", chunk_rows=7)  # verified, then appended to
    reopened.add(x[10:], v[10:])
    reopened.save(path)  # its own file: flush
    assert MemoryBank.load(path, verify=True).read()[1].equal(v)  # a reader beside the writer
    reopened.close()  # one writer at a time (tests/test_bank_crash.py)
    unverified = MemoryBank.load(path, storage="disk", verify=False)
    unverified.add(x[:1], v[:1])  # the checksum is rebuilt before the append
    unverified.close()
    assert len(MemoryBank.load(path)) == 31
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # a file we may not write (root may)
    ro = MemoryBank.load(path, storage="disk")
    assert len(ro) == 31 and ro.update(x[:1], 1.0).shape == (1, dv)
    with pytest.raises(ValueError, match="read-only"):
        ro.add(x[:1], v[:1])
    ro.close()


def test_disk_chunks_are_windows_not_the_whole_file(tmp_path, monkeypatch):
    bank = new_bank(tmp_path, "disk", 16, chunk_rows=10)
    bank.add(make((95, 16), torch.float32, 27))
    sizes = []
    real = storage.DiskStore.window

    def spy(self, a, b):
        sizes.append(b - a)
        return real(self, a, b)

    monkeypatch.setattr(storage.DiskStore, "window", spy)
    bank.update(make((1, 16), torch.float32, 28), 1.0)
    assert max(sizes) == 10 and sum(sizes) == 95


# --- CUDA streaming (run where a GPU is present) --------------------------------------

@pytest.mark.skipif(not CUDA, reason="no CUDA device: the host/disk streaming to a GPU is not exercised here")
@pytest.mark.parametrize("storage", ["host", "disk"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_streaming_equals_the_resident_bank(tmp_path, storage, dtype):
    n, d, dv = 1000, 64, 32
    x, v = make((n, d), dtype, 29), make((n, dv), dtype, 30)
    q = make((4, d), dtype, 31).cuda()
    bank = new_bank(tmp_path, storage, d, value_dim=dv, dtype=dtype, device="cuda", chunk_rows=77)
    bank.add(x, v)
    got = bank.update(q, 0.2)
    ref = ref64(q.cpu(), x, 0.2, "dot", v)
    assert got.device.type == "cuda"
    assert rel_err(got.cpu(), ref.out) <= max(TOLERANCE[dtype], 1e-3)
    if storage == "host":
        assert bank._store.p.is_pinned()
