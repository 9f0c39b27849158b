"""The bank file: one safetensors file that ``save``, ``load`` and disk storage share.

It holds a single tensor ``"rows"`` of shape (count, dim + value_dim),
row-major, little-endian, and a ``__metadata__`` record (format, version, dim,
value_dim, dtype, count, similarity and beta defaults, the sha256 of the data
region, any user metadata).  The header is padded with spaces so the data
starts at byte 4096 (page-aligned, and a disk bank can rewrite its header in
place as it grows).  :func:`write_atomically` writes a temporary file, fsyncs
it, renames it over the target and fsyncs the directory; :func:`read_info`
checks the header and the size, :func:`stream_rows` the checksum, and a
truncated or corrupted file is refused with :class:`BankFileError`.  Nothing is
ever unpickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from typing import Callable, Dict, Mapping, NamedTuple, Optional

import torch

from ..constants import SIMILARITIES
from ._checks import PathLike, check_path, progress_bar

FORMAT = "hen_kernels.MemoryBank"
FORMAT_VERSION = "1"
TENSOR_NAME = "rows"
DATA_OFFSET = 4096  # 8-byte length + the JSON header padded with spaces; data page-aligned
MIB = 2 ** 20
IO_BYTES = 16 * MIB  # bytes per read or write when saving, loading and verifying
_MAX_HEADER = 16 * MIB

_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPE = {v: k for k, v in _DTYPE_NAME.items()}
_OWN_KEYS = ("format", "version", "dim", "value_dim", "dtype", "count", "similarity", "beta", "sha256")


class BankFileError(ValueError):
    """A bank file that is truncated, corrupted, or not a hen_kernels bank."""


def check_metadata(metadata: object) -> Dict[str, str]:
    """User metadata for the header: str -> str, none of the keys the format writes itself."""
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
        return self.width * itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.count * self.row_bytes


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def header_bytes(dim: int, value_dim: Optional[int], dtype: torch.dtype, count: int, similarity: str,
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
                      "data_offsets": [0, count * width * itemsize(dtype)]},
    }
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    room = data_offset - 8
    if len(js) > room:
        raise ValueError(f"metadata: the header needs {len(js)} bytes, more than the {room} a bank file has room for")
    return struct.pack("<Q", room) + js + b" " * (room - len(js))


def read_info(path: PathLike) -> FileInfo:
    """Parse and check a bank file's header and size (not the checksum); BankFileError when it is bad."""
    path = check_path("path", path)
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


def stream_rows(info: FileInfo, progress: Optional[bool], desc: str):
    """Yield (first row, rows (m, width)) over the whole data region, read in IO_BYTES pieces into
    one reused buffer (bounded memory); return (as StopIteration's value) the sha256 of the data."""
    rows_per = max(1, IO_BYTES // info.row_bytes)
    buf = bytearray(min(info.count, rows_per) * info.row_bytes)
    view = memoryview(buf)
    h = hashlib.sha256()
    bar = progress_bar(info.nbytes, progress, desc, unit="B")
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


def drain(gen) -> str:
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def check_digest(info: FileInfo, hasher) -> None:
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


def as_bytes(rows: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    rows = rows.contiguous()
    return memoryview(rows.reshape(-1).view(torch.uint8).numpy())


def write_atomically(path: str, count: int, row_bytes: int, rows_cpu: Callable[[int, int], torch.Tensor],
                     header: Callable[[str], bytes], progress: Optional[bool]) -> None:
    """Write ``count`` rows, read as ``rows_cpu(start, stop)``, under the header ``header(sha256)``.

    A temporary file, fsync, rename over ``path``, fsync of the directory: until
    the rename a bank already at ``path`` stays intact, and a killed save leaves
    only a temporary file that the next save to ``path`` removes.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    _remove_stale_tmp(path)
    rows_per = max(1, IO_BYTES // row_bytes)
    bar = progress_bar(count * row_bytes, progress, "bank save", unit="B")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * DATA_OFFSET)
            h = hashlib.sha256()
            for a in range(0, count, rows_per):
                buf = as_bytes(rows_cpu(a, min(count, a + rows_per)))
                _write_all(f, buf)
                h.update(buf)
                bar.update(len(buf))
            f.seek(0)
            f.write(header(h.hexdigest()))
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
