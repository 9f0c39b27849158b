"""Build driver: setuptools hands the extension to CMake (CMakeLists.txt), as vLLM does.

Metadata and dependencies live in pyproject.toml; this file only builds
hen_kernels/_C.  Set HEN_KERNELS_SKIP_EXT=1 to install without it (the
package then serves the "torch" backend alone), CMAKE_ARGS to pass
extra options to CMake (e.g. -DHEN_CUDA=OFF to leave the CUDA kernels out,
-DHEN_CUDA_ARCHS="80;90;100") and HEN_BUILD_DIR to choose the CMake build
folder (default build/cmake.<python tag>/, kept between builds).
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        # A build folder that outlives pip's temporary one, so a rebuild after an
        # edit recompiles only what changed (the CUDA kernels take minutes).
        build_dir = os.environ.get("HEN_BUILD_DIR") or os.path.join(
            ROOT, "build", "cmake" + sysconfig.get_config_var("EXT_SUFFIX").rsplit(".", 1)[0])
        os.makedirs(build_dir, exist_ok=True)
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DHEN_EXT_DIR={os.path.dirname(target)}",
            f"-DHEN_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        subprocess.run(["cmake", "-S", ROOT, "-B", build_dir, *args], check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", build_dir, "--parallel", jobs], check=True)


ext_modules = [] if os.environ.get("HEN_KERNELS_SKIP_EXT") == "1" else [CMakeExtension("hen_kernels._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
