"""Global-model arrays on the server: dtype bookkeeping and byte counts.

Weights travel packed in ``transport-dtype`` (common/transport.py) but are aggregated,
evaluated and checkpointed with the model's own dtypes, which the initial model fixes:
replies are unpacked into them before aggregation, and the aggregate (in which averaging
has turned integer buffers such as BatchNorm's ``num_batches_tracked`` into float64) is
cast back after it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


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


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays, in the order given."""
    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in state.items()})


def payload_bytes(arrays: ArrayRecord) -> int:
    """Bytes of array data in a record (each array's ``.npy`` header included): what crosses
    the network per message, less the few hundred bytes of message framing."""
    return sum(len(array.data) for array in arrays.values())
