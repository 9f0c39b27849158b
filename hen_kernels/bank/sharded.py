"""ShardedMemoryBank: one logical bank split over the ranks of a torch.distributed group.

Each rank holds a shard in a local :class:`~hen_kernels.MemoryBank` (any storage),
computes its shard's :class:`~hen_kernels.Partial` for the (replicated) queries,
and the ranks exchange Partials with one ``all_gather`` per field (out and lse in
float64, as the local merge over chunks keeps them); every rank then merges the
same list in the same order with :func:`hen_kernels.merge_partials` and rounds once,
so every rank holds the same answer, and it equals one bank holding every row
(docs/design.md §2).  Multi-step retrieval is the one loop of
:func:`hen_kernels.streaming.retrieve` with that gathered step: ranks take their
decisions from identical merged results, so they stay in lockstep.

Row ids are global and follow the order of addition: ``add`` (every rank passes
the same rows; each keeps a contiguous slice) and ``add_local`` (each rank passes
its own rows; ids run rank by rank) are collectives, as are ``partial``,
``update``, ``retrieve``, ``save`` and ``load``: every rank must call them
together with the same queries and arguments.

Works over gloo (CPU tensors) and NCCL (each rank's bank on its own GPU) alike:
the collectives run on the bank's device.  See ``docs/memory_bank.md`` for
``torchrun`` on several machines.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import ops, streaming
from ..checksums import row_checksums
from ..constants import SIMILARITY_CODES
from ..types import Beta, Partial, Retrieval
from ..validation import check_steps
from ._checks import PathLike, check_path, progress_bar
from .file_format import BankFileError
from .file_io import open_regular, replaced_on_success
from .memory_bank import MemoryBank

SHARD_KEY = "hen_kernels.shard"
RUNS_SUFFIX = ".runs"  # the file beside a saved shard that holds its rows' global ids


def shard_path(path: PathLike, rank: int) -> str:
    """This rank's file for ``path``: ``path`` with ``{rank}`` filled in, else ``path.rank<r>``."""
    p = check_path("path", path)
    return p.format(rank=rank) if "{rank}" in p else f"{p}.rank{rank}"


def _read_runs(shard: str, sha256: str) -> list:
    """The runs :meth:`ShardedMemoryBank.save` wrote beside ``shard``, checked against its record's sha256."""
    path = shard + RUNS_SUFFIX
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"path: {path!r} is missing: it holds the global row ids of the shard {shard!r} "
                                "and goes with it") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BankFileError(f"{path}: not the row ids saved with {shard!r}: its sha256 does not match the "
                            "shard's record (damaged, or a save was interrupted between the two files)")
    return json.loads(data)


# top_index of a shard whose rank refused a query (kernels give -1 or a row, never this)
REFUSED = -2


def _exchange(error: Optional[BaseException], payload, group) -> list:
    """Every rank's (error message or None, payload), in rank order: one all_gather_object."""
    said: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(said, (None if error is None else f"{type(error).__name__}: {error}", payload), group=group)
    return said


def _raise_if_any_failed(error: Optional[BaseException], said: list, failed_msg) -> None:
    """A rank that failed raises its own error; the others a ValueError naming the first rank that failed
    (``failed_msg(rank, its message)``), so that every rank raises, and none waits in a later collective."""
    if error is not None:
        raise error
    failed = [(r, m) for r, (m, _) in enumerate(said) if m is not None]
    if failed:
        raise ValueError(failed_msg(*failed[0]) + (f"; and {len(failed) - 1} more rank(s) failed" if len(failed) > 1
                                                   else ""))


def _ids(a: int, b: int) -> str:
    return f"id {a}" if b == a + 1 else f"ids {a}-{b - 1}"


