"""Patient-level, stratified, seeded splits."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from fedct.common.cache.splits import assign_splits


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(-1, 2)), min_size=1, max_size=200),
    st.integers(0, 3),
)
def test_no_patient_in_two_splits_and_deterministic(scans, seed) -> None:
    patients = [f"p{p}" for p, _ in scans]
    classes = [c for _, c in scans]
    splits = assign_splits(patients, classes, (0.7, 0.15, 0.15), seed)
    assert splits == assign_splits(patients, classes, (0.7, 0.15, 0.15), seed)
    owner: dict[str, str] = {}
    for patient, split in zip(patients, splits, strict=True):
        assert owner.setdefault(patient, split) == split


def test_each_class_is_split_in_proportion() -> None:
    patients = [f"p{i}" for i in range(300)]
    classes = [i % 3 for i in range(300)]
    splits = assign_splits(patients, classes, (0.6, 0.2, 0.2), seed=1)
    for cls in range(3):
        counts = Counter(s for s, c in zip(splits, classes, strict=True) if c == cls)
        assert counts == {"train": 60, "tune": 20, "test": 20}


def test_all_test_fraction_for_external_sets() -> None:
    assert set(assign_splits(["a", "b", "c"], [0, 2, 2], (0.0, 0.0, 1.0), 0)) == {"test"}
