"""Choice of the torch device and of mixed precision: CUDA when present, the CPU otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class DeviceError(RuntimeError):
    """The requested device is unknown or not present on this machine."""


def pick_device(preference: str | torch.device = "auto") -> torch.device:
    """The device to compute on.

    ``"auto"`` gives CUDA when available, else the CPU; ``"cpu"``, ``"cuda"`` and ``"cuda:N"``
    are honoured as given and raise :class:`DeviceError` when that device does not exist.
    """
    text = str(preference).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {preference!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"unsupported device {preference!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {preference!r} requested but CUDA is not available here")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {preference!r} requested but only {count} CUDA device(s) exist")
    return device


AMP_MODES = ("auto", "off", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast precision on ``device``: bf16 (fp16 on GPUs without it) on CUDA, none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast precision ``amp`` asks for on ``device``: ``auto`` is
    :func:`autocast_dtype`, ``off`` full precision, ``bf16``/``fp16`` that dtype on any device
    (CPU autocast included)."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        return autocast_dtype(device)
    return _AMP_DTYPES.get(amp)


@contextlib.contextmanager
def autocast_context(device: torch.device, amp: str = "auto") -> Iterator[None]:
    """Mixed-precision autocast as ``amp`` asks (:func:`amp_dtype`); by default on CUDA only,
    a no-op on the CPU, where full precision is kept."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
