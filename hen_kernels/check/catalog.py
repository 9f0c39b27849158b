"""Every case `hen check` runs, in order, by the name ``--case`` takes."""
from __future__ import annotations

from typing import Callable, Iterator, List, Tuple

from .cases import (Result, Target, case_bank_chunks, case_chunked_merge, case_edges, case_energy, case_exact_ties,
                    case_far_from_the_origin, case_hard_retrieval, case_inf_bank, case_multi_step, case_nan_isolation,
                    case_near_stored_rows, case_partial, case_softmax_weights, case_values_and_leading_dims,
                    case_weights)
from .gradient_cases import (case_gradient_rounding, case_gradients, case_l2_gradients_at_stored_rows,
                             case_saturated_gradients, case_weighted_gradients)

CASES: List[Tuple[str, Callable[[Target, bool], Iterator[Result]]]] = [
    ("partial", case_partial),
    ("leading dims", case_values_and_leading_dims),
    ("chunked merge", case_chunked_merge),
    ("exact ties", case_exact_ties),
    ("bank in chunks", case_bank_chunks),
    ("near stored rows", case_near_stored_rows),
    ("NaN isolation", case_nan_isolation),
    ("inf bank row", case_inf_bank),
    ("softmax weights", case_softmax_weights),
    ("hard retrieval", case_hard_retrieval),
    ("multi-step retrieval", case_multi_step),
    ("energy", case_energy),
    ("edges", case_edges),
    ("weights", case_weights),
    ("far from the origin", case_far_from_the_origin),
    ("gradients", case_gradients),
    ("weighted gradients", case_weighted_gradients),
    ("saturated gradients", case_saturated_gradients),
    ("l2 gradients at stored rows", case_l2_gradients_at_stored_rows),
    ("gradient rounding", case_gradient_rounding),
]
