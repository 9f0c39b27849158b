"""ShardedMemoryBank over gloo with 2 and 3 CPU processes: every rank gets one bank's answer."""
import datetime
import json
import os
import shutil
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hen_kernels as hk
from hen_kernels import reference
from hen_kernels.bank import ShardedMemoryBank, shard_path, sharded
from hen_kernels.bank.file_format import HEADER_ROOM, header_bytes

from .conftest import SIMILARITIES, TOLERANCE, beta_for, make, ref64, rel_err


def _same_on_every_rank(t: torch.Tensor) -> None:
    t = t.contiguous()
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t)
    for other in every:
        assert torch.equal(other.view(torch.uint8) if other.is_floating_point() else other,
                           t.view(torch.uint8) if t.is_floating_point() else t), "ranks disagree"


def _checks(rank: int, world: int, tmp: str) -> None:
    n, d, dv = 103, 12, 5
    x, v, q = make((n, d), torch.float32, 1), make((n, dv), torch.float32, 2), make((4, d), torch.float32, 3)
    f32 = TOLERANCE[torch.float32]

    for storage in ("device", "host", "disk"):
        path = os.path.join(tmp, f"{storage}-{{rank}}.hkb") if storage == "disk" else None
        bank = ShardedMemoryBank(d, value_dim=dv, storage=storage, path=path, chunk_rows=7)
        ids = bank.add(x[:50], v[:50])  # replicated rows, a slice each
        assert torch.equal(ids, torch.arange(50))
        lo = 50 + rank * (n - 50) // world
        hi = 50 + (rank + 1) * (n - 50) // world
        mine = bank.add_local(x[lo:hi], v[lo:hi])  # each rank's own rows, rank by rank
        assert torch.equal(mine, torch.arange(lo, hi)) and len(bank) == n
        for similarity in SIMILARITIES:
            beta = beta_for(similarity, d, 4.0)
            out = bank.update(q, beta, similarity=similarity)
            assert rel_err(out, ref64(q, x, beta, similarity, v).out) <= f32
            p = bank.partial(q, beta, similarity=similarity)
            whole = hk.hopfield_partial(q, x, beta, similarity=similarity, values=v)
            assert torch.equal(p.top_index, whole.top_index)
            _same_on_every_rank(out)
            _same_on_every_rank(p.top_index)
            # per-query feature weights reach every shard's every chunk (issue 14)
            w = torch.rand(q.shape, generator=torch.Generator().manual_seed(5))
            w[:, : d // 3] = 0.0
            ref_w = reference.partial(q.double(), x.double(), beta, similarity, v.double(), weights=w.double())
            pw = bank.partial(q, beta, similarity=similarity, weights=w)
            assert rel_err(pw.out, ref_w.out) <= f32 and rel_err(pw.lse, ref_w.lse) <= f32
            assert rel_err(bank.update(q, beta, similarity=similarity, weights=w), ref_w.out) <= f32
            _same_on_every_rank(pw.out)
        # save and load: each rank its shard, the same answers bit for bit
        bank.save(os.path.join(tmp, f"saved-{storage}-{{rank}}.hkb"))
        back = ShardedMemoryBank.load(os.path.join(tmp, f"saved-{storage}-{{rank}}.hkb"), storage=storage,
                                      chunk_rows=7)
        assert len(back) == n
        assert torch.equal(back.update(q, 0.3), bank.update(q, 0.3))
        assert torch.equal(back.partial(q, 0.3).top_index, bank.partial(q, 0.3).top_index)
        bank.close()

    # multi-step retrieval: every step sees every shard; per-query steps match one bank's
    bank = ShardedMemoryBank(d, storage="host", chunk_rows=5, beta=beta_for("dot", d, 2.0))
    bank.add(x)
    q2 = x[:6] + 0.6 * make((6, d), torch.float32, 4)
    r = bank.retrieve(q2, max_steps=30, tol=1e-3)
    ref = hk.hopfield_retrieve(q2, x, beta_for("dot", d, 2.0), max_steps=30, tol=1e-3)
    assert torch.equal(r.steps, ref.steps) and torch.equal(r.converged, ref.converged)
    assert torch.equal(r.top_index, ref.top_index)
    assert rel_err(r.state, ref.state) <= f32
    for field in r:
        _same_on_every_rank(field)

    # 2,500 one-row chunks over the ranks merge in float64 and round once (issue 13 item 2)
    xb, qb = make((2500, 48), torch.float32, 50), make((8, 48), torch.float32, 51)
    many = ShardedMemoryBank(48, storage="host", chunk_rows=1)
    many.add(xb)
    ref_b, whole = ref64(qb, xb, 0.7, "dot"), hk.hopfield_partial(qb, xb, 0.7)
    pb = many.partial(qb, 0.7)
    assert pb.out.dtype == torch.float32
    assert rel_err(pb.out, ref_b.out) <= min(f32, 2 * rel_err(whole.out, ref_b.out) + 1e-6)
    assert rel_err(pb.lse, ref_b.lse) <= f32 and torch.equal(pb.top_index, whole.top_index)
    r_w = many.retrieve(qb, 0.7, weights=torch.ones_like(qb), max_steps=2)
    assert rel_err(r_w.state, hk.hopfield_retrieve(qb, xb, 0.7, max_steps=2).state) <= f32

    # fewer rows than ranks: some shards are empty, the merge identity
    tiny = ShardedMemoryBank(d)
    tiny.add(x[:2])
    assert rel_err(tiny.update(q, 0.5), ref64(q, x[:2], 0.5, "dot").out) <= f32
    assert torch.equal(tiny.partial(q, 0.5).top_index, hk.hopfield_partial(q, x[:2], 0.5).top_index)

    # wrap banks each rank already has (say, loaded from its own file): ids run rank by rank
    # shards of rank + 1 parts each (rank 0's the smallest): a rank's first row taken from rank 0's size, on
    # every rank, had passed with the near-equal shards of an even split
    lo, hi = rank * (rank + 1) * n // (world * (world + 1)), (rank + 1) * (rank + 2) * n // (world * (world + 1))
    local = hk.MemoryBank(d)
    local.add(x[lo:hi])
    wrapped = ShardedMemoryBank.from_local(local)
    assert len(wrapped) == n
    assert rel_err(wrapped.update(q, 0.5), ref64(q, x, 0.5, "dot").out) <= f32
    assert torch.equal(wrapped.partial(q, 0.5).top_index, hk.hopfield_partial(q, x, 0.5).top_index)

    # a collective add with different rows per rank is refused on every rank
    with pytest.raises(ValueError, match="every rank must pass the same rows"):
        tiny.add(x[: rank + 1])
    with pytest.raises(ValueError, match="bank: the bank is empty on every rank"):
        ShardedMemoryBank(d).update(q, 1.0)

    _many_adds_save_and_load(rank, world, tmp)


def _many_adds_save_and_load(rank: int, world: int, tmp: str) -> None:
    """~300 adds outgrew the header page when shard records held the runs (now beside the shard)."""
    x = make((world * 400, 4), torch.float32, 6)
    bank = ShardedMemoryBank(4, storage="host", beta=1.0)
    for i in range(400):  # a row per rank and add: a run each
        bank.add(x[world * i: world * (i + 1)])
    path = os.path.join(tmp, "many-{rank}.hkb")
    bank.save(path)
    back = ShardedMemoryBank.load(path, storage="host")
    q = x[::97] + 0.1
    assert torch.equal(back.partial(q).top_index, hk.hopfield_partial(q, x, 1.0).top_index)
    assert back._runs == bank._runs and len(bank._runs) == 400
    os.remove(shard_path(path, rank) + ".runs")
    with pytest.raises(FileNotFoundError, match="global row ids"):
        ShardedMemoryBank.load(path, storage="host")
    # a shard saved before the runs moved out of the record still loads
    small = ShardedMemoryBank(4, storage="host")
    for i in range(3):
        small.add(x[world * i: world * (i + 1)])
    old = {"rank": rank, "world_size": world, "count": len(small), "runs": small._runs}
    small.local.metadata["hen_kernels.shard"] = json.dumps(old, separators=(",", ":"))
    small.local.save(shard_path(path, rank))
    assert ShardedMemoryBank.load(path, storage="host")._runs == small._runs == [(i, world * i + rank, 1)
                                                                                 for i in range(3)]

    # runs that continue one another are one run (here only rank 0 adds)
    disk = ShardedMemoryBank(4, storage="disk", path=os.path.join(tmp, "live-{rank}.hkb"))
    for i in range(3):
        disk.add_local(x[i: i + 1] if rank == 0 else x[:0])
    assert len(disk._runs) == (1 if rank == 0 else 0)
    # a save whose record does not fit leaves the shard as it was: it still adds, and closes
    page = header_bytes(4, None, torch.float32, 10 ** 6, "dot", None, "0" * 64, {"notes": ""})
    disk.local.metadata["notes"] = "x" * (HEADER_ROOM - len(page.rstrip(b" ")) + 8)  # room for no record
    with pytest.raises(ValueError, match="metadata: the header needs"):
        disk.save(os.path.join(tmp, "full-{rank}.hkb"))
    assert "hen_kernels.shard" not in disk.local.metadata
    assert not os.path.exists(shard_path(os.path.join(tmp, "full-{rank}.hkb"), rank) + ".runs")
    disk.add(x[:2])
    disk.close()

    # one shard changed after the save: every rank raises, that one its own error and the others naming it
    # (they once waited in a collective for the rank that had raised, then failed with gloo's error)
    stale = os.path.join(tmp, "stale-{rank}.hkb")
    bank = ShardedMemoryBank(4, storage="host")
    bank.add(x[:2 * world])
    bank.save(stale)
    if rank == world - 1:
        shard = hk.MemoryBank.load(shard_path(stale, rank))
        shard.add(x[:1])
        shard.save(shard_path(stale, rank))
    dist.barrier()
    match = "rows were added after" if rank == world - 1 else f"the shard of rank {world - 1} .* did not load"
    with pytest.raises(ValueError, match=match):
        ShardedMemoryBank.load(stale, storage="host")


def _worker(rank: int, world: int, init_file: str, tmp: str, errors, checks=_checks, timeout: int = 60) -> None:
    # A bounded timeout: a rank that fails must not leave the others waiting for half an hour.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    torch.set_num_threads(1)
    try:
        checks(rank, world, tmp)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, world: int, checks=_checks, timeout: int = 60) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), errors, checks, timeout),
                 nprocs=world, join=True)
    except Exception as e:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        pytest.fail("\n".join(msgs) or str(e))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_bank_equals_one_bank(tmp_path, world):
    _spawn(tmp_path, world)


