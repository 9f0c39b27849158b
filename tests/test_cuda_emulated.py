"""The CUDA kernels run on the CPU through csrc/emu (a fiber-per-thread emulator
of the CUDA primitives they use) against a float64 reference: every kernel
family, dtype and similarity, splits and the combine, ties, NaN queries, empty
banks, strided and unaligned rows.  This is how the kernels' logic is checked on
machines without a GPU; tests/test_cuda.py runs the same op on a device."""
import concurrent.futures
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def cuda_sources():
    """The build's CUDA sources, from their one list in CMakeLists.txt (HEN_CUDA_SOURCES)."""
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        found = re.search(r"set\(HEN_CUDA_SOURCES\s+([^)]*)\)", f.read())
    assert found, "CMakeLists.txt has no set(HEN_CUDA_SOURCES ...)"
    return [os.path.join(ROOT, s) for s in found.group(1).split()]


def test_the_cuda_source_list_names_every_cuda_file():
    listed = set(cuda_sources())
    on_disk = {os.path.join(d, n) for d, _, names in os.walk(CSRC) for n in names if n.endswith(".cu")}
    assert listed == on_disk


# The build and the run each split over the machine's cores (one g++ per source, one emulator process
# per shard of the cases): together ~75 s on one core of these CPUs.
JOBS = max(1, min(4, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulator")
    out = tmp_path_factory.mktemp("cuda_emu")
    emu = sorted(os.path.join(CSRC, "emu", n) for n in os.listdir(os.path.join(CSRC, "emu")) if n.endswith(".cpp"))
    # HEN_EMU_CXXFLAGS: extra compile and link flags (scripts/sanitize.sh passes the sanitizers').
    extra = shlex.split(os.environ.get("HEN_EMU_CXXFLAGS", ""))
    flags = ["-std=c++17", "-O1", "-DHEN_CUDA_EMULATE", f"-I{CSRC}", *extra]
    units = [(src, ["-x", "c++"]) for src in cuda_sources()] + [(src, []) for src in emu]
    objects = [str(out / f"{i}.o") for i in range(len(units))]
    with concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
        runs = pool.map(lambda u: subprocess.run([cxx, *flags, *u[0][1], "-c", u[0][0], "-o", u[1]],
                                                 capture_output=True, text=True), zip(units, objects))
        for (src, _), r in zip(units, runs):
            assert r.returncode == 0, f"{src}:\n{r.stderr[-4000:]}"
    exe = str(out / "emulate_test")
    subprocess.run([cxx, *extra, *objects, "-o", exe], check=True, capture_output=True, text=True)
    return exe


def test_cuda_kernels_match_float64_under_emulation(emulator):
    shards = [subprocess.Popen([emulator, "", f"{i}/{JOBS}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for i in range(JOBS)]
    ran = total = 0
    for proc in shards:
        stdout, stderr = proc.communicate(timeout=600)
        failed = [line for line in stdout.splitlines() if line.startswith("FAIL")]
        assert proc.returncode == 0 and not failed, stdout[-4000:] + stderr[-2000:]
        last = stdout.strip().splitlines()[-1]
        ran, total = ran + int(last.split()[0]), total + int(last.split()[2])
    assert ran == total >= 30, (ran, total)
