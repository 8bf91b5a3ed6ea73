"""Intensity normalisation and resizing into cache pixels."""

import numpy as np
import pytest

from fedct.common.cache.dataset import to_model_input
from fedct.common.cache.normalize import (
    normalize_slices,
    parse_normalization,
    resize_slices,
    to_cache_pixels,
)


def test_ai_corona_clips_the_brightest_half_percent_then_rescales() -> None:
    rng = np.random.default_rng(0)
    slices = rng.normal(-500, 300, size=(2, 64, 64)).astype(np.float32)
    slices[0, 0, :10] = 3000.0  # a few metal-bright pixels
    out = normalize_slices(slices, parse_normalization("ai-corona"), "hu")
    for s, o in zip(slices, out, strict=True):
        high = np.percentile(s, 99.5)
        expected = (np.minimum(s, high) - s.min()) / (high - s.min())
        np.testing.assert_allclose(o, expected, atol=1e-5)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)


def test_constant_slice_does_not_divide_by_zero() -> None:
    out = normalize_slices(np.full((1, 8, 8), -1000.0), parse_normalization("ai-corona"), "hu")
    assert np.isfinite(out).all()


def test_lung_window_maps_minus_1000_to_400() -> None:
    hu = np.array([[[-1200.0, -1000.0, -300.0, 400.0, 900.0]]])
    out = normalize_slices(hu, parse_normalization("lung-window"), "hu")
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0])


def test_generic_window_and_display_inputs() -> None:
    norm = parse_normalization("window:40,400")
    np.testing.assert_allclose(
        normalize_slices(np.array([[[-160.0, 40.0, 240.0]]]), norm, "hu")[0, 0], [0, 0.5, 1]
    )
    np.testing.assert_allclose(
        normalize_slices(np.array([[[0.0, 255.0]]]), norm, "display")[0, 0], [0, 1]
    )


@pytest.mark.parametrize("spec", ["", "softtissue", "window:40", "window:40,0", "window:a,b"])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="normalisation"):
        parse_normalization(spec)


def test_resize_is_antialiased_and_keeps_the_mean() -> None:
    checker = np.indices((64, 64)).sum(axis=0) % 2
    small = resize_slices(checker[None].astype(np.float32), 16)
    assert small.shape == (1, 16, 16)
    assert np.abs(small - 0.5).max() < 0.05  # no aliasing back into a pattern


def test_cache_pixels_round_trip_to_model_input() -> None:
    hu = np.linspace(-1000, 400, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
    pixels = to_cache_pixels(hu, parse_normalization("lung-window"), "hu", 32)
    assert pixels.dtype == np.uint8 and pixels[0, 0, 0] == 0 and pixels[0, -1, -1] == 255
    x = to_model_input(pixels)
    assert x.shape == (1, 1, 32, 32)
    assert float(x[0, 0, 0, 0]) == 0.0 and float(x[0, 0, -1, -1]) == 1.0
