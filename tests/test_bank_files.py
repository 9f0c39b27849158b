"""Bank files (issues 5, 13): lossless, safetensors-readable, and refused when any byte of header or data
changed, when the header is not the flat JSON a bank writes, or when the path is not a regular file."""
import hashlib
import json
import os
import random
import struct
import threading

import pytest
import torch

from hen_kernels.bank import BankBusyError, BankFileError, MemoryBank, read_info
from hen_kernels.bank import file_format
from hen_kernels.bank.file_format import DATA_OFFSET, HEADER_ROOM

from .conftest import DTYPES, make, rel_err

STORAGES = ["device", "host", "disk"]


def bits(t):
    """The raw bits of a tensor, for bit-for-bit comparison (NaN and -0 included)."""
    return t.contiguous().view(torch.uint8)


def new_bank(tmp_path, storage, dim, **kw):
    if storage == "disk":
        kw["path"] = tmp_path / f"bank-{len(list(tmp_path.iterdir()))}.hkb"
    return MemoryBank(dim, storage=storage, **kw)


def header_of(data: bytes) -> dict:
    return json.loads(data[8:DATA_OFFSET])


def with_header(data: bytes, header: dict, *, compact: bool = True) -> bytes:
    """``data`` under another header (the length prefix and padding kept right; no checksum fixed)."""
    js = json.dumps(header, separators=(",", ":") if compact else None).encode()
    assert len(js) <= HEADER_ROOM
    return data[:8] + js + b" " * (HEADER_ROOM - len(js)) + data[DATA_OFFSET:]


def raw_header(data: bytes, js: bytes) -> bytes:
    """``data`` under the header text ``js``, whatever it is."""
    assert len(js) <= HEADER_ROOM
    return struct.pack("<Q", HEADER_ROOM) + js + b" " * (HEADER_ROOM - len(js)) + data[DATA_OFFSET:]


def replaced(data: bytes, old: bytes, new: bytes) -> bytes:
    """A text edit of the header, re-padded so that the JSON stays valid and the page its size."""
    js = data[8:DATA_OFFSET].rstrip(b" ")
    assert js.count(old) == 1, old
    return raw_header(data, js.replace(old, new))


def refused(path, data, match=None, verify=(True, False)):
    """Every loader refuses ``data``; with verify=(True,), a damage only the data checksum sees."""
    path.write_bytes(data)
    if False in verify:
        with pytest.raises(BankFileError, match=match):
            read_info(path)
    for storage in STORAGES:
        for v in verify:
            with pytest.raises(BankFileError, match=match):
                MemoryBank.load(path, storage=storage, verify=v)


def _saved(tmp_path, n=40, d=8, **kw):
    bank = MemoryBank(d, **kw)
    bank.add(make((n, d), torch.float32, 24)) if "value_dim" not in kw else bank.add(
        make((n, d), torch.float32, 24), make((n, kw["value_dim"]), torch.float32, 25))
    path = tmp_path / "b.hkb"
    bank.save(path)
    return path, path.read_bytes()


# --- lossless, readable by safetensors ----------------------------------------------------

@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_values", [False, True])
def test_append_save_load_is_bit_for_bit(tmp_path, storage, dtype, with_values):
    d, dv = 7, 3
    x, v = make((50, d), dtype, 20, scale=3.0), make((50, dv), dtype, 21)
    x[3, 1] = -0.0
    kw = dict(value_dim=dv) if with_values else {}
    bank = new_bank(tmp_path, storage, d, dtype=dtype, similarity="l2", beta=0.25, metadata={"model": "m1"}, **kw)
    bank.add(x[:20], v[:20] if with_values else None)
    path = tmp_path / "saved.hkb"
    bank.save(path)
    bank.add(x[20:], v[20:] if with_values else None)  # append, save again over the old file
    bank.save(path)
    for load_storage in STORAGES:
        back = MemoryBank.load(path, storage=load_storage, chunk_rows=9)
        assert len(back) == 50 and back.dtype == dtype and back.dim == d
        assert back.similarity == "l2" and back.beta == 0.25 and back.metadata == {"model": "m1"}
        p, vals = back.read()
        assert torch.equal(bits(p), bits(x))
        if with_values:
            assert torch.equal(bits(vals), bits(v))
        else:
            assert vals is None
        q = x[:2].clone()
        # Loaded with chunk_rows=9, the bank merges other partials than the original: float32
        # rounding apart, except where a 16-bit bank's products run on 16-bit matrix paths (AMX,
        # AVX-512 BF16), which round each chunk's softmax weights to the bank's dtype before the
        # value product, as FlashAttention does (docs/design.md §5.1): then to that dtype's epsilon.
        tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert torch.equal(back.update(q), bank.update(q)) or rel_err(back.update(q), bank.update(q)) < tol
        back.close()
    bank.close()
    assert not list(tmp_path.glob("*.tmp-*"))


