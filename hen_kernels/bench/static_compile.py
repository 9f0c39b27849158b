"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90 on a machine without a GPU, and the
reading of their machine code: registers and spills (ptxas's own log), shared memory, occupancy, the
SASS instruction mix of the whole kernel and of its hot loop, and the loads per loop level in TTIR.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs triton's whole pipeline,
ptxas included, without a device (triton 3.6 to 3.8).  It must run in a process that imported
triton without TRITON_INTERPRET=1: under the interpreter ``@triton.jit`` builds interpreted
functions, triton.language's own helpers included, which cannot be compiled.  ``static.main``
re-executes itself without the variable, so tests start it as a subprocess.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import os
import re
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if os.environ.get("TRITON_INTERPRET") == "1":
    raise ImportError("hen_kernels.bench.static_compile compiles kernels, which triton's interpreter cannot: "
                      "run `python -m hen_kernels.bench static` (it restarts itself without TRITON_INTERPRET)")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ..triton.configs import ARCHS, MAX_REGISTERS, RESERVED_SMEM  # noqa: E402


@dataclasses.dataclass
class Case:
    """One compile: a kernel's JIT function with every argument as the launcher would pass it."""
    kernel: str                 # small_d, tiled_d, combine, dq, dkv
    fn: object                  # the JITFunction
    args: Dict[str, object]     # runtime arguments: a pointer as "*bf16"-style type, an int as an example value
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    label: Dict[str, object]    # what the report shows (dtype, SIM, D, BM, SPLITS, config, ...)
    pruned: Optional[str] = None  # why configs.py keeps this config from the autotuner (None: it may pick it)
    expect: Dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. bank tile bytes per iteration


def _specialise(value: int):
    """(type, divisible by 16) the way the JIT specialises an int argument (1 becomes a constexpr)."""
    if value == 1:
        return "constexpr", False
    return ("i64" if not -2**31 <= value < 2**31 else "i32"), value % 16 == 0


def source(case: Case) -> ASTSource:
    sig, cx, attrs = {}, dict(case.constexprs), {}
    for i, p in enumerate(case.fn.params):
        name = p.name
        if p.is_constexpr:
            if name not in cx:
                raise KeyError(f"{case.kernel}: constexpr {name} not given")
            sig[name] = "constexpr"
            continue
        v = case.args[name]
        if isinstance(v, str):  # a pointer: torch allocations are 16-byte aligned
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        ty, div = _specialise(int(v))
        sig[name] = ty
        if ty == "constexpr":
            cx[name] = int(v)
        elif div:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=case.fn, signature=sig, constexprs=cx, attrs=attrs)


# ---- machine code ----------------------------------------------------------------------------------

def _tool(name: str) -> str:
    tool = getattr(knobs.nvidia, name, None)
    path = getattr(tool, "path", None) if tool is not None else None
    return path or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


CLASSES = {  # SASS opcode classes the report counts (regex on the opcode with its modifiers)
    "HMMA": r"HMMA", "HGMMA": r"HGMMA", "MMA.TF32": r"HG?MMA\.\S*TF32",
    "MUFU.EX2": r"MUFU\.EX2", "MUFU.SQRT": r"MUFU\.SQRT",
    "MUFU.RSQ": r"MUFU\.RSQ", "MUFU.RCP": r"MUFU\.RCP", "MUFU.LG2": r"MUFU\.LG2",
    "LDGSTS": r"LDGSTS", "UTMALDG": r"UTMALDG", "LDG": r"LDG(?!STS|DEPBAR)", "STG": r"STG",
    "LDS": r"LDS(?!M)", "LDSM": r"LDSM", "STS": r"STS", "LDL": r"LDL", "STL": r"STL",
    "FFMA": r"FFMA", "DFMA": r"DFMA|DADD|DMUL", "BAR": r"BAR",
}
_CLASS_RX = {k: re.compile(rf"(?:{v})(?:\.|$)") if "TF32" not in k else re.compile(v) for k, v in CLASSES.items()}
_INS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[0-9T]+\s+")
_FUNC = re.compile(r"\s*Function : (\S+)")
_HEX = re.compile(r"0x([0-9a-f]+)")
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "16": 2, "U8": 1, "S8": 1}


