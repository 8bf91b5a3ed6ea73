"""What checking a site cache before it is used costs: headers and sizes against sha256.

Each site checks its cache before it trains or scores (client/site_data.py), and ``fedct
simulate`` checks every site cache before Flower starts (server/launch/preflight.py).  This
times :func:`~fedct.common.cache.scan_index.verify_cache` on each cache given (default: the
demo's, demo/cache/*) without and with ``checksum`` (every scan file's sha256 against the
scan index), as the median of ``--repeats`` runs with the files in the page cache (a site
checks the files it is about to read; a cold disk adds its read time, which training pays
anyway).  Prints one line per cache and a summary; writes
bench/results/cache_check.json.  Run: ``python -m bench.cache_check [CACHE ...]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, machine
from fedct.common.cache.scan_index import verify_cache
from fedct.common.cache.store import read_manifest


def _seconds(cache: Path, checksum: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        verify_cache(cache, checksum=checksum)
        times.append(time.perf_counter() - began)
    return round(statistics.median(times), 4)


def cpu_model() -> str:
    """The CPU's model name (Linux), for the figures' label."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def measure(cache: Path, repeats: int) -> dict[str, Any]:
    scans = len(read_manifest(cache))
    size = sum(p.stat().st_size for p in (cache / "scans").glob("*.npy"))
    sizes = _seconds(cache, False, repeats)
    sha = _seconds(cache, True, repeats)
    return {
        "cache": str(cache),
        "scans": scans,
        "megabytes": round(size / 1e6, 2),
        "headers_and_sizes_seconds": sizes,
        "sha256_seconds": sha,
        "sha256_over_sizes": round(sha / sizes, 1) if sizes else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caches", nargs="*", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "cache_check.json")
    args = parser.parse_args()
    caches = args.caches or sorted(p for p in Path("demo/cache").iterdir() if p.is_dir())
    rows = [measure(cache, args.repeats) for cache in caches]
    for row in rows:
        print(
            f"{row['cache']}: {row['scans']} scans, {row['megabytes']} MB: headers and sizes "
            f"{row['headers_and_sizes_seconds']} s, sha256 {row['sha256_seconds']} s"
        )
    total_sha = sum(r["sha256_seconds"] for r in rows)
    total_sizes = sum(r["headers_and_sizes_seconds"] for r in rows)
    print(
        f"cache check: {len(rows)} caches, headers and sizes {total_sizes:.3f} s, sha256 "
        f"{total_sha:.3f} s in all ({cpu_model()}, files in the page cache)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": {**machine(), "cpu": cpu_model()}, "caches": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