def test_file_is_safetensors_with_a_metadata_record(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    bank = MemoryBank(4, value_dim=2, dtype=torch.bfloat16, similarity="l2sq", beta=3.0)
    x, v = make((5, 4), torch.bfloat16, 22), make((5, 2), torch.bfloat16, 23)
    bank.add(x, v)
    bank.save(tmp_path / "b.safetensors")
    rows = load_file(str(tmp_path / "b.safetensors"))["rows"]
    assert torch.equal(rows, torch.cat([x, v], 1))
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["dim"] == "4" and meta["value_dim"] == "2" and meta["dtype"] == "bfloat16"
    assert meta["count"] == "5" and meta["similarity"] == "l2sq" and meta["beta"] == "3.0"
    assert meta["version"] == file_format.FORMAT_VERSION == "2"
    assert meta["sha256"] == hashlib.sha256(rows.view(torch.uint8).numpy().tobytes()).hexdigest()
    # header_sha256: the sha256 of the header page with its own 64 digits written as zeros
    data = (tmp_path / "b.safetensors").read_bytes()
    zeroed = data[:DATA_OFFSET].replace(meta["header_sha256"].encode(), b"0" * 64)
    assert hashlib.sha256(zeroed).hexdigest() == meta["header_sha256"]
    assert struct.unpack("<Q", data[:8])[0] + 8 == DATA_OFFSET


# --- refused: truncated, damaged, edited ---------------------------------------------------

def test_load_refuses_truncated_and_corrupted_files(tmp_path):
    path, good = _saved(tmp_path)
    bad = tmp_path / "bad.hkb"
    refused(bad, good[:-5], "truncated: the header describes 40 rows")
    refused(bad, good[:100], "truncated or not a bank file")
    refused(bad, good[:3], "too short")
    refused(bad, b"", "too short")
    flipped = bytearray(good)
    flipped[DATA_OFFSET + 77] ^= 0x10
    refused(bad, bytes(flipped), "corrupted: the sha256", verify=(True,))
    header = bytearray(good)
    header[20] = ord("}")
    refused(bad, bytes(header), "corrupted header|corrupted metadata|not a hen_kernels")
    meta = header_of(good)
    meta["__metadata__"]["count"] = "41"
    refused(bad, with_header(good, meta, compact=False), "corrupted header|truncated")
    from safetensors.torch import save_file
    save_file({"rows": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(BankFileError, match="not a hen_kernels bank file"):
        MemoryBank.load(bad)
    with pytest.raises(FileNotFoundError, match="path: no bank file"):
        MemoryBank.load(tmp_path / "missing.hkb")
    # verify=False skips only the data checksum: the damaged rows load, and say so by differing.
    bad.write_bytes(bytes(flipped))
    loose = MemoryBank.load(bad, verify=False)
    assert not torch.equal(loose.read()[0], MemoryBank.load(path).read()[0])


def test_bytes_after_the_committed_rows_are_an_uncommitted_add(tmp_path):
    """What a writer killed mid-add leaves (tests/test_bank_crash.py): readers ignore it, a writer cuts it."""
    path, good = _saved(tmp_path)
    path.write_bytes(good + b"\x01" * 100)
    assert read_info(path).tail_bytes == 100 and read_info(path).count == 40
    for storage in STORAGES:
        back = MemoryBank.load(path, storage=storage, read_only=True if storage == "disk" else None)
        assert torch.equal(back.read()[0], make((40, 8), torch.float32, 24))
        back.close()
    assert path.stat().st_size == len(good) + 100  # readers never write
    writer = MemoryBank.load(path, storage="disk")
    assert path.stat().st_size == len(good)
    writer.add(make((2, 8), torch.float32, 26))
    writer.close()
    assert len(MemoryBank.load(path)) == 42


def _bank_for_edits(tmp_path):
    return _saved(tmp_path, d=6, value_dim=2, similarity="dot", beta=2.0, metadata={"model": "m1"})


EDITS = {
    "beta": (b'"beta":"2.0"', b'"beta":"9.0"'),
    "similarity": (b'"similarity":"dot"', b'"similarity":"l2"'),
    "user metadata": (b'"model":"m1"', b'"model":"m2"'),
    "renamed user key": (b'"model":', b'"modem":'),
    "renamed own key": (b'"similarity":', b'"similaritx":'),
    "version downgrade": (b'"version":"2"', b'"version":"1"'),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_header_edits_are_refused(tmp_path, edit):
    """Issue 13 item 4: edits that keep the JSON valid (and canonical) loaded silently before."""
    path, good = _bank_for_edits(tmp_path)
    refused(tmp_path / "edited.hkb", replaced(good, *EDITS[edit]))


def test_consistent_header_rewrites_are_refused(tmp_path):
    """Edits that keep every field consistent with the others: only the header's checksum sees them."""
    path, good = _bank_for_edits(tmp_path)
    split = header_of(good)
    meta = split["__metadata__"]
    meta.update(dim="5", value_dim="3", layout="rows[:, :5] are the patterns, rows[:, 5:] the values")
    fewer = header_of(good)
    fewer["__metadata__"]["count"] = "39"  # drop the last row: shape and offsets follow
    fewer["rows"].update(shape=[39, 8], data_offsets=[0, 39 * 8 * 4])
    for header, data in ((split, good), (fewer, good[: DATA_OFFSET + 39 * 32])):
        refused(tmp_path / "edited.hkb", with_header(data, header), "header_sha256")


def test_every_single_byte_flip_of_the_header_is_refused(tmp_path):
    path, good = _bank_for_edits(tmp_path)
    page, size = good[:DATA_OFFSET], len(good)
    for i in range(DATA_OFFSET):
        for mask in (0x01, 0x03, 0x20, 0x80):
            flipped = bytearray(page)
            flipped[i] ^= mask
            with pytest.raises(BankFileError):
                file_format.parse_header(bytes(flipped), "p", size)
    rng = random.Random(0)
    bad = tmp_path / "flipped.hkb"
    for _ in range(40):  # and through the public loaders, header and data alike
        flipped = bytearray(good)
        flipped[rng.randrange(len(good))] ^= 1 << rng.randrange(8)
        refused(bad, bytes(flipped), verify=(True,))


NOT_FLAT = {
    "deeply nested": b'{"__metadata__":' + b"[" * 2000 + b"]" * 2000 + b"}",
    "only brackets": b"[" * HEADER_ROOM,
    "a list": b"[1,2]",
    "a string": b'"__metadata__"',
    "not utf-8": b'{"__metadata__":{"format":"\xff"}}',
}


@pytest.mark.parametrize("case", list(NOT_FLAT))
def test_header_that_is_not_a_flat_object_is_refused(tmp_path, case):
    path, good = _saved(tmp_path)
    refused(tmp_path / "bad.hkb", raw_header(good, NOT_FLAT[case]))


def _restructured(good, change):
    header = header_of(good)
    change(header)
    return with_header(good, header)


RESTRUCTURED = {
    "extra top-level key": lambda h: h.update(extra={}),
    "nested value": lambda h: h["__metadata__"].update(model={"a": "b"}),
    "number value": lambda h: h["__metadata__"].update(count=40),
    "list value": lambda h: h["__metadata__"].update(beta=["2.0"]),
    "missing key": lambda h: h["__metadata__"].pop("similarity"),
    "tensor extra key": lambda h: h["rows"].update(extra=1),
    "non-canonical int": lambda h: h["__metadata__"].update(dim="08"),
}


@pytest.mark.parametrize("case", list(RESTRUCTURED))
def test_header_of_other_keys_or_types_is_refused(tmp_path, case):
    path, good = _saved(tmp_path)
    refused(tmp_path / "bad.hkb", _restructured(good, RESTRUCTURED[case]))


def test_duplicate_keys_are_refused(tmp_path):
    path, good = _bank_for_edits(tmp_path)
    refused(tmp_path / "dup.hkb", replaced(good, b'"beta":"2.0"', b'"beta":"2.0","beta":"9.0"'), "duplicate")


def test_a_header_caught_mid_commit_is_read_again(tmp_path, monkeypatch):
    """A reader may read the header page while a writer rewrites it: a torn page that reads differently a
    moment later is read again; the same bad bytes twice are refused."""
    from hen_kernels.bank import file_io

    path, good = _saved(tmp_path)
    torn = good[:2000] + good[2000:DATA_OFFSET].replace(b" ", b"x", 1)
    real, reads = os.pread, []

    def pread(fd, n, offset):
        reads.append(offset)
        return torn if len(reads) == 1 and offset == 0 else real(fd, n, offset)

    monkeypatch.setattr(file_io.os, "pread", pread)
    assert read_info(path).count == 40 and reads == [0, 0]
    monkeypatch.setattr(file_io.os, "pread", lambda fd, n, offset: torn)
    with pytest.raises(BankFileError):
        read_info(path)


# --- special files ---------------------------------------------------------------------------

def _returns(fn, seconds=20.0):
    """fn()'s exception (or None), failing the test if fn blocks."""
    out = {}

    def run():
        try:
            fn()
            out["error"] = None
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert "error" in out, "blocked on a special file"
    return out["error"]


@pytest.mark.parametrize("kind", ["fifo", "/dev/null", "/dev/zero"])
def test_special_files_are_refused_without_blocking(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    else:
        path = kind
        if not os.path.exists(path):
            pytest.skip(f"no {path} here")
    calls = [lambda: read_info(path)]
    calls += [lambda s=s: MemoryBank.load(path, storage=s) for s in STORAGES]
    calls += [lambda: MemoryBank.load(path, storage="disk", read_only=True)]
    for call in calls:
        err = _returns(call)
        assert isinstance(err, BankFileError) and "not a bank file" in str(err), err


def test_directories_and_links(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        MemoryBank.load(tmp_path)
    path, good = _saved(tmp_path)
    link = tmp_path / "link.hkb"
    link.symlink_to(path)
    assert len(MemoryBank.load(link)) == 40


# --- version 1 -------------------------------------------------------------------------------

def _as_version_1(good: bytes) -> bytes:
    """The same bank as the version-1 writer wrote it: no header_sha256, the same layout."""
    header = header_of(good)
    header["__metadata__"].pop("header_sha256")
    header["__metadata__"]["version"] = "1"
    return with_header(good, header)


def test_version_1_files_still_load_and_are_written_as_version_2(tmp_path):
    path, good = _bank_for_edits(tmp_path)
    old = tmp_path / "v1.hkb"
    old.write_bytes(_as_version_1(good))
    assert read_info(old).version == "1"
    for storage in STORAGES:
        back = MemoryBank.load(old, storage=storage, read_only=True if storage == "disk" else None)
        assert len(back) == 40 and back.beta == 2.0 and back.metadata == {"model": "m1"}
        assert torch.equal(back.read()[1], make((40, 2), torch.float32, 25))
        back.close()
    refused(old, _as_version_1(good)[:-1], "truncated")
    old.write_bytes(_as_version_1(good) + b"\0" * 7)  # a version-1 bank killed in an add now loads
    writer = MemoryBank.load(old, storage="disk")
    writer.add(make((1, 6), torch.float32, 27), make((1, 2), torch.float32, 28))
    writer.close()
    assert read_info(old).version == "2" and len(MemoryBank.load(old)) == 41
    MemoryBank.load(path).save(old)
    assert read_info(old).version == "2"


# --- creation, growth and saves that must not leave or bless a bad file ----------------------

def test_failed_creation_leaves_no_file_and_a_retry_works(tmp_path):
    path = tmp_path / "new.hkb"
    with pytest.raises(ValueError, match="metadata: the header needs"):
        MemoryBank(4, storage="disk", path=path, metadata={"notes": "x" * 5000})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="^path: the folder .*no-such-dir.* does not exist"):
        MemoryBank(4, storage="disk", path=tmp_path / "no-such-dir" / "b.hkb")
    assert list(tmp_path.iterdir()) == []
    bank = MemoryBank(4, storage="disk", path=path, metadata={"notes": "short"})
    bank.add(make((3, 4), torch.float32, 29))
    bank.close()
    assert [p.name for p in tmp_path.iterdir()] == ["new.hkb"] and len(MemoryBank.load(path)) == 3
    with pytest.raises(ValueError, match="already exists"):
        MemoryBank(4, storage="disk", path=path)


def test_a_header_that_cannot_grow_refuses_the_add_before_writing(tmp_path):
    room = HEADER_ROOM - len(file_format.header_bytes(4, None, torch.float32, 0, "dot", None, "0" * 64,
                                                      {"notes": ""}).rstrip(b" ")) + 8
    path = tmp_path / "full.hkb"
    bank = MemoryBank(4, storage="disk", path=path, metadata={"notes": "x" * room})  # the page exactly full
    x = make((1000, 4), torch.float32, 30)
    size = path.stat().st_size
    with pytest.raises(ValueError, match="metadata: the header needs"):
        bank.add(x)  # "count":"1000" no longer fits
    assert path.stat().st_size == size and len(bank) == 0
    bank.close()
    assert len(MemoryBank.load(path)) == 0


def test_damaged_rows_are_not_given_a_fresh_checksum(tmp_path):
    path, good = _saved(tmp_path)
    flipped = bytearray(good)
    flipped[DATA_OFFSET + 5] ^= 0x40
    path.write_bytes(bytes(flipped))
    bank = MemoryBank.load(path, storage="disk", verify=False)
    with pytest.raises(BankFileError, match="sha256"):
        bank.add(make((1, 8), torch.float32, 31))
    with pytest.raises(BankFileError, match="sha256"):
        bank.save(tmp_path / "copy.hkb")
    assert not (tmp_path / "copy.hkb").exists() and not list(tmp_path.glob("*.tmp-*"))
    bank.close()
    assert path.read_bytes() == bytes(flipped)


def test_a_host_bank_loaded_unverified_does_not_save_damaged_rows(tmp_path):
    path, good = _saved(tmp_path)
    flipped = bytearray(good)
    flipped[DATA_OFFSET + 5] ^= 0x40
    path.write_bytes(bytes(flipped))
    for storage in ("host", "device"):
        bank = MemoryBank.load(path, storage=storage, verify=False)  # loads, as asked
        bank.add(make((1, 8), torch.float32, 31))
        with pytest.raises(BankFileError, match="sha256.*verify=False"):
            bank.save(tmp_path / "copy.hkb")
        with pytest.raises(BankFileError, match="sha256"):
            bank.save(path)
    assert not (tmp_path / "copy.hkb").exists() and path.read_bytes() == bytes(flipped)
    path.write_bytes(good)
    MemoryBank.load(path, storage="host", verify=False).save(tmp_path / "copy.hkb")  # undamaged rows save
    assert MemoryBank.load(tmp_path / "copy.hkb").read()[0].equal(MemoryBank.load(path).read()[0])


# Edits of a live bank that no header may hold: metadata's dict edited in place, and attributes set
# behind their setters' checks (the page is checked as it is written, whatever the way in).
HEADER_BREAKERS = [
    (TypeError, lambda b: b.metadata.__setitem__("n", 5)),
    (ValueError, lambda b: b.metadata.__setitem__("count", "1")),
    (ValueError, lambda b: setattr(b, "_beta", float("inf"))),
    (ValueError, lambda b: setattr(b, "_similarity", "cosine")),
]


def test_changed_similarity_beta_or_metadata_are_checked_before_a_header_is_written(tmp_path):
    x = make((3, 4), torch.float32, 37)
    bank = MemoryBank(4, beta=1.0, metadata={"user": "u"})
    for name, value, err in [("beta", 0.0, ValueError), ("beta", -2.0, ValueError), ("beta", "1", TypeError),
                             ("similarity", "cosine", ValueError), ("metadata", {"n": 5}, TypeError),
                             ("metadata", {"count": "1"}, ValueError)]:
        with pytest.raises(err, match=name):
            setattr(bank, name, value)
    assert (bank.beta, bank.similarity, bank.metadata) == (1.0, "dot", {"user": "u"})
    bank.add(x)
    saved = tmp_path / "saved.hkb"
    bank.save(saved)
    good = saved.read_bytes()
    for k, (err, edit) in enumerate(HEADER_BREAKERS):
        disk = MemoryBank(4, storage="disk", path=tmp_path / f"disk{k}.hkb", beta=1.0)
        disk.add(x)
        before = (tmp_path / f"disk{k}.hkb").read_bytes()
        host = MemoryBank.load(saved, storage="host")
        edit(disk)
        edit(host)
        for write in (lambda: disk.add(x), disk.flush, disk.close, lambda: host.save(saved)):
            with pytest.raises(err):
                write()
        assert (tmp_path / f"disk{k}.hkb").read_bytes() == before and saved.read_bytes() == good
        assert len(MemoryBank.load(tmp_path / f"disk{k}.hkb")) == 3 and len(MemoryBank.load(saved)) == 3


@pytest.mark.parametrize("write", ["save to its own file", "flush", "close"])
def test_changed_settings_of_an_open_disk_bank_reach_its_file(tmp_path, write):
    """A writable disk bank's changed beta, similarity and metadata are written to its file's header by a save
    to its own path, a flush or a close (a header left as it was, each way, had passed every test)."""
    path = tmp_path / "bank.hkb"
    bank = MemoryBank(4, storage="disk", path=path, beta=1.0)
    bank.add(make((3, 4), torch.float32, 38))
    bank.beta, bank.similarity, bank.metadata = 2.0, "l2", {"note": "x"}
    {"save to its own file": lambda: bank.save(path), "flush": bank.flush, "close": bank.close}[write]()
    again = MemoryBank.load(path, storage="host")
    assert (again.beta, again.similarity, again.metadata, len(again)) == (2.0, "l2", {"note": "x"}, 3)
    bank.close()


@pytest.mark.parametrize("change", ["beta", "similarity", "metadata"])
def test_a_read_only_bank_refuses_to_drop_changed_header_fields(tmp_path, change):
    """Saved to its own file (or flushed), a read-only disk bank can write nothing: with its similarity,
    beta or metadata changed that raises, where the save had returned and the change was lost."""
    path = tmp_path / "b.hkb"
    bank = MemoryBank(4, beta=1.0, metadata={"user": "u"})
    bank.add(make((3, 4), torch.float32, 38))
    bank.save(path)
    before = path.read_bytes()
    ro = MemoryBank.load(path, storage="disk", read_only=True)
    ro.save(path)  # nothing changed: nothing to write, no error
    ro.flush()
    setattr(ro, change, {"beta": 7.0, "similarity": "l2", "metadata": {"note": "x"}}[change])
    for write in (lambda: ro.save(path), ro.flush):
        with pytest.raises(ValueError, match=r"^bank: .* is read-only \(it was opened with read_only=True\)"):
            write()
    ro.save(tmp_path / "elsewhere.hkb")  # another path takes the change
    assert getattr(MemoryBank.load(tmp_path / "elsewhere.hkb"), change) == getattr(ro, change)
    ro.close()
    assert path.read_bytes() == before


def test_save_does_not_replace_a_bank_another_writer_holds(tmp_path):
    path = tmp_path / "live.hkb"
    writer = MemoryBank(4, storage="disk", path=path)
    writer.add(make((3, 4), torch.float32, 32))
    other = MemoryBank(4)
    other.add(make((5, 4), torch.float32, 33))
    with pytest.raises(BankBusyError, match="open for writing"):
        other.save(path)
    writer.add(make((1, 4), torch.float32, 34))  # the writer's file is still the one at path
    writer.close()
    assert len(MemoryBank.load(path)) == 4
    other.save(path)
    assert len(MemoryBank.load(path)) == 5