def sass(path: str, arch: Optional[int] = None) -> Dict[str, tuple]:
    """{function: ([(address, opcode with modifiers)], [loop address ranges, innermost first])} from
    cuobjdump -sass of a cubin, object or library.  A loop is a branch back to a lower address (a branch
    to itself is the trap after EXIT)."""
    cmd = [_tool("cuobjdump"), "-sass"] + ([f"-arch=sm_{arch}"] if arch else []) + [path]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    funcs: Dict[str, tuple] = collections.OrderedDict()
    cur = None
    for line in text.splitlines():
        if ";" not in line:  # an instruction's encoding, a header or a brace: the library's SASS is ~10^6 lines
            m = _FUNC.match(line) if "Function :" in line else None
            if m:
                cur = funcs.setdefault(m.group(1), ([], set()))
            continue
        m = _INS.match(line)
        if m and cur is not None:
            addr, body = int(m.group(1), 16), m.group(2)
            if body.startswith("@"):
                body = _PRED.sub("", body)
            op = body.split(None, 1)[0] if body else ""
            cur[0].append((addr, op))
            t = _HEX.search(body) if op.startswith("BRA") else None
            if t and int(t.group(1), 16) < addr:
                cur[1].add((int(t.group(1), 16), addr))
    return {k: (ins, sorted(lp, key=lambda r: r[1] - r[0])) for k, (ins, lp) in funcs.items()}


def res_usage(path: str, arch: Optional[int] = None) -> Dict[str, Dict[str, int]]:
    """{function: {REG, STACK, SHARED, LOCAL, ...}} from cuobjdump -res-usage."""
    cmd = [_tool("cuobjdump"), "-res-usage"] + ([f"-arch=sm_{arch}"] if arch else []) + [path]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = m.group(1)
        elif cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            cur = None
    return out


@functools.lru_cache(maxsize=None)
def _classes_of(op: str) -> Tuple[str, ...]:
    return tuple(name for name, rx in _CLASS_RX.items() if rx.match(op))


def classify(ins: Sequence[tuple]) -> Dict[str, int]:
    c = collections.Counter()
    for op, n in collections.Counter(op for _, op in ins).items():
        for name in _classes_of(op):
            c[name] += n
    return {k: c[k] for k in CLASSES if c[k]}


def global_bytes(ins: Sequence[tuple], threads: int, store: bool = False) -> int:
    """Bytes one program moves to (LDG, LDGSTS) or from (STG) global memory in these instructions."""
    total = 0
    for _, op in ins:
        if (op.startswith("STG") if store else op.startswith(("LDG", "LDGSTS")) and not op.startswith("LDGDEPBAR")):
            m = re.search(r"\.(128|64|U16|S16|16|U8|S8)(?:\.|$)", op)
            total += (_WIDTH[m.group(1)] if m else 4) * threads
    return total


def _mma_count(ins: Sequence[tuple], r: tuple) -> int:
    return sum(r[0] <= a <= r[1] and op.startswith(("HMMA", "HGMMA")) for a, op in ins)


def outer_loop(ins: Sequence[tuple], ranges: List[tuple]) -> Optional[tuple]:
    """A forward kernel's walk over the bank: the first loop in program order holding tensor-core instructions
    (the widest of those starting there).  The epilogue's loop (triton/common.py exact_top_rows) comes after
    it, and ptxas's branches can make a range that spans the bank loop's end and that loop."""
    mma = [r for r in ranges if _mma_count(ins, r)]
    return min(mma, key=lambda r: (r[0], r[0] - r[1])) if mma else None


