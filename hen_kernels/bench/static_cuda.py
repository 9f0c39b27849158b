"""The CUDA C++ kernels (csrc/cuda/) in the machine-code report, read from the built extension's cubins:
registers, stack (spills), static shared memory, launch-bound threads, the SASS mix and, for the
tensor-core ``mma_kernel``, the occupancy per SM with its dynamic shared memory.

The extension holds one cubin per architecture (sm_80, sm_90) for each CUDA translation unit;
cuobjdump (the one in triton's wheel) reads them from the .so without a GPU or the CUDA toolkit.
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import subprocess
from typing import Dict, List, Optional, Sequence

from .static_compile import _tool, classify, occupancy, res_usage, sass


def extension_path() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = sorted(glob.glob(os.path.join(here, "_C*.so")))
    return hits[0] if hits else None


def _max_threads(path: str, arch: int) -> Dict[str, int]:
    """{mangled function: threads of its __launch_bounds__} from the cubin's .nv.info sections."""
    text = subprocess.run([_tool("cuobjdump"), "-elf", f"-arch=sm_{arch}", path], capture_output=True,
                          text=True).stdout
    out, cur, want = {}, None, False
    for line in text.splitlines():
        if line.startswith(".nv.info."):  # the dump has ~10^6 lines per architecture: no regex on each
            cur, want = line[len(".nv.info."):].split(None, 1)[0], False
        elif "EIATTR_MAX_THREADS" in line:
            want = True
        elif want and cur and "Value:" in line:
            out[cur] = int(line.split()[1], 16)
            want = False
    return out


def _demangle(names: Sequence[str]) -> List[str]:
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        pretty = r.stdout.split("\n")
        return pretty[:len(names)] if len(pretty) >= len(names) else list(names)
    except (OSError, subprocess.CalledProcessError):
        return list(names)


def mma_dynamic_smem(head_dim: int, same: bool) -> int:
    """Dynamic shared memory of mma_kernel<., head_dim>: mirrors ``mma_smem_bytes`` in
    csrc/cuda/mma_kernel.cuh (the cubin does not hold it): Q tile, two K stages, two V stages
    unless values are the memory, the rows' and queries' squared norms."""
    rows, pitch = (64 if head_dim <= 128 else 32), head_dim + 8
    return 64 * pitch * 2 + 2 * rows * pitch * 2 * (1 if same else 2) + 2 * rows * 4 + 64 * 4


def _dumps(path: str, arch: int) -> tuple:
    return sass(path, arch), res_usage(path, arch), _max_threads(path, arch)


def report(path: str, archs: Sequence[int], jobs: int = 1) -> List[dict]:
    # cuobjdump takes ~10 s per architecture on these CPUs: with jobs > 1 the architectures' dumps overlap.
    with concurrent.futures.ThreadPoolExecutor(max(1, min(jobs, len(archs)))) as pool:
        dumps = list(pool.map(lambda arch: _dumps(path, arch), archs))
    rows = []
    for arch, (funcs, ru, threads) in zip(archs, dumps):
        names = list(funcs)
        for name, pretty in zip(names, _demangle(names)):
            ins, ranges = funcs[name]
            r = ru.get(name, {})
            short = re.sub(r"\(hen::PartialParams.*$", "", pretty.replace("hen::cuda_kernels::", ""))
            short = short.replace("void ", "", 1)
            row = dict(kernel=short, arch=arch, regs=r.get("REG"), stack=r.get("STACK", 0),
                       static_smem=r.get("SHARED", 0), threads=threads.get(name), sass=classify(ins),
                       loops=len(ranges))
            row["spills"] = bool(row["stack"])
            m = re.search(r"mma_kernel<\(hen::DType\)\d+, (\d+)>", pretty)
            if m and row["threads"] and row["regs"]:
                row["occupancy"] = {}
                for label, same in (("keys = values", True), ("separate values", False)):
                    smem = mma_dynamic_smem(int(m.group(1)), same) + row["static_smem"]
                    blocks, limiter, occ = occupancy(arch, row["regs"], row["threads"], smem)
                    row["occupancy"][label] = dict(smem=smem, blocks_per_sm=blocks, limiter=limiter, occupancy=occ)
            elif row["threads"] and row["regs"]:
                blocks, limiter, occ = occupancy(arch, row["regs"], row["threads"], row["static_smem"])
                row["occupancy"] = {"registers and threads only (dynamic shared memory not in the cubin)":
                                    dict(blocks_per_sm=blocks, limiter=limiter, occupancy=occ)}
            rows.append(row)
    return rows
