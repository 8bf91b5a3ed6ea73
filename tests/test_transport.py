"""Packed weight transport: exact round trips, half the bytes in float16, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedct.common.federation.transport import (
    FLOATING,
    INTEGER,
    Layout,
    TransportError,
    payload_bytes,
)
from fedct.common.model.classifier import ModelConfig, build_model, travelling_state

TINY = ModelConfig(backbone="test_efficientnet")


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(TINY)
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buffer.fill_(7)
    return travelling_state(model, TINY)


def test_float32_round_trip_is_exact_and_keeps_dtypes() -> None:
    state = _state()
    layout = Layout.of(state)
    packed = layout.pack(state, "float32")
    assert set(packed) == {FLOATING, INTEGER}
    back = layout.unpack(packed)
    assert list(back) == list(state)
    for name, value in state.items():
        assert back[name].dtype == value.numpy().dtype, name
        np.testing.assert_array_equal(back[name], value.numpy())
    assert back[next(k for k in state if k.endswith("num_batches_tracked"))] == 7


def test_float16_halves_the_bytes_and_rounds_only_the_floats() -> None:
    state = _state()
    layout = Layout.of(state)
    fp32, fp16 = layout.pack(state, "float32"), layout.pack(state, "float16")
    floats = sum(v.numel() for v in state.values() if v.is_floating_point())
    assert fp32[FLOATING].shape == fp16[FLOATING].shape == (floats,)
    assert fp16[FLOATING].dtype == "float16"
    # What does not halve: one .npy header per array (two arrays) and the int64 counters.
    fixed = 2 * payload_bytes(fp16) - payload_bytes(fp32)
    assert 0 < fixed <= 2 * 128 + 8 * sum(1 for k in state if k.endswith("tracked"))
    back = layout.unpack(fp16)
    for name, value in state.items():
        expected = value.numpy()
        if value.is_floating_point():
            expected = expected.astype(np.float16).astype(expected.dtype)
        np.testing.assert_array_equal(back[name], expected)


def test_weights_of_another_model_are_refused() -> None:
    state = _state()
    layout = Layout.of(state)
    group_norm = _gn_state()
    other = Layout.of(group_norm)
    with pytest.raises(TransportError, match="do not fit the model"):
        layout.unpack(other.pack(group_norm, "float32"))
    extra = layout.pack(state, "float32")
    extra["pixels"] = Array(np.zeros(4, np.float32))
    with pytest.raises(TransportError, match="do not fit the model"):
        layout.unpack(extra)
    with pytest.raises(TransportError, match="does not have the model.s entries"):
        layout.pack(dict(list(state.items())[1:]), "float32")
    nan = layout.pack(state, "float32")
    nan[FLOATING] = Array(np.full(nan[FLOATING].shape, np.nan, np.float32))
    with pytest.raises(TransportError, match="not finite"):
        layout.unpack(nan)
    wrong = layout.pack(state, "float32")
    wrong[FLOATING] = Array(np.zeros(wrong[FLOATING].shape, np.complex64))
    with pytest.raises(TransportError, match="dtype complex64"):
        layout.unpack(wrong)


def _gn_state() -> dict[str, torch.Tensor]:
    cfg = ModelConfig(backbone="test_efficientnet_gn", norm="group")
    return travelling_state(build_model(cfg), cfg)


shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
entries = st.lists(
    st.tuples(shapes, st.sampled_from(["float32", "float64", "int64"])), min_size=1, max_size=6
)


@settings(max_examples=40, deadline=None)
@given(entries, st.sampled_from(["float32", "float16"]), st.integers(0, 2**31 - 1))
def test_any_state_round_trips_in_order(
    spec: list[tuple[tuple[int, ...], str]], transport: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    state = {
        f"entry{i}": (rng.integers(-50, 50, shape) * 0.25).astype(dtype)
        for i, (shape, dtype) in enumerate(spec)
    }
    layout = Layout.of(state)
    record = layout.pack(state, transport)
    assert isinstance(record, ArrayRecord) and 1 <= len(record) <= 2
    back = layout.unpack(record)
    assert list(back) == list(state)
    for name, value in state.items():
        assert back[name].shape == value.shape and back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)  # quarter steps are exact in float16
