"""The bank file's bytes: one safetensors file that ``save``, ``load`` and disk storage share.

Layout (format version 2; ``docs/memory_bank.md`` is the user's description):

- bytes [0, 4096): the header page, an 8-byte little-endian length (always
  4088) and a flat JSON object padded with spaces: ``"__metadata__"`` (str to
  str: format, version, dim, value_dim, dtype, count, similarity, beta,
  ``sha256`` of the data region, any user metadata, layout, and last
  ``header_sha256``) and ``"rows"`` (dtype, shape (count, dim + value_dim),
  data_offsets);
- bytes [4096, 4096 + count * row_bytes): the rows, row-major;
- anything after that is an add that had not committed when its writer died:
  readers ignore it, the next writer cuts it off.

``header_sha256`` is the sha256 of the whole header page with those 64 hex
digits written as zeros.  The header carries the data's sha256, so the two
checksums together cover every byte of header and data: the header is checked
on every open (cheap), the data when ``verify=True``.  A header is accepted
only if it is exactly the page this module would write for the values it
holds (canonical JSON, the expected keys, canonical numbers), so an edit that
keeps the JSON valid is refused as surely as one that breaks it.

Version 1 files (no ``header_sha256``; the checksum covered only the data)
are still read, with their header unprotected; saving one writes version 2.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Dict, Mapping, NamedTuple, Optional

import torch

from ..constants import SIMILARITIES
from ..validation import check_similarity
from ._checks import check_beta_default

FORMAT = "hen_kernels.MemoryBank"
FORMAT_VERSION = "2"
READ_VERSIONS = ("1", "2")
TENSOR_NAME = "rows"
DATA_OFFSET = 4096  # one page of header: the commit of an add is a single page-aligned write
HEADER_ROOM = DATA_OFFSET - 8
MIB = 2 ** 20
IO_BYTES = 16 * MIB  # bytes per read or write when saving, loading and verifying
EMPTY_SHA = hashlib.sha256().hexdigest()
_ZERO_SHA = "0" * 64

_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPE = {v: k for k, v in _DTYPE_NAME.items()}
# The keys the format writes itself, in the order it writes them (after any user metadata).
_OWN_KEYS = ("format", "version", "dim", "value_dim", "dtype", "count", "similarity", "beta", "sha256", "layout",
             "header_sha256")
_TENSOR_KEYS = ("dtype", "shape", "data_offsets")


class BankFileError(ValueError):
    """A bank file that is truncated, corrupted, edited, or not a hen_kernels bank."""


class BankBusyError(RuntimeError):
    """A disk bank that another writer (another process, or another bank object) holds open."""


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
        if k in _OWN_KEYS:
            raise ValueError(f"metadata: the key {k!r} is the bank's own; pick another name")
        out[k] = v
    return out


class FileInfo(NamedTuple):
    """What a bank file's header says, after every check but the data checksum."""

    path: str
    dim: int
    value_dim: Optional[int]
    dtype: torch.dtype
    count: int
    similarity: str
    beta: Optional[float]
    sha256: str  # of the data region
    metadata: Dict[str, str]
    data_offset: int
    version: str = FORMAT_VERSION
    tail_bytes: int = 0  # bytes after the committed rows: an add whose writer died before its commit

    @property
    def width(self) -> int:
        return self.dim + (self.value_dim or 0)

    @property
    def row_bytes(self) -> int:
        return self.width * itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.count * self.row_bytes

    @property
    def end(self) -> int:
        """Where the committed rows end."""
        return self.data_offset + self.nbytes


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _encode(header: dict) -> bytes:
    """The page for a header dict: length, compact JSON, spaces up to DATA_OFFSET."""
    js = json.dumps(header, separators=(",", ":")).encode("ascii")
    if len(js) > HEADER_ROOM:
        raise ValueError(f"metadata: the header needs {len(js)} bytes, more than the {HEADER_ROOM} "
                         "a bank file has room for")
    return struct.pack("<Q", HEADER_ROOM) + js + b" " * (HEADER_ROOM - len(js))


def _with_header_sha(header: dict, sha: str) -> dict:
    meta = dict(header["__metadata__"])
    meta["header_sha256"] = sha
    return {"__metadata__": meta, TENSOR_NAME: header[TENSOR_NAME]}


def _page_sha(header: dict) -> str:
    return hashlib.sha256(_encode(_with_header_sha(header, _ZERO_SHA))).hexdigest()


def header_bytes(dim: int, value_dim: Optional[int], dtype: torch.dtype, count: int, similarity: str,
                 beta: Optional[float], sha256: str, metadata: Mapping[str, str]) -> bytes:
    """The DATA_OFFSET-byte header page of a version-2 file (ValueError naming metadata if it does not fit).

    Every writer builds its page here, so similarity, beta and metadata (public attributes a caller
    may have changed since the constructor checked them) are checked here too: a page that
    parse_header would refuse is never written.
    """
    similarity, beta = check_similarity(similarity), check_beta_default(beta)
    meta = check_metadata(metadata)  # a copy: the format's own keys go after the user's
    width = dim + (value_dim or 0)
    meta.update(
        format=FORMAT, version=FORMAT_VERSION, dim=str(dim),
        value_dim="none" if value_dim is None else str(value_dim),
        dtype=_DTYPE_NAME[dtype], count=str(count), similarity=similarity,
        beta="none" if beta is None else repr(float(beta)), sha256=sha256,
        layout=f"rows[:, :{dim}] are the patterns" + ("" if value_dim is None else f", rows[:, {dim}:] the values"),
        header_sha256=_ZERO_SHA,
    )
    header = {
        "__metadata__": meta,
        TENSOR_NAME: {"dtype": _ST_DTYPE[dtype], "shape": [count, width],
                      "data_offsets": [0, count * width * itemsize(dtype)]},
    }
    page = _encode(header)
    return _encode(_with_header_sha(header, hashlib.sha256(page).hexdigest()))


