"""Where a bank's rows live, and how they reach the device one chunk at a time.

- ``"device"`` and ``"host"`` storage: :class:`MemoryStore`, two growable
  tensors (patterns, values) on the bank's device, or in host memory (pinned
  when the bank's device is a CUDA device).
- ``"disk"`` storage: :class:`DiskStore`, the rows in a bank file
  (:mod:`.file_format`), appended with pwrite and committed by rewriting the
  header page (:meth:`DiskStore.append` says in which order), one writer at a
  time (:func:`.file_io.lock_writer`), and read through a memory map one
  chunk-sized window at a time (a helper thread reads the next window into the
  page cache, ``posix_fadvise(WILLNEED)``, while this one computes), so a bank
  larger than RAM works.

:func:`chunks` walks a store in order.  Rows already on the device are viewed
in place; host and disk rows bound for a CUDA device stream through two device
buffers, the copy of the next chunk on a copy stream overlapping the compute
of this one (a disk window goes through a pinned staging buffer first).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import mmap
import os
import threading
import weakref
from typing import Iterator, Optional, Tuple, Union

import torch

from .file_format import DATA_OFFSET, EMPTY_SHA, IO_BYTES, BankBusyError, FileInfo, header_bytes
from .file_io import (as_bytes, check_digest, create_exclusive, drain, lock_writer, open_regular, pwrite_all,
                      read_info, stream_rows)

Chunk = Tuple[int, torch.Tensor, Optional[torch.Tensor]]  # (first row, patterns, values)
# Windows smaller than this are not prefetched on the helper thread: the kernel's own readahead
# covers them, and handing each one to a thread costs more than reading it (1-row chunks).
PREFETCH_MIN_BYTES = 1 << 20


class MemoryStore:
    """Rows in two growable tensors (patterns, values) on the device or in (pinned) host memory."""

    def __init__(self, dim: int, value_dim: Optional[int], dtype: torch.dtype, where: torch.device, pin: bool):
        self.dim, self.value_dim, self.dtype, self.where, self.pin = dim, value_dim, dtype, where, pin
        self.count = 0
        self.p = self._empty(0, dim)
        self.v = None if value_dim is None else self._empty(0, value_dim)

    def _empty(self, rows: int, width: int) -> torch.Tensor:
        return torch.empty((rows, width), dtype=self.dtype, device=self.where, pin_memory=self.pin)

    def reserve(self, rows: int) -> None:
        cap = self.p.shape[0]
        if rows <= cap:
            return
        new_cap = max(rows, cap + cap // 2, 1024)
        p = self._empty(new_cap, self.dim)
        p[: self.count].copy_(self.p[: self.count])
        self.p = p
        if self.v is not None:
            v = self._empty(new_cap, self.value_dim)
            v[: self.count].copy_(self.v[: self.count])
            self.v = v

    def append(self, p: torch.Tensor, v: Optional[torch.Tensor]) -> None:
        m = p.shape[0]
        self.reserve(self.count + m)
        self.p[self.count: self.count + m].copy_(p)
        if self.v is not None:
            self.v[self.count: self.count + m].copy_(v)
        self.count += m

    def view(self, a: int, b: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.p[a:b], None if self.v is None else self.v[a:b]

    def rows_cpu(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as a CPU tensor the store does not share (read() hands it to the caller)."""
        p, v = self.view(a, b)
        if v is None:
            return p.to("cpu", copy=True)  # on the CPU, to() alone would return the store's own rows
        return torch.cat([p, v], 1).to("cpu")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _fadvise_willneed(fd: int, start: int, length: int) -> None:
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)


