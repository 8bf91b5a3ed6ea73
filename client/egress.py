"""The egress guard: the outermost ClientApp mod, which checks every reply against the reply the
protocol fixes for the message it answers, audits it, and blocks what breaks a rule
(docs/privacy-egress.md).

The message is parsed with the schema (common/federation/messages.py) and the reply must be
exactly what :func:`~fedct.common.federation.messages.reply_rules` allows for it:

* records: ``metrics`` and ``site``, and ``arrays`` in a reply to a train message only;
* arrays: exactly the travelling state of the model the instruction describes (built on the
  meta device; nothing computed, no weights read), packed as common/federation/transport.py
  packs it: one array of every floating-point value in the ``transport-dtype`` and one of the
  integer values, each of the model's size, their bytes exactly those of their shape;
* metrics: exactly the instruction's keys, each value within its rule (counts are whole and
  non-negative, shares in [0, 1], losses non-negative, NaN where a split has no scans); the
  histograms, when asked for, exactly as many non-negative integer counts as the site's
  policy allowed bins;
* ``site``: one key, ``name``, this site's name: the only string;
* a secure-aggregation stage (client/secagg.py) instead: its own record and nothing else —
  two public keys of 32 bytes; sealed shares of the exact size for exactly the neighbours
  the message named; one masked vector in the field's dtype (uint64) of exactly the length of
  the input the instruction describes (common/federation/secure_vector.py); shares of the
  exact size for no site but those the protocol lets this site reveal (itself and the
  neighbours it masked with, seed shares only for survivors and key shares only for the
  dropped);
* an error reply: a reason of the fixed vocabulary (common/federation/site_error.py) naming
  this site; any other error text is replaced.

A reply that breaks a rule is replaced by an error reply (``egress: …``), so the coordinator
counts a failure for the site and receives none of the content.  Every reply, blocked or not,
first gets a line in the site's audit log (node-config ``audit-log``, default
``<site cache>/fedct-audit.jsonl``): its structure only (record, array and metric names,
shapes, dtypes, bytes) and, for an error, its fixed reason: never a value and never an
exception's text.  A reply whose line cannot be written is not sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log

from fedct.client.audit_log import AUDIT_FILE, append_line, audit_log_path
from fedct.client.model_layout import local_entries, model_layout
from fedct.client.secagg import revealable
from fedct.client.site_data import cache_dir_of, declared_name
from fedct.client.site_errors import error_reply, issued_errors
from fedct.common.federation.messages import (
    ARRAYS_RECORD,
    COVID_KEY,
    MASKED_ARRAY,
    MASKED_RECORD,
    METRICS_RECORD,
    OTHER_KEY,
    SECAGG_RECORD,
    SECAGG_STAGES,
    SITE_KEY,
    SITE_RECORD,
    Instruction,
    SecAggMasked,
    SecAggStage,
    SecAggUnmask,
    TrainInstruction,
    histogram_fits,
    read_message,
    record_bytes,
    reply_rules,
)
from fedct.common.federation.secagg import FIELD_DTYPE
from fedct.common.federation.secure_vector import VectorSpec
from fedct.common.federation.site_error import (
    MAX_REASON,
    SiteRefusal,
    fixed_reason,
    site_error_reason,
)

_SHOWN_NAMES = 5


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``kind`` is fixed text, ``detail`` names the records, arrays and keys
    involved (their names and shapes, never a value), for the site's audit log only."""

    kind: str
    detail: str


def _names(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown + (f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else "")


def _record_violations(instruction: Instruction, reply: Message) -> list[Violation]:
    expected = {METRICS_RECORD: "MetricRecord", SITE_RECORD: "ConfigRecord"}
    if isinstance(instruction, TrainInstruction):
        expected[ARRAYS_RECORD] = "ArrayRecord"
    found = {name: type(record).__name__ for name, record in reply.content.items()}
    if found == expected:
        return []
    return [Violation("records other than the protocol's", f"records {_names(found)}")]


def _array_violations(instruction: Instruction, reply: Message) -> list[Violation]:
    record = reply.content.array_records.get(ARRAYS_RECORD)
    if record is None:
        return []
    layout = model_layout(instruction.model)
    return _arrays_fit(record, layout.packed_shapes(instruction.transport_dtype))


def _arrays_fit(
    record: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], str]]
) -> list[Violation]:
    """What breaks the rule that ``record`` holds exactly the ``expected`` arrays (name →
    shape, dtype), their bytes exactly those of their shape."""
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


