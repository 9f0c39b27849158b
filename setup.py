"""Build driver: setuptools hands the extension to CMake (CMakeLists.txt), as vLLM does.

Metadata lives in pyproject.toml.  This file builds hen_kernels/_C
(build_backend/hen_cmake.py: the CMake call and its build folder) and pins the
wheel's torch to the release _C was compiled against (build_backend/hen_build.py
says why).  Set HEN_KERNELS_SKIP_EXT=1 to install without the extension (the
package then serves the "torch" backend alone), CMAKE_ARGS to pass extra
options to CMake (e.g. -DHEN_CUDA=OFF to leave the CUDA kernels out,
-DHEN_CUDA_ARCHS="80;90;100") and HEN_BUILD_DIR to choose the CMake build
folder (default build/cmake.<python tag>.<key of the build environment>/).
"""
import os
import sys
from importlib import metadata

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_backend"))
from hen_build import torch_requirement  # noqa: E402
from hen_cmake import CMakeBuild, CMakeExtension  # noqa: E402

SKIP_EXT = os.environ.get("HEN_KERNELS_SKIP_EXT") == "1"


class BuildPy(build_py):
    """Copies every module, whatever the file times: a source older than its copy left in build/lib
    by an earlier build (files restored with their old times) would otherwise ship the old copy."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.force = True


def torch_dependency() -> str:
    # A wheel carries a _C built against the torch of its build: it requires exactly that release.
    # An sdist carries no _C (each of its builds pins its own), nor does a build without the extension.
    if SKIP_EXT or "sdist" in sys.argv[1:]:
        return torch_requirement(None)
    try:
        return torch_requirement(metadata.version("torch"))
    except metadata.PackageNotFoundError:
        return torch_requirement(None)


setup(
    ext_modules=[] if SKIP_EXT else [CMakeExtension("hen_kernels._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    install_requires=[torch_dependency(), "numpy", "safetensors>=0.4", "tqdm"],
)
