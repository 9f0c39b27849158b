"""Keep nvcc's `-Xptxas -v` reports and gather them into one log with a table.

CMakeLists.txt uses this file twice:

    python cmake/ptxas_summary.py capture DIR nvcc ARGS...
        the CUDA compiler launcher: runs nvcc, passes its output through and
        keeps its stderr (the ptxas report) in DIR/<object>.log;
    python cmake/ptxas_summary.py summarize LOG CPP DIR OBJECT...
        once the CUDA objects exist: the raw reports of those objects, then a
        table of registers, static shared memory, stack and spills per kernel
        and architecture, written to LOG (build/.../ptxas.log) and echoed in
        the build output; CPP is a C++ file that puts the table in the
        extension itself (the op hen_kernels::cuda_ptxas).  Only the objects
        named count: a build folder kept across a rename of a source still
        holds the report of the old object.

tests/test_cuda_build.py reads the table back from the op with `parse`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
TABLE_HEADER_NOTE = "# ptxas summary (registers per thread; bytes of static smem, stack and spills)"
TABLE_HEADER = "# kernel\tarch\tregisters\tsmem_static\tstack\tspill_stores\tspill_loads"


def parse_ptxas(text: str) -> List[Dict[str, object]]:
    """One record per (kernel, arch) from raw ptxas -v output."""
    rows: List[Dict[str, object]] = []
    cur: Dict[str, object] | None = None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": 0, "smem_static": 0,
                   "stack": 0, "spill_stores": 0, "spill_loads": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(x) for x in m.groups())
        m = USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = SMEM.search(line)
            cur["smem_static"] = int(s.group(1)) if s else 0
    return rows


def demangle(names: List[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def short(name: str) -> str:
    """hen::cuda_kernels::simt_kernel<(hen::DType)2, 1, 1, true>(...) -> simt_kernel<bf16, 1, 1, true>."""
    name = name.split("(hen::PartialParams")[0]
    name = name.replace("hen::cuda_kernels::", "").replace("void ", "")
    for code, dt in (("0", "f32"), ("1", "f16"), ("2", "bf16")):
        name = name.replace(f"(hen::DType){code}", dt)
    return name


def table(rows: List[Dict[str, object]]) -> str:
    names = demangle([str(r["kernel"]) for r in rows])
    lines = [TABLE_HEADER]
    for r, n in zip(rows, names):
        lines.append("\t".join([short(n), str(r["arch"])] + [str(r[k]) for k in
                                ("registers", "smem_static", "stack", "spill_stores", "spill_loads")]))
    return "\n".join(lines)


def parse(log_text: str) -> List[Dict[str, object]]:
    """The table of a log written by this script."""
    rows = []
    in_table = False
    for line in log_text.splitlines():
        if line == TABLE_HEADER:
            in_table = True
            continue
        if in_table and line.strip():
            kernel, arch, *nums = line.split("\t")
            rec: Dict[str, object] = {"kernel": kernel, "arch": arch}
            rec.update(zip(("registers", "smem_static", "stack", "spill_stores", "spill_loads"), map(int, nums)))
            rows.append(rec)
    return rows


def log_path(log_dir: str, obj: str) -> str:
    """Where the report of object `obj` is kept: nvcc is given it relative to its working folder, CMake absolute."""
    return os.path.join(log_dir, re.sub(r"[^\w.-]+", "_", os.path.realpath(obj).strip("/")) + ".log")


def capture(log_dir: str, cmd: List[str]) -> int:
    """Run one nvcc command, keeping its stderr in log_dir, named after its object file."""
    obj = cmd[cmd.index("-o") + 1] if "-o" in cmd else "unnamed"
    os.makedirs(log_dir, exist_ok=True)
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, errors="replace", check=False)
    sys.stderr.write(proc.stderr)
    if proc.returncode == 0:
        with open(log_path(log_dir, obj), "w", encoding="utf-8") as f:
            f.write(proc.stderr)
    return proc.returncode


def summarize(log: str, cpp: str, log_dir: str, objects: List[str]) -> int:
    raw = ""
    for path in sorted(log_path(log_dir, obj) for obj in objects):
        if not os.path.exists(path):
            print(f"-- ptxas: no report for {path} (compiled without the launcher?)")
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            raw += f"## {os.path.basename(path)}\n" + f.read()
    rows = parse_ptxas(raw)
    summary = f"{TABLE_HEADER_NOTE}\n{table(rows)}\n"
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    with open(log, "w", encoding="utf-8") as f:
        f.write(raw + "\n" + summary)
    with open(cpp, "w", encoding="utf-8") as f:
        f.write("// Generated by cmake/ptxas_summary.py: the ptxas report of this build's CUDA kernels.\n"
                "namespace hen {\nextern const char* const kPtxasReport;\n"
                f'const char* const kPtxasReport = R"hen_ptxas({summary})hen_ptxas";\n}}  // namespace hen\n')
    print(f"-- ptxas: {len(rows)} kernel builds, {len(spills)} with spills; raw report in {log}")
    print(summary)
    return 0


def main(argv: List[str]) -> int:
    if len(argv) >= 3 and argv[0] == "capture":
        return capture(argv[1], argv[2:])
    if len(argv) >= 5 and argv[0] == "summarize":
        return summarize(argv[1], argv[2], argv[3], argv[4:])
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