def _copy_shard(src: str, dst: str, rank: int) -> None:
    for suffix in ("", ".runs"):
        shutil.copy(shard_path(src, rank) + suffix, shard_path(dst, rank) + suffix)


def _mixed_saves(rank: int, world: int, tmp: str) -> None:
    x = make((10, 4), torch.float32, 7)
    a = ShardedMemoryBank(4, storage="host")
    a.add(x)  # rank 0: ids 0-4, rank 1: ids 5-9
    b = ShardedMemoryBank(4, storage="host")
    b.add_local(x[:8] if rank == 0 else x[8:])  # rank 0: ids 0-7, rank 1: ids 8-9
    c = ShardedMemoryBank(4, storage="host")
    c.add(x + 1.0)  # a's layout, other rows
    saves = {name: os.path.join(tmp, f"{name}-{{rank}}.hkb") for name in "abc"}
    for name, bank in zip("abc", (a, b, c)):
        bank.save(saves[name])
    # each rank's shard from another save: every rank refuses the mix with the same error
    for mix, match in ((("a", "b"), r"no shard holds ids 5-7 \(rank 0's file .*ab-0.hkb' ends at id 4, rank 1's"),
                       (("b", "a"), r"ids 5-7 are held twice \(by rank 0's file .*ba-0.hkb' and rank 1's"),
                       (("a", "c"), r"come from different saves: rank 0's file .*ac-0.hkb' from one, rank 1's")):
        path = os.path.join(tmp, "".join(mix) + "-{rank}.hkb")
        _copy_shard(saves[mix[rank]], path, rank)
        dist.barrier()
        with pytest.raises(ValueError, match=match):
            ShardedMemoryBank.load(path, storage="disk")
    # the refused loads closed their shards: each loads again, here or from one save's files copied
    back = ShardedMemoryBank.load(saves["a"], storage="disk")
    assert len(back) == 10 and back._runs == a._runs
    back.close()
    copied = os.path.join(tmp, "ab-{rank}.hkb")
    _copy_shard(saves["a"], copied, rank)
    assert torch.equal(ShardedMemoryBank.load(copied, storage="host").update(x[:3], 1.0), a.update(x[:3], 1.0))