# --- reading a header page -------------------------------------------------------------------

def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    return dict(pairs)


def _canonical_int(s: str, minimum: int) -> int:
    # int() would also take " 12", "+12", "1_2" and "012": a header holds only what str(int) writes
    if not isinstance(s, str) or not s.isascii() or not s.isdigit():
        raise ValueError
    v = int(s)
    if str(v) != s or v < minimum:
        raise ValueError
    return v


def _beta(s: str) -> Optional[float]:
    if s == "none":
        return None
    b = float(s)
    if not (math.isfinite(b) and b > 0) or repr(b) != s:
        raise ValueError
    return b


def _choice(options):
    def parse(s: str):
        if s not in options:
            raise ValueError
        return s
    return parse


def _hex64(s: str) -> str:
    if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
        raise ValueError
    return s


def parse_header(page: bytes, path: str, size: int) -> FileInfo:
    """Check a header page (the first DATA_OFFSET bytes, or fewer for a short file) against the
    file's size; BankFileError for anything but a header this module wrote, untouched."""
    if len(page) < 8:
        raise BankFileError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
    (hlen,) = struct.unpack("<Q", page[:8])
    if hlen != HEADER_ROOM:
        if 8 + hlen > size:
            raise BankFileError(f"{path}: truncated or not a bank file: the header claims {hlen} bytes, "
                                f"the file has {size}")
        raise BankFileError(f"{path}: not a hen_kernels bank file: a {hlen}-byte header where a bank "
                            f"file has {HEADER_ROOM}")
    if len(page) < DATA_OFFSET:
        raise BankFileError(f"{path}: truncated or not a bank file: the header claims {hlen} bytes, "
                            f"the file has {size}")
    try:
        header = json.loads(page[8:].decode("ascii"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise BankFileError(f"{path}: corrupted header: not the JSON a bank file holds ({e})") from None
    except RecursionError:
        raise BankFileError(f"{path}: corrupted header: nested too deeply for a bank file's flat JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise BankFileError(f"{path}: not a hen_kernels bank file: the safetensors header has no __metadata__")
    meta = header["__metadata__"]
    if meta.get("format") != FORMAT:
        raise BankFileError(f"{path}: not a hen_kernels bank file: metadata format is {meta.get('format')!r}")
    version = meta.get("version")
    if version not in READ_VERSIONS:
        raise BankFileError(f"{path}: bank file version {version!r}; this code reads {READ_VERSIONS}")
    if list(header) != ["__metadata__", TENSOR_NAME]:
        raise BankFileError(f"{path}: corrupted header: expected the keys ['__metadata__', {TENSOR_NAME!r}], "
                            f"found {list(header)}")
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise BankFileError(f"{path}: corrupted metadata: the values of {bad} are not strings")
    own = [k for k in _OWN_KEYS if k != "header_sha256" or version != "1"]
    order = [k for k in meta if k in _OWN_KEYS]
    if order != own:
        raise BankFileError(f"{path}: corrupted metadata: expected the keys {own} (in this order) after any "
                            f"user metadata, found {order}")
    if list(meta)[-len(own):] != own:
        raise BankFileError(f"{path}: corrupted metadata: user metadata after the bank's own keys")
    try:
        canonical = _encode(header)
    except ValueError:
        canonical = b""
    if canonical != page[:DATA_OFFSET]:
        raise BankFileError(f"{path}: corrupted header: its bytes are not the header a bank file writes "
                            "for the values it holds (edited?)")
    if version != "1":
        claimed = meta["header_sha256"]
        if _page_sha(header) != claimed:
            raise BankFileError(f"{path}: corrupted header: its sha256 does not match header_sha256 {claimed} "
                                "(edited or damaged)")

    def field(key: str, parse):
        try:
            return parse(meta[key])
        except (KeyError, ValueError, TypeError, AttributeError):
            raise BankFileError(f"{path}: corrupted metadata: bad or missing {key!r}: {meta.get(key)!r}") from None

    dim = field("dim", lambda s: _canonical_int(s, 1))
    value_dim = field("value_dim", lambda s: None if s == "none" else _canonical_int(s, 1))
    dtype = field("dtype", lambda s: _NAME_DTYPE[s])
    count = field("count", lambda s: _canonical_int(s, 0))
    similarity = field("similarity", _choice(SIMILARITIES))
    beta = field("beta", _beta)
    sha = field("sha256", _hex64)
    user = {k: v for k, v in meta.items() if k not in _OWN_KEYS}
    info = FileInfo(path, dim, value_dim, dtype, count, similarity, beta, sha, user, DATA_OFFSET, version)
    layout = f"rows[:, :{dim}] are the patterns" + ("" if value_dim is None else f", rows[:, {dim}:] the values")
    if meta["layout"] != layout:
        raise BankFileError(f"{path}: corrupted metadata: layout {meta['layout']!r} where dim and value_dim "
                            f"imply {layout!r}")
    t = header[TENSOR_NAME]
    expected = {"dtype": _ST_DTYPE[dtype], "shape": [count, info.width], "data_offsets": [0, info.nbytes]}
    if not isinstance(t, dict) or list(t) != list(_TENSOR_KEYS) or t != expected:
        raise BankFileError(f"{path}: corrupted header: tensor {TENSOR_NAME!r} is {t}, the metadata implies {expected}")
    if size < info.end:
        raise BankFileError(
            f"{path}: truncated: the header describes {count} rows ({info.nbytes} bytes of data) "
            f"but the file holds only {size - info.data_offset}"
        )
    return info._replace(tail_bytes=size - info.end)
