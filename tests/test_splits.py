"""Patient-level, seeded splits that never move (common/cache/splits.py)."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from fedct.common.cache.splits import assign_splits

FRACTIONS = (0.7, 0.15, 0.15)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=200),
    st.lists(st.integers(41, 400), max_size=200),
    st.integers(0, 3),
)
def test_a_patients_split_depends_on_the_patient_and_seed_only(before, added, seed) -> None:
    """All scans of a patient share one split, and adding patients (a new export) or
    removing some never moves anyone else."""
    patients = [f"p{p}" for p in before]
    splits = assign_splits(patients, FRACTIONS, seed)
    owner: dict[str, str] = {}
    for patient, split in zip(patients, splits, strict=True):
        assert owner.setdefault(patient, split) == split
    grown = patients + [f"p{p}" for p in added]
    assert assign_splits(grown, FRACTIONS, seed)[: len(patients)] == splits
    kept = patients[len(patients) // 2 :]
    assert assign_splits(kept, FRACTIONS, seed) == splits[len(patients) // 2 :]


def test_each_split_gets_its_fraction_in_expectation() -> None:
    """Over 30 000 patients every split is within 1.5 percentage points of its fraction
    (the binomial standard deviation is 0.2 points); bench/split_balance.py measures the
    spread at a site's size."""
    patients = [f"patient-{i}" for i in range(30_000)]
    counts = Counter(assign_splits(patients, (0.6, 0.2, 0.2), seed=1))
    for split, fraction in zip(("train", "tune", "test"), (0.6, 0.2, 0.2), strict=True):
        assert abs(counts[split] / len(patients) - fraction) < 0.015
    assert assign_splits(patients[:100], (0.6, 0.2, 0.2), seed=2) != assign_splits(
        patients[:100], (0.6, 0.2, 0.2), seed=1
    )


def test_all_test_fraction_for_external_sets() -> None:
    assert set(assign_splits([f"p{i}" for i in range(200)], (0.0, 0.0, 1.0), 0)) == {"test"}
    assert set(assign_splits([f"p{i}" for i in range(200)], (1.0, 0.0, 0.0), 0)) == {"train"}