def test_load_refuses_shards_of_different_saves(tmp_path):
    _spawn(tmp_path, 2, _mixed_saves, timeout=20)


def _failed_saves(rank: int, world: int, tmp: str) -> None:
    x, q = make((6, 4), torch.float32, 8), make((2, 4), torch.float32, 9)
    bank = ShardedMemoryBank(4, storage="host", beta=1.0)
    bank.add(x)
    before = bank.update(q)
    # rank 1's header cannot hold its metadata and the shard's record: checked before any rank writes,
    # so every rank raises and no file is written anywhere (the others once hung in save's barrier)
    page = header_bytes(4, None, torch.float32, 10 ** 6, "dot", 1.0, "0" * 64, {"notes": ""})
    if rank == 1:
        bank.local.metadata["notes"] = "x" * (HEADER_ROOM - len(page.rstrip(b" ")) + 8)
    folder = os.path.join(tmp, "full")
    os.makedirs(folder, exist_ok=True)
    match = "metadata: the header needs" if rank == 1 else "the shard of rank 1 .* cannot be saved .*no rank wrote"
    with pytest.raises(ValueError, match=match):
        bank.save(os.path.join(folder, "s-{rank}.hkb"))
    dist.barrier()
    assert os.listdir(folder) == []
    assert "hen_kernels.shard" not in bank.local.metadata
    # the bank is still usable on every rank: it answers, adds, and saves once the metadata fits
    assert torch.equal(bank.update(q), before)
    bank.add(x[:2])
    bank.local.metadata.pop("notes", None)
    path = os.path.join(tmp, "ok-{rank}.hkb")
    bank.save(path)
    assert torch.equal(ShardedMemoryBank.load(path, storage="host").update(q), bank.update(q))

    # a write that fails on rank 1 alone (say, a full disk): every rank raises; rank 0's new shard and
    # rank 1's old one are from different saves, and load refuses them (here the sizes differ)
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    bank.add(x[2:4])
    if rank == 1:
        bank.local.save = full_disk
    match = "No space left" if rank == 1 else "the shard of rank 1 .* was not saved .*No space left"
    with pytest.raises(OSError if rank == 1 else ValueError, match=match):
        bank.save(path)
    assert "hen_kernels.shard" in bank.local.metadata  # the previous save's record, as it was
    with pytest.raises(ValueError, match=r"disagree on the bank's size: \[10, 8\]"):
        ShardedMemoryBank.load(path, storage="host")
    if rank == 1:
        del bank.local.save
    bank.save(path)
    back = ShardedMemoryBank.load(path, storage="host")
    assert len(back) == len(bank) == 10 and torch.equal(back.update(q), bank.update(q))


