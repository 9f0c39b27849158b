"""MemoryBank: millions of stored patterns on the device, in host memory or on disk, streamed.

A bank is a table of rows, pattern (``dim``) then value (``value_dim``; none
when values are the patterns).  Every query walks the bank in chunks of
``chunk_rows`` rows: each chunk's :class:`~hen_kernels.Partial` comes from the
public :func:`hen_kernels.hopfield_partial` with the chunk's global ``offset``
and is merged at once into the running Partial with
:func:`hen_kernels.merge_partials`, so memory stays bounded by one chunk and the
answer equals one :func:`hen_kernels.hopfield_update` over the whole bank
(DESIGN.md §2, §5).  Multi-step retrieval is the one loop in
:func:`hen_kernels.reference.retrieve`, handed a step that streams the whole bank.

Storage:

- ``"device"``: the rows live on ``device``; one kernel call per ``chunk_rows``
  (the whole bank when ``chunk_rows`` is None).
- ``"host"``: the rows live in host memory (pinned when ``device`` is a CUDA
  device) and stream to the device chunk by chunk: the copy of the next chunk on
  a copy stream overlaps the compute of this one on the current stream.
- ``"disk"``: the rows live in the file ``path``, read through a memory map one
  chunk-sized window at a time (a helper thread reads the next window into the
  page cache, ``posix_fadvise(WILLNEED)``, while this one computes), so a bank
  larger than RAM works; on CUDA the window is
  copied into a pinned staging buffer and streamed like a host bank.

File format (``save``, ``load`` and disk storage alike): one safetensors file
with a single tensor ``"rows"`` of shape (count, dim + value_dim), row-major,
little-endian, and a ``__metadata__`` record (format, version, dim, value_dim,
dtype, count, similarity and beta defaults, the sha256 of the data region, any
user metadata).  The header is padded with spaces so the data starts at byte
4096.  ``save`` writes a temporary file, fsyncs it, renames it over ``path``
and fsyncs the directory; ``load`` checks the header, the size and (unless
``verify=False``) the checksum, and refuses a truncated or corrupted file with
:class:`BankFileError`.  Nothing is ever unpickled.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import mmap
import numbers
import os
import struct
import sys
from typing import Dict, Iterator, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from . import ops, reference
from .reference import SIMILARITIES
from .types import Partial, Retrieval
from .validation import FLOAT_DTYPES, check_beta, check_similarity, check_steps

Beta = Union[float, torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]

STORAGES = ("device", "host", "disk")
FORMAT = "hen_kernels.MemoryBank"
FORMAT_VERSION = "1"
TENSOR_NAME = "rows"
DATA_OFFSET = 4096  # 8-byte length + the JSON header padded with spaces; data page-aligned
MIB = 2 ** 20
# Default chunk sizes, from a memory budget per chunk buffer: on CUDA two device
# buffers (and, for a disk bank, two pinned staging buffers) are in flight.
CHUNK_BYTES = {"cpu": 64 * MIB, "cuda": 256 * MIB}
IO_BYTES = 16 * MIB  # bytes per read or write when saving, loading and verifying
PROGRESS_DELAY_S = 2.0  # the automatic progress bar shows only once a call has run this long
_MAX_HEADER = 16 * MIB

_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPE = {v: k for k, v in _DTYPE_NAME.items()}
_OWN_KEYS = ("format", "version", "dim", "value_dim", "dtype", "count", "similarity", "beta", "sha256")


class BankFileError(ValueError):
    """A bank file that is truncated, corrupted, or not a hen_kernels bank."""


# --- argument checks ------------------------------------------------------------------

def _check_int(name: str, v: object, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return int(v)


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    return dtype


def _check_device(device: object) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__}")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {d} asked for, but CUDA is not available on this machine")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
    elif d.type != "cpu":
        raise ValueError(f"device: expected 'cpu' or a CUDA device, got {d}")
    return d


def _check_beta_default(beta: object) -> Optional[float]:
    if beta is None:
        return None
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta: expected a float > 0 or None as the bank's default, got {type(beta).__name__}")
    b = float(beta)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta: expected a finite float > 0, got {b}")
    return b


def _check_metadata(metadata: object) -> Dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata: expected a mapping of str to str, got {type(metadata).__name__}")
    out = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata: expected str keys and values, got {k!r}: {type(v).__name__}")
        if k in _OWN_KEYS or k == "layout":
            raise ValueError(f"metadata: the key {k!r} is the bank's own; pick another name")
        out[k] = v
    return out


def _check_rows(name: str, t: object, width: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the bank's), got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != width:
        raise ValueError(f"{name}: expected shape (M, {width}), got {tuple(t.shape)}")
    if t.numel() and not bool(torch.isfinite(t).all()):
        row = int((~torch.isfinite(t)).any(1).nonzero()[0, 0])
        raise ValueError(
            f"{name}: expected finite entries, row {row} holds NaN or inf (one such row would poison every query)"
        )
    return t.detach()


def _path(name: str, path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


# --- progress -------------------------------------------------------------------------

class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, progress: Optional[bool], desc: str, unit: str = "chunk"):
    """A tqdm bar: always with progress=True, never with False; None shows it on a terminal after 2 s."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool or None, got {type(progress).__name__}")
    if progress is False or total <= 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, dynamic_ncols=True,
                delay=0.0 if progress else PROGRESS_DELAY_S, disable=False if progress else None)


