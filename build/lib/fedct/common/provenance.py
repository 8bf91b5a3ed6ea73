"""What produced a model or a report: the versions of fedct and of the libraries that decide
its numbers, recorded in every model card and evaluation report."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("fedct", "torch", "timm", "flwr")


def software_versions() -> dict[str, str]:
    """``{"fedct": "0.1.0", "torch": ..., "timm": ..., "flwr": ..., "python": ...}``; a
    package that is not installed is "not installed"."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions
