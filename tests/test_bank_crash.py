"""Bank files under kills and concurrent writers (issue 13 item 5): a SIGKILL at any moment of an add, a
creation or a save loses at most what was in flight; one writer per file; readers always work.

The killed processes are forked from a forkserver that has imported torch and this module once, so
each kill costs milliseconds, not an interpreter start: the kills run in the default suite.
"""
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
import torch

from hen_kernels.bank import BankBusyError, BankFileError, MemoryBank, read_info
from hen_kernels.bank import file_io, storage
from hen_kernels.bank.file_format import DATA_OFFSET

D = 8
ROWS_PER_ADD = 7
ROWS_PER_WRITE = 3  # the child writes an add's rows in pieces, so a kill can fall between them


def rows_for(start: int, m: int, tag: int = 0) -> torch.Tensor:
    """Rows whose every value names them: row id in column 0, a tag in column 1."""
    ids = torch.arange(start, start + m, dtype=torch.float32)
    out = ids[:, None] + torch.arange(D, dtype=torch.float32) / 64
    out[:, 1] = tag
    return out


def _ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "hen_kernels.bank", __name__])
    return ctx


def _run(target, *args, kill_after=None, timeout=60.0):
    """Run ``target(*args)`` in a forked child; SIGKILL it after ``kill_after`` seconds; its exit code."""
    p = _ctx().Process(target=target, args=args)
    p.start()
    if kill_after is not None:
        p.join(kill_after)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
    p.join(timeout)
    assert not p.is_alive(), "the child hung"
    return p.exitcode


def _log(progress: str, line: str) -> None:
    with open(progress, "a") as f:
        f.write(line + "\n")


