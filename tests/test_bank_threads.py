"""A MemoryBank shared by threads and by forked processes (a server's request threads, DataLoader workers):
adds take turns, close waits for the reads in flight, a fork's child reads but never writes a disk bank."""
import copy
import faulthandler
import multiprocessing
import pickle
import threading

import pytest
import torch

from hen_kernels.bank import MemoryBank

from .conftest import make


def _bank(tmp_path, storage, dim=64, **kw):
    path = tmp_path / "b.hkb" if storage == "disk" else None
    return MemoryBank(dim, storage=storage, path=path, **kw)


@pytest.mark.parametrize("storage", ["host", "disk"])
def test_adds_from_threads_take_turns(tmp_path, storage):
    """Three threads adding to one bank: each add's ids are its own and hold its rows, and a disk bank's file
    loads again (without the lock, ids were returned twice, rows sat at other ids and the file's checksum broke)."""
    rows = make((3000, 64), torch.float32, 70)
    bank = _bank(tmp_path, storage)
    got = {}

    def adder(t):
        for j in range(10):
            k = t * 10 + j
            got[k] = bank.add(rows[k * 100:(k + 1) * 100])

    threads = [threading.Thread(target=adder, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = torch.cat(list(got.values()))
    assert len(bank) == 3000 and torch.equal(ids.sort().values, torch.arange(3000))
    stored, _ = bank.read()
    for k, at in got.items():
        assert torch.equal(stored[at], rows[k * 100:(k + 1) * 100]), k
    if storage == "disk":
        bank.close()
        assert torch.equal(MemoryBank.load(tmp_path / "b.hkb").read()[0], stored)


def test_close_waits_for_reads_in_flight_and_refuses_later_ones(tmp_path):
    """Queries on two threads while the bank is closed: each answers, or raises the closed bank's ValueError
    (it had also raised a closed executor's RuntimeError and EBADF, and mapped a file that took the fd's number)."""
    bank = _bank(tmp_path, "disk", chunk_rows=4096, beta=0.1)
    bank.add(make((16384, 64), torch.float32, 71))  # 4 MiB: windows of 1 MiB, each prefetched
    q = make((4, 64), torch.float32, 72)
    want = bank.update(q)
    outcomes = []

    def queries():
        for _ in range(200):
            try:
                outcomes.append("ok" if torch.equal(bank.update(q), want) else "wrong")
            except ValueError as e:
                outcomes.append("closed" if "is closed" in str(e) else repr(e))
            except Exception as e:  # noqa: BLE001 (what the test is about)
                outcomes.append(repr(e))

    threads = [threading.Thread(target=queries) for _ in range(2)]
    for t in threads:
        t.start()
    while not outcomes:
        pass
    bank.close()
    for t in threads:
        t.join()
    assert set(outcomes) <= {"ok", "closed"}, {o for o in outcomes if o not in ("ok", "closed")}
    assert "closed" in outcomes
    assert not [t for t in threading.enumerate() if t.name.startswith("hen-bank-prefetch")]


# A forked child runs torch on one thread, as DataLoader workers do: libgomp's pool does not survive a
# fork, and a parallel region in the child of a parent that had one waits for it forever (any torch op).
def _child_query(bank, q, out):
    torch.set_num_threads(1)
    out.put(bank.update(q).tolist())  # (a tensor would travel as shared memory the child takes away)


def _child_add(bank, out):
    torch.set_num_threads(1)
    try:
        bank.add(torch.ones(5, 16))
        out.put("added")
    except ValueError as e:
        out.put(str(e))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_a_forked_child_reads_a_disk_bank_and_never_writes_it(tmp_path):
    """The parent's query started the prefetch thread, which the child does not have: the child's query had
    waited for it forever (DataLoader workers too).  The child shares the open file and the writer's lock:
    its add had taken the parent's next ids and been overwritten."""
    ctx = multiprocessing.get_context("fork")
    bank = _bank(tmp_path, "disk", chunk_rows=4096, beta=0.1)
    bank.add(make((12288, 64), torch.float32, 73))
    q = make((4, 64), torch.float32, 74)
    want = bank.update(q)  # starts the prefetch thread
    out = ctx.Queue()
    child = ctx.Process(target=_child_query, args=(bank, q, out))
    child.start()
    got = out.get(timeout=60)
    child.join(60)
    assert got == want.tolist() and child.exitcode == 0

    (tmp_path / "w").mkdir()
    writer = _bank(tmp_path / "w", "disk", dim=16)
    writer.add(torch.zeros(10, 16))
    child = ctx.Process(target=_child_add, args=(writer, out))
    child.start()
    said = out.get(timeout=60)
    child.join(60)
    assert said.startswith("bank: the disk bank") and "a fork of it" in said
    assert torch.equal(writer.add(torch.full((5, 16), 2.0)), torch.arange(10, 15))
    writer.close()
    stored, _ = MemoryBank.load(tmp_path / "w" / "b.hkb").read()
    assert len(stored) == 15 and bool((stored[10:] == 2.0).all())


def test_a_bank_in_memory_pickles_and_a_disk_bank_says_how_to_reach_it(tmp_path):
    rows = make((10, 64), torch.float32, 75)
    bank = _bank(tmp_path, "host")
    bank.add(rows)
    for twin in (pickle.loads(pickle.dumps(bank)), copy.deepcopy(bank)):
        assert torch.equal(twin.read()[0], rows) and torch.equal(twin.add(rows), torch.arange(10, 20))
    disk = _bank(tmp_path, "disk")
    with pytest.raises(TypeError, match="^MemoryBank: a disk bank cannot be pickled or copied; it holds its file"):
        pickle.dumps(disk)


def test_close_from_inside_its_own_read_raises_instead_of_waiting_for_itself(tmp_path):
    """(a signal handler that closes the bank amid an add on the same thread had waited forever)"""
    bank = _bank(tmp_path, "disk")
    bank.add(make((10, 64), torch.float32, 76))
    faulthandler.dump_traceback_later(60, exit=True)  # a regression waits forever: end the run, saying where
    try:
        with bank._store._using():
            with pytest.raises(RuntimeError, match="would wait for itself"):
                bank.close()
    finally:
        faulthandler.cancel_dump_traceback_later()
    bank.close()


def _child_flush_and_add(bank, out):
    torch.set_num_threads(1)
    try:
        bank.flush()  # nothing changed since the parent's flush: no error
        bank.add(torch.ones(2, 64))
        out.put("added")
    except ValueError as e:
        out.put(str(e))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
@pytest.mark.parametrize("storage", ["host", "disk"])
def test_a_fork_amid_another_threads_add_leaves_the_child_free_to_act(tmp_path, storage):
    """A fork while another thread held the add lock: the child's add had waited forever for it.  And a
    child's flush of a header its parent had rewritten raised as if something had changed."""
    ctx = multiprocessing.get_context("fork")
    bank = _bank(tmp_path, storage)
    bank.metadata = {"note": "x"}
    bank.flush()
    out = ctx.Queue()
    with bank._adding:  # as another thread's add holds it
        child = ctx.Process(target=_child_flush_and_add, args=(bank, out))
        child.start()
    said = out.get(timeout=60)
    child.join(60)
    assert said == "added" if storage == "host" else "a fork of it" in said