def test_failed_save_raises_on_every_rank(tmp_path):
    _spawn(tmp_path, 2, _failed_saves, timeout=20)


def _different_rows(rank: int, world: int, tmp: str) -> None:
    x, v = make((9, 6), torch.float32, 10), make((9, 3), torch.float32, 11)
    bank = ShardedMemoryBank(6, value_dim=3, storage="host")
    one_bit = x.clone()
    one_bit[4, 2] = torch.nextafter(one_bit[4, 2], torch.tensor(10.0))
    swapped = x[[1, 0] + list(range(2, 9))]
    features = x[:, [2, 3, 0, 1, 4, 5]]  # whole 8-byte words swapped within each row: features in another order
    for name, p, vv in (("patterns", x + rank, v), ("patterns", one_bit if rank else x, v),
                        ("patterns", swapped if rank else x, v), ("patterns", features if rank else x, v),
                        ("values", x, v * (1 + rank))):
        with pytest.raises(ValueError, match=rf"{name}: add is collective .* the rows of rank\(s\) \[1\] differ"):
            bank.add(p, vv)
        assert len(bank) == 0 and len(bank.local) == 0
    # the same rows, whatever their strides, are taken
    ids = bank.add(x.t().contiguous().t() if rank else x, v)
    assert torch.equal(ids, torch.arange(9)) and len(bank) == 9
    half = ShardedMemoryBank(5, dtype=torch.float16, storage="host")
    xh = make((7, 6), torch.float16, 12)
    half.add(xh[:, 1:] if rank else xh[:, 1:].contiguous())
    q = make((2, 6), torch.float32, 13)
    assert rel_err(bank.update(q, 0.5), ref64(q, x, 0.5, "dot", v).out) <= TOLERANCE[torch.float32]


