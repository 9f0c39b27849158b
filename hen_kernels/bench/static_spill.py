"""What a compiled config's spill code costs: the machine-code report's no_spills check (bench/static.py) and
its tables (static_report.py) judge each row by this."""
from __future__ import annotations

from typing import Optional

from ..triton.configs import MAX_REGISTERS


def costly_spill(row: dict) -> Optional[str]:
    """Why a compiled config's spill code costs time, or None when it has none that does.

    Compiled with .maxnreg 255 (``stack_at_ceiling``), a kernel that still has a stack frame needs more
    registers than a thread has: that is pressure, and which values ptxas spills moves between its
    versions.  Local loads and stores inside the bank loop run on every tile.  The rest is ptxas's own
    trade: without a .maxnreg it may hold a kernel to fewer registers, for more resident blocks, and
    spill a few bytes that are read once per program.
    """
    if not row.get("spills"):
        return None
    if row.get("stack_at_ceiling", 1):  # reports from before these fields were read count as costly
        return (f"{row.get('stack_at_ceiling', row['stack'])} B stack with all {MAX_REGISTERS} registers"
                + ("" if row["regs"] >= MAX_REGISTERS else f" ({row['stack']} B at ptxas's {row['regs']})"))
    if row.get("bank_loop_local", 1):
        return f"{row.get('bank_loop_local', '?')} local loads/stores in the bank loop at {row['regs']} registers"
    return None
