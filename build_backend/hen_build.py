"""The PEP 517 build backend of hen_kernels: setuptools', asking for the right torch to build against.

hen_kernels/_C is compiled against one torch release and loads only into that
release (hen_kernels/build_info.py refuses any other, naming both).  Under
pip's build isolation the build gets a torch of its own, by default the newest
release, whatever the environment being installed into has.  So the build asks
for the torch that environment already has (torch==its version), and for any
torch >= TORCH_MIN when it has none; setup.py then pins the wheel's torch to
the release it was built against, so pip installs the two together.

HEN_BUILD_TORCH replaces the requirement (e.g. HEN_BUILD_TORCH="torch==2.13.0").
With HEN_KERNELS_SKIP_EXT=1 nothing is compiled and no torch is asked for.
"""
from __future__ import annotations

import os
import sysconfig
from importlib import metadata
from typing import List, Optional

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook this module does not replace)

TORCH_MIN = "2.11"


def public_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': builds of one release differ only in their local label."""
    return version.split("+", 1)[0]


def torch_requirement(version: Optional[str]) -> str:
    """The torch to build against (and that the wheel then requires): exactly ``version`` when given."""
    return f"torch=={public_version(version)}" if version else f"torch>={TORCH_MIN}"


def installed_torch(paths: Optional[List[str]] = None) -> Optional[str]:
    """The torch version installed in the environment pip installs into, or None.

    pip runs these hooks with the target environment's interpreter but hides its
    site-packages from sys.path; sysconfig still names them.
    """
    if paths is None:
        paths = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    for dist in metadata.distributions(path=paths):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist.version
    return None


def _torch_requires() -> List[str]:
    if os.environ.get("HEN_KERNELS_SKIP_EXT") == "1":
        return []
    return [os.environ.get("HEN_BUILD_TORCH") or torch_requirement(installed_torch())]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _torch_requires()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _torch_requires()