def test_add_refuses_different_rows_per_rank(tmp_path):
    _spawn(tmp_path, 2, _different_rows, timeout=20)


def _one_shard_refuses(rank: int, world: int, tmp: str) -> None:
    bank = ShardedMemoryBank(8, storage="host", value_dim=2)
    x, v = torch.randn(20, 8, generator=torch.Generator().manual_seed(rank)), torch.randn(20, 2)
    if rank == 1:  # finite rows whose values, on this rank alone, sum past the float32 range
        x.zero_()
        v.fill_(1e38)
    bank.add_local(x, v)
    q = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
    want = "^values: " if rank == 1 else r"^bank: the shard of rank 1 refused this query"
    for call in (lambda: bank.update(q, 1.0), lambda: bank.partial(q, 1.0)):
        with pytest.raises(ValueError, match=want):
            call()
    bank.add(torch.ones(2, 8), torch.ones(2, 2))  # every rank goes on: the next collective meets them all


def _one_rank_passes_bad_rows(rank: int, world: int, tmp: str) -> None:
    bank = ShardedMemoryBank(4, storage="host")
    good = torch.ones(3, 4)
    bad = good.clone()
    bad[1, 2] = float("nan")
    rows = bad if rank == 1 else good
    want = "^patterns: expected finite" if rank == 1 else r"^patterns: the rows of rank 1 were refused there"
    for call in (bank.add, bank.add_local):
        with pytest.raises(ValueError, match=want):
            call(rows)
    assert len(bank) == 0
    assert torch.equal(bank.add(good), torch.arange(3))  # every rank goes on to the next collective


def test_rows_refused_on_one_rank_make_every_rank_raise(tmp_path):
    """One rank's bad rows had raised there before the add's collective, leaving the others waiting in it."""
    _spawn(tmp_path, 2, _one_rank_passes_bad_rows, timeout=20)


def _read_only_shard(rank: int, world: int, tmp: str) -> None:
    path = os.path.join(tmp, "b-{rank}.hkb")
    bank = ShardedMemoryBank(8, storage="host")
    bank.add(torch.ones(20, 8))
    bank.save(path)
    bank.close()
    dist.barrier()
    back = ShardedMemoryBank.load(path, storage="disk")
    if rank == 1:  # (as open_disk marks a file it cannot write; a chmod does not stop root)
        back.local._store._read_only_reason = "the file is not writable"
    mine = shard_path(path, rank)
    with open(mine, "rb") as f:
        before = f.read()
    want = "^bank: save to its own file: .* is read-only" if rank == 1 else "^path: the shard of rank 1 .* no rank wrote"
    with pytest.raises(ValueError, match=want):
        back.save(path)
    back.close()
    with open(mine, "rb") as f:
        assert f.read() == before  # refused before any rank wrote
    assert len(ShardedMemoryBank.load(path, storage="host")) == 20