# --- the file format ------------------------------------------------------------------

class FileInfo(NamedTuple):
    """What a bank file's header says, after every check but the checksum."""

    path: str
    dim: int
    value_dim: Optional[int]
    dtype: torch.dtype
    count: int
    similarity: str
    beta: Optional[float]
    sha256: str
    metadata: Dict[str, str]
    data_offset: int

    @property
    def width(self) -> int:
        return self.dim + (self.value_dim or 0)

    @property
    def row_bytes(self) -> int:
        return self.width * _itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.count * self.row_bytes


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _header_bytes(dim: int, value_dim: Optional[int], dtype: torch.dtype, count: int, similarity: str,
                  beta: Optional[float], sha256: str, metadata: Mapping[str, str],
                  data_offset: int = DATA_OFFSET) -> bytes:
    width = dim + (value_dim or 0)
    meta = dict(metadata)
    meta.update(
        format=FORMAT, version=FORMAT_VERSION, dim=str(dim),
        value_dim="none" if value_dim is None else str(value_dim),
        dtype=_DTYPE_NAME[dtype], count=str(count), similarity=similarity,
        beta="none" if beta is None else repr(beta), sha256=sha256,
        layout=f"rows[:, :{dim}] are the patterns" + ("" if value_dim is None else f", rows[:, {dim}:] the values"),
    )
    header = {
        "__metadata__": meta,
        TENSOR_NAME: {"dtype": _ST_DTYPE[dtype], "shape": [count, width],
                      "data_offsets": [0, count * width * _itemsize(dtype)]},
    }
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    room = data_offset - 8
    if len(js) > room:
        raise ValueError(f"metadata: the header needs {len(js)} bytes, more than the {room} a bank file has room for")
    return struct.pack("<Q", room) + js + b" " * (room - len(js))


