"""Cache files, manifest, Dataset and the padding collate."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedct.common.cache.dataset import CacheDataset, make_loader, pad_collate
from fedct.common.cache.store import CacheError, read_manifest, write_manifest, write_scan


def _tiny_cache(root: Path, slice_counts=(3, 5, 2), classes=(0, 2, 1)) -> Path:
    rows = []
    for i, (n, cls) in enumerate(zip(slice_counts, classes, strict=True)):
        write_scan(root, f"s{i}", np.full((n, 16, 16), 10 * i, dtype=np.uint8))
        split = "train" if i < 2 else "test"
        rows.append({"scan_id": f"s{i}", "patient_id": f"p{i}", "class_index": cls, "split": split})
    write_manifest(root, rows)
    return root


def _item(dataset: CacheDataset, scan_id: str):
    """The dataset's item of ``scan_id`` (a dataset is in the order of its scans' content)."""
    return next(dataset[i] for i, row in enumerate(dataset.rows) if row["scan_id"] == scan_id)


def test_dataset_items_and_splits(tmp_path: Path) -> None:
    cache = _tiny_cache(tmp_path)
    assert len(CacheDataset(cache)) == 3
    train = CacheDataset(cache, splits=["train"])
    assert len(train) == 2 and train.class_counts() == [1, 0, 1]
    item = _item(train, "s1")
    assert item.pixels.shape == (5, 1, 16, 16) and item.label == 2 and item.scan_id == "s1"
    assert float(item.pixels.min()) >= 0.0 and float(item.pixels.max()) <= 1.0


def test_collate_pads_with_a_mask(tmp_path: Path) -> None:
    dataset = CacheDataset(_tiny_cache(tmp_path))
    items = [_item(dataset, f"s{i}") for i in range(3)]
    batch = pad_collate(items)
    assert batch.x.shape == (3, 5, 1, 16, 16)
    assert batch.mask.sum(dim=1).tolist() == [3, 5, 2]
    assert torch.all(batch.x[0, 3:] == 0) and batch.y.tolist() == [0, 2, 1]
    torch.testing.assert_close(batch.x[2, :2], items[2].pixels)


def test_loader_shuffle_is_seeded(tmp_path: Path) -> None:
    dataset = CacheDataset(_tiny_cache(tmp_path))
    order = [[b.scan_ids for b in make_loader(dataset, 1, shuffle=True, seed=s)] for s in (3, 3)]
    assert order[0] == order[1]


def test_missing_or_damaged_cache_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="manifest.csv: no manifest"):
        CacheDataset(tmp_path)
    cache = _tiny_cache(tmp_path)
    (cache / "scans" / "s0.npy").write_bytes(b"garbage")
    with pytest.raises(CacheError, match="s0.npy"):
        _item(CacheDataset(cache), "s0")
    (cache / "scans" / "s0.npy").unlink()
    with pytest.raises(CacheError, match="s0.npy"):
        _item(CacheDataset(cache), "s0")
    with pytest.raises(CacheError, match="unknown split"):
        CacheDataset(cache, splits=["validation"])


def test_manifest_is_sorted_and_complete(tmp_path: Path) -> None:
    rows = read_manifest(_tiny_cache(tmp_path))
    assert [r["scan_id"] for r in rows] == ["s0", "s1", "s2"]
    assert rows[0]["warnings"] == ""


def test_max_slices_draws_ordered_random_subsets(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_scan(root, "s0", np.arange(10, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2))
    write_manifest(root, [{"scan_id": "s0", "patient_id": "p", "class_index": 1, "split": "train"}])
    dataset = CacheDataset(root, max_slices=3, seed=0)
    draws = [dataset[0].pixels[:, 0, 0, 0] for _ in range(5)]
    assert all(len(d) == 3 and torch.all(d[1:] > d[:-1]) for d in draws)
    assert len({tuple(d.tolist()) for d in draws}) > 1
    assert CacheDataset(root)[0].pixels.shape[0] == 10
