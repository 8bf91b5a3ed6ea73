"""How model weights travel between the coordinator and the sites: packed, in one dtype.

Flower stores every array of an ArrayRecord as its own ``.npy`` blob with a 128-byte header,
so an EfficientNet-B3 state of about 580 tensors carries 74 kB of headers per message, and
float16 transport would save less than half.  fedct packs the travelling state instead: a
message holds at most two arrays,

* ``floating``: every floating-point entry, flattened in state order and concatenated, in the
  transport dtype (float32 or float16);
* ``integer``: the integer entries (BatchNorm's ``num_batches_tracked``) as int64.

The layout (names, shapes and dtypes, in order) is not sent: both ends build the model from
the run's model config.  Its fingerprint travels in the message config (``layout``,
common/federation/messages.py), and a site refuses weights whose layout is not its own
model's (another fedct or timm version), of another dtype, or holding values that are not
finite.
Aggregation works on unpacked entries, so strategies see the model's state as usual.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedct.common.model.classifier import cast_to

LAYOUT_KEY = "layout"
FLOATING = "floating"
INTEGER = "integer"
TRANSPORT_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}


class TransportError(ValueError):
    """Weights that do not fit the model they are meant for."""


def transport_dtype(name: str) -> type[np.floating]:
    """The numpy dtype of a ``transport-dtype`` setting; TransportError for unknown names."""
    try:
        return TRANSPORT_DTYPES[name]
    except KeyError as exc:
        raise TransportError(
            f"transport-dtype must be one of {sorted(TRANSPORT_DTYPES)}, got {name!r}"
        ) from exc


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, Array):
        return value.numpy()
    return np.asarray(value)


def _packed_into(dtype: str) -> str:
    """The packed array an entry of ``dtype`` travels in."""
    return FLOATING if np.issubdtype(np.dtype(dtype), np.floating) else INTEGER


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a travelling state, in state order."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> Layout:
        """The layout of ``state`` (tensors, numpy arrays or Flower Arrays)."""
        entries = []
        for name, value in state.items():
            array = _numpy(value)
            entries.append((name, tuple(array.shape), str(array.dtype)))
        return cls(tuple(entries))

    @property
    def fingerprint(self) -> str:
        """A short hash of the layout, sent with the weights."""
        text = json.dumps([list(entry) for entry in self.entries])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def packed_sizes(self) -> dict[str, int]:
        """Values in each packed array of this layout (arrays without values are left out)."""
        sizes = {FLOATING: 0, INTEGER: 0}
        for _, shape, dtype in self.entries:
            sizes[_packed_into(dtype)] += int(np.prod(shape))
        return {key: size for key, size in sizes.items() if size}

    def packed_shapes(self, transport: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name → (shape, dtype) of the arrays a packed message of this layout holds."""
        dtypes = {FLOATING: str(np.dtype(transport_dtype(transport))), INTEGER: "int64"}
        return {key: ((size,), dtypes[key]) for key, size in self.packed_sizes().items()}

    def pack(self, state: Mapping[str, Any], transport: str) -> ArrayRecord:
        """``state`` (this layout's entries, in any order) as the arrays of
        :meth:`packed_shapes`, values in layout order."""
        names = [name for name, _, _ in self.entries]
        if set(state) != set(names):
            raise TransportError("the state to send does not have the model's entries")
        dtype = transport_dtype(transport)
        parts: dict[str, list[np.ndarray]] = {FLOATING: [], INTEGER: []}
        for name, shape, kind in self.entries:
            array = _numpy(state[name])
            if array.shape != shape:
                raise TransportError(f"{name} has shape {array.shape}, the model's is {shape}")
            array = array.reshape(-1)
            into = _packed_into(kind)
            parts[into].append(cast_to(array, dtype if into == FLOATING else np.int64))
        return ArrayRecord(
            {key: Array(np.concatenate(arrays)) for key, arrays in parts.items() if arrays}
        )

    def unpack(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """The entries of a packed ``record``, each in its layout shape and dtype."""
        expected = {key: (size,) for key, size in self.packed_sizes().items()}
        found = {key: tuple(array.shape) for key, array in record.items()}
        if found != expected:
            raise TransportError(
                f"packed weights {found} do not fit the model, which needs {expected}"
            )
        flat = {key: array.numpy() for key, array in record.items()}
        for key, values in flat.items():
            if values.dtype.kind != ("f" if key == FLOATING else "i"):
                raise TransportError(f"packed array {key} has dtype {values.dtype}")
            if key == FLOATING and not np.isfinite(values).all():
                raise TransportError("the packed weights hold values that are not finite")
        offsets = {FLOATING: 0, INTEGER: 0}
        state: dict[str, np.ndarray] = {}
        for name, shape, dtype in self.entries:
            key = _packed_into(dtype)
            size = int(np.prod(shape))
            values = flat[key][offsets[key] : offsets[key] + size]
            state[name] = cast_to(values.reshape(shape), dtype)
            offsets[key] += size
        return state


# The coordinator's side: weights are aggregated, evaluated and checkpointed with the model's
# own dtypes, which the initial model fixes; replies are unpacked into them before
# aggregation, and the aggregate is cast back after it.
def dtypes_of(arrays: ArrayRecord) -> dict[str, np.dtype]:
    return {key: np.dtype(array.dtype) for key, array in arrays.items()}


def conform(arrays: ArrayRecord, dtypes: dict[str, np.dtype]) -> ArrayRecord:
    """``arrays`` with every entry cast to its reference dtype, integers rounded."""
    out = ArrayRecord()
    for key, array in arrays.items():
        same = np.dtype(array.dtype) == dtypes[key]
        out[key] = array if same else Array(cast_to(array.numpy(), dtypes[key]))
    return out


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays, in the order given."""
    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in state.items()})


def payload_bytes(arrays: ArrayRecord) -> int:
    """Bytes of array data in a record (each array's ``.npy`` header included): what crosses
    the network per message, less the few hundred bytes of message framing."""
    return sum(len(array.data) for array in arrays.values())
