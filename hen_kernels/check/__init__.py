"""`hen check` and `python -m hen_kernels.check`: the kernel contract, run on the user's machine.

Every available backend on every device it serves, against the float64
reference: every dtype and similarity, shapes off every block size, values ≠
memory, leading dims and a bank stored transposed, chunked merges and a MemoryBank
streamed in chunks, exact ties to the first row, ℓ2 queries next to stored rows,
NaN isolation, a bank row holding inf refused, the softmax weights' rounding, hard
and multi-step retrieval, energy, empty banks, per-query feature weights, and
gradients (weighted, saturated, few queries, one thread, ℓ2 at stored rows, 16-bit
ones rounded to nearest).  Prints one table
(backend x device x dtype: max error against tolerance, pass or fail) and exits
1 on any failure; ``--quick`` runs fewer, smaller shapes.  Needs no pytest.

The tolerances (docs/design.md §5) are :data:`TOLERANCE`, defined in ``hen_kernels.constants`` and
re-exported here.
"""
from .cases import TOLERANCE, Result, Target
from .runner import Report, main, run

__all__ = ["TOLERANCE", "Report", "Result", "Target", "main", "run"]
