"""The bank file on the operating system: opening, locking, reading, atomic writes.

- :func:`open_regular` opens only regular files, and never blocks (a FIFO or a
  device is refused before anything is read from it);
- :func:`lock_writer` takes the writer's advisory lock (``flock``, exclusive,
  non-blocking): one writer per file, across processes and within one;
  readers take no lock and are never refused;
- :func:`read_info` reads and checks the header page (:mod:`.file_format`);
- :func:`stream_rows` reads the committed rows in bounded pieces and hashes them;
- :func:`write_atomically` (``save``) and :func:`create_exclusive` (a new disk
  bank) never leave a half-written file under the bank's name;
  :func:`replaced_on_success` does the same for a small file saved alongside.

Nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import time
from typing import Callable, Optional

import torch

from ._checks import PathLike, check_path, progress_bar
from .file_format import DATA_OFFSET, IO_BYTES, BankBusyError, BankFileError, FileInfo, parse_header

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_TORN_RETRIES = 50  # re-reads of a header that a concurrent commit may be rewriting


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_special(path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise ValueError(f"path: {path!r} is a directory, expected a bank file")
    if not stat.S_ISREG(mode):
        raise BankFileError(f"{path}: {_kind(mode)}, not a bank file (a bank file is a regular file)")


def open_regular(path: PathLike, *, write: bool = False) -> int:
    """A file descriptor of the regular file ``path``; refuses anything else without blocking on it."""
    path = check_path("path", path)
    try:
        _refuse_special(path, os.stat(path).st_mode)  # before open(): opening a FIFO or a device may block
        fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK | _O_CLOEXEC | _O_NOCTTY)
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no bank file at {path!r}") from None
    try:
        _refuse_special(path, os.fstat(fd).st_mode)  # what was opened, should the name have changed meanwhile
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_writer(fd: int, path: str) -> None:
    """The writer's lock on an open bank file (flock: per open file, released when it is closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise BankBusyError(
            f"path: {path!r} is open for writing by another process (or another bank in this one); "
            "a bank file has one writer at a time. Close the other writer, or open this one with "
            "MemoryBank.load(path, storage='disk', read_only=True) to read it"
        ) from None


def read_info(path_or_fd, path: Optional[str] = None) -> FileInfo:
    """Parse and check a bank file's header and size (not the data checksum); BankFileError when bad.

    Takes a path, or an open descriptor and its path.  A header that fails its checks but reads
    differently a moment later was being rewritten by a writer's commit: it is read again.
    """
    if isinstance(path_or_fd, int) and not isinstance(path_or_fd, bool):
        fd, own = path_or_fd, False
    else:
        path = check_path("path", path_or_fd)
        fd, own = open_regular(path), True
    try:
        last = None
        for _ in range(_TORN_RETRIES):
            size = os.fstat(fd).st_size
            page = os.pread(fd, DATA_OFFSET, 0)
            try:
                return parse_header(page, path, size)
            except BankFileError:
                if page == last:
                    raise
                last = page
                time.sleep(0.001)
        return parse_header(page, path, size)
    finally:
        if own:
            os.close(fd)


def _pread_into(fd: int, buf: memoryview, offset: int, where: str) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise BankFileError(f"{where}: truncated while reading: the file shrank underneath")
        done += got


def stream_rows(fd: int, info: FileInfo, progress: Optional[bool], desc: str):
    """Yield (first row, rows (m, width)) over the committed rows, read in IO_BYTES pieces into one
    reused buffer (bounded memory); return (as StopIteration's value) the sha256 of the data."""
    rows_per = max(1, IO_BYTES // info.row_bytes)
    buf = bytearray(min(info.count, rows_per) * info.row_bytes)
    view = memoryview(buf)
    h = hashlib.sha256()
    bar = progress_bar(info.nbytes, progress, desc, unit="B")
    try:
        for a in range(0, info.count, rows_per):
            m = min(rows_per, info.count - a)
            part = view[: m * info.row_bytes]
            _pread_into(fd, part, info.data_offset + a * info.row_bytes, info.path)
            h.update(part)
            bar.update(len(part))
            yield a, torch.frombuffer(buf, dtype=info.dtype, count=m * info.width).view(m, info.width)
    finally:
        bar.close()
    return h


def drain(gen):
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def check_digest(info: FileInfo, digest: str) -> None:
    if digest != info.sha256:
        raise BankFileError(
            f"{info.path}: corrupted: the sha256 of the data, {digest}, does not match the header's {info.sha256}"
        )


def as_bytes(rows: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    rows = rows.contiguous()
    return memoryview(rows.reshape(-1).view(torch.uint8).numpy())


def pwrite_all(fd: int, buf, at: int) -> None:
    buf = memoryview(buf)
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], at + done)