def _die_at_syscall(kill_at: int, half: bool) -> None:
    """Count the writes and syncs of this process; SIGKILL it at the ``kill_at``-th, before it runs (or,
    with ``half``, after writing half of a data write: what a kill inside a many-page write leaves)."""
    calls = [0]
    real_pwrite, real_sync, real_link = os.pwrite, os.fdatasync, os.link

    def point():
        calls[0] += 1
        return calls[0] == kill_at

    def pwrite(fd, buf, offset):
        if point():
            if half and offset >= DATA_OFFSET:
                real_pwrite(fd, bytes(buf)[: len(buf) // 2], offset)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_pwrite(fd, buf, offset)

    def fdatasync(fd):
        if point():
            os.kill(os.getpid(), signal.SIGKILL)
        return real_sync(fd)

    def link(a, b):
        if point():
            os.kill(os.getpid(), signal.SIGKILL)
        return real_link(a, b)

    os.pwrite, os.fdatasync, os.link = pwrite, fdatasync, link


def _adder(path: str, progress: str, adds: int, kill_at: int, half: bool, slow: float) -> None:
    torch.set_num_threads(1)
    storage.IO_BYTES = ROWS_PER_WRITE * D * 4
    if kill_at:
        _die_at_syscall(kill_at, half)
    if slow:
        real = os.pwrite
        os.pwrite = lambda fd, buf, off: (time.sleep(slow), real(fd, buf, off))[1]  # a slow disk
    bank = MemoryBank.load(path, storage="disk", read_only=False, progress=False) if os.path.exists(path) else \
        MemoryBank(D, storage="disk", path=path)
    for _ in range(adds):
        n = len(bank)
        bank.add(rows_for(n, ROWS_PER_ADD))
        _log(progress, str(len(bank)))
    bank.close()


def _committed(progress: str) -> int:
    if not os.path.exists(progress):
        return 0
    with open(progress) as f:
        lines = f.read().split()
    return int(lines[-1]) if lines else 0


def _check_prefix(path: str, at_least: int, at_most: int) -> int:
    """The file loads (checksums verified) with between at_least and at_most rows, all the right ones."""
    bank = MemoryBank.load(path, verify=True)
    n = len(bank)
    assert at_least <= n <= at_most, (at_least, n, at_most)
    assert torch.equal(bank.read()[0], rows_for(0, n))
    return n


def test_a_kill_at_every_write_of_an_add_loses_only_the_add_in_flight(tmp_path):
    """Before: 6 of 10 kills left a file that no longer loaded ("trailing bytes")."""
    path, progress = str(tmp_path / "bank.hkb"), str(tmp_path / "progress")
    _run(_adder, path, progress, 2, 0, False, 0.0)  # 14 committed rows to start from
    base, base_bytes = _committed(progress), open(path, "rb").read()
    writes_per_add = -(-ROWS_PER_ADD // ROWS_PER_WRITE) + 2  # data pieces, fdatasync, header page
    for kill_at in range(1, 3 * writes_per_add + 1):
        for half in (False, True):
            with open(path, "wb") as f:
                f.write(base_bytes)
            os.remove(progress)
            _log(progress, str(base))
            code = _run(_adder, path, progress, 3, kill_at, half, 0.0)
            assert code == -signal.SIGKILL
            done = _committed(progress)
            n = _check_prefix(path, done, done + ROWS_PER_ADD)
            # the next writer cuts off the dead add's rows and appends after the committed ones
            assert read_info(path).count == n
            with MemoryBank.load(path, storage="disk", read_only=False) as bank:
                assert read_info(path).tail_bytes == 0
                bank.add(rows_for(n, 1))
            _check_prefix(path, n + 1, n + 1)


def test_kills_at_random_moments_of_a_busy_writer(tmp_path):
    rng = random.Random(0)
    path, progress = str(tmp_path / "bank.hkb"), str(tmp_path / "progress")
    deadline = time.monotonic() + 20.0  # bounded: as many kills as fit, at least 10
    kills = seen = 0
    while kills < 10 or (kills < 40 and time.monotonic() < deadline):
        code = _run(_adder, path, progress, 10_000, 0, False, 0.0005, kill_after=rng.uniform(0.0, 0.15))
        assert code == -signal.SIGKILL, "the writer finished before the kill"
        kills += 1
        # A kill between an add's commit and its progress line leaves the log one add behind the file, and
        # the next writer starts from the file: the rows already seen there count as committed too.
        done = max(_committed(progress), seen)
        seen = _check_prefix(path, done, done + ROWS_PER_ADD) if os.path.exists(path) else seen
    assert _committed(progress) > 0  # the writers did commit between kills


def _creator(path: str, kill_at: int) -> None:
    _die_at_syscall(kill_at, False)
    MemoryBank(D, storage="disk", path=path).add(rows_for(0, 2))


def test_a_killed_creation_leaves_no_file_or_an_empty_bank(tmp_path):
    for kill_at in range(1, 6):
        path = str(tmp_path / f"new-{kill_at}.hkb")
        _run(_creator, path, kill_at)
        if os.path.exists(path):
            assert len(MemoryBank.load(path)) in (0, 2)
            os.remove(path)
        with MemoryBank(D, storage="disk", path=path) as bank:  # a retry works, and clears leftovers
            bank.add(rows_for(0, 1))
        assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def _slow_saver(path: str) -> None:
    real = file_io._write_all

    def slow_write(f, buf):  # a slow disk: the parent kills us in the middle
        real(f, buf)
        f.flush()
        time.sleep(0.05)

    file_io._write_all = slow_write
    file_io.IO_BYTES = 1 << 16
    bank = MemoryBank(64)
    bank.add(torch.ones(8192, 64))
    bank.save(path)


def test_killed_save_leaves_the_previous_bank_intact(tmp_path):
    path = tmp_path / "b.hkb"
    bank = MemoryBank(D)
    bank.add(rows_for(0, 40))
    bank.save(path)
    good = path.read_bytes()
    p = _ctx().Process(target=_slow_saver, args=(str(path),))
    p.start()
    tmp = tmp_path / f"b.hkb.tmp-{p.pid}"
    deadline = time.monotonic() + 60
    try:
        while not (tmp.exists() and tmp.stat().st_size > DATA_OFFSET + (1 << 17)):
            assert p.is_alive(), "the save ended before the kill"
            assert time.monotonic() < deadline, "the save never started writing"
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert tmp.exists()  # the half-written file, left behind by the kill
    with pytest.raises(BankFileError):
        MemoryBank.load(tmp)
    assert path.read_bytes() == good
    MemoryBank.load(path).save(path)  # the next save clears the dead process's leftover
    assert not tmp.exists()


# --- one writer, any number of readers ------------------------------------------------------

def test_a_second_writer_is_refused_and_readers_still_work(tmp_path):
    path = tmp_path / "bank.hkb"
    writer = MemoryBank(D, storage="disk", path=path)
    writer.add(rows_for(0, 5))
    with pytest.raises(BankBusyError, match="open for writing by another process"):
        MemoryBank.load(path, storage="disk", read_only=False)
    second = MemoryBank.load(path, storage="disk")  # the default: read-only, and add says why
    with pytest.raises(ValueError, match="read-only: another writer holds it"):
        second.add(rows_for(5, 1))
    snapshot = MemoryBank.load(path, storage="disk", read_only=True)
    assert len(MemoryBank.load(path, storage="host")) == 5
    writer.add(rows_for(5, 3))
    assert len(snapshot) == 5 and torch.equal(snapshot.read()[0], rows_for(0, 5))  # what it opened
    assert torch.equal(MemoryBank.load(path).read()[0], rows_for(0, 8))  # a new reader sees the new rows
    for bank in (second, snapshot, writer):
        bank.close()
    with MemoryBank.load(path, storage="disk", read_only=False) as bank:  # the lock went with the writer
        bank.add(rows_for(8, 1))
    assert len(MemoryBank.load(path)) == 9
    with pytest.raises(ValueError, match="read_only: only storage='disk'"):
        MemoryBank.load(path, storage="host", read_only=True)


def _holder(path: str, ready: str) -> None:
    bank = MemoryBank.load(path, storage="disk", read_only=False, progress=False)
    bank.add(rows_for(len(bank), 2))
    _log(ready, "ready")
    time.sleep(60)


def test_a_writer_in_another_process_holds_the_file_until_it_dies(tmp_path):
    path, ready = str(tmp_path / "bank.hkb"), str(tmp_path / "ready")
    with MemoryBank(D, storage="disk", path=path) as bank:
        bank.add(rows_for(0, 3))
    p = _ctx().Process(target=_holder, args=(path, ready))
    p.start()
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            assert p.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(BankBusyError):
            MemoryBank.load(path, storage="disk", read_only=False)
        assert torch.equal(MemoryBank.load(path).read()[0], rows_for(0, 5))
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    with MemoryBank.load(path, storage="disk", read_only=False) as bank:  # the kernel dropped the dead lock
        bank.add(rows_for(5, 1))
    _check_prefix(path, 6, 6)


def _appender(path: str, tag: int, rounds: int, rows: int) -> None:
    torch.set_num_threads(1)
    for r in range(rounds):
        while True:
            try:
                bank = MemoryBank.load(path, storage="disk", read_only=False)
                break
            except BankBusyError:
                time.sleep(0.002)
        with bank:
            bank.add(rows_for(r * rows, rows, tag))


def test_two_processes_appending_lose_no_row(tmp_path):
    """Before: 7 rows loaded where 9 were added; now the lock serialises the writers."""
    path = str(tmp_path / "bank.hkb")
    MemoryBank(D, storage="disk", path=path).close()
    ctx = _ctx()
    procs = [ctx.Process(target=_appender, args=(path, tag, 8, 5)) for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = MemoryBank.load(path).read()[0]
    assert rows.shape[0] == 2 * 8 * 5
    for tag in (1, 2):
        mine = rows[rows[:, 1] == tag]
        assert torch.equal(mine[:, 0].sort().values, torch.arange(40, dtype=torch.float32))


def test_a_failed_add_leaves_the_committed_rows_and_no_tail(tmp_path, monkeypatch):
    path = tmp_path / "bank.hkb"
    bank = MemoryBank(D, storage="disk", path=path)
    bank.add(rows_for(0, 4))
    size = path.stat().st_size
    real, calls = storage.pwrite_all, [0]

    def disk_full(fd, buf, at):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(28, "No space left on device")
        real(fd, buf, at)

    monkeypatch.setattr(storage, "IO_BYTES", ROWS_PER_WRITE * D * 4)
    monkeypatch.setattr(storage, "pwrite_all", disk_full)
    with pytest.raises(OSError, match="No space"):
        bank.add(rows_for(4, ROWS_PER_ADD))
    assert len(bank) == 4 and path.stat().st_size == size
    _check_prefix(str(path), 4, 4)
    bank.add(rows_for(4, 2))  # the bank goes on where it was
    bank.close()
    _check_prefix(str(path), 6, 6)