def open_disk(path: str, read_only: Optional[bool]) -> Tuple[int, FileInfo, Optional[str]]:
    """Open a bank file for disk storage: (fd, its header, why it is read-only or None).

    ``read_only``: True never writes; False must write (BankBusyError while another writer holds
    the file); None writes when it can and otherwise opens read-only, saying why on ``add``.
    The header is read after the writer's lock is taken, so no writer ever appends on a count
    another writer has since moved; a writer cuts off the uncommitted add of a dead writer.
    """
    reason = "it was opened with read_only=True" if read_only else None
    if reason is None and os.path.exists(path) and not os.access(path, os.W_OK):
        if read_only is False:
            raise ValueError(f"read_only: False asks to write {path!r}, but the file is not writable")
        reason = "the file is not writable"
    fd = open_regular(path, write=reason is None)
    try:
        if reason is None:
            try:
                lock_writer(fd, path)
            except BankBusyError:
                if read_only is False:
                    raise
                os.close(fd)
                fd = -1
                fd = open_regular(path)
                reason = "another writer holds it (read_only=False would raise BankBusyError)"
        info = read_info(fd, path)
        if reason is None and info.tail_bytes:
            os.ftruncate(fd, info.end)
            info = info._replace(tail_bytes=0)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd, info, reason


def write_page(fd: int, page: bytes) -> None:
    """The commit point of every change to a disk bank: one page-aligned DATA_OFFSET-byte write of
    the header at offset 0 (one page: a process killed around it leaves the old page or the new)."""
    if os.pwrite(fd, page, 0) != len(page):
        raise OSError(f"bank: a short write of the {len(page)}-byte header page")


