"""The CUDA kernels run on the CPU through csrc/emu (a fiber-per-thread emulator
of the CUDA primitives they use) against a float64 reference: every kernel
family, dtype and similarity, splits and the combine, ties, NaN queries, empty
banks, strided and unaligned rows.  This is how the kernels' logic is checked on
machines without a GPU; tests/test_cuda.py runs the same op on a device."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ["hopfield_cuda.cu", "hopfield_cuda_simt_f32.cu", "hopfield_cuda_simt_f16.cu",
           "hopfield_cuda_simt_bf16.cu", "hopfield_cuda_mma.cu"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulator")
    exe = str(tmp_path_factory.mktemp("cuda_emu") / "emulate_test")
    cmd = [cxx, "-std=c++17", "-O1", "-DHEN_CUDA_EMULATE", f"-I{CSRC}", "-x", "c++",
           *[os.path.join(CSRC, s) for s in SOURCES], "-x", "none", os.path.join(CSRC, "emu", "emulate_test.cpp"),
           "-o", exe]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def test_cuda_kernels_match_float64_under_emulation(emulator):
    proc = subprocess.run([emulator], capture_output=True, text=True, timeout=600)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, proc.stdout[-4000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    ran, total = int(last.split()[0]), int(last.split()[2])
    assert ran == total >= 30, last