def _check_shards(path: PathLike, shards: list) -> None:
    """The shards every rank loaded are one save's: the same size and save, and their runs tile [0, count)."""
    counts = [s[1] for s in shards]
    if any(c != counts[0] for c in counts):
        raise ValueError(f"path: the shards of {path!r} disagree on the bank's size: {counts}")
    count, files = counts[0], [s[0] for s in shards]
    spans = sorted((gs, n, r) for r, s in enumerate(shards) for gs, n in s[3])
    problems, end, owner = [], 0, None
    for gs, n, r in spans:
        if gs > end:
            after = "" if owner is None else f"rank {owner}'s file {files[owner]!r} ends at id {end - 1}, "
            problems.append(f"no shard holds {_ids(end, gs)} ({after}rank {r}'s file {files[r]!r} goes on at id {gs})")
        elif gs < end:
            problems.append(f"{_ids(gs, min(end, gs + n))} are held twice (by rank {owner}'s file "
                            f"{files[owner]!r} and rank {r}'s file {files[r]!r})")
        if gs + n > end:
            end, owner = gs + n, r
    if end < count:
        after = "" if owner is None else f" (rank {owner}'s file {files[owner]!r} ends at id {end - 1})"
        problems.append(f"no shard holds {_ids(end, count)}{after}")
    elif end > count:
        problems.append(f"rank {owner}'s file {files[owner]!r} holds {_ids(count, end)}, beyond the bank's "
                        f"{count} rows")
    if problems:
        raise ValueError(f"path: the shards of {path!r} do not hold each id of the bank's {count} rows once: "
                         + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
                         + " (shards from different saves?)")
    saves = [s[2] for s in shards]
    if any(t != saves[0] for t in saves):
        other = next(r for r, t in enumerate(saves) if t != saves[0])
        raise ValueError(f"path: the shards of {path!r} come from different saves: rank 0's file {files[0]!r} "
                         f"from one, rank {other}'s file {files[other]!r} from another (a save that failed on "
                         "some rank, or files copied from several saves); load the shards of one save")


def _fingerprint(t: Optional[torch.Tensor]) -> List[int]:
    """Two int64 checksums of the rows' bits: their ``row_checksums`` summed, and summed weighted by row number
    (rows swapped change it), at a small part of the cost of checking the rows finite."""
    if t is None or t.shape[0] == 0:
        return [0, 0]
    rows = row_checksums(t)
    weights = torch.arange(1, t.shape[0] + 1, dtype=torch.int64, device=rows.device)
    return [int(rows.sum()), int((rows * weights).sum())]