def hot_loop(ins: Sequence[tuple], ranges: List[tuple], outer: Optional[tuple]) -> Optional[tuple]:
    """The innermost loop holding tensor-core instructions within ``outer`` (outer_loop's), else the innermost
    loop, else None."""
    for r in ranges:
        if outer and outer[0] <= r[0] and r[1] <= outer[1] and _mma_count(ins, r):
            return r
    return ranges[0] if ranges else None


def local_accesses(ins: Sequence[tuple], r: Optional[tuple]) -> int:
    """Local-memory loads and stores (spill code) within a loop, the loops nested in it included."""
    return sum(r[0] <= a <= r[1] and op.startswith(("LDL", "STL")) for a, op in ins) if r else 0


def own_instructions(ins: Sequence[tuple], r: tuple, ranges: List[tuple]) -> list:
    """A loop's instructions without those of the loops nested in it (e.g. small_d's ℓ2 recompute loop)."""
    inner = [o for o in ranges if o != r and r[0] <= o[0] and o[1] <= r[1]]
    return [(a, op) for a, op in ins if r[0] <= a <= r[1] and not any(o[0] <= a <= o[1] for o in inner)]


def loop_ops(ir: str, op: str = r"tt\.load") -> List[int]:
    """Count ops matching ``op`` in TTIR/TTGIR text by scf.for nesting depth: [outside loops, in 1 loop, ...],
    the loops being the first top-level scf.for and those nested in it (small_d's bank loop; the loop of
    its epilogue, triton/common.py exact_top_rows, comes after it and is left out)."""
    stack, counts, top_level_loops = [], collections.Counter(), 0
    rx = re.compile(rf"= {op}\b")
    for line in ir.splitlines():
        code = line.split(" loc(")[0]
        depth = stack.count("for")
        if rx.search(code) and (depth == 0 or top_level_loops == 1):
            counts[depth] += 1
        net = code.count("{") - code.count("}")
        for _ in range(net):
            if "scf.for" in code and depth == 0:
                top_level_loops += 1
            stack.append("for" if "scf.for" in code else "other")
        for _ in range(-net):
            if stack:
                stack.pop()
    return [counts[d] for d in range(max(counts) + 1)] if counts else []


def parse_ptxas(log: str) -> Dict[str, int]:
    r = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        r.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", log)
    if m:
        r["ptxas_regs"] = int(m.group(1))
    return r


