"""The default run's sample of the interpreted Triton cases (tests/conftest.py): it must hold every value of
every parameter, and every combination a test crosses, or a kernel path would go unchecked on CPU machines."""
import itertools

from hypothesis import given
from hypothesis import strategies as st

from .conftest import covering_sample

CASES = st.lists(st.dictionaries(st.sampled_from("abcd"), st.integers(0, 3), min_size=1), min_size=1, max_size=40)


@given(CASES)
def test_the_sample_holds_every_value_of_every_parameter(cases):
    kept = covering_sample(cases)
    assert kept <= set(range(len(cases)))
    assert {kv for i in kept for kv in cases[i].items()} == {kv for c in cases for kv in c.items()}


@given(CASES)
def test_the_sample_is_no_larger_than_the_values_it_must_hold(cases):
    """Each case taken holds at least one value not held before it."""
    assert len(covering_sample(cases)) <= len({kv for c in cases for kv in c.items()})


def test_a_full_cross_product_is_thinned_and_a_crossed_parameter_kept_whole():
    sims, dtypes, paths = ("dot", "l2", "l2sq"), ("f32", "bf16", "f16"), range(8)
    cases = [dict(similarity=s, dtype=t, path=p) for s, t, p in itertools.product(sims, dtypes, paths)]
    kept = covering_sample(cases)
    assert len(kept) == 8  # one case per path, the similarities and dtypes spread over them
    assert {cases[i]["path"] for i in kept} == set(paths)
    assert {cases[i]["dtype"] for i in kept} == set(dtypes) and {cases[i]["similarity"] for i in kept} == set(sims)
