"""The paper's experiments, one command each: ``hen experiment NAME`` (see docs/hen.md).

Each writes NAME.md (a Markdown table with the command that made it), NAME.json and PNG
plots under the output folder (``results/hen`` by default) and shows progress with tqdm.
"""
from __future__ import annotations

EXPERIMENTS = ("table1", "fig2", "fig3", "table2", "uniqueness", "masking")


def get(name: str):
    """The ``run(out, *, quick=False, ...)`` function of experiment ``name``."""
    if name == "table1":
        from .table1 import run
    elif name == "fig2":
        from .fig2 import run
    elif name == "fig3":
        from .fig3 import run
    elif name == "table2":
        from .text import run_table2 as run
    elif name == "uniqueness":
        from .text import run_uniqueness as run
    elif name == "masking":
        from .masking import run
    else:
        raise ValueError(f"experiment: expected one of {EXPERIMENTS}, got {name!r}")
    return run
