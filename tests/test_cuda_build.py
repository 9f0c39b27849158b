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


def _template_args(kernel):
    """'simt_kernel<bf16, 1, 2, true, false>' -> ['bf16', '1', '2', 'true', 'false']."""
    return kernel[kernel.index("<") + 1:kernel.rindex(">")].split(", ")


def test_weighted_instances_are_built_for_both_archs():
    """docs/design.md §5.1: weights are fused through instances of their own (last template argument)."""
    _require_cuda_build()
    rows = _ptxas_tool().parse(torch.ops.hen_kernels.cuda_ptxas())
    for family in ("simt_kernel", "mma_kernel"):
        for arch in ARCHS:
            flags = {_template_args(r["kernel"])[-1] for r in rows if r["kernel"].startswith(family) and r["arch"] == arch}
            assert flags == {"true", "false"}, (family, arch, flags)


def test_small_simt_instances_fit_two_blocks_per_sm():
    """simt_min_blocks: instances with <= 16 accumulator floats per thread are built for two
    blocks of 256 threads per SM, i.e. at most 128 registers (and, above, without spills)."""
    _require_cuda_build()
    rows = _ptxas_tool().parse(torch.ops.hen_kernels.cuda_ptxas())
    vec = {"f32": 4, "f16": 8, "bf16": 8}
    small = [r for r in rows if r["kernel"].startswith("simt_kernel")
             and int(_template_args(r["kernel"])[1]) * int(_template_args(r["kernel"])[2])
             * vec[_template_args(r["kernel"])[0]] <= 16]
    assert small, "no simt instance with <= 16 accumulator floats per thread in the table"
    over = [(r["kernel"], r["arch"], r["registers"]) for r in small if r["registers"] > 128]
    assert not over, over


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