def test_a_read_only_shard_refuses_the_save_before_any_rank_writes(tmp_path):
    _spawn(tmp_path, 2, _read_only_shard, timeout=20)


def test_a_shard_that_refuses_a_query_makes_every_rank_raise(tmp_path):
    """The refusing rank had raised alone, leaving the others in the gather until the group's timeout."""
    _spawn(tmp_path, 2, _one_shard_refuses, timeout=20)


def _different_arguments(rank: int, world: int, tmp: str) -> None:
    x = make((12, 6), torch.float32, 14)
    # from_local of banks made apart, each with its own defaults: a merge of shards scored differently
    bank = ShardedMemoryBank.from_local(hk.MemoryBank(6, storage="host", beta=1.0 + rank,
                                                      similarity="dot" if rank == 0 else "l2"))
    bank.add(x)
    q = make((3, 6), torch.float32, 15)
    cases = (
        ("similarity", lambda: bank.update(q, 0.5)),  # each rank's own default similarity
        ("beta", lambda: bank.update(q, similarity="dot")),  # ... and its own default beta
        ("beta", lambda: bank.partial(q, 0.5 * (1 + rank), similarity="dot")),
        ("query", lambda: bank.update(q + rank, 0.5, similarity="dot")),  # a rank's own batch
        ("query", lambda: bank.update(q[: 2 + rank], 0.5, similarity="dot")),  # (gloo had aborted the process)
        ("weights", lambda: bank.update(q, 0.5, similarity="dot", weights=torch.full((3, 6), 1.0 + rank))),
        ("max_steps and tol", lambda: bank.retrieve(q, 0.5, similarity="dot", max_steps=2 + rank)),
    )
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"^{name}: the call is collective .* rank\(s\) \[1\] passed another"):
            call()
    # a rank that refuses its arguments stops every rank, in the one gather they all join
    want = "^beta: expected a finite float > 0" if rank == 1 else "^query: rank 1 refused its arguments"
    with pytest.raises(ValueError, match=want):
        bank.update(q, -1.0 if rank == 1 else 0.5, similarity="dot")
    # the same arguments, whatever their strides, are taken
    out = bank.update(q.t().contiguous().t() if rank else q, 0.5, similarity="dot")
    assert rel_err(out, ref64(q, x, 0.5, "dot").out) <= TOLERANCE[torch.float32]


def test_calls_refuse_arguments_that_differ_between_ranks(tmp_path):
    """Arguments, or a rank's own defaults, that differ between ranks: every rank raises, naming the argument."""
    _spawn(tmp_path, 2, _different_arguments, timeout=30)


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedMemoryBank(4)


def test_shard_path():
    assert shard_path("/data/bank-{rank}.hkb", 2) == "/data/bank-2.hkb"
    assert shard_path("/data/bank.hkb", 0) == "/data/bank.hkb.rank0"


@pytest.mark.parametrize("runs, problem", [
    ([[(0, 5)], [(5, 3)]], "no shard holds ids 8-9"),  # the end of the bank
    ([[(0, 4)], [(5, 5)]], "no shard holds id 4"),  # a gap between two shards
    ([[(0, 6)], [(5, 5)]], "id 5 are held twice"),
    ([[(0, 5)], [(5, 6)]], "beyond the bank's 10 rows"),
])
def test_shards_that_do_not_tile_the_bank_are_refused(runs, problem):
    """The check behind a sharded load, on its own: a row no shard holds is a lost row, whatever the checksums
    say (a shard file is checked alone; the end of the bank is the one thing only all of them can tell)."""
    shards = [(f"f{r}", 10, "save", spans) for r, spans in enumerate(runs)]
    with pytest.raises(ValueError, match=problem):
        sharded._check_shards("p", shards)
