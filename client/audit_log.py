"""The site's audit log: one JSON object per line, at the hospital only (docs/privacy-egress.md).

Its one owner: the egress guard (client/egress.py) writes a line for every reply, the site's
approvals (client/approvals.py) one for every decision and change.  This module imports
nothing heavy, so that ``fedct site`` starts without torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

AUDIT_FILE = "fedct-audit.jsonl"


def audit_log_path(node_config: Mapping[str, Any], cache_dir: Path) -> Path:
    """The site's audit log: node-config ``audit-log``, else ``AUDIT_FILE`` in the cache."""
    explicit = str(node_config.get("audit-log") or "").strip()
    return Path(explicit).expanduser() if explicit else cache_dir / AUDIT_FILE


def append_line(path: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` as one JSON line with a single write to a file opened for appending,
    so that lines of concurrent ClientApps never interleave."""
    data = (json.dumps(entry, sort_keys=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        written = os.write(handle, data)
    finally:
        os.close(handle)
    if written != len(data):
        raise OSError(f"{path}: audit line written only in part ({written} of {len(data)} bytes)")
