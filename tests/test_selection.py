"""Middle-slice selection is defined, centred and contiguous for every slice count."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedct.common.cache.selection import middle_slices


@given(st.integers(1, 2000), st.floats(0.01, 1.0))
def test_selection_is_centred_nonempty_and_inside(n: int, fraction: float) -> None:
    start, stop = middle_slices(n, fraction)
    k = stop - start
    assert 1 <= k <= n
    assert k == min(n, max(1, round(n * fraction)))
    assert start >= 0 and stop <= n
    assert start == (n - k) // 2
    assert abs((n - stop) - start) <= 1


@pytest.mark.parametrize(
    ("n", "expected"), [(1, (0, 1)), (2, (0, 1)), (3, (0, 2)), (5, (1, 3)), (40, (10, 30))]
)
def test_small_series_the_public_code_got_wrong(n: int, expected: tuple[int, int]) -> None:
    assert middle_slices(n, 0.5) == expected


@pytest.mark.parametrize(("n", "fraction"), [(0, 0.5), (10, 0.0), (10, 1.5)])
def test_invalid_arguments_raise(n: int, fraction: float) -> None:
    with pytest.raises(ValueError):
        middle_slices(n, fraction)