def occupancy(arch: int, regs: int, threads: int, smem: int) -> tuple:
    """(resident blocks per SM, what limits them, warps per SM / 64)."""
    lim = ARCHS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256  # registers are allocated per warp in 256s
    by = dict(threads=lim["threads"] // threads, blocks=lim["blocks"],
              registers=(lim["regs"] // per_warp) // warps,
              smem=lim["smem_sm"] // (smem + RESERVED_SMEM) if smem else lim["blocks"])
    n = min(by.values())
    return n, min(by, key=by.get), round(n * warps / 64, 3)


# ---- one compile -------------------------------------------------------------------------------------

def compile_case(case: Case, arch: int, keep: Optional[str] = None) -> dict:
    """Compile one case for one architecture and read its machine code; errors become a row field."""
    row = dict(kernel=case.kernel, arch=arch, **case.label, num_warps=case.num_warps, num_stages=case.num_stages,
               pruned=case.pruned)
    t0 = time.perf_counter()
    try:
        k, log = _compile(case, arch)
    except Exception as e:  # noqa: BLE001 - reported with the kernel, arch and config that failed
        row.update(compile_s=round(time.perf_counter() - t0, 2),
                   error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    threads = case.num_warps * 32
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        ins, ranges = next(iter(sass(cubin).values()))
        ru = next(iter(res_usage(cubin).values()))
        if keep:
            stem = os.path.join(keep, f"{case.kernel}_sm{arch}_" + "_".join(str(v) for v in case.label.values()))
            for ext in ("ttir", "ttgir", "ptx"):
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(k.asm[ext])
    smem = k.metadata.shared + ru.get("SHARED", 0)
    blocks, limiter, occ = occupancy(arch, ru["REG"], threads, smem)
    outer = outer_loop(ins, ranges)
    hot = hot_loop(ins, ranges, outer)
    hot_ins = own_instructions(ins, hot, ranges) if hot else []
    row.update(
        regs=ru["REG"], spill_stores=log.get("spill_stores"), spill_loads=log.get("spill_loads"),
        stack=ru.get("STACK", 0), smem=smem, smem_limit=ARCHS[arch]["smem_block"],
        smem_ok=smem <= ARCHS[arch]["smem_block"], blocks_per_sm=blocks, limiter=limiter, occupancy=occ,
        sass=classify(ins), loops=len(ranges), hot_loop=classify(hot_ins),
        hot_loop_load_bytes=global_bytes(hot_ins, threads), hot_loop_store_bytes=global_bytes(hot_ins, threads, True),
        loops_detail=[dict(range=f"{r[0]:#x}-{r[1]:#x}", **classify(own := own_instructions(ins, r, ranges)),
                           load_bytes=global_bytes(own, threads), store_bytes=global_bytes(own, threads, True))
                      for r in ranges],
        ttir_loads=loop_ops(k.asm["ttir"]),
        bank_loop_async_bytes=global_bytes([x for x in own_instructions(ins, outer, ranges) if x[1].startswith(
            "LDGSTS")], threads) if outer else 0,
        bank_loop_local=local_accesses(ins, outer),
        n_sass=len(ins),
    )
    row["spills"] = bool(row["spill_stores"] or row["stack"])
    # Below the ceiling a frame may be ptxas's choice (fewer registers for more resident blocks) rather than
    # need: the same kernel compiled with .maxnreg 255 tells them apart (bench/static_spill.py).
    row["stack_at_ceiling"] = row["stack"]
    if row["spills"] and row["regs"] < MAX_REGISTERS:
        # no frame in ptxas's log (not captured): the spill stays costly
        row["stack_at_ceiling"] = _compile(case, arch, maxnreg=MAX_REGISTERS)[1].get("stack", row["stack"])
    return row


def _compile(case: Case, arch: int, **options) -> tuple:
    """(triton's compiled kernel, ptxas's -v log parsed)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # ptxas -v's log, printed by triton (dump_ptxas_log)
        k = triton.compile(source(case), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=case.num_warps, num_stages=case.num_stages, **options))
    return k, parse_ptxas(buf.getvalue())


# ---- many compiles -----------------------------------------------------------------------------------

_WORK: list = []


def _nth(n: int) -> dict:
    case, arch, keep = _WORK[n]
    return compile_case(case, arch, keep)


def compile_all(cases: Sequence[Case], archs: Sequence[int], jobs: int = 1, keep: Optional[str] = None,
                progress: Optional[Callable[[int, int, dict], None]] = None) -> List[dict]:
    """Every case for every arch, ``jobs`` at a time in forked workers (the JIT functions do not pickle)."""
    global _WORK
    _WORK = [(c, a, keep) for c in cases for a in archs]
    rows: List[dict] = []
    with compiling():
        if jobs > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(jobs) as pool:
                for i, row in enumerate(pool.imap(_nth, range(len(_WORK)), chunksize=1)):
                    rows.append(row)
                    if progress:
                        progress(i + 1, len(_WORK), row)
        else:
            for i in range(len(_WORK)):
                rows.append(_nth(i))
                if progress:
                    progress(i + 1, len(_WORK), rows[-1])
    return rows


@contextlib.contextmanager
def compiling():
    """Fresh compiles with ptxas's log (a cache hit would skip ptxas), into a temporary triton cache so
    report runs neither read nor fill ~/.triton; the JIT's settings come back afterwards."""
    import shutil

    old = os.environ.get("TRITON_CACHE_DIR"), knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    tmp = tempfile.mkdtemp(prefix="hen_static_")
    os.environ["TRITON_CACHE_DIR"] = tmp
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield tmp
    finally:
        if old[0] is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old[0]
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = old[1], old[2]
        shutil.rmtree(tmp, ignore_errors=True)
