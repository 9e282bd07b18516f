"""The audit chain's record format: what a record holds, its canonical encoding and hash, and the
checks a record passes before it is queued (`AuditLog` in `store/audit.py` writes the chain,
`store/audit_verify.py` walks it).

The chain
---------
Every record has `seq` (1, 2, 3, … with no gaps: assigned under the head lock, not the autoincrement
`id`, which a rolled-back insert can skip), `prev_hash` (the `record_hash` of seq - 1; for seq 1 the
genesis value, 64 zeros) and `record_hash`, the lowercase hex SHA-256 of its canonical encoding:

    a JSON object with the twelve members action, credential_id, latency_ms, occurred_at,
    prev_hash, problem, request_id, seq, session_id, status, subject, upstream_status, plus `detail`
    when it is not null (every column but `id`, which the database assigns after hashing, and
    `record_hash` itself), keys in sorted order, no whitespace, UTF-8; null as null;
    strings as JSON strings escaping only `"`, `\\` and control characters (`\\b \\t \\n \\f \\r`,
    others as `\\u00xx`), everything else written as itself;
    integers (seq, status, upstream_status) as JSON integers;
    floats (occurred_at, latency_ms) as JSON strings of 16 lowercase hex digits, the big-endian
    IEEE-754 binary64 bit pattern, after mapping -0.0 to 0.0.

`detail` is present only on system events (a recorded verdict, a webhook delivered or dead-lettered:
see `SYSTEM_ACTIONS`); it holds their facts as a JSON string. Leaving it out when null keeps the hash
of every record written before it existed unchanged.

With floats carried as strings this is also the object's RFC 8785 (JCS) form, so the hash can be
recomputed from an export in any language. Floats are hashed as bits, not decimals, because both
engines store binary64 exactly (SQLite REAL, PostgreSQL double precision): what is read back is what
was hashed, whichever library formats decimals. SQLite stores -0.0 as 0 and NaN as NULL, hence the
-0.0 mapping and the refusal of NaN and infinities at `append`.

A purge deletes the oldest records and records the last deleted one as the anchor (`anchor_seq`,
`anchor_hash` in the head row): verification starts there. The chain proves that records were not
altered, removed or reordered by anyone who cannot also rewrite every later hash and the head;
someone with full write access to the database can rewrite all of it, so keep the head hash that
`verify` prints somewhere else (a ticket, a log shipper) and compare.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy import Float, Integer, String

from liveness_proxy.store.tables import audit_records

GENESIS_HASH = "0" * 64
HEAD_ROW_ID = 1


@dataclass(frozen=True, slots=True)
class AuditRecord:
    occurred_at: float
    request_id: str
    subject: str | None
    credential_id: str | None
    action: str
    session_id: str | None
    status: int
    upstream_status: int | None
    latency_ms: float
    problem: str | None
    detail: str | None = None


# Records the proxy writes on its own, not in answer to a request: one per fact, not per request.
SYSTEM_ACTIONS = frozenset(
    {"verdict.record", "session.unresolved", "webhook.delivered", "webhook.dead_letter", "webhook.disabled"}
)

# Records that stand for many requests: the failed authentications of one window, per credential
# kind and client address, and what did not fit (`store/failed_authentications.py`).
AUTH_FAILED = "auth.failed"
AUTH_FAILED_OVERFLOW = "auth.failed.overflow"
AGGREGATE_ACTIONS = frozenset({AUTH_FAILED, AUTH_FAILED_OVERFLOW})

RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(AuditRecord))
HASHED_FIELDS = tuple(sorted((*RECORD_FIELDS, "seq", "prev_hash")))
_FLOAT_FIELDS = frozenset(name for name in HASHED_FIELDS if isinstance(audit_records.c[name].type, Float))
_PG_INT4 = 2**31  # PostgreSQL INTEGER is 32-bit: a larger value would fail the whole batch there


class AuditChainMissing(RuntimeError):
    """The chain-head row is not there: the database was not migrated (`liveness-proxy db upgrade`)."""


# -- the canonical encoding -------------------------------------------------------------------------


def canonical_bytes(values: Mapping[Any, Any]) -> bytes:
    """The bytes a record's hash is taken over (see the module docstring). Raises ValueError for a
    value that has no canonical form (wrong type, NaN, infinity)."""
    document: dict[str, Any] = {}
    for name in HASHED_FIELDS:
        value = values.get(name) if name == "detail" else values[name]
        if name == "detail" and value is None:
            continue
        if name in _FLOAT_FIELDS:
            document[name] = _float_bits(value)
        elif value is None or (type(value) is int) or (type(value) is str):
            document[name] = value
        else:
            raise ValueError(f"{name}: {type(value).__name__} has no canonical form")
    try:  # orjson refuses strings that are not valid Unicode (lone surrogates)
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"not encodable: {exc}") from None


def record_hash(values: Mapping[Any, Any]) -> str:
    """Lowercase hex SHA-256 of `canonical_bytes(values)`."""
    return hashlib.sha256(canonical_bytes(values)).hexdigest()


def _float_bits(value: Any) -> str:
    if type(value) is not float and type(value) is not int:
        raise ValueError(f"{type(value).__name__} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("NaN and infinities have no canonical form")
    return struct.pack(">d", number + 0.0).hex()  # + 0.0 turns -0.0 into 0.0


@dataclass(frozen=True, slots=True)
class _ColumnRule:
    """What a column of `audit_records` accepts, read from the table once (not on every append)."""

    name: str
    kind: Literal["float", "int", "str"]
    nullable: bool
    max_length: int | None


def _column_rules() -> tuple[_ColumnRule, ...]:
    rules = []
    for name in RECORD_FIELDS:
        column = audit_records.c[name]
        kind: Literal["float", "int", "str"]
        if isinstance(column.type, Float):
            kind = "float"
        elif isinstance(column.type, Integer):
            kind = "int"
        elif isinstance(column.type, String):
            kind = "str"
        else:
            raise TypeError(f"audit column {name} has a type the record rules do not know")
        length = column.type.length if isinstance(column.type, String) else None
        rules.append(_ColumnRule(name, kind, bool(column.nullable), length))
    return tuple(rules)


_COLUMN_RULES = _column_rules()


def column_values(record: AuditRecord) -> dict[str, Any]:
    """The record as column values, checked against what both engines can store exactly."""
    values: dict[str, Any] = {}
    for rule in _COLUMN_RULES:
        name = rule.name
        value = getattr(record, name)
        if value is None:
            if not rule.nullable:
                raise ValueError(f"audit record {name}: required")
            values[name] = None
        elif rule.kind == "float":
            _float_bits(value)
            values[name] = float(value) + 0.0
        elif rule.kind == "int":
            if type(value) is not int or not -_PG_INT4 <= value < _PG_INT4:
                raise ValueError(f"audit record {name}: expected a 32-bit integer")
            values[name] = value
        else:
            if type(value) is not str:
                raise ValueError(f"audit record {name}: expected a string")
            if rule.max_length is not None and len(value) > rule.max_length:
                raise ValueError(f"audit record {name}: longer than {rule.max_length} characters")
            if "\x00" in value:
                raise ValueError(f"audit record {name}: contains NUL, which PostgreSQL cannot store")
            if not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError:
                    raise ValueError(f"audit record {name}: not valid Unicode") from None
            values[name] = value
    return values
