"""`make bench` runs every benchmark as ``python -m bench.<module>`` from the repository root.

``python bench/<module>.py`` would put bench/ itself first on ``sys.path``, where ``import
bench`` fails: fedct installs as the ``fedct`` package and the repository root is not on the path.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_recipe() -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("bench:"))) + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_bench_runs_each_benchmark_as_a_module_that_imports() -> None:
    recipe = bench_recipe()
    assert len(recipe) >= 8
    for line in recipe:
        match = re.fullmatch(r"\$\(BIN\)/python -m (bench\.\w+)( .*)?", line)
        assert match, f"Makefile bench: {line!r} is not `$(BIN)/python -m bench.<module>`"
        module = importlib.import_module(match[1])
        assert callable(module.main), match[1]
