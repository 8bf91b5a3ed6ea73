"""How fast the CLI answers: ``fedct --help`` and ``fedct CMD --help`` for every command, each
beside the import of the module that runs that command (what building its options cost when
the options lived in that module).

Each figure is the median of ``--repeats`` fresh interpreters, the two sides of a command
measured alternately: wall seconds (what a user waits) and CPU seconds of the process (user +
system, which other jobs on a shared machine do not inflate).  Prints a table and one summary
line; writes bench/results/cli_help.json.  Run: ``python -m bench.cli_help``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cli_help.json"
TARGET_SECONDS = 1.0


def _seconds(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of running ``command``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _medians(times: list[tuple[float, float]]) -> tuple[float, float]:
    return tuple(round(statistics.median(t[i] for t in times), 3) for i in (0, 1))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interpreters per figure")
    args = parser.parse_args(argv)
    fedct = shutil.which("fedct") or str(Path(sys.executable).parent / "fedct")
    commands = {ep.name: ep.load().module for ep in entry_points(group="fedct.commands")}
    rows = []
    for name in ["", *sorted(commands)]:
        help_times, import_times = [], []
        for _ in range(args.repeats):
            help_times.append(_seconds([fedct, *([name] if name else []), "--help"]))
            if name:
                import_times.append(_seconds([sys.executable, "-c", f"import {commands[name]}"]))
        help_wall, help_cpu = _medians(help_times)
        import_wall, import_cpu = _medians(import_times) if name else (None, None)
        row = {
            "command": f"fedct {name} --help".replace("  ", " "),
            "help_seconds": help_wall,
            "help_cpu_seconds": help_cpu,
            "running_module": commands.get(name),
            "import_seconds": import_wall,
            "import_cpu_seconds": import_cpu,
        }
        rows.append(row)
        imported = f"{import_wall:6.2f} s ({import_cpu:5.2f} CPU s)" if name else "-"
        print(
            f"{row['command']:<28} {help_wall:5.2f} s ({help_cpu:4.2f} CPU s)   import {imported}"
        )
    slowest = max(rows, key=lambda row: row["help_seconds"])
    slowest_cpu = max(rows, key=lambda row: row["help_cpu_seconds"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"repeats": args.repeats, "target_seconds": TARGET_SECONDS, "rows": rows}, indent=2
        )
        + "\n"
    )
    met = "met" if slowest["help_seconds"] < TARGET_SECONDS else "NOT met"
    print(
        f"slowest: {slowest['command']} in {slowest['help_seconds']:.2f} s (target < "
        f"{TARGET_SECONDS:.0f} s: {met}); most CPU: {slowest_cpu['command']}, "
        f"{slowest_cpu['help_cpu_seconds']:.2f} CPU s; written to {RESULTS}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
