"""MemoryBank: millions of stored patterns on the device, in host memory or on disk, streamed.

A bank is a table of rows, pattern (``dim``) then value (``value_dim``; none
when values are the patterns).  Every query walks the bank in chunks of
``chunk_rows`` rows (:func:`.storage.chunks`): each chunk's
:class:`~hen_kernels.Partial` comes from the public
:func:`hen_kernels.hopfield_partial` with the chunk's global ``offset`` and is
merged at once into the running Partial with :func:`hen_kernels.merge_partials`;
the running Partial keeps out and lse in float64 and is rounded once at the end
(docs/design.md §5.1), so memory stays bounded by one chunk, the error does not
grow with the number of chunks, every backend serves the bank, and the
answer equals one :func:`hen_kernels.hopfield_update` over the whole bank
(docs/design.md §2, §5).  Multi-step retrieval is the one loop of
:func:`hen_kernels.streaming.retrieve`, handed a step that streams the whole bank.
Where the rows live is :mod:`.storage`; the file ``save``, ``load`` and disk
storage share is :mod:`.file_format`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from .. import ops, streaming
from ..types import Beta, Partial, Retrieval
from ..validation import check_beta, check_similarity, check_steps, check_weights
from ._checks import (PathLike, check_beta_default, check_device, check_dtype, check_int, check_path, check_rows,
                      progress_bar)
from .file_format import EMPTY_SHA, MIB, BankFileError, FileInfo, check_metadata, header_bytes, itemsize
from .file_io import check_digest, drain, open_regular, read_info, stream_rows, write_atomically
from .storage import DiskStore, MemoryStore, chunks, open_disk

STORAGES = ("device", "host", "disk")
# Default chunk sizes, from a memory budget per chunk buffer: on CUDA two device
# buffers (and, for a disk bank, two pinned staging buffers) are in flight.
CHUNK_BYTES = {"cpu": 64 * MIB, "cuda": 256 * MIB}


# Every bank, so that a forked child gets each add lock anew (one held by another thread at the fork would
# never be released there).
_BANKS: "weakref.WeakSet[MemoryBank]" = weakref.WeakSet()


def _fresh_add_locks_after_fork() -> None:
    for bank in list(_BANKS):
        bank._adding = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_add_locks_after_fork)


class MemoryBank:
    """A growable bank of patterns (and optional values) that queries stream over in chunks.

    ``MemoryBank(dim, *, value_dim=None, dtype=torch.float32, device="cpu", storage="device",
    path=None, chunk_rows=None, similarity="dot", beta=None, backend=None, metadata=None)``

    - ``value_dim``: width of the stored values; None stores none (values are the patterns).
    - ``storage``: ``"device"``, ``"host"`` or ``"disk"`` (:mod:`.storage`); ``path``, for disk
      only, names a new bank file (``MemoryBank.load(path, storage="disk")`` opens an existing one).
    - ``chunk_rows``: rows per kernel call; None picks the whole bank for device storage, and for
      host storage on a CPU device (the same memory), and a chunk of about 64 MiB (CPU disk
      banks) or 256 MiB (CUDA) otherwise.  Results do not depend on it
      beyond float rounding (docs/design.md §5).
    - ``similarity``, ``beta``: defaults for queries, saved with the bank.
    - ``backend``: passed to :func:`hen_kernels.hopfield_partial` (None picks the fastest).
    - ``metadata``: extra str -> str pairs saved in the file's metadata record.
    """

    def __init__(
        self,
        dim: int,
        *,
        value_dim: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        storage: str = "device",
        path: Optional[PathLike] = None,
        chunk_rows: Optional[int] = None,
        similarity: str = "dot",
        beta: Optional[float] = None,
        backend: Optional[str] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ):
        self._setup(dim, value_dim, dtype, device, storage, path, chunk_rows, similarity, beta, backend, metadata)

    def _setup(self, dim, value_dim, dtype, device, storage, path, chunk_rows, similarity, beta, backend, metadata,
               disk_open: Optional[Tuple[int, FileInfo, object, Optional[str]]] = None) -> None:
        self._dim = check_int("dim", dim, 1)
        self._value_dim = None if value_dim is None else check_int("value_dim", value_dim, 1)
        self._dtype = check_dtype(dtype)
        self._device = check_device(device)
        if not isinstance(storage, str):
            raise TypeError(f"storage: expected a str, one of {STORAGES}, got {type(storage).__name__}")
        if storage not in STORAGES:
            raise ValueError(f"storage: expected one of {STORAGES}, got {storage!r}")
        self._storage = storage
        self._chunk_rows = None if chunk_rows is None else check_int("chunk_rows", chunk_rows, 1)
        self.similarity = similarity
        self.beta = beta
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend: expected a str or None, got {type(backend).__name__}")
        self.backend = backend
        self.metadata = metadata
        # Why the rows must not be saved (damage load(verify=False) let in), or None
        self._damage: Optional[BankFileError] = None
        # adds from several threads take turns: each reads the count its ids start at and moves it
        self._adding = threading.Lock()
        _BANKS.add(self)
        if storage == "disk":
            if path is None:
                raise ValueError("path: storage='disk' needs the path of the bank file")
            path = check_path("path", path)
            if sys.byteorder != "little":  # pragma: no cover
                raise ValueError("storage: bank files are little-endian (safetensors); this machine is not")
            if disk_open is None:
                self._store = DiskStore.create(path, self._dim, self._value_dim, self._dtype, self._meta)
            else:
                self._store = DiskStore(*disk_open[:3], self._meta, read_only_reason=disk_open[3])
        else:
            if path is not None:
                raise ValueError(f"path: only storage='disk' keeps a file; got path with storage={storage!r}")
            host = storage == "host"
            where = torch.device("cpu") if host else self._device
            pin = host and self._device.type == "cuda"
            self._store = MemoryStore(self._dim, self._value_dim, self._dtype, where, pin)

    def _meta(self):
        return self.similarity, self.beta, self.metadata

    # --- properties ---------------------------------------------------------------

    # similarity, beta and metadata are public and saved with the bank: checked as the constructor
    # checks them when set (header_bytes checks them again when a page is written: metadata's dict
    # may be edited in place).
    @property
    def similarity(self) -> str:
        return self._similarity

    @similarity.setter
    def similarity(self, value: str) -> None:
        self._similarity = check_similarity(value)

    @property
    def beta(self) -> Optional[float]:
        return self._beta

    @beta.setter
    def beta(self, value: Optional[float]) -> None:
        self._beta = check_beta_default(value)

    @property
    def metadata(self) -> Dict[str, str]:
        return self._metadata

    @metadata.setter
    def metadata(self, value: Optional[Mapping[str, str]]) -> None:
        self._metadata = check_metadata(value)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def value_dim(self) -> int:
        """Width of what an update returns: the values' width, or ``dim`` when values are the patterns."""
        return self._dim if self._value_dim is None else self._value_dim

    @property
    def has_values(self) -> bool:
        return self._value_dim is not None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def storage(self) -> str:
        return self._storage

    @property
    def path(self) -> Optional[str]:
        return self._store.path if isinstance(self._store, DiskStore) else None

    @property
    def row_bytes(self) -> int:
        return (self._dim + (self._value_dim or 0)) * itemsize(self._dtype)

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    @property
    def chunk_rows(self) -> int:
        """Rows per kernel call in the next query."""
        if self._chunk_rows is not None:
            return self._chunk_rows
        # Rows the kernel reads where they lie: one call, which streams them itself (on the CPU, host rows
        # are such rows: in chunks of 64 MiB the calls and merges cost 1.28-1.32x one call, docs/memory_bank.md).
        if self._storage == "device" or (self._storage == "host" and self._device.type == "cpu"):
            return max(1, len(self))
        return max(1, CHUNK_BYTES[self._device.type] // self.row_bytes)

    def num_chunks(self) -> int:
        return -(-len(self) // self.chunk_rows)

    def __len__(self) -> int:
        return self._store.count

    def __repr__(self) -> str:
        vd = "" if self._value_dim is None else f", value_dim={self._value_dim}"
        where = f", path={self.path!r}" if self.path else ""
        return (f"MemoryBank({len(self)} rows, dim={self._dim}{vd}, dtype={self._dtype}, device={self._device}, "
                f"storage={self._storage!r}{where}, chunk_rows={self.chunk_rows}, similarity={self.similarity!r}, "
                f"beta={self.beta})")

    # --- adding and reading rows --------------------------------------------------

    def _check_rows(self, patterns: object, values: object) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rows fit to add: (patterns, values), values None when the bank stores none."""
        p = check_rows("patterns", patterns, self._dim, self._dtype)
        if self._value_dim is None:
            if values is not None:
                raise ValueError(
                    "values: this bank stores no values (value_dim=None: the patterns are the values); "
                    "create it with value_dim=... to store values"
                )
            v = None
        else:
            if values is None:
                raise ValueError(f"values: this bank stores values of width {self._value_dim}; pass values (M, Dv)")
            v = check_rows("values", values, self._value_dim, self._dtype)
            if v.shape[0] != p.shape[0]:
                raise ValueError(f"values: expected {p.shape[0]} rows (one per pattern), got {v.shape[0]}")
        return p, v

    def add(self, patterns: torch.Tensor, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append rows; returns their ids (int64, CPU), the global row numbers ``top_index`` reports."""
        p, v = self._check_rows(patterns, values)
        with self._adding:
            start = len(self)
            if p.shape[0]:
                self._store.append(p, v)
        return torch.arange(start, start + p.shape[0], dtype=torch.int64)

    def read(self, start: int = 0, stop: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rows [start, stop) as CPU copies: (patterns, values), values None when the bank stores none."""
        n = len(self)
        start = check_int("start", start, 0)
        stop = n if stop is None else check_int("stop", stop, 0)
        if not start <= stop <= n:
            raise ValueError(f"stop: expected start <= stop <= {n} (the bank's rows), got start={start}, stop={stop}")
        rows = self._store.rows_cpu(start, stop) if stop > start else torch.empty(
            (0, self._dim + (self._value_dim or 0)), dtype=self._dtype)
        p = rows[:, : self._dim].contiguous()
        return p, None if self._value_dim is None else rows[:, self._dim:].contiguous()

    # --- streaming ------------------------------------------------------------------

    def _check_query(self, query: object, beta: object, similarity: object, weights: object = None):
        """(query, beta, similarity, weights) checked against the bank; the defaults filled in."""
        if not isinstance(query, torch.Tensor):
            raise TypeError(f"query: expected a torch.Tensor, got {type(query).__name__}")
        if query.dtype != self._dtype:
            raise TypeError(f"query: expected dtype {self._dtype} (the bank's), got {query.dtype}")
        if query.device != self._device:
            raise ValueError(f"query: expected device {self._device} (the bank's), got {query.device}")
        if query.dim() < 2 or query.shape[-1] != self._dim:
            raise ValueError(f"query: expected shape (..., B, {self._dim}), got {tuple(query.shape)}")
        if beta is None:
            beta = self.beta
            if beta is None:
                raise ValueError("beta: expected a float > 0 or a tensor; this bank has no default beta")
        check_beta(beta, query.shape[:-2], query.device)
        similarity = self.similarity if similarity is None else check_similarity(similarity)
        weights = check_weights(weights, query)
        return query, beta, similarity, weights

    def _partial(self, query: torch.Tensor, beta: Beta, similarity: str, weights: Optional[torch.Tensor] = None,
                 bar=None) -> Partial:
        """The whole bank's Partial in float64 (``streaming.to_float64``); callers round it once."""
        running: Optional[Partial] = None
        gen = chunks(self._store, self.chunk_rows, self._device)
        try:
            for a, p, v in gen:
                part = streaming.to_float64(ops.hopfield_partial(
                    query, p, beta, similarity=similarity, values=v, offset=a, weights=weights, backend=self.backend))
                del p, v
                running = part if running is None else ops.merge_partials([running, part])
                if bar is not None:
                    bar.update(1)
        finally:
            gen.close()
        return self._empty_partial(query, beta, similarity, weights) if running is None else running

    def _empty_partial(self, query: torch.Tensor, beta: Beta, similarity: str,
                       weights: Optional[torch.Tensor] = None) -> Partial:
        """The merge identity (an empty bank's Partial) for these queries, in float64."""
        empty = torch.empty((0, self._dim), dtype=self._dtype, device=self._device)
        values = None if self._value_dim is None else torch.empty(
            (0, self._value_dim), dtype=self._dtype, device=self._device)
        return streaming.to_float64(ops.hopfield_partial(
            query, empty, beta, similarity=similarity, values=values, weights=weights, backend=self.backend))

    def _require_rows(self) -> None:
        if len(self) == 0:
            raise ValueError("bank: the bank is empty; add patterns before querying it")

    def partial(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
                weights: Optional[torch.Tensor] = None, progress: Optional[bool] = None) -> Partial:
        """The whole bank's Partial for ``query`` (..., B, dim); an empty bank gives the merge identity.

        ``weights`` (..., B, dim) float32, non-negative: per-query feature weights
        (:func:`hen_kernels.hopfield_partial`), for a query that knows only part of its pattern.
        """
        query, beta, similarity, weights = self._check_query(query, beta, similarity, weights)
        bar = progress_bar(self.num_chunks(), progress, "bank partial")
        try:
            return streaming.round_partial(self._partial(query, beta, similarity, weights, bar))
        finally:
            bar.close()

    def update(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
               weights: Optional[torch.Tensor] = None, progress: Optional[bool] = None) -> torch.Tensor:
        """One update over the whole bank, (..., B, value_dim) in the query's dtype: equals
        ``hk.hopfield_update(query, patterns, beta, similarity=..., values=values, weights=...)``."""
        query, beta, similarity, weights = self._check_query(query, beta, similarity, weights)
        self._require_rows()
        bar = progress_bar(self.num_chunks(), progress, "bank update")
        try:
            return self._partial(query, beta, similarity, weights, bar).finalize(query.dtype)
        finally:
            bar.close()

    def retrieve(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
                 max_steps: int = 1, tol: Optional[float] = None, weights: Optional[torch.Tensor] = None,
                 progress: Optional[bool] = None) -> Retrieval:
        """Up to ``max_steps`` updates, each over the whole bank; a query stops once max|s_new - s| <= tol.

        Equals ``hk.hopfield_retrieve`` over the whole bank: the same loop, with a step that
        streams every chunk and merges.  ``weights`` weigh the query's features in every step, as
        in ``hk.hopfield_retrieve``.  ``progress``: a bar always (True), never (False), or on a
        terminal once the call has run 2 s (None).
        """
        query, beta, similarity, weights = self._check_query(query, beta, similarity, weights)
        max_steps, tol = check_steps(max_steps, tol)
        self._require_rows()
        bar = progress_bar(max_steps * self.num_chunks(), progress, "bank retrieve")

        def step(state: torch.Tensor) -> Partial:
            return streaming.round_partial(self._partial(state, beta, similarity, weights, bar))

        try:
            return streaming.retrieve(step, query, value_dim=self.value_dim, max_steps=max_steps, tol=tol)
        finally:
            bar.close()

    # --- files ----------------------------------------------------------------------

    def save(self, path: PathLike, *, progress: Optional[bool] = None) -> None:
        """Write the bank to ``path`` atomically: a temporary file, fsync, rename, fsync of the directory.

        Until the rename, a bank already at ``path`` stays intact; a disk bank that another writer
        holds open there is not replaced (BankBusyError).  A disk bank saved to its own file only
        writes its header and fsyncs.
        """
        path = check_path("path", path)
        store = self._store
        if self._save_checks(path):
            with self._adding:
                store.flush()
            return
        n = len(self)

        def page(sha256: str) -> bytes:
            return header_bytes(self._dim, self._value_dim, self._dtype, n, self.similarity, self.beta, sha256,
                                self.metadata)

        def header(sha256: str) -> bytes:
            if isinstance(store, DiskStore) and sha256 != store.data_sha256:
                # loaded with verify=False: a save must not give damaged rows a fresh checksum
                raise BankFileError(f"{store.path}: corrupted: the sha256 of its rows, {sha256}, does not match "
                                    f"the header's {store.data_sha256}; not saved")
            return page(sha256)

        write_atomically(path, n, self.row_bytes, store.rows_cpu, header, progress)

    def _save_checks(self, path: str) -> bool:
        """What a save to ``path`` checks before it writes anything (ShardedMemoryBank.save runs them on every
        rank before any rank writes); True where ``path`` is this disk bank's own file, whose save writes
        only its header."""
        if os.path.isdir(path):
            raise ValueError(f"path: {path!r} is a directory, expected a file name")
        store = self._store
        own = isinstance(store, DiskStore) and os.path.exists(path) and os.path.samefile(path, store.path)
        if own:
            store.check_meta_writable("save to its own file")
        elif self._damage is not None:  # a save must not give damaged rows a fresh checksum
            raise BankFileError(f"{self._damage} (loaded with verify=False); not saved")
        # a header that cannot be written refuses before any row is (the checksum's length is fixed)
        header_bytes(self._dim, self._value_dim, self._dtype, len(self), self.similarity, self.beta, EMPTY_SHA,
                     self.metadata)
        return own

    @classmethod
    def load(
        cls,
        path: PathLike,
        *,
        storage: str = "device",
        device: Union[str, torch.device] = "cpu",
        chunk_rows: Optional[int] = None,
        backend: Optional[str] = None,
        verify: bool = True,
        read_only: Optional[bool] = None,
        progress: Optional[bool] = None,
    ) -> "MemoryBank":
        """Open a bank file.  ``storage="disk"`` serves it from the file itself (memory-mapped, never
        read whole; later adds append to it); otherwise the rows are read into device or host memory.

        The header is always checked (its own sha256, its form, the file's size); ``verify`` also
        checks the sha256 of the data (a streamed read of the whole file; pass False to skip it for
        a huge bank).  A truncated, corrupted or edited file raises :class:`BankFileError`; rows a
        killed writer never committed are ignored.

        ``read_only`` (disk storage): None opens the file for writing when this process may and no
        other writer holds it, and read-only otherwise (``add`` then says why); True never writes;
        False insists (:class:`BankBusyError` while another writer holds the file).
        """
        if not isinstance(verify, bool):
            raise TypeError(f"verify: expected a bool, got {type(verify).__name__}")
        if read_only is not None and not isinstance(read_only, bool):
            raise TypeError(f"read_only: expected a bool or None, got {type(read_only).__name__}")
        if read_only is not None and storage != "disk":
            raise ValueError(f"read_only: only storage='disk' keeps the file open; got storage={storage!r}")
        path = check_path("path", path)
        bank = cls.__new__(cls)
        disk = storage == "disk"
        if disk:
            fd, info, reason = open_disk(path, read_only)
        else:
            fd = open_regular(path)
        try:
            if not disk:
                info = read_info(fd, path)
            args = (info.dim, info.value_dim, info.dtype, device, storage)
            rest = (chunk_rows, info.similarity, info.beta, backend, info.metadata)
            if disk:
                hasher = None
                if verify:
                    hasher = drain(stream_rows(fd, info, progress, "bank verify"))
                    check_digest(info, hasher.hexdigest())
                bank._setup(*args, info.path, *rest, disk_open=(fd, info, hasher, reason))
                return bank
            bank._setup(*args, None, *rest)
            bank._store.reserve(info.count)
            gen = stream_rows(fd, info, progress, "bank load")
            while True:
                try:
                    _, rows = next(gen)
                except StopIteration as stop:
                    hasher = stop.value
                    break
                bank._store.append(rows[:, : info.dim], None if info.value_dim is None else rows[:, info.dim:])
            try:
                check_digest(info, hasher.hexdigest())
            except BankFileError as e:
                if verify:
                    raise
                bank._damage = e  # the rows were hashed anyway: remember, so that save refuses them
            return bank
        except BaseException:
            if disk:
                os.close(fd)
            raise
        finally:
            if not disk:
                os.close(fd)

    def flush(self) -> None:
        """Disk storage: fsync the file (adds survive a power loss after this; a killed process never
        loses a returned add), rewriting the header if similarity, beta or metadata changed (a read-only
        disk bank whose similarity, beta or metadata changed raises: it cannot write them)."""
        if isinstance(self._store, DiskStore):
            self._store.check_meta_writable("flush")
        with self._adding:  # (a header written beside an add's commit could count the rows before it)
            self._store.flush()

    def close(self) -> None:
        """Disk storage: flush and close the file; the bank is unusable afterwards."""
        self._store.close()

    def __enter__(self) -> "MemoryBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        # A disk bank's open file cannot travel (pickle's own error named a hash object inside; spawn-started
        # DataLoader workers meet this); a bank in memory pickles and deep-copies with its rows, its lock anew.
        if isinstance(self._store, DiskStore):
            raise TypeError(f"MemoryBank: a disk bank cannot be pickled or copied; it holds its file {self.path!r} "
                            "open: open it there with MemoryBank.load(path, storage='disk')")
        state = self.__dict__.copy()
        del state["_adding"]
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._adding = threading.Lock()
        _BANKS.add(self)

    def __del__(self) -> None:
        store = getattr(self, "_store", None)
        if isinstance(store, DiskStore) and store._prefetcher is not None:
            store._prefetcher.shutdown(wait=False)
        if isinstance(store, DiskStore) and store._fd is not None:
            with contextlib.suppress(Exception):
                os.close(store._fd)
                store._fd = None

