"""setup.py's build of hen_kernels/_C: setuptools hands the extension to CMake (CMakeLists.txt).

The CMake build folder is build/cmake.<python tag>.<key> in the source tree
(HEN_BUILD_DIR overrides it), kept between builds so a rebuild recompiles only
what changed, with one key per build environment (interpreter, torch, cmake,
ninja): a build from another environment, pip's isolated one say, never reuses
and so never breaks this one's folder.  A folder whose recorded tools are gone
(pip's temporary build environment is deleted after the build) cannot be
reused and is removed before the next build.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from typing import Dict, Optional

from setuptools import Extension
from setuptools.command.build_ext import build_ext

# CMakeCache entries naming a tool or input that must still exist for the folder to be reused.
CACHED_PATHS = ("CMAKE_COMMAND", "CMAKE_MAKE_PROGRAM", "CMAKE_CXX_COMPILER", "Python3_EXECUTABLE", "HEN_TORCH_DIR")


def cached_paths(build_dir: str) -> Dict[str, str]:
    found = {}
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt")) as f:
            for line in f:
                name, sep, value = line.rstrip("\n").partition("=")
                name = name.split(":", 1)[0]
                if sep and name in CACHED_PATHS and value:
                    found[name] = value
    except OSError:
        pass
    return found


def stale_reason(build_dir: str) -> Optional[str]:
    """Why a CMake build folder cannot be reused (a tool it recorded is gone), or None."""
    for name, path in cached_paths(build_dir).items():
        if not os.path.exists(path):
            return f"{name} {path} no longer exists"
    return None


def wipe_if_stale(build_dir: str) -> None:
    reason = stale_reason(build_dir)
    if reason is not None:
        print(f"hen_kernels: removing the stale build folder {build_dir} ({reason})", flush=True)
        shutil.rmtree(build_dir, ignore_errors=True)


def torch_dir() -> str:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building hen_kernels/_C needs torch importable by this Python "
                           f"({sys.executable}); or set HEN_KERNELS_SKIP_EXT=1 to install without it")
    return os.path.realpath(list(spec.submodule_search_locations)[0])


def build_dir_for_env(root: str) -> str:
    """The CMake build folder of this build environment; stale folders beside it are removed."""
    explicit = os.environ.get("HEN_BUILD_DIR")
    if explicit:
        wipe_if_stale(explicit)
        return explicit
    tools = [os.path.realpath(sys.executable), torch_dir(), shutil.which("cmake") or "", shutil.which("ninja") or ""]
    key = hashlib.sha1("\n".join(tools).encode()).hexdigest()[:10]
    tag = sysconfig.get_config_var("EXT_SUFFIX").rsplit(".", 1)[0].lstrip(".")
    for old in glob.glob(os.path.join(root, "build", "cmake.*")):
        wipe_if_stale(old)
    return os.path.join(root, "build", f"cmake.{tag}.{key}")


class CMakeExtension(Extension):
    def __init__(self, name: str, root: str):
        super().__init__(name, sources=[])
        self.root = root


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = build_dir_for_env(ext.root)
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
        subprocess.run(["cmake", "-S", ext.root, "-B", build_dir, *args], check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", build_dir, "--parallel", jobs], check=True)