def read_info(path: PathLike) -> FileInfo:
    """Parse and check a bank file's header and size (not the checksum); BankFileError when it is bad."""
    path = _path("path", path)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no bank file at {path!r}") from None
    if os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a directory, expected a bank file")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BankFileError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise BankFileError(
                f"{path}: truncated or not a bank file: the header claims {hlen} bytes, the file has {size}"
            )
        raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BankFileError(f"{path}: corrupted header: not valid JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise BankFileError(f"{path}: not a hen_kernels bank file: the safetensors header has no __metadata__")
    meta = header["__metadata__"]
    if meta.get("format") != FORMAT:
        raise BankFileError(f"{path}: not a hen_kernels bank file: metadata format is {meta.get('format')!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise BankFileError(f"{path}: bank file version {meta.get('version')!r}; this code reads {FORMAT_VERSION!r}")

    def field(key: str, parse):
        try:
            return parse(meta[key])
        except (KeyError, ValueError, TypeError, AttributeError):
            raise BankFileError(f"{path}: corrupted metadata: bad or missing {key!r}: {meta.get(key)!r}") from None

    def positive(s: str) -> int:
        v = int(s)
        if v < 1:
            raise ValueError
        return v

    def count_(s: str) -> int:
        v = int(s)
        if v < 0:
            raise ValueError
        return v

    def beta_(s: str) -> Optional[float]:
        if s == "none":
            return None
        b = float(s)
        if not (math.isfinite(b) and b > 0):
            raise ValueError
        return b

    def sim_(s: str) -> str:
        if s not in SIMILARITIES:
            raise ValueError
        return s

    def sha_(s: str) -> str:
        if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
            raise ValueError
        return s

    dim = field("dim", positive)
    value_dim = field("value_dim", lambda s: None if s == "none" else positive(s))
    dtype = field("dtype", lambda s: _NAME_DTYPE[s])
    count = field("count", count_)
    similarity = field("similarity", sim_)
    beta = field("beta", beta_)
    sha = field("sha256", sha_)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(tensors) != {TENSOR_NAME}:
        raise BankFileError(f"{path}: corrupted header: expected one tensor {TENSOR_NAME!r}, found {sorted(tensors)}")
    info = FileInfo(path, dim, value_dim, dtype, count, similarity, beta, sha,
                    {k: v for k, v in meta.items() if k not in _OWN_KEYS and k != "layout"}, 8 + hlen)
    t = tensors[TENSOR_NAME]
    expected = {"dtype": _ST_DTYPE[dtype], "shape": [count, info.width], "data_offsets": [0, info.nbytes]}
    if not isinstance(t, dict) or {k: t.get(k) for k in expected} != expected:
        raise BankFileError(f"{path}: corrupted header: tensor {TENSOR_NAME!r} is {t}, the metadata implies {expected}")
    end = info.data_offset + info.nbytes
    if size < end:
        raise BankFileError(
            f"{path}: truncated: the header describes {count} rows ({info.nbytes} bytes of data) "
            f"but the file holds only {size - info.data_offset}"
        )
    if size > end:
        raise BankFileError(
            f"{path}: corrupted: {size - end} unexpected bytes after the {count} rows the header describes "
            "(an interrupted add to a disk bank?)"
        )
    return info


def _read_exact(f, buf: memoryview, where: str) -> None:
    got = f.readinto(buf)
    if got != len(buf):
        raise BankFileError(f"{where}: truncated while reading: the file shrank underneath")


def _stream_rows(info: FileInfo, progress: Optional[bool], desc: str):
    """Yield (first row, rows (m, width)) over the whole data region, read in IO_BYTES pieces into
    one reused buffer (bounded memory); return (as StopIteration's value) the sha256 of the data."""
    rows_per = max(1, IO_BYTES // info.row_bytes)
    buf = bytearray(min(info.count, rows_per) * info.row_bytes)
    view = memoryview(buf)
    h = hashlib.sha256()
    bar = _progress(info.nbytes, progress, desc, unit="B")
    try:
        with open(info.path, "rb") as f:
            f.seek(info.data_offset)
            for a in range(0, info.count, rows_per):
                m = min(rows_per, info.count - a)
                part = view[: m * info.row_bytes]
                _read_exact(f, part, info.path)
                h.update(part)
                bar.update(len(part))
                yield a, torch.frombuffer(buf, dtype=info.dtype, count=m * info.width).view(m, info.width)
    finally:
        bar.close()
    return h


def _drain(gen) -> str:
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def _check_digest(info: FileInfo, hasher) -> None:
    digest = hasher.hexdigest()
    if digest != info.sha256:
        raise BankFileError(
            f"{info.path}: corrupted: the sha256 of the data, {digest}, does not match the header's {info.sha256}"
        )


def _write_all(f, buf: memoryview) -> None:
    """Write every byte of ``buf`` (one home for the save path's writes; tests slow it down)."""
    f.write(buf)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_tmp(path: str) -> None:
    """Remove ``path.tmp-<pid>`` files left by saves whose process died."""
    directory, base = os.path.split(os.path.abspath(path))
    prefix = base + ".tmp-"
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix) or not name[len(prefix):].isdigit():
            continue
        pid = int(name[len(prefix):])
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to judge)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(directory, name))