def _write_all(f, buf: memoryview) -> None:
    """Write every byte of ``buf`` (one home for the save path's writes; tests slow it down)."""
    f.write(buf)


def fsync_dir(directory: str) -> None:
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


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def remove_stale_tmp(path: str) -> None:
    """Remove ``path.tmp-<pid>`` files left by saves and creations whose process died."""
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


@contextlib.contextmanager
def _target_locked(path: str):
    """Hold the writer's lock of a bank file about to be replaced: a disk bank that another writer has
    open must not be renamed away underneath it (its later adds would go to an unlinked file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        yield
        return
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"path: {path!r} is a directory, expected a file name")
    if not stat.S_ISREG(st.st_mode):
        yield
        return
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _O_CLOEXEC | _O_NOCTTY)
    try:
        lock_writer(fd, path)
        yield
    finally:
        os.close(fd)


def write_atomically(path: str, count: int, row_bytes: int, rows_cpu: Callable[[int, int], torch.Tensor],
                     header: Callable[[str], bytes], progress: Optional[bool]) -> None:
    """Write ``count`` rows, read as ``rows_cpu(start, stop)``, under the page ``header(data sha256)``.

    A temporary file, fsync, rename over ``path``, fsync of the directory: until the rename a
    bank already at ``path`` stays intact, and a killed save leaves only a temporary file that
    the next save to ``path`` removes.  ``header`` may raise to refuse the rows it was shown.
    """
    tmp = _tmp_name(path)
    remove_stale_tmp(path)
    rows_per = max(1, IO_BYTES // row_bytes)
    bar = progress_bar(count * row_bytes, progress, "bank save", unit="B")
    try:
        with _target_locked(path):
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
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    finally:
        bar.close()


@contextlib.contextmanager
def replaced_on_success(path: str, data: bytes):
    """``data`` written and fsynced under a temporary name, renamed over ``path`` once the block ends
    without an error (removed otherwise): a file that must change only if another file's save does."""
    tmp = _tmp_name(path)
    remove_stale_tmp(path)
    try:
        with open(tmp, "wb") as f:
            _write_all(f, memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        yield
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _exists_error(path: str) -> ValueError:
    return ValueError(f"path: {path!r} already exists; open it with MemoryBank.load(path, storage='disk') "
                      "or remove it first")


def check_new_bank_path(path: str) -> None:
    """Refuse, naming ``path``, a disk bank's path where no bank can be created: one that exists, or one in a
    folder that does not (the creation had failed on the name of its temporary file)."""
    if os.path.lexists(path):
        raise _exists_error(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path: the folder {folder!r} of {path!r} does not exist (or is not a folder); create it "
                         "first")


def _new_file(name: str, page: bytes) -> int:
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
    try:
        lock_writer(fd, name)
        pwrite_all(fd, page, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(name)
        raise
    return fd


def create_exclusive(path: str, page: bytes) -> int:
    """Create the bank file ``path`` holding only ``page`` and return it open for writing, locked.

    The page is written and fsynced under a temporary name first and then linked to ``path``
    (which fails if ``path`` exists), so ``path`` never names a file without its header: a
    creation that fails leaves nothing behind, and a retry works.  (Where the file system has no
    hard links, the file is created in place and removed again if writing its page fails.)
    """
    check_new_bank_path(path)
    remove_stale_tmp(path)
    tmp = _tmp_name(path)
    fd = _new_file(tmp, page)
    try:
        os.link(tmp, path)
    except FileExistsError:
        os.close(fd)
        raise _exists_error(path) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        fd = -1
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    if fd < 0:
        try:
            fd = _new_file(path, page)
        except FileExistsError:
            raise _exists_error(path) from None
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return fd
