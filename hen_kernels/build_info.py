"""What the compiled extension hen_kernels/_C was built against, read from the file before it is loaded.

An extension compiled against one torch release may fail to load into another
(an undefined symbol) or, worse, load and misbehave.  cmake/torch.cmake
compiles a marker string into _C naming the torch it was built against; the
loader compares it with the running torch first and refuses a mismatch with a
message that names both releases and the fix, instead of loading it.
"""
from __future__ import annotations

import mmap
from typing import Dict, Optional

MARKER = b"hen_kernels-build-info "


def read(path: str) -> Optional[Dict[str, str]]:
    """The build's facts (torch, cuda, cxx11_abi) from the library file, or None for a build without them."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        start = m.find(MARKER)
        if start < 0:
            return None
        end = m.find(b";", start, start + 4096)
        if end < 0:
            return None
        text = m[start + len(MARKER):end].decode("ascii", "replace")
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def public_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': builds of one release (CPU, CUDA) share the C++ interface _C uses."""
    return version.split("+", 1)[0]


def torch_mismatch(path: str, running: Optional[str] = None) -> Optional[str]:
    """Why the extension at ``path`` must not be loaded into this torch, or None when it may."""
    if running is None:
        import torch

        running = torch.__version__
    info = read(path)
    built = info.get("torch") if info else None
    if built is None or public_version(built) == public_version(running):
        return None
    return (
        f"hen_kernels/_C ({path}) was built against torch {built}, but this Python runs torch {running}: "
        f"the compiled kernels are off (the 'torch' reference backend still works). Rebuild the extension "
        f"against this torch: `pip install --no-build-isolation --force-reinstall --no-deps <hen_kernels "
        f"checkout or sdist>` (`make install` in a checkout), or install torch=={public_version(built)}."
    )
