"""fedct as a hospital installs it: the wheel puts everything under one ``fedct`` namespace,
and the installed commands work from a folder that is not the checkout.

The wheel goes into a fresh virtual environment without its dependencies; those (torch,
Flower, ...) are this environment's, reached through a ``.pth`` line, because installing
6 GB again would test pip, not fedct.  A ``.pth`` line adds a folder to ``sys.path`` without
running that folder's own ``.pth`` files, so this checkout's editable install stays out of
the fresh environment.  ``flwr`` is installed into it (no dependencies) for its commands,
which ``fedct simulate`` runs from the environment's own ``bin``.  Building the wheel and
installing flwr reach PyPI, as ``make test``'s own install does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITES = ("hospital-a", "hospital-b")


def _run(command: list[str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _fresh_environment(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
             tmp_path).strip()
    )  # fmt: skip
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    _run([*pip, "--no-deps", str(wheel), f"flwr=={version('flwr')}"], tmp_path)
    # After the install: pip would take this environment's flwr for the one asked for.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_wheel_installs_under_fedct_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    source, dist = tmp_path / "source", tmp_path / "dist"
    listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT)
    for name in listed.splitlines():  # setuptools builds in the tree: not in the checkout's
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    _run([*pip_wheel, "-w", str(dist), str(source)], tmp_path)
    (wheel,) = dist.glob("fedct-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "fedct",
        wheel.name.split("-py")[0] + ".dist-info",
    }
    assert {"fedct/server/flower_app.toml", "fedct/common/cli.py"} <= set(names)

    bin_dir = _fresh_environment(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(
        [str(bin_dir / "python"), "-c", "import fedct.common; print(*fedct.common.__path__)"], work
    )
    assert Path(where.strip()).is_relative_to(bin_dir.parent)

    fedct = str(bin_dir / "fedct")
    assert "simulate" in _run([fedct, "--help"], work)
    assert _run([fedct, "--version"], work).startswith(f"fedct {version('fedct')}")
    _run([fedct, "synth", "--out", "raw", "--profile", "tiny", "--sites", "2", "--no-external"],
         work)  # fmt: skip
    for site in SITES:
        _run([fedct, "prepare", "--input", f"raw/sites/{site}", "--out", f"cache/{site}",
              "--labels", f"raw/sites/{site}/labels.csv",
              "--size", "32", "--min-slices", "4", "--workers", "1"], work)  # fmt: skip
    caches = ",".join(str(work / "cache" / site) for site in SITES)
    overrides = {
        "site-caches": caches,
        "backbone": "test_efficientnet",
        "image-size": 32,
        "num-server-rounds": 1,
        "batch-size": 4,
        "device": "cpu",
        "cross-site": "false",
        "run-dir": "run",
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    _run([fedct, "simulate", *sets, "--cpus", "2"], work)
    latest = json.loads((work / "run" / "latest.json").read_text())
    assert latest["round"] == 1
    assert (work / "run" / "flower" / "app" / "pyproject.toml").is_file()