def _metric_violations(instruction: Instruction, reply: Message) -> list[Violation]:
    record = reply.content.metric_records.get(METRICS_RECORD)
    if record is None:
        return []
    rules = reply_rules(instruction)
    out = []
    if extra := set(record) - set(rules):
        out.append(Violation("metrics the protocol does not have", f"keys {_names(extra)}"))
    if missing := set(rules) - set(record):
        out.append(Violation("metrics the protocol needs", f"keys {_names(missing)}"))
    bins = getattr(instruction, "histogram_bins", None)
    for key in sorted(set(rules) & set(record)):
        value = record[key]
        if key in (COVID_KEY, OTHER_KEY):
            ok = bins is not None and histogram_fits(value, bins)
        else:
            ok = not isinstance(value, list) and rules[key](value)
        if not ok:
            out.append(Violation("metric values outside the protocol's rules", f"key {key}"))
    return out


def _site_violations(reply: Message, site_name: str) -> list[Violation]:
    record = reply.content.config_records.get(SITE_RECORD)
    if record is None:
        return []
    if set(record) != {SITE_KEY}:
        keys = f"keys {_names(record)}"
        return [Violation("a site record with more than the site's name", keys)]
    if record[SITE_KEY] != site_name:
        return [Violation("a site name that is not this site's", f"record {SITE_RECORD}")]
    return []


def violations(
    instruction: Instruction | SecAggStage,
    reply: Message,
    site_name: str,
    context: Context | None = None,
) -> list[Violation]:
    """Every rule of the module docstring that ``reply`` (to ``instruction``) breaks;
    ``context`` holds the site's record of a secure aggregation (for its unmask stage)."""
    if isinstance(instruction, SecAggStage):
        return [
            *_stage_violations(instruction, reply, context),
            *_site_violations(reply, site_name),
        ]
    return [
        *_record_violations(instruction, reply),
        *_array_violations(instruction, reply),
        *_metric_violations(instruction, reply),
        *_site_violations(reply, site_name),
    ]


def _stage_violations(
    stage: SecAggStage, reply: Message, context: Context | None
) -> list[Violation]:
    expected = {**stage.reply_records, SITE_RECORD: "ConfigRecord"}
    found = {name: type(record).__name__ for name, record in reply.content.items()}
    if found != expected:
        return [Violation("records other than the protocol's", f"records {_names(found)}")]
    if problems := stage.reply_problems(reply):
        kind = "secure-aggregation values outside the protocol's rules"
        return [Violation(kind, _names(problems))]
    if isinstance(stage, SecAggMasked):
        instruction = stage.instruction
        spec = VectorSpec.for_instruction(
            instruction,
            model_layout(instruction.model),
            local_entries(instruction.model, instruction.fedbn),
        )
        shapes = {MASKED_ARRAY: ((spec.length,), str(np.dtype(FIELD_DTYPE)))}
        return _arrays_fit(reply.content.array_records[MASKED_RECORD], shapes)
    if isinstance(stage, SecAggUnmask):
        allowed = revealable(context.state, stage) if context is not None else None
        record = reply.content.config_records[SECAGG_RECORD]
        if allowed is None:
            return [Violation("unmask shares without a finished aggregation", "")]
        seeds, keys = set(record["seed-nodes"]), set(record["key-nodes"])
        if not (seeds <= allowed[0] and keys <= allowed[1]) or seeds & keys:
            return [Violation("unmask shares of sites the protocol does not allow", "")]
    return []


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
        "bytes": sum(record_bytes(record) for record in content.values()),
    }