def _as_bytes(rows: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    rows = rows.contiguous()
    return memoryview(rows.reshape(-1).view(torch.uint8).numpy())


# --- storage --------------------------------------------------------------------------

class _MemoryStore:
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
        p, v = self.view(a, b)
        rows = p if v is None else torch.cat([p, v], 1)
        return rows.to("cpu").contiguous()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _fadvise_willneed(fd: int, start: int, length: int) -> None:
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)


class _DiskStore:
    """Rows in a bank file: appended with pwrite, read through one mmap window per chunk."""

    def __init__(self, info: FileInfo, hasher: Optional["hashlib._Hash"], meta_fn, read_only: bool = False):
        self.path = os.path.abspath(info.path)
        self.dim, self.value_dim, self.dtype = info.dim, info.value_dim, info.dtype
        self.width, self.row_bytes, self.data_offset = info.width, info.row_bytes, info.data_offset
        self.count = info.count
        self.read_only = read_only
        self._hasher = hasher  # sha256 over the data so far; None until needed (after load(verify=False))
        self._meta_fn = meta_fn  # () -> (similarity, beta, metadata) for the header
        self._fd: Optional[int] = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)
        self._prefetcher: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._prefetched: Optional[concurrent.futures.Future] = None

    @classmethod
    def create(cls, path: str, dim: int, value_dim: Optional[int], dtype: torch.dtype, meta_fn) -> "_DiskStore":
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise ValueError(
                f"path: {path!r} already exists; open it with MemoryBank.load(path, storage='disk') "
                "or remove it first"
            ) from None
        os.close(fd)
        info = FileInfo(path, dim, value_dim, dtype, 0, "dot", None, hashlib.sha256().hexdigest(), {}, DATA_OFFSET)
        store = cls(info, hashlib.sha256(), meta_fn)
        store.write_header()
        store.flush()
        return store

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"bank: the disk bank {self.path!r} is closed")
        return self._fd

    def _digest(self) -> str:
        if self._hasher is None:  # loaded without verification: hash what is there once
            h = hashlib.sha256()
            for a in range(0, self.count, max(1, IO_BYTES // self.row_bytes)):
                b = min(self.count, a + max(1, IO_BYTES // self.row_bytes))
                h.update(os.pread(self.fd, (b - a) * self.row_bytes, self.data_offset + a * self.row_bytes))
            self._hasher = h
        return self._hasher.hexdigest()

    def write_header(self) -> None:
        similarity, beta, metadata = self._meta_fn()
        hdr = _header_bytes(self.dim, self.value_dim, self.dtype, self.count, similarity, beta, self._digest(),
                            metadata, self.data_offset)
        os.pwrite(self.fd, hdr, 0)

    def append(self, p: torch.Tensor, v: Optional[torch.Tensor]) -> None:
        if self.read_only:
            raise ValueError(f"bank: the disk bank {self.path!r} was opened read-only (the file is not writable)")
        self._digest()
        rows_per = max(1, IO_BYTES // self.row_bytes)
        for a in range(0, p.shape[0], rows_per):
            chunk = p[a: a + rows_per].to("cpu")
            if v is not None:
                chunk = torch.cat([chunk, v[a: a + rows_per].to("cpu")], 1)
            buf = _as_bytes(chunk)
            at = self.data_offset + self.count * self.row_bytes
            done = 0
            while done < len(buf):
                done += os.pwrite(self.fd, buf[done:], at + done)
            self._hasher.update(buf)
            self.count += chunk.shape[0]
        # Data first, then the header that counts it: a killed add leaves the old count.
        self.write_header()

    def window(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as a (b - a, width) tensor over a private memory map of just those bytes."""
        start = self.data_offset + a * self.row_bytes
        base = start - start % mmap.ALLOCATIONGRANULARITY
        length = (b - a) * self.row_bytes + (start - base)
        mm = mmap.mmap(self.fd, length, access=mmap.ACCESS_COPY, offset=base)
        # The tensor keeps the map alive; the map is unmapped when the last view of it dies.
        return torch.frombuffer(mm, dtype=self.dtype, count=(b - a) * self.width,
                                offset=start - base).view(b - a, self.width)

    def prefetch(self, a: int, b: int) -> None:
        """Start reading rows [a, b) into the page cache on a helper thread (fadvise WILLNEED blocks
        while it submits the reads; the kernel of the current chunk runs meanwhile, without the GIL).
        At most one prefetch is outstanding."""
        if not hasattr(os, "posix_fadvise") or self._fd is None:
            return
        if self._prefetcher is None:
            self._prefetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hen-bank-prefetch")
        if self._prefetched is not None:
            self._prefetched.result()
        start, length = self.data_offset + a * self.row_bytes, (b - a) * self.row_bytes
        self._prefetched = self._prefetcher.submit(_fadvise_willneed, self._fd, start, length)

    def split(self, rows: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return rows[:, : self.dim], None if self.value_dim is None else rows[:, self.dim:]

    def view(self, a: int, b: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.split(self.window(a, b))

    def rows_cpu(self, a: int, b: int) -> torch.Tensor:
        return self.window(a, b).clone()

    def flush(self) -> None:
        if self._fd is not None and not self.read_only:
            self.write_header()
            os.fsync(self._fd)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher, self._prefetched = None, None
        if self._fd is not None:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = None


# --- the bank -------------------------------------------------------------------------

class MemoryBank:
    """A growable bank of patterns (and optional values) that queries stream over in chunks.

    ``MemoryBank(dim, *, value_dim=None, dtype=torch.float32, device="cpu", storage="device",
    path=None, chunk_rows=None, similarity="dot", beta=None, backend=None, metadata=None)``

    - ``value_dim``: width of the stored values; None stores none (values are the patterns).
    - ``storage``: ``"device"``, ``"host"`` or ``"disk"`` (module docstring); ``path``, for disk
      only, names a new bank file (``MemoryBank.load(path, storage="disk")`` opens an existing one).
    - ``chunk_rows``: rows per kernel call; None picks the whole bank for device storage and a
      chunk of about 64 MiB (CPU) or 256 MiB (CUDA) otherwise.  Results do not depend on it
      beyond float rounding (DESIGN.md §5).
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
               disk_open: Optional[Tuple[FileInfo, object]] = None) -> None:
        self._dim = _check_int("dim", dim, 1)
        self._value_dim = None if value_dim is None else _check_int("value_dim", value_dim, 1)
        self._dtype = _check_dtype(dtype)
        self._device = _check_device(device)
        if not isinstance(storage, str):
            raise TypeError(f"storage: expected a str, one of {STORAGES}, got {type(storage).__name__}")
        if storage not in STORAGES:
            raise ValueError(f"storage: expected one of {STORAGES}, got {storage!r}")
        self._storage = storage
        self._chunk_rows = None if chunk_rows is None else _check_int("chunk_rows", chunk_rows, 1)
        self.similarity = check_similarity(similarity)
        self.beta = _check_beta_default(beta)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend: expected a str or None, got {type(backend).__name__}")
        self.backend = backend
        self.metadata = _check_metadata(metadata)
        if storage == "disk":
            if path is None:
                raise ValueError("path: storage='disk' needs the path of the bank file")
            path = _path("path", path)
            if sys.byteorder != "little":  # pragma: no cover
                raise ValueError("storage: bank files are little-endian (safetensors); this machine is not")
            if disk_open is None:
                self._store = _DiskStore.create(path, self._dim, self._value_dim, self._dtype, self._meta)
            else:
                info, hasher = disk_open
                self._store = _DiskStore(info, hasher, self._meta, read_only=not os.access(path, os.W_OK))
        else:
            if path is not None:
                raise ValueError(f"path: only storage='disk' keeps a file; got path with storage={storage!r}")
            host = storage == "host"
            where = torch.device("cpu") if host else self._device
            pin = host and self._device.type == "cuda"
            self._store = _MemoryStore(self._dim, self._value_dim, self._dtype, where, pin)

    def _meta(self):
        return self.similarity, self.beta, self.metadata

    # --- properties ---------------------------------------------------------------

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
        return self._store.path if isinstance(self._store, _DiskStore) else None

    @property
    def row_bytes(self) -> int:
        return (self._dim + (self._value_dim or 0)) * _itemsize(self._dtype)

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    @property
    def chunk_rows(self) -> int:
        """Rows per kernel call in the next query."""
        if self._chunk_rows is not None:
            return self._chunk_rows
        if self._storage == "device":
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

    def add(self, patterns: torch.Tensor, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append rows; returns their ids (int64, CPU), the global row numbers ``top_index`` reports."""
        p = _check_rows("patterns", patterns, self._dim, self._dtype)
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
            v = _check_rows("values", values, self._value_dim, self._dtype)
            if v.shape[0] != p.shape[0]:
                raise ValueError(f"values: expected {p.shape[0]} rows (one per pattern), got {v.shape[0]}")
        start = len(self)
        if p.shape[0]:
            self._store.append(p, v)
        return torch.arange(start, start + p.shape[0], dtype=torch.int64)

    def read(self, start: int = 0, stop: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rows [start, stop) as CPU copies: (patterns, values), values None when the bank stores none."""
        n = len(self)
        start = _check_int("start", start, 0)
        stop = n if stop is None else _check_int("stop", stop, 0)
        if not start <= stop <= n:
            raise ValueError(f"stop: expected start <= stop <= {n} (the bank's rows), got start={start}, stop={stop}")
        rows = self._store.rows_cpu(start, stop) if stop > start else torch.empty(
            (0, self._dim + (self._value_dim or 0)), dtype=self._dtype)
        p = rows[:, : self._dim].contiguous()
        return p, None if self._value_dim is None else rows[:, self._dim:].contiguous()

    # --- streaming ------------------------------------------------------------------

    def _chunks(self, rows: int) -> Iterator[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
        """(first row, patterns, values) on the bank's device, covering the bank in order."""
        if self._device.type == "cuda" and self._storage != "device":
            yield from self._cuda_chunks(rows)
            return
        n = len(self)
        disk = isinstance(self._store, _DiskStore)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            if disk and b < n:
                self._store.prefetch(b, min(n, b + rows))  # read the next window while this one computes
            p, v = self._store.view(a, b)
            yield a, p, v
            del p, v  # drop this window's map before the next one

    def _cuda_chunks(self, rows: int) -> Iterator[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
        """Host or disk rows streamed to the CUDA device through two buffers.

        The copy of chunk i+1 runs on ``copy`` while chunk i computes on the current stream:
        ``ready[s]`` (recorded on ``copy``) orders a slot's compute after its copy, ``free[s]``
        (recorded on the compute stream once the consumer has enqueued chunk i's work) orders the
        next copy into that slot after the compute that reads it.  A disk bank first copies each
        window into a pinned staging slot on the CPU, after the H2D copy that last read that slot
        has finished (``ready[s].synchronize()``).
        """
        dev = self._device
        n = len(self)
        if n == 0:
            return
        rows = min(rows, n)
        compute = torch.cuda.current_stream(dev)
        copy = torch.cuda.Stream(device=dev)
        disk = isinstance(self._store, _DiskStore)
        dv = self._value_dim

        def alloc(width: int, **kw) -> torch.Tensor:
            return torch.empty((rows, width), dtype=self._dtype, **kw)

        bufs = [(alloc(self._dim, device=dev), None if dv is None else alloc(dv, device=dev)) for _ in range(2)]
        stage = [(alloc(self._dim, pin_memory=True), None if dv is None else alloc(dv, pin_memory=True))
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
                    self._store.prefetch(starts[i + 1], min(n, starts[i + 1] + rows))
                if i >= 2:
                    ready[s].synchronize()  # the H2D copy of chunk i-2 has read stage[s]
                sp, sv = stage[s]
                wp, wv = self._store.view(a, a + m)
                sp[:m].copy_(wp)
                if sv is not None:
                    sv[:m].copy_(wv)
                del wp, wv
                src_p, src_v = sp[:m], None if sv is None else sv[:m]
            else:
                src_p, src_v = self._store.view(a, a + m)
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

    def _check_query(self, query: object, beta: object, similarity: object):
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
        return query, beta, similarity

    def _partial(self, query: torch.Tensor, beta: Beta, similarity: str, bar=None) -> Partial:
        running: Optional[Partial] = None
        gen = self._chunks(self.chunk_rows)
        try:
            for a, p, v in gen:
                part = ops.hopfield_partial(query, p, beta, similarity=similarity, values=v, offset=a,
                                            backend=self.backend)
                del p, v
                running = part if running is None else ops.merge_partials([running, part])
                if bar is not None:
                    bar.update(1)
        finally:
            gen.close()
        if running is None:  # an empty bank: the merge identity
            empty = torch.empty((0, self._dim), dtype=self._dtype, device=self._device)
            values = None if self._value_dim is None else torch.empty(
                (0, self._value_dim), dtype=self._dtype, device=self._device)
            running = ops.hopfield_partial(query, empty, beta, similarity=similarity, values=values,
                                           backend=self.backend)
        return running

    def _require_rows(self) -> None:
        if len(self) == 0:
            raise ValueError("bank: the bank is empty; add patterns before querying it")

    def partial(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
                progress: Optional[bool] = None) -> Partial:
        """The whole bank's Partial for ``query`` (..., B, dim); an empty bank gives the merge identity."""
        query, beta, similarity = self._check_query(query, beta, similarity)
        bar = _progress(self.num_chunks(), progress, "bank partial")
        try:
            return self._partial(query, beta, similarity, bar)
        finally:
            bar.close()

    def update(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
               progress: Optional[bool] = None) -> torch.Tensor:
        """One update over the whole bank, (..., B, value_dim) in the query's dtype: equals
        ``hk.hopfield_update(query, patterns, beta, similarity=..., values=values)``."""
        query, beta, similarity = self._check_query(query, beta, similarity)
        self._require_rows()
        bar = _progress(self.num_chunks(), progress, "bank update")
        try:
            return self._partial(query, beta, similarity, bar).finalize(query.dtype)
        finally:
            bar.close()

    def retrieve(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
                 max_steps: int = 1, tol: Optional[float] = None, progress: Optional[bool] = None) -> Retrieval:
        """Up to ``max_steps`` updates, each over the whole bank; a query stops once max|s_new - s| <= tol.

        Equals ``hk.hopfield_retrieve`` over the whole bank: the same loop, with a step that
        streams every chunk and merges.  A progress bar shows when the call runs long (module doc).
        """
        query, beta, similarity = self._check_query(query, beta, similarity)
        max_steps, tol = check_steps(max_steps, tol)
        self._require_rows()
        if max_steps > 1 and self.value_dim != self._dim:
            raise ValueError(
                f"values: multi-step retrieval feeds the output back as the query, so value_dim must equal "
                f"dim = {self._dim}, got value_dim = {self.value_dim}"
            )
        bar = _progress(max_steps * self.num_chunks(), progress, "bank retrieve")

        def step(state, memory, beta_, similarity_, values):
            return self._partial(state, beta_, similarity_, bar)

        try:
            return reference.retrieve(query, None, beta, similarity, None, max_steps, tol, partial_fn=step)
        finally:
            bar.close()

    # --- files ----------------------------------------------------------------------

    def _header(self, count: int, sha256: str) -> bytes:
        return _header_bytes(self._dim, self._value_dim, self._dtype, count, self.similarity, self.beta,
                             sha256, self.metadata)

    def save(self, path: PathLike, *, progress: Optional[bool] = None) -> None:
        """Write the bank to ``path`` atomically: a temporary file, fsync, rename, fsync of the directory.

        Until the rename, a bank already at ``path`` stays intact.  A disk bank saved to its own
        file only writes its header and fsyncs.
        """
        path = _path("path", path)
        if os.path.isdir(path):
            raise ValueError(f"path: {path!r} is a directory, expected a file name")
        if isinstance(self._store, _DiskStore) and os.path.exists(path) and os.path.samefile(path, self._store.path):
            self._store.flush()
            return
        n = len(self)
        tmp = f"{path}.tmp-{os.getpid()}"
        _remove_stale_tmp(path)
        rows_per = max(1, IO_BYTES // self.row_bytes)
        bar = _progress(self.nbytes, progress, "bank save", unit="B")
        try:
            with open(tmp, "wb") as f:
                f.write(b"\0" * DATA_OFFSET)
                h = hashlib.sha256()
                for a in range(0, n, rows_per):
                    buf = _as_bytes(self._store.rows_cpu(a, min(n, a + rows_per)))
                    _write_all(f, buf)
                    h.update(buf)
                    bar.update(len(buf))
                f.seek(0)
                f.write(self._header(n, h.hexdigest()))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        finally:
            bar.close()

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
        progress: Optional[bool] = None,
    ) -> "MemoryBank":
        """Open a bank file.  ``storage="disk"`` serves it from the file itself (memory-mapped, never
        read whole; later adds append to it); otherwise the rows are read into device or host memory.

        ``verify`` checks the sha256 of the data (a streamed read of the whole file; pass False to
        skip it for a huge bank).  A truncated or corrupted file raises :class:`BankFileError`.
        """
        if not isinstance(verify, bool):
            raise TypeError(f"verify: expected a bool, got {type(verify).__name__}")
        info = read_info(path)
        args = (info.dim, info.value_dim, info.dtype, device, storage)
        rest = (chunk_rows, info.similarity, info.beta, backend, info.metadata)
        bank = cls.__new__(cls)
        if storage == "disk":
            hasher = None
            if verify:
                hasher = _drain(_stream_rows(info, progress, "bank verify"))
                _check_digest(info, hasher)
            bank._setup(*args, info.path, *rest, disk_open=(info, hasher))
            return bank
        bank._setup(*args, None, *rest)
        bank._store.reserve(info.count)
        gen = _stream_rows(info, progress, "bank load")
        while True:
            try:
                _, rows = next(gen)
            except StopIteration as stop:
                hasher = stop.value
                break
            bank._store.append(rows[:, : info.dim], None if info.value_dim is None else rows[:, info.dim:])
        if verify:
            _check_digest(info, hasher)
        return bank

    def flush(self) -> None:
        """Disk storage: write the header and fsync the file (adds are durable after this)."""
        self._store.flush()

    def close(self) -> None:
        """Disk storage: flush and close the file; the bank is unusable afterwards."""
        self._store.close()

    def __enter__(self) -> "MemoryBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        store = getattr(self, "_store", None)
        if isinstance(store, _DiskStore) and store._prefetcher is not None:
            store._prefetcher.shutdown(wait=False)
        if isinstance(store, _DiskStore) and store._fd is not None:
            with contextlib.suppress(Exception):
                os.close(store._fd)
                store._fd = None

