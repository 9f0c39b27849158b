"""The CUDA kernels are compiled into this build wherever nvcc exists, GPU or not (issue 4)."""
import importlib.util
import os
import shutil

import pytest
import torch

import hen_kernels as hk
from hen_kernels import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_FAMILIES = ("simt_kernel", "mma_kernel", "combine_kernel")
ARCHS = ("sm_80", "sm_90")


def _ptxas_tool():
    spec = importlib.util.spec_from_file_location("ptxas_summary", os.path.join(ROOT, "cmake", "ptxas_summary.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _require_cuda_build():
    if os.environ.get("HEN_KERNELS_SKIP_EXT") == "1":
        pytest.skip("HEN_KERNELS_SKIP_EXT=1: built without the extension")
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the build leaves the CUDA kernels out")
    assert backends.load_extension() is None


def test_cuda_sources_are_compiled_in_when_nvcc_is_present():
    _require_cuda_build()
    info = torch.ops.hen_kernels.cuda_info()
    assert info != "none", "nvcc is on PATH but the extension was built without the CUDA kernels"
    archs = dict(item.split("=") for item in info.split())["archs"].split(",")
    assert {"800", "900"} <= set(archs), info
    assert torch._C._dispatch_has_kernel_for_dispatch_key("hen_kernels::partial", "CUDA")


def test_ptxas_report_covers_every_kernel_without_spills():
    _require_cuda_build()
    rows = _ptxas_tool().parse(torch.ops.hen_kernels.cuda_ptxas())
    for family in KERNEL_FAMILIES:
        for arch in ARCHS:
            assert any(r["kernel"].startswith(family) and r["arch"] == arch for r in rows), (family, arch)
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"register spills: {spilled}"
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_ptxas_parser_reads_nvcc_output():
    raw = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]\n"
    )
    tool = _ptxas_tool()
    (row,) = tool.parse_ptxas(raw)
    assert (row["arch"], row["registers"], row["smem_static"]) == ("sm_90", 40, 1024)
    assert (row["stack"], row["spill_stores"], row["spill_loads"]) == (16, 8, 4)
    assert tool.parse(tool.table([row])) [0]["registers"] == 40


def test_available_backends_tells_the_truth_about_cuda():
    reason = backends.BACKENDS["cuda"].unavailable_reason
    if torch.cuda.is_available() and backends.load_extension() is None and torch.ops.hen_kernels.cuda_info() != "none":
        assert reason is None and "cuda" in hk.available_backends()
    else:
        assert reason and "cuda" not in hk.available_backends()