class DiskStore:
    """Rows in a bank file: appended with pwrite and committed by the header page, read through one
    mmap window per chunk.  A writable store holds the file's writer lock until it is closed."""

    def __init__(self, fd: int, info: FileInfo, hasher: Optional["hashlib._Hash"], meta_fn,
                 read_only_reason: Optional[str] = None):
        self.path = os.path.abspath(info.path)
        self.dim, self.value_dim, self.dtype = info.dim, info.value_dim, info.dtype
        self.width, self.row_bytes, self.data_offset = info.width, info.row_bytes, info.data_offset
        self.count = info.count
        self.where = torch.device("cpu")  # its rows reach a device from host memory maps
        self._read_only_reason = read_only_reason
        # A forked child shares the open file and the writer's lock with its parent: it must not write
        # (its adds would take the parent's ids), and the prefetch thread did not survive the fork.
        self._pid = os.getpid()
        # close() waits for the reads in flight (windows, prefetches, appends) and refuses new ones: it
        # closes the fd, whose number a new file would otherwise take under a read about to map it.
        self._in_flight: dict = {}  # thread id -> its reads in flight
        self._closing = False
        self._use = threading.Condition()
        self._committed_sha = info.sha256  # the data's sha256 that the header on disk holds
        self._hasher = hasher  # sha256 over the committed data; None until needed (after load(verify=False))
        self._meta_fn = meta_fn  # () -> (similarity, beta, metadata) for the header
        self._file_meta = (info.similarity, info.beta, dict(info.metadata))  # as the file holds them at open
        self._fd: Optional[int] = fd
        # the header page on disk, as last read or written: flush rewrites it only when it changes
        self._page: Optional[bytes] = None if read_only_reason else os.pread(fd, DATA_OFFSET, 0)
        self._prefetcher: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._prefetch_lock = threading.Lock()  # one prefetch at a time, also from queries on several threads
        _STORES.add(self)
        self._prefetched: Optional[concurrent.futures.Future] = None

    @property
    def read_only_reason(self) -> Optional[str]:
        if self._read_only_reason is None and os.getpid() != self._pid:
            return (f"it was opened for writing by process {self._pid}, and this process (a fork of it) shares "
                    "that open file and its writer's lock: its adds would take the parent's ids")
        return self._read_only_reason

    @property
    def read_only(self) -> bool:
        return self.read_only_reason is not None

    @contextlib.contextmanager
    def _using(self) -> Iterator[int]:
        """The open fd, held open until the block ends (close() waits for it); ValueError once closed."""
        me = threading.get_ident()
        with self._use:
            if self._fd is None or self._closing:
                raise ValueError(f"bank: the disk bank {self.path!r} is closed")
            self._in_flight[me] = self._in_flight.get(me, 0) + 1
        try:
            yield self._fd
        finally:
            with self._use:
                self._in_flight[me] -= 1
                if not self._in_flight[me]:
                    del self._in_flight[me]
                self._use.notify_all()

    @classmethod
    def create(cls, path: str, dim: int, value_dim: Optional[int], dtype: torch.dtype, meta_fn) -> "DiskStore":
        similarity, beta, metadata = meta_fn()
        page = header_bytes(dim, value_dim, dtype, 0, similarity, beta, EMPTY_SHA, metadata)  # may refuse: no file
        fd = create_exclusive(path, page)
        info = FileInfo(path, dim, value_dim, dtype, 0, similarity, beta, EMPTY_SHA, dict(metadata), DATA_OFFSET)
        store = cls(fd, info, hashlib.sha256(), meta_fn)
        store._page = page
        return store

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"bank: the disk bank {self.path!r} is closed")
        return self._fd

    def _data_hasher(self) -> "hashlib._Hash":
        """The sha256 state over the committed rows; after load(verify=False) the rows are hashed once
        here and must match the header's checksum: a new commit must not bless damaged rows."""
        if self._hasher is None:
            info = FileInfo(self.path, self.dim, self.value_dim, self.dtype, self.count, "dot", None,
                            self._committed_sha, {}, self.data_offset)
            h = drain(stream_rows(self.fd, info, False, "bank verify"))
            check_digest(info, h.hexdigest())
            self._hasher = h
        return self._hasher

    @property
    def data_sha256(self) -> str:
        """The sha256 of the committed rows (the header's, until this store hashed them)."""
        return self._committed_sha if self._hasher is None else self._hasher.hexdigest()

    def _header(self, count: int, sha256: str) -> bytes:
        similarity, beta, metadata = self._meta_fn()
        return header_bytes(self.dim, self.value_dim, self.dtype, count, similarity, beta, sha256, metadata)

    def check_meta_writable(self, what: str) -> None:
        """Refuse ``what`` (a save to this file, a flush) where the bank's similarity, beta or metadata
        changed and this store cannot write them: a read-only store would otherwise drop them silently."""
        similarity, beta, metadata = self._meta_fn()
        if self.read_only_reason is not None and (similarity, beta, dict(metadata)) != self._file_meta:
            raise ValueError(
                f"bank: {what}: the disk bank {self.path!r} is read-only ({self.read_only_reason}), so its changed "
                "similarity, beta or metadata cannot be written there; save it to another path"
            )

    def _refuse_writes(self) -> None:
        if self.read_only_reason is not None:
            raise ValueError(f"bank: the disk bank {self.path!r} is read-only: {self.read_only_reason}")

    def append(self, p: torch.Tensor, v: Optional[torch.Tensor]) -> None:
        """Rows past the committed end, fdatasync, then the header page that counts them (the commit).

        Killed before the page is written, the file still says the old count and checksum (the rows
        written so far are a tail that readers ignore); killed after, it holds every new row.
        """
        self._refuse_writes()
        with self._using():
            self._append(p, v)

    def _append(self, p: torch.Tensor, v: Optional[torch.Tensor]) -> None:
        m = p.shape[0]
        self._header(self.count + m, EMPTY_SHA)  # a header that cannot grow refuses before any row is written
        h = self._data_hasher().copy()
        end = at = self.data_offset + self.count * self.row_bytes
        rows_per = max(1, IO_BYTES // self.row_bytes)
        try:
            for a in range(0, m, rows_per):
                chunk = p[a: a + rows_per].to("cpu")
                if v is not None:
                    chunk = torch.cat([chunk, v[a: a + rows_per].to("cpu")], 1)
                buf = as_bytes(chunk)
                pwrite_all(self.fd, buf, at)
                h.update(buf)
                at += len(buf)
            page = self._header(self.count + m, h.hexdigest())
            os.fdatasync(self.fd)  # on a power loss too, the header never counts rows the disk does not hold
        except BaseException:  # nothing committed: take the uncommitted rows back (a disk full, say)
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, end)
            raise
        write_page(self.fd, page)
        self.count += m
        self._hasher, self._committed_sha = h, h.hexdigest()
        self._committed(page)

    def window(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as a (b - a, width) tensor over a private memory map of just those bytes."""
        start = self.data_offset + a * self.row_bytes
        base = start - start % mmap.ALLOCATIONGRANULARITY
        length = (b - a) * self.row_bytes + (start - base)
        with self._using() as fd:  # (the map keeps a file of its own: it outlives close)
            mm = mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=base)
        # The tensor keeps the map alive; the map is unmapped when the last view of it dies.
        return torch.frombuffer(mm, dtype=self.dtype, count=(b - a) * self.width,
                                offset=start - base).view(b - a, self.width)

    def prefetch(self, a: int, b: int) -> None:
        """Start reading rows [a, b) into the page cache on a helper thread (fadvise WILLNEED blocks
        while it submits the reads; the kernel of the current chunk runs meanwhile, without the GIL).
        At most one prefetch is outstanding."""
        if not hasattr(os, "posix_fadvise") or (b - a) * self.row_bytes < PREFETCH_MIN_BYTES:
            return
        with contextlib.suppress(ValueError), self._using() as fd, self._prefetch_lock:  # closed: none
            if self._prefetcher is None:
                self._prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hen-bank-prefetch")
            if self._prefetched is not None:
                self._prefetched.result()
            start, length = self.data_offset + a * self.row_bytes, (b - a) * self.row_bytes
            self._prefetched = self._prefetcher.submit(_fadvise_willneed, fd, start, length)

    def split(self, rows: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return rows[:, : self.dim], None if self.value_dim is None else rows[:, self.dim:]

    def view(self, a: int, b: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.split(self.window(a, b))

    def rows_cpu(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as a CPU tensor of their own (not the memory map's)."""
        return self.window(a, b).clone()

    def flush(self) -> None:
        """Write the header again if the bank's similarity, beta or metadata changed; fsync."""
        if self._fd is not None and not self.read_only:
            with self._using() as fd:
                self._flush(fd)

    def _flush(self, fd: int) -> None:
        page = self._header(self.count, self.data_sha256)
        if page != self._page:
            write_page(fd, page)
            self._committed(page)
        os.fsync(fd)

    def _committed(self, page: bytes) -> None:
        """The header page now on disk, and the similarity, beta and metadata it holds."""
        similarity, beta, metadata = self._meta_fn()
        self._page, self._file_meta = page, (similarity, beta, dict(metadata))

    def close(self) -> None:
        with self._use:  # new reads refused from here; those in flight finish first
            if threading.get_ident() in self._in_flight:  # (a signal handler, say, amid this thread's add)
                raise RuntimeError(f"bank: close() of the disk bank {self.path!r} from inside one of its own reads "
                                   "or adds on this thread would wait for itself; close it after that returns")
            self._closing = True
            self._use.wait_for(lambda: not self._in_flight)
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher, self._prefetched = None, None
        if self._fd is not None:
            try:
                if not self.read_only:
                    self._flush(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


Store = Union[MemoryStore, DiskStore]

# Every open DiskStore, so that a forked child starts each with fresh locks (one held by another thread
# at the fork would never be released there) and no prefetch thread (none runs there: a prefetch would
# wait for it forever, as DataLoader workers of a bank the parent had queried did).
_STORES: "weakref.WeakSet[DiskStore]" = weakref.WeakSet()


def _fresh_after_fork() -> None:
    for store in list(_STORES):
        store._use, store._in_flight, store._prefetch_lock = threading.Condition(), {}, threading.Lock()
        store._prefetcher, store._prefetched = None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_after_fork)


def chunks(store: Store, rows: int, device: torch.device) -> Iterator[Chunk]:
    """(first row, patterns, values) on ``device``, ``rows`` rows at a time, covering the store in order."""
    if device.type == "cuda" and store.where != device:
        yield from _cuda_chunks(store, rows, device)
        return
    n = store.count
    disk = isinstance(store, DiskStore)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        if disk and b < n:
            store.prefetch(b, min(n, b + rows))  # read the next window while this one computes
        p, v = store.view(a, b)
        yield a, p, v
        del p, v  # drop this window's map before the next one


def _cuda_chunks(store: Store, rows: int, dev: torch.device) -> Iterator[Chunk]:
    """Host or disk rows streamed to the CUDA device through two buffers.

    The copy of chunk i+1 runs on ``copy`` while chunk i computes on the current stream:
    ``ready[s]`` (recorded on ``copy``) orders a slot's compute after its copy, ``free[s]``
    (recorded on the compute stream once the consumer has enqueued chunk i's work) orders the
    next copy into that slot after the compute that reads it.  A disk bank first copies each
    window into a pinned staging slot on the CPU, after the H2D copy that last read that slot
    has finished (``ready[s].synchronize()``).
    """
    n = store.count
    if n == 0:
        return
    rows = min(rows, n)
    compute = torch.cuda.current_stream(dev)
    copy = torch.cuda.Stream(device=dev)
    disk = isinstance(store, DiskStore)
    dv = store.value_dim

    def alloc(width: int, **kw) -> torch.Tensor:
        return torch.empty((rows, width), dtype=store.dtype, **kw)

    bufs = [(alloc(store.dim, device=dev), None if dv is None else alloc(dv, device=dev)) for _ in range(2)]
    stage = [(alloc(store.dim, pin_memory=True), None if dv is None else alloc(dv, pin_memory=True))
             for _ in range(2)] if disk else None
    ready = [torch.cuda.Event() for _ in range(2)]
    free: list = [None, None]
    starts = list(range(0, n, rows))
    # The buffers come from the caching allocator on the compute stream: their memory may
    # still be in use by earlier compute work, so the copy stream starts after it.
    copy.wait_stream(compute)

    def issue(i: int) -> Tuple[int, int]:
        s = i % 2
        a = starts[i]
        m = min(n, a + rows) - a
        if disk:
            if i + 1 < len(starts):
                store.prefetch(starts[i + 1], min(n, starts[i + 1] + rows))
            if i >= 2:
                ready[s].synchronize()  # the H2D copy of chunk i-2 has read stage[s]
            sp, sv = stage[s]
            wp, wv = store.view(a, a + m)
            sp[:m].copy_(wp)
            if sv is not None:
                sv[:m].copy_(wv)
            del wp, wv
            src_p, src_v = sp[:m], None if sv is None else sv[:m]
        else:
            src_p, src_v = store.view(a, a + m)
        dp, dvb = bufs[s]
        with torch.cuda.stream(copy):
            if free[s] is not None:
                copy.wait_event(free[s])
            dp[:m].copy_(src_p, non_blocking=True)
            if dvb is not None:
                dvb[:m].copy_(src_v, non_blocking=True)
            ready[s].record(copy)
        return a, m

    try:
        pending = issue(0)
        for i in range(len(starts)):
            s = i % 2
            a, m = pending
            if i + 1 < len(starts):
                pending = issue(i + 1)
            compute.wait_event(ready[s])
            dp, dvb = bufs[s]
            yield a, dp[:m], None if dvb is None else dvb[:m]
            ev = torch.cuda.Event()
            ev.record(compute)
            free[s] = ev
    finally:
        # Written on `copy`: the allocator must not hand them out again before that work ends.
        for dp, dvb in bufs:
            dp.record_stream(copy)
            if dvb is not None:
                dvb.record_stream(copy)