def _float_bits(x: float) -> int:
    """A float's float64 bits as an int64."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


# What _collective_args gathers of each call, after a 1 (0: the rank refused its arguments): the argument's
# name and its ints.
_CALL_FIELDS = (("similarity", 1), ("query", 3), ("beta", 2), ("weights", 2), ("max_steps and tol", 2))


class ShardedMemoryBank:
    """A bank whose rows are spread over the ranks of ``group`` (the default group when None).

    Takes MemoryBank's arguments; with ``storage="disk"`` each rank keeps its shard in
    :func:`shard_path` (``path``, ``rank``).  ``torch.distributed`` must be initialised.
    """

    def __init__(self, dim: int, *, group: Optional[dist.ProcessGroup] = None,
                 path: Optional[PathLike] = None, _local: Optional[MemoryBank] = None, **bank_kw):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ShardedMemoryBank: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group(...) first (torchrun sets up its environment)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if _local is None:
            if path is not None:
                path = shard_path(path, self.rank)
            _local = MemoryBank(dim, path=path, **bank_kw)
        self.local = _local
        # Global ids of local rows: runs (local start, global start, length), both increasing.
        self._runs: List[Tuple[int, int, int]] = []
        self._count = 0
        self._check_same_layout()

    # --- construction from existing shards -----------------------------------------

    @classmethod
    def from_local(cls, bank: MemoryBank, *, group: Optional[dist.ProcessGroup] = None) -> "ShardedMemoryBank":
        """Wrap each rank's own bank (collective); global ids run rank by rank: rank 0's rows first."""
        if not isinstance(bank, MemoryBank):
            raise TypeError(f"bank: expected a MemoryBank, got {type(bank).__name__}")
        self = cls(bank.dim, group=group, _local=bank)
        counts = self._gather_ints([len(bank)])
        before = sum(c[0] for c in counts[: self.rank])
        if len(bank):
            self._runs.append((0, before, len(bank)))
        self._count = sum(c[0] for c in counts)
        return self

    @staticmethod
    def _load_shard(mine: str, rank: int, world: int, load_kw: dict):
        """This rank's shard, its runs and its record, checked against the rows it holds."""
        local = MemoryBank.load(mine, **load_kw)
        record = local.metadata.get(SHARD_KEY)
        if record is None:
            raise ValueError(f"path: {mine!r} is not a shard written by ShardedMemoryBank.save "
                             f"(no {SHARD_KEY!r} metadata); wrap plain banks with ShardedMemoryBank.from_local")
        info = json.loads(record)
        if info["world_size"] != world or info["rank"] != rank:
            raise ValueError(f"path: {mine!r} is shard {info['rank']} of {info['world_size']}, "
                             f"but this is rank {rank} of {world}")
        # Shards saved before the runs moved beside them hold the runs in the record itself.
        runs = info["runs"] if "runs" in info else _read_runs(mine, info["runs_sha256"])
        if sum(r[2] for r in runs) != len(local):
            raise ValueError(f"path: {mine!r} holds {len(local)} rows but its shard record counts "
                             f"{sum(r[2] for r in runs)}: rows were added after ShardedMemoryBank.save")
        at = 0
        for ls, gs, n in runs:  # save writes runs that follow one another through the local rows
            if ls != at or n <= 0 or gs < 0:
                raise BankFileError(f"{mine}: its runs {runs[:8]}... do not cover its rows in order")
            at += n
        return local, runs, info

    @classmethod
    def load(cls, path: PathLike, *, group: Optional[dist.ProcessGroup] = None, **load_kw) -> "ShardedMemoryBank":
        """Each rank loads :func:`shard_path` (``path``, rank), written by :meth:`save` (collective).

        ``load_kw`` go to :meth:`MemoryBank.load` (storage, device, chunk_rows, verify, ...).
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedMemoryBank.load: torch.distributed is not initialised")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        # Every rank learns whether every shard loaded, and each shard's size, save and global ids, in one
        # collective before any goes on: a rank that raised alone would leave the others in the next
        # collective, to fail there with the process group's error; and shards that do not make one bank
        # together (say, from different saves) are refused by every rank with the same error.
        error, local, payload = None, None, None
        try:
            mine = shard_path(path, rank)
            local, runs, info = cls._load_shard(mine, rank, world, load_kw)
            payload = (mine, info["count"], info.get("save"), [(r[1], r[2]) for r in runs])
        except Exception as e:  # (not BaseException: an interrupt is not for the other ranks to report)
            error = e
        said = _exchange(error, payload, group)
        try:
            _raise_if_any_failed(error, said, lambda r, m: f"path: the shard of rank {r} of {path!r} did not "
                                                           f"load ({m})")
            _check_shards(path, [p for _, p in said])
        except BaseException:
            if local is not None:
                local.close()
            raise
        self = cls(local.dim, group=group, _local=local)
        self._runs = [tuple(r) for r in runs]
        self._count = info["count"]
        return self

    def save(self, path: PathLike, *, progress: Optional[bool] = None) -> None:
        """Each rank saves its shard atomically to :func:`shard_path` (``path``, rank), and its rows' global
        ids (runs) beside it, to that path + ``".runs"`` (collective).

        Every rank first checks what it can (the path, that the shard's header has room for its record);
        if any rank fails that, no rank writes and every rank raises. A write that fails on some rank
        (an OSError, say) also makes every rank raise; the shards written meanwhile are from another save
        than the others, which :meth:`load` refuses. A failed save leaves the bank as it was, on every rank.
        """
        # The runs grow with every add and the header page does not: they go to a file of their own,
        # which the record in the header names by its sha256. The record names the save too (an id
        # drawn by rank 0), so that load refuses shards from different saves.
        metadata = self.local.metadata
        before = metadata.get(SHARD_KEY)
        runs = json.dumps(self._runs, separators=(",", ":")).encode("ascii")

        def record(save_id: str) -> str:
            return json.dumps({"rank": self.rank, "world_size": self.world_size, "count": self._count,
                               "save": save_id, "runs_sha256": hashlib.sha256(runs).hexdigest()},
                              separators=(",", ":"))

        def restore() -> None:  # a failed save leaves the record it replaced: a disk shard writes its header from it
            if before is None:
                metadata.pop(SHARD_KEY, None)
            else:
                metadata[SHARD_KEY] = before

        # Kept in the shard's metadata (a disk shard rewrites its header on every add); load checks
        # it against the rows, so a shard changed after the save is refused rather than misnumbered.
        error, mine = None, None
        try:
            mine = shard_path(path, self.rank)
            metadata[SHARD_KEY] = record("0" * 16)  # as long as the real one
            self._check_saveable(mine)
        except Exception as e:  # (not BaseException: an interrupt is not for the other ranks to report)
            error = e
        said = _exchange(error, os.urandom(8).hex(), group=self.group)
        try:
            _raise_if_any_failed(error, said, lambda r, m: f"path: the shard of rank {r} of {path!r} cannot be "
                                                           f"saved ({m}); no rank wrote its shard")
        except BaseException:
            restore()
            raise
        metadata[SHARD_KEY] = record(said[0][1])
        try:
            with replaced_on_success(mine + RUNS_SUFFIX, runs):  # renamed only once the shard is saved
                self.local.save(mine, progress=progress)
        except Exception as e:
            error = e
        except BaseException:
            restore()
            raise
        said = _exchange(error, None, group=self.group)  # also the barrier: every shard is written
        try:
            _raise_if_any_failed(error, said, lambda r, m: f"path: the shard of rank {r} of {path!r} was not "
                                                           f"saved ({m}); the other ranks' shards were: load "
                                                           "refuses this mix of saves, save again")
        except BaseException:
            restore()
            raise

    def _check_saveable(self, mine: str) -> None:
        """What can fail in this rank's save, checked before any rank writes: the folder, and the shard's own
        save checks (its path, a read-only shard's own file, damaged rows, the header page with its record)."""
        folder = os.path.dirname(os.path.abspath(mine))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"path: no directory {folder!r} to save the shard {mine!r} in")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"path: the directory {folder!r} is not writable: cannot save {mine!r} there")
        self.local._save_checks(mine)

    # --- collectives ----------------------------------------------------------------

    @property
    def _comm_device(self) -> torch.device:
        return self.local.device

    def _gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return out

    def _gather_ints(self, values: List[int]) -> List[List[int]]:
        t = torch.tensor(values, dtype=torch.int64, device=self._comm_device)
        return [g.tolist() for g in self._gather(t)]

    def _check_same_layout(self) -> None:
        b = self.local
        code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[b.dtype]
        mine = [b.dim, b.value_dim, int(b.has_values), code]
        every = self._gather_ints(mine)
        if any(e != mine for e in every):
            raise ValueError(f"bank: the ranks' shards differ in (dim, value_dim, has_values, dtype): {every}")

    # --- rows -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Rows in the whole (global) bank."""
        return self._count

    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def value_dim(self) -> int:
        return self.local.value_dim

    def _append_local(self, p: torch.Tensor, v: Optional[torch.Tensor], global_start: int) -> None:
        m = p.shape[0]
        if m == 0:
            return
        local_start = len(self.local)
        self.local.add(p, v)
        if self._runs:
            ls, gs, n = self._runs[-1]
            if ls + n == local_start and gs + n == global_start:
                self._runs[-1] = (ls, gs, n + m)
                return
        self._runs.append((local_start, global_start, m))

    def add(self, patterns: torch.Tensor, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Collective: every rank passes the same rows; rank r keeps the r-th contiguous slice.

        Returns the rows' global ids (int64, CPU).
        """
        p, v, error = self._rows_or_error(patterns, values)
        m = -1 if p is None else p.shape[0]
        # the counts and checksums of the rows (exact, cheap: integer sums of their bits), in one collective
        every = self._gather_ints([m] + _fingerprint(p) + _fingerprint(v))
        self._raise_if_refused(error, [e[0] for e in every], "add")
        if any(e[0] != m for e in every):
            raise ValueError(f"patterns: add is collective and every rank must pass the same rows; "
                             f"the ranks passed {[e[0] for e in every]} rows (use add_local for per-rank rows)")
        for name, a, b in (("patterns", 1, 3), ("values", 3, 5)):
            differ = [r for r, e in enumerate(every) if e[a:b] != every[0][a:b]]
            if differ:
                raise ValueError(f"{name}: add is collective and every rank must pass the same rows; the rows "
                                 f"of rank(s) {differ} differ from rank 0's (their checksums do not match; "
                                 "use add_local for per-rank rows)")
        a, b = self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size
        base = self._count
        self._append_local(p[a:b], None if v is None else v[a:b], base + a)
        self._count += m
        return torch.arange(base, base + m, dtype=torch.int64)

    def add_local(self, patterns: torch.Tensor, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Collective: each rank adds its own rows; ids run rank by rank (rank 0's rows first).

        Returns this rank's rows' global ids (int64, CPU).
        """
        p, v, error = self._rows_or_error(patterns, values)
        sizes = [s[0] for s in self._gather_ints([-1 if p is None else p.shape[0]])]
        self._raise_if_refused(error, sizes, "add_local")
        start = self._count + sum(sizes[: self.rank])
        self._append_local(p, v, start)
        self._count += sum(sizes)
        return torch.arange(start, start + p.shape[0], dtype=torch.int64)

    def _rows_or_error(self, patterns, values):
        """The checked rows, or the error that refused them on this rank: it travels as a count of -1 in the
        add's collective, so that every rank raises (one raising alone left the others in that collective)."""
        try:
            return (*self.local._check_rows(patterns, values), None)
        except (TypeError, ValueError) as e:
            return None, None, e

    @staticmethod
    def _raise_if_refused(error: Optional[BaseException], counts: List[int], call: str) -> None:
        if error is not None:
            raise error
        refused = [r for r, c in enumerate(counts) if c < 0]
        if refused:
            raise ValueError(f"patterns: the rows of rank {refused[0]} were refused there (that rank raised why); "
                             f"{call} is collective, so no rank added its rows")

    def _to_global(self, index: torch.Tensor) -> torch.Tensor:
        """Local row -> global id through the runs (monotonic, so ties still go to the smaller row)."""
        if not self._runs:
            return index
        runs = torch.tensor(self._runs, dtype=torch.int64, device=index.device)
        k = torch.searchsorted(runs[:, 0].contiguous(), index.clamp_min(0), right=True) - 1
        k = k.clamp_min(0)
        gid = runs[k, 1] + (index - runs[k, 0])
        return torch.where(index < 0, index, gid)

    # --- queries ----------------------------------------------------------------------

    def _collective_args(self, query: object, beta: object, similarity: object, weights: object,
                         steps: Optional[tuple] = None) -> tuple:
        """Collective: (query, beta, similarity, weights) checked on every rank (and ``steps``, retrieve's
        (max_steps, tol)), and the same on every rank, or every rank raises.

        Each rank's checks run before any collective, so a rank that refuses its arguments still joins
        the one gather here, of a checksum of each argument (``_fingerprint``: integer sums of the bits),
        and every rank then raises, where the others had waited in the gathers of the Partials (and a
        query of another shape there made gloo abort the process); arguments that differ between ranks,
        a rank's own default beta or similarity included (``from_local`` of banks made apart), would
        merge shards scored differently into an answer no bank gives.
        """
        try:
            args = self.local._check_query(query, beta, similarity, weights)
            steps = None if steps is None else check_steps(*steps)
            q, b, sim, w = args
            fields = (
                [SIMILARITY_CODES[sim]],
                [zlib.crc32(repr((tuple(q.shape), str(q.dtype))).encode())]
                + _fingerprint(q.detach().reshape(-1, q.shape[-1])),
                _fingerprint(b.detach().reshape(1, -1)) if isinstance(b, torch.Tensor) else [_float_bits(b), 0],
                _fingerprint(None if w is None else w.detach().reshape(-1, w.shape[-1])),
                [0, 0] if steps is None else [steps[0], _float_bits(-1.0 if steps[1] is None else steps[1])],
            )
            mine, error = [1] + [v for f in fields for v in f], None
        except (TypeError, ValueError) as e:
            mine, error = [0] * (1 + sum(n for _, n in _CALL_FIELDS)), e
        every = self._gather_ints(mine)
        if error is not None:
            raise error
        refused = [r for r, e in enumerate(every) if e[0] == 0]
        if refused:
            raise ValueError(f"query: rank {refused[0]} refused its arguments (that rank raised why); the call is "
                             "collective, so every rank stops")
        end = 1
        for name, n in _CALL_FIELDS:
            start, end = end, end + n
            differ = [r for r, e in enumerate(every) if e[start:end] != every[0][start:end]]
            if differ:
                raise ValueError(f"{name}: the call is collective and every rank must pass the same {name} (the "
                                 f"bank's default where it is None); rank(s) {differ} passed another than rank 0's "
                                 "(their checksums differ)")
        return args if steps is None else (args, steps)

    def _partial(self, query: torch.Tensor, beta: Beta, similarity: str, weights: Optional[torch.Tensor],
                 bar=None) -> Partial:
        """The global Partial of checked arguments (``_collective_args``), rounded once: shards' out and lse
        travel and merge in float64 (§5.1).

        A shard whose rows make its rank refuse the query (check_scores: beta·sim or the values past
        the float32 range there, say) still takes part in the gather, with top_index REFUSED: every rank
        then raises, where the others had waited in the gather for the process group's timeout.
        """
        args = (query, beta, similarity, weights)
        error = None
        try:
            p = self.local._partial(*args, bar)
            p = Partial(p.out, p.lse, p.top_score, self._to_global(p.top_index))
        except ValueError as e:
            error = e
            p = self.local._empty_partial(*args)
            p = p._replace(top_index=torch.full_like(p.top_index, REFUSED))
        shards = list(zip(*(self._gather(field) for field in p)))
        if error is not None:
            raise error
        refused = [r for r, fields in enumerate(shards) if bool((fields[3] == REFUSED).any())]
        if refused:
            raise ValueError(f"bank: the shard of rank {refused[0]} refused this query (that rank raised why)")
        return streaming.round_partial(ops.merge_partials([Partial(*fields) for fields in shards]))

    def partial(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
                weights: Optional[torch.Tensor] = None) -> Partial:
        """The whole (global) bank's Partial, the same on every rank (``weights``: as MemoryBank's)."""
        return self._partial(*self._collective_args(query, beta, similarity, weights))

    def _require_rows(self) -> None:
        if self._count == 0:
            raise ValueError("bank: the bank is empty on every rank; add patterns before querying it")

    def update(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One update over the whole bank, in the query's dtype, the same on every rank."""
        args = self._collective_args(query, beta, similarity, weights)
        self._require_rows()
        return self._partial(*args).finalize(query.dtype)

    def retrieve(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
                 max_steps: int = 1, tol: Optional[float] = None, weights: Optional[torch.Tensor] = None,
                 progress: Optional[bool] = None) -> Retrieval:
        """Multi-step retrieval over the whole bank (every step sees every shard); rank 0 shows progress."""
        (query, beta, similarity, weights), (max_steps, tol) = self._collective_args(
            query, beta, similarity, weights, (max_steps, tol))
        self._require_rows()
        bar = progress_bar(max_steps * self.local.num_chunks(), progress if self.rank == 0 else False,
                           f"sharded retrieve (rank 0 of {self.world_size})")

        def step(state: torch.Tensor) -> Partial:
            return self._partial(state, beta, similarity, weights, bar)

        try:
            return streaming.retrieve(step, query, value_dim=self.local.value_dim, max_steps=max_steps, tol=tol)
        finally:
            bar.close()

    def close(self) -> None:
        self.local.close()

    def __repr__(self) -> str:
        return (f"ShardedMemoryBank({self._count} rows over {self.world_size} ranks; rank {self.rank} holds "
                f"{len(self.local)}: {self.local!r})")


def init_from_env(backend: Optional[str] = None) -> Tuple[int, int, torch.device]:
    """Initialise the default group from torchrun's environment; (rank, world size, this rank's device).

    NCCL with one GPU per process where CUDA is available (``LOCAL_RANK`` picks the GPU),
    gloo on CPUs otherwise.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


__all__ = ["ShardedMemoryBank", "init_from_env", "shard_path"]
