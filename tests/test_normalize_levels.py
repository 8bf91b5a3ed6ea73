"""``clip_levels`` is ``np.percentile(..., 99.5)`` bit for bit, whatever the values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedct.common.cache.normalize import CLIP_PERCENTILE, clip_levels


def reference(flat: np.ndarray) -> np.ndarray:
    return np.percentile(flat, CLIP_PERCENTILE, axis=1, keepdims=True).astype(np.float32)


def assert_same(flat: np.ndarray) -> None:
    flat = flat.astype(np.float32)
    got = clip_levels(flat, flat.min(axis=1, keepdims=True))
    assert got.dtype == np.float32 and got.shape == (len(flat), 1)
    assert np.array_equal(got, reference(flat), equal_nan=True)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20_000),
    kind=st.sampled_from(["normal", "integers", "air-and-bone", "few-values", "sorted"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_equals_numpy(n: int, kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (3, n)
    flat = {
        "normal": lambda: rng.normal(0, 500, shape),
        "integers": lambda: rng.integers(-1024, 3000, shape),
        "air-and-bone": lambda: np.where(
            rng.random(shape) < 0.997, -1024, rng.integers(0, 3000, shape)
        ),
        "few-values": lambda: rng.choice([-0.0, 0.0, 1.0, 7.5], shape),
        "sorted": lambda: np.sort(rng.normal(0, 1, shape), axis=1),
    }[kind]()
    assert_same(flat)


def test_constant_rows_and_a_512_slice() -> None:
    assert_same(np.full((2, 512 * 512), -1024.0))
    rng = np.random.default_rng(0)
    assert_same(np.rint(rng.normal(-600, 400, (4, 512 * 512))))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_and_infinite_values() -> None:
    rng = np.random.default_rng(1)
    flat = rng.normal(0, 1, (3, 5000))
    flat[1, 7] = np.nan
    assert_same(flat)
    assert_same(rng.choice([0.0, 1.0, np.inf, -np.inf], (3, 5000)))
