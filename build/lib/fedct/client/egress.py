"""The egress guard: a ClientApp mod that audits every reply before it leaves the site and
blocks the ones that carry more than the protocol allows (docs/privacy-egress.md).

Allowed in a reply:

* arrays only in a reply to a ``train`` message: one ArrayRecord, named as the one received,
  holding exactly the model's travelling state (every parameter and buffer, or the head only
  with a frozen backbone) packed as common/federation/transport.py packs it: one array of every
  floating-point value in the ``transport-dtype`` and one of the integer values, each of the
  model's size.  The model is the one described by the ``model-config`` of the incoming
  message, built on the meta device;
* metrics whose values are numbers; lists only under the histogram keys, when the coordinator
  asked for histograms, as that many non-negative integer counts;
* one ConfigRecord, ``site``, with one key, ``name``: this site's name.  It is the only string.

A reply that breaks a rule is replaced by an error reply, so the coordinator counts a failure
for the site and receives none of the content; the error names only the kinds of violation.
Every reply, blocked or not, first gets a line in the site's audit log (node-config
``audit-log``, default ``<site cache>/fedct-audit.jsonl``): structure only (record, array and
metric names, shapes, dtypes, bytes), never a value.  A reply whose line cannot be written is
not sent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.common.constant import ErrorCode

from fedct.client.site_data import resolve_site
from fedct.common.federation.transport import Layout
from fedct.common.metrics.pooled_operating_point import BINS_KEY, COVID_KEY, OTHER_KEY
from fedct.common.model.classifier import ModelConfig, build_model, travelling_state

AUDIT_FILE = "fedct-audit.jsonl"
CONFIG_RECORD = "config"
SITE_RECORD = "site"
SITE_KEY = "name"
HISTOGRAM_KEYS = frozenset({COVID_KEY, OTHER_KEY})
_SHOWN_NAMES = 5


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``kind`` is fixed text (all the coordinator learns), ``detail`` names
    the records and arrays involved, for the site's audit log only."""

    kind: str
    detail: str


@lru_cache(maxsize=4)
def model_layout(model_config: str) -> Layout:
    """The travelling-state layout of the model of ``model_config`` (the JSON the coordinator
    sends).  Built on the meta device and materialised uninitialised: nothing is computed,
    and no pretrained weights are read."""
    cfg = ModelConfig(**json.loads(model_config)).without_weights()
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    return Layout.of(travelling_state(model, cfg))


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


def _category(message: Message) -> str:
    return message.metadata.message_type.split(".", 1)[0]


def _array_violations(request: Message, reply: Message) -> list[Violation]:
    records = reply.content.array_records
    if not records:
        return []
    if _category(request) != MessageType.TRAIN:
        return [Violation("arrays in a reply that carries none", f"records {_names(records)}")]
    if len(records) > 1 or not set(records) <= set(request.content.array_records):
        return [Violation("array records other than the model's", f"records {_names(records)}")]
    config = request.content[CONFIG_RECORD]
    layout = model_layout(str(config["model-config"]))
    expected = layout.packed_shapes(str(config["transport-dtype"]))
    (record,) = records.values()
    out = []
    if extra := set(record) - set(expected):
        out.append(Violation("arrays that are not the model's", f"unexpected {_names(extra)}"))
    if missing := set(expected) - set(record):
        out.append(Violation("arrays that are not the model's", f"missing {_names(missing)}"))
    wrong = []
    for name in set(expected) & set(record):
        shape, dtype = expected[name]
        array = record[name]
        value = array.numpy()
        fits = value.shape == shape == tuple(array.shape) and str(value.dtype) == dtype
        # Bytes beyond the declared array would travel unseen by the checks above.
        if not fits or len(array.data) != len(Array(value).data):
            wrong.append(f"{name} {tuple(array.shape)} {array.dtype} (expected {shape} {dtype})")
    if wrong:
        out.append(Violation("arrays of the wrong shape, dtype or size", _names(wrong)))
    return out


def _histograms_ok(value: list[Any], bins: int | None) -> bool:
    return len(value) == bins and all(isinstance(v, int) and v >= 0 for v in value)


def _metric_violations(request: Message, reply: Message) -> list[Violation]:
    config = request.content.config_records.get(CONFIG_RECORD) or ConfigRecord()
    bins = int(config[BINS_KEY]) if BINS_KEY in config else None
    out = []
    for record_name, record in reply.content.metric_records.items():
        for key, value in record.items():
            where = f"{record_name}/{key}"
            if isinstance(value, list):
                if key not in HISTOGRAM_KEYS or not _histograms_ok(value, bins):
                    out.append(Violation("metric lists other than the requested histograms", where))
            elif isinstance(value, bool) or not isinstance(value, int | float):
                out.append(Violation("metric values that are not numbers", where))
    return out


def _config_violations(reply: Message, site_name: str) -> list[Violation]:
    out = []
    for record_name, record in reply.content.config_records.items():
        if record_name != SITE_RECORD or set(record) != {SITE_KEY}:
            detail = f"record {record_name} with keys {_names(record)}"
            out.append(Violation("config records other than the site's name", detail))
        elif record[SITE_KEY] != site_name:
            out.append(Violation("a site name that is not this site's", f"record {record_name}"))
    return out


def violations(request: Message, reply: Message, site_name: str) -> list[Violation]:
    """Every rule of the module docstring that ``reply`` (to ``request``) breaks."""
    return [
        *_array_violations(request, reply),
        *_metric_violations(request, reply),
        *_config_violations(reply, site_name),
    ]


def describe(reply: Message) -> dict[str, Any]:
    """The audit fields of a reply's content: its structure, no values."""
    content = reply.content
    return {
        "records": {name: type(record).__name__ for name, record in content.items()},
        "arrays": {
            name: {key: [list(a.shape), a.dtype] for key, a in record.items()}
            for name, record in content.array_records.items()
        },
        "metric_keys": {name: list(record) for name, record in content.metric_records.items()},
        "bytes": sum(record.count_bytes() for record in content.values()),
    }


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


def _server_round(message: Message) -> int | None:
    config = message.content.config_records.get(CONFIG_RECORD) or ConfigRecord()
    return int(config["server-round"]) if "server-round" in config else None


def egress_guard(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp mod: run the handler, audit its reply, and block it if it breaks a rule.

    A node whose site cannot be resolved fails here, with the error its handler would raise.
    """
    site = resolve_site(context.node_config, context.run_config)
    audit_log = audit_log_path(context.node_config, site.cache_dir)
    entry: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "run": message.metadata.run_id,
        "round": _server_round(message),
        "message_type": message.metadata.message_type,
    }
    try:
        reply = call_next(message, context)
    except Exception as exc:
        # Flower turns the exception into an error reply: record that one left.
        append_line(audit_log, {**entry, "blocked": False, "raised": type(exc).__name__})
        raise
    if reply.has_error():
        error = {"code": reply.error.code, "reason": reply.error.reason}
        append_line(audit_log, {**entry, "blocked": False, "error": error})
        return reply
    found = violations(message, reply, site.name)
    append_line(
        audit_log,
        {
            **entry,
            **describe(reply),
            "blocked": bool(found),
            "reasons": [f"{v.kind}: {v.detail}" for v in found],
        },
    )
    if not found:
        return reply
    kinds = "; ".join(sorted({v.kind for v in found}))
    log(
        WARNING,
        "site %s round %s: egress guard blocked the %s reply: %s",
        site.name,
        entry["round"],
        entry["message_type"],
        kinds,
    )
    reason = f"egress guard blocked the reply: {kinds} (details in the site's audit log)"
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=message)
