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
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import ops, streaming
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
        return local, runs, info

    @classmethod
    def load(cls, path: PathLike, *, group: Optional[dist.ProcessGroup] = None, **load_kw) -> "ShardedMemoryBank":
        """Each rank loads :func:`shard_path` (``path``, rank), written by :meth:`save` (collective).

        ``load_kw`` go to :meth:`MemoryBank.load` (storage, device, chunk_rows, verify, ...).
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedMemoryBank.load: torch.distributed is not initialised")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        # Every rank learns whether every shard loaded before any goes on: a rank that raised alone would
        # leave the others in the size check's collective, to fail there with the process group's error.
        error = None
        try:
            local, runs, info = cls._load_shard(shard_path(path, rank), rank, world, load_kw)
        except Exception as e:  # (not BaseException: an interrupt is not for the other ranks to report)
            error = e
        said: List[Optional[str]] = [None] * world
        dist.all_gather_object(said, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(said) if m is not None]
        if failed:
            raise ValueError(f"path: the shard of rank {failed[0][0]} of {path!r} did not load ({failed[0][1]})"
                             + (f", and {len(failed) - 1} more" if len(failed) > 1 else ""))
        self = cls(local.dim, group=group, _local=local)
        self._runs = [tuple(r) for r in runs]
        self._count = info["count"]
        counts = self._gather_ints([self._count])
        if any(c[0] != self._count for c in counts):
            raise ValueError(f"path: the shards of {path!r} disagree on the bank's size: {[c[0] for c in counts]}")
        return self

    def save(self, path: PathLike, *, progress: Optional[bool] = None) -> None:
        """Each rank saves its shard atomically to :func:`shard_path` (``path``, rank), and its rows' global
        ids (runs) beside it, to that path + ``".runs"`` (collective)."""
        mine = shard_path(path, self.rank)
        # The runs grow with every add and the header page does not: they go to a file of their own,
        # which the record in the header names by its sha256.
        runs = json.dumps(self._runs, separators=(",", ":")).encode("ascii")
        record = json.dumps({"rank": self.rank, "world_size": self.world_size, "count": self._count,
                             "runs_sha256": hashlib.sha256(runs).hexdigest()}, separators=(",", ":"))
        # Kept in the shard's metadata (a disk shard rewrites its header on every add); load checks
        # it against the rows, so a shard changed after the save is refused rather than misnumbered.
        metadata = self.local.metadata
        before = metadata.get(SHARD_KEY)
        metadata[SHARD_KEY] = record
        try:
            with replaced_on_success(mine + RUNS_SUFFIX, runs):  # renamed only once the shard is saved
                self.local.save(mine, progress=progress)
        except BaseException:
            # a failed save leaves the record it replaced: a disk shard writes its header from it
            if before is None:
                del metadata[SHARD_KEY]
            else:
                metadata[SHARD_KEY] = before
            raise
        self._barrier()

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

    def _barrier(self) -> None:
        self._gather_ints([0])  # a barrier that works on every backend and device

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
        p, v = self.local._check_rows(patterns, values)
        m = p.shape[0]
        sizes = self._gather_ints([m])
        if any(s[0] != m for s in sizes):
            raise ValueError(f"patterns: add is collective and every rank must pass the same rows; "
                             f"the ranks passed {[s[0] for s in sizes]} rows (use add_local for per-rank rows)")
        a, b = self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size
        base = self._count
        self._append_local(p[a:b], None if v is None else v[a:b], base + a)
        self._count += m
        return torch.arange(base, base + m, dtype=torch.int64)

    def add_local(self, patterns: torch.Tensor, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Collective: each rank adds its own rows; ids run rank by rank (rank 0's rows first).

        Returns this rank's rows' global ids (int64, CPU).
        """
        p, v = self.local._check_rows(patterns, values)
        sizes = [s[0] for s in self._gather_ints([p.shape[0]])]
        start = self._count + sum(sizes[: self.rank])
        self._append_local(p, v, start)
        self._count += sum(sizes)
        return torch.arange(start, start + p.shape[0], dtype=torch.int64)

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

    def _partial(self, query: torch.Tensor, beta: Beta, similarity: Optional[str], weights: Optional[torch.Tensor],
                 bar=None) -> Partial:
        """The global Partial, rounded once: shards' out and lse travel and merge in float64 (§5.1)."""
        p = self.local._partial(*self.local._check_query(query, beta, similarity, weights), bar)
        p = Partial(p.out, p.lse, p.top_score, self._to_global(p.top_index))
        shards = list(zip(*(self._gather(field) for field in p)))
        return streaming.round_partial(ops.merge_partials([Partial(*fields) for fields in shards]))

    def partial(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
                weights: Optional[torch.Tensor] = None) -> Partial:
        """The whole (global) bank's Partial, the same on every rank (``weights``: as MemoryBank's)."""
        return self._partial(query, beta, similarity, weights)

    def _require_rows(self) -> None:
        if self._count == 0:
            raise ValueError("bank: the bank is empty on every rank; add patterns before querying it")

    def update(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One update over the whole bank, in the query's dtype, the same on every rank."""
        self._require_rows()
        return self._partial(query, beta, similarity, weights).finalize(query.dtype)

    def retrieve(self, query: torch.Tensor, beta: Optional[Beta] = None, *, similarity: Optional[str] = None,
                 max_steps: int = 1, tol: Optional[float] = None, weights: Optional[torch.Tensor] = None,
                 progress: Optional[bool] = None) -> Retrieval:
        """Multi-step retrieval over the whole bank (every step sees every shard); rank 0 shows progress."""
        query, beta, similarity, weights = self.local._check_query(query, beta, similarity, weights)
        max_steps, tol = check_steps(max_steps, tol)
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
