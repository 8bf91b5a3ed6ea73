"""The torch Dataset over a site cache: one item per scan, its selected slices as a tensor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedct.common.cache.store import SPLITS, CacheError, content_order, read_manifest, scan_path
from fedct.common.classes import GLOBAL_CLASSES

UNLABELLED = -1  # the class index of a scan without a label (the manifest's class_index)


class ScanItem(NamedTuple):
    pixels: torch.Tensor  # (S, 1, H, W) float32 grey values in [0, 1]
    label: int
    scan_id: str
    patient_id: str


class Batch(NamedTuple):
    x: torch.Tensor  # (B, S_max, 1, H, W)
    mask: torch.Tensor  # (B, S_max) bool, True for real slices
    y: torch.Tensor  # (B,) long
    scan_ids: list[str]
    patient_ids: list[str]


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (S, H, W) cache pixels → float32 (S, 1, H, W) in [0, 1].  The model makes the
    backbone's three normalised channels (``SliceClassifier.backbone_input``)."""
    grey = torch.from_numpy(np.array(pixels, dtype=np.uint8)).float().div_(255.0)
    return grey.unsqueeze(1)


class CacheDataset(Dataset[ScanItem]):
    """The labelled scans of one cache (with ``unlabelled``, every scan; an unlabelled one has
    label :data:`UNLABELLED`), optionally restricted to some splits.

    ``max_slices`` > 0 makes every access return a fresh random subset of at most that many of
    a scan's slices, in order: a training-time augmentation that also bounds the compute per
    scan (the mean over a random subset is an unbiased estimate of the mean over all slices).
    Evaluation uses every slice (``max_slices`` = 0).
    """

    def __init__(
        self,
        cache_dir: Path,
        splits: Sequence[str] | None = None,
        *,
        max_slices: int = 0,
        seed: int = 0,
        unlabelled: bool = False,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_slices = max_slices
        self._rng = np.random.default_rng(seed)
        unknown = set(splits or ()) - set(SPLITS)
        if unknown:
            raise CacheError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
        rows = [
            row
            for row in read_manifest(self.cache_dir)
            if (unlabelled or int(row["class_index"]) >= 0)
            and (splits is None or row["split"] in splits)
        ]
        self.rows = sorted(rows, key=content_order(self.cache_dir))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> ScanItem:
        row = self.rows[index]
        path = scan_path(self.cache_dir, row["scan_id"])
        try:
            pixels = np.load(path, mmap_mode="r")
        except Exception as exc:  # numpy's header parser raises many types on damaged bytes
            raise CacheError(f"{path}: unreadable cached scan ({exc})") from exc
        if 0 < self.max_slices < len(pixels):
            pixels = pixels[np.sort(self._rng.choice(len(pixels), self.max_slices, replace=False))]
        return ScanItem(
            to_model_input(pixels), int(row["class_index"]), row["scan_id"], row["patient_id"]
        )

    def labels(self) -> np.ndarray:
        return np.array([int(row["class_index"]) for row in self.rows], dtype=np.int64)

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels(), minlength=len(GLOBAL_CLASSES)).tolist()


def pad_collate(items: Sequence[ScanItem]) -> Batch:
    """Stack scans of different slice counts, zero-padding to the longest, with a mask."""
    longest = max(item.pixels.shape[0] for item in items)
    _, channels, height, width = items[0].pixels.shape
    x = torch.zeros(len(items), longest, channels, height, width)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, item in enumerate(items):
        n = item.pixels.shape[0]
        x[i, :n] = item.pixels
        mask[i, :n] = True
    y = torch.tensor([item.label for item in items], dtype=torch.long)
    return Batch(x, mask, y, [item.scan_id for item in items], [item.patient_id for item in items])


def make_loader(
    dataset: Dataset[ScanItem],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader[ScanItem]:
    """A DataLoader yielding :class:`Batch`; shuffling is seeded for reproducible rounds."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=pad_collate,
    )


def pooled(caches: Sequence[Path], splits: Sequence[str]) -> ConcatDataset[ScanItem]:
    """The ``splits`` of several caches as one dataset, cache after cache (the data of a
    centralized baseline, which no federated run may use)."""
    return ConcatDataset([CacheDataset(cache, list(splits)) for cache in caches])


def pooled_patients(data: ConcatDataset[ScanItem]) -> list[str]:
    """The patient of every scan of a :func:`pooled` dataset, in its order, made unique across
    caches: pseudonyms are salted per site, so equal ones at two sites are different people."""
    return [
        f"{i}/{row['patient_id']}"
        for i, part in enumerate(data.datasets)
        for row in part.rows  # type: ignore[attr-defined]
    ]
