"""Global-model arrays on the server: dtype bookkeeping, transport casts and byte counts.

Weights travel in ``transport-dtype`` (float32 or float16) but are aggregated, evaluated and
checkpointed with the model's own dtypes, which the initial model fixes: replies are cast
back before aggregation, and the aggregate (in which averaging has turned integer buffers
such as BatchNorm's ``num_batches_tracked`` into float64) is cast back after it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

TRANSPORT_DTYPES = {"float32": np.float32, "float16": np.float16}


def transport_dtype(name: str) -> type[np.floating]:
    """The numpy dtype of a ``transport-dtype`` setting; ValueError for unknown names."""
    try:
        return TRANSPORT_DTYPES[name]
    except KeyError as exc:
        raise ValueError(
            f"transport-dtype must be one of {sorted(TRANSPORT_DTYPES)}, got {name!r}"
        ) from exc


def dtypes_of(arrays: ArrayRecord) -> dict[str, np.dtype]:
    return {key: np.dtype(array.dtype) for key, array in arrays.items()}


def conform(arrays: ArrayRecord, dtypes: dict[str, np.dtype]) -> ArrayRecord:
    """``arrays`` with every entry cast to its reference dtype, integers rounded."""
    out = ArrayRecord()
    for key, array in arrays.items():
        wanted = dtypes[key]
        if np.dtype(array.dtype) == wanted:
            out[key] = array
            continue
        value = array.numpy()
        if not np.issubdtype(wanted, np.floating):
            value = np.rint(value)
        out[key] = Array(np.asarray(value, dtype=wanted))
    return out


def cast_floating(arrays: ArrayRecord, dtype: type[np.floating]) -> ArrayRecord:
    """``arrays`` with floating-point entries cast to ``dtype``; integer entries untouched."""
    out = ArrayRecord()
    for key, array in arrays.items():
        current = np.dtype(array.dtype)
        needs_cast = np.issubdtype(current, np.floating) and current != dtype
        out[key] = Array(array.numpy().astype(dtype)) if needs_cast else array
    return out


def payload_bytes(arrays: ArrayRecord) -> int:
    """Bytes of array data in a record, the size that crosses the network per message."""
    return sum(len(array.data) for array in arrays.values())