def node_audit_log(context: Context) -> Path | None:
    """The audit log of this node: node-config ``audit-log``, else in its ``data-path``, else
    (in simulation) in the site's cache; None when none can be told."""
    data_path = str(context.node_config.get("data-path") or "").strip()
    if context.node_config.get("audit-log") or data_path:
        path = audit_log_path(context.node_config, Path(data_path).expanduser())
        # A default log lives in the cache, which the guard never creates.
        return path if context.node_config.get("audit-log") or path.parent.is_dir() else None
    try:
        cache = cache_dir_of(context.node_config, context.run_config)
    except Exception:  # noqa: BLE001 — the handler names the problem; here there is no log
        return None
    # Only where the log goes: the handler checks the cache itself (its sha256 once a message).
    return cache / AUDIT_FILE if cache.is_dir() else None


def _parsed(message: Message) -> Instruction | SecAggStage | None:
    try:
        return read_message(message)[0]
    except SiteRefusal:
        return None


def _error_fields(reply: Message, site: str, **fields: Any) -> tuple[Message, dict[str, Any]]:
    """An error reply and its audit fields: its fixed reason, without the site's name."""
    return reply, {**fields, "error": reply.error.reason[len(site_error_reason(site, "")) :]}


def _checked(
    message: Message,
    context: Context,
    call_next: ClientAppCallable,
    site: str,
    instruction: Instruction | None,
) -> tuple[Message, dict[str, Any]]:
    """The reply to send and its audit fields (``instruction``: the message as the schema
    reads it, None when it refuses it)."""
    with issued_errors() as issued:
        try:
            reply = call_next(message, context)
        except Exception as exc:  # noqa: BLE001 — client/site_errors.py normally catches all
            log(WARNING, "site %s: the ClientApp raised %s", site, type(exc).__name__)
            reply = error_reply(message, site, fixed_reason("internal"))
        if reply.has_error() and reply.error.reason not in issued:
            log(WARNING, "site %s: an error reply made outside fedct's vocabulary replaced", site)
            reply = error_reply(message, site, fixed_reason("internal"))
    if reply.has_error():
        return _error_fields(reply, site)
    if instruction is None:
        found = [Violation("a reply to a message the schema refuses", "")]
    else:
        found = violations(instruction, reply, site, context)
    fields = {**describe(reply), "blocked": bool(found)}
    fields["reasons"] = [f"{v.kind}: {v.detail}" if v.detail else v.kind for v in found]
    if not found:
        return reply, fields
    kinds = "; ".join(sorted({v.kind for v in found}))
    log(WARNING, "site %s: egress guard blocked the %s reply: %s", site, _type(message), kinds)
    reason = f"egress: the guard blocked the reply ({kinds})"[:MAX_REASON]
    return _error_fields(error_reply(message, site, reason), site, **fields)


def _type(message: Message) -> str:
    kind = message.metadata.message_type
    category, _, action = kind.partition(".")
    plain = kind in (MessageType.TRAIN, MessageType.EVALUATE)
    secure = category in (MessageType.TRAIN, MessageType.EVALUATE) and action in SECAGG_STAGES
    return kind if plain or secure else "other"


def egress_guard(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp mod: run the rest of the ClientApp, check its reply against the
    protocol, audit it, and send it, a fixed-vocabulary error in its place, or nothing but a
    fixed error when its audit line cannot be written."""
    site = declared_name(context.node_config, context.run_config)
    instruction = _parsed(message)
    entry: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "run": message.metadata.run_id,
        "round": instruction.server_round if instruction else None,
        "message_type": _type(message),
    }
    reply, fields = _checked(message, context, call_next, site, instruction)
    audit_log = node_audit_log(context)
    try:
        if audit_log is None:
            raise OSError("no audit log: the node config names neither audit-log nor a cache")
        append_line(audit_log, {**entry, **fields})
    except OSError as exc:
        log(WARNING, "site %s: reply withheld, its audit line cannot be written: %s", site, exc)
        return error_reply(message, site, fixed_reason("site"))
    return reply
