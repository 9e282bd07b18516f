"""The audit chain's record format: what a record holds, its canonical encoding and keyed hash, and
the checks a record passes before it is queued (`AuditLog` in `store/audit.py` writes the chain,
`store/audit_verify.py` walks it).

The chain
---------
Every record has `seq` (1, 2, 3, … with no gaps: assigned under the head lock, not the autoincrement
`id`, which a rolled-back insert can skip), `prev_hash` (the `record_hash` of seq - 1; for seq 1 the
genesis value, 64 zeros), `key_id` and `record_hash`: the lowercase hex HMAC-SHA256, under the audit
key named `key_id`, of its canonical encoding:

    a JSON object with the fifteen members action, credential_id, detail, key_id, latency_ms,
    occurred_at, personal_commitment, prev_hash, problem, request_id, seq, session_id, status,
    subject_commitment, upstream_status (every column but `id`, which the database assigns after
    hashing, `record_hash` itself, and the erasable plain values `subject`, `personal` and
    `erased_at`), keys in sorted order, no whitespace, UTF-8; null as null;
    strings as JSON strings escaping only `"`, `\\` and control characters (`\\b \\t \\n \\f \\r`,
    others as `\\u00xx`), everything else written as itself;
    integers (seq, status, upstream_status) as JSON integers;
    floats (occurred_at, latency_ms) as JSON strings of 16 lowercase hex digits, the big-endian
    IEEE-754 binary64 bit pattern, after mapping -0.0 to 0.0.

With floats carried as strings this is also the object's RFC 8785 (JCS) form, so the hash can be
recomputed from an export in any language that has the key. Floats are hashed as bits, not decimals,
because both engines store binary64 exactly (SQLite REAL, PostgreSQL double precision): what is read
back is what was hashed, whichever library formats decimals. SQLite stores -0.0 as 0 and NaN as NULL,
hence the -0.0 mapping and the refusal of NaN and infinities at `append`.

Keys and commitments
--------------------
The audit keys (`LIVENESS_PROXY_AUDIT_KEYS_FILE`, lines of `key_id:secret`; without it one key
derived from the API-key pepper, id `pepper`) never live in the database: someone who can write the
database but does not hold a key cannot recompute a hash after changing a record. The last key signs
new records; every listed key verifies.

Personal values are not hashed, their commitments are (store/subjects.py): `subject_commitment` is
the subject's own commitment under its secret; `personal_commitment` covers the other personal values
of a record (`personal`: a failed authentication's client address), keyed with a random salt stored
with them. Erasing the plain values (and, for a subject, its secret) leaves every hash intact.

`detail` holds a system event's non-personal facts (a recorded verdict, a webhook delivered or
dead-lettered, an erasure: see `SYSTEM_ACTIONS`) as a JSON string.

A purge deletes the oldest records and records the last deleted one as the anchor (`anchor_seq`,
`anchor_hash` in the head row): verification starts there. Migration 0008 re-chained the records of
the earlier, unkeyed format (`legacy_record_hash`) after verifying them, and recorded the old head in
an `audit.rechained` event.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import secrets
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
    # Set whenever `subject` is (store/subjects.py); stays when the subject is erased.
    subject_commitment: str | None = None
    # Other personal values and their commitment (see `personal_values`).
    personal: str | None = None
    personal_commitment: str | None = None


# Records the proxy writes on its own, not in answer to a request: one per fact, not per request.
SUBJECT_ERASED = "subject.erased"
SESSION_ERASED = "session.erased"
RETENTION_APPLIED = "retention.applied"
CHAIN_REKEYED = "audit.rechained"
SYSTEM_ACTIONS = frozenset(
    {
        "verdict.record",
        "session.unresolved",
        "webhook.delivered",
        "webhook.dead_letter",
        "webhook.disabled",
        SUBJECT_ERASED,
        SESSION_ERASED,
        RETENTION_APPLIED,
        CHAIN_REKEYED,
    }
)

# Records that stand for many requests: the failed authentications of one window, per credential
# kind and client address, and what did not fit (`store/failed_authentications.py`).
AUTH_FAILED = "auth.failed"
AUTH_FAILED_OVERFLOW = "auth.failed.overflow"
AGGREGATE_ACTIONS = frozenset({AUTH_FAILED, AUTH_FAILED_OVERFLOW})

RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(AuditRecord))
# The erasable plain values: kept beside their commitments, never hashed.
PLAIN_FIELDS = frozenset({"subject", "personal"})
HASHED_FIELDS = tuple(sorted({*RECORD_FIELDS, "seq", "prev_hash", "key_id"} - PLAIN_FIELDS))
LEGACY_HASHED_FIELDS = (
    "action", "credential_id", "detail", "latency_ms", "occurred_at", "prev_hash", "problem",
    "request_id", "seq", "session_id", "status", "subject", "upstream_status",
)  # fmt: skip
_FLOAT_FIELDS = frozenset(
    name for name in (*HASHED_FIELDS, *LEGACY_HASHED_FIELDS) if isinstance(audit_records.c[name].type, Float)
)
_PG_INT4 = 2**31  # PostgreSQL INTEGER is 32-bit: a larger value would fail the whole batch there


class AuditChainMissing(RuntimeError):
    """The chain-head row is not there: the database was not migrated (`liveness-proxy db upgrade`)."""


class AuditKeys:
    """The audit chain's HMAC keys by id; the last one signs new records."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one audit key is required")
        self._keys = dict(keys)
        if len(self._keys) != len(keys):
            raise ValueError("an audit key id appears twice")
        self.signing_key_id = keys[-1][0]
        # Each key's HMAC state, keyed once: a record's hash copies it instead of keying a new HMAC
        # (about half of the hash's cost, measured: every audit record is hashed once when written).
        self._keyed = {key_id: hmac.new(key, digestmod=hashlib.sha256) for key_id, key in keys}

    def get(self, key_id: str) -> bytes | None:
        return self._keys.get(key_id)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def sign(self, values: Mapping[Any, Any]) -> str:
        """The record hash of `values`, whose `key_id` must be a configured key."""
        keyed = self._keyed.get(values["key_id"])
        if keyed is None:
            raise ValueError(f"audit key {values['key_id']!r} is not configured")
        signer = keyed.copy()
        signer.update(canonical_bytes(values))
        return signer.hexdigest()


PEPPER_AUDIT_KEY_ID = "pepper"


def parse_audit_keys(text: str, *, pepper: str) -> AuditKeys:
    """`LIVENESS_PROXY_AUDIT_KEYS_FILE`'s content: lines of `key_id:secret` (blank lines and `#`
    comments ignored; secrets of at least 32 characters). The key derived from the pepper (id
    `pepper`) always verifies, and signs when the file lists no key: records written before a keys
    file existed stay verifiable after one is added."""
    derived = hmac.new(pepper.encode(), b"liveness-proxy audit chain key v1", hashlib.sha256).digest()
    keys: list[tuple[str, bytes]] = [(PEPPER_AUDIT_KEY_ID, derived)]
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, separator, secret = line.partition(":")
        key_id, secret = key_id.strip(), secret.strip()
        if not separator or not key_id:
            raise ValueError(f"line {number}: expected key_id:secret")
        if len(key_id) > 64 or not key_id.isascii() or not key_id.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"line {number}: a key id is 1-64 letters, digits, '-' or '_'")
        if key_id == PEPPER_AUDIT_KEY_ID:
            raise ValueError(f"line {number}: the key id {PEPPER_AUDIT_KEY_ID!r} is reserved")
        if len(secret) < 32:
            raise ValueError(f"line {number}: the secret of key {key_id} needs at least 32 characters")
        keys.append((key_id, secret.encode()))
    return AuditKeys(keys)


def system_event(
    action: str,
    *,
    request_id: str,
    occurred_at: float,
    facts: Mapping[str, object],
    session_id: str | None = None,
    subject_commitment: str | None = None,
) -> dict[str, Any]:
    """The column values of a system event (`SYSTEM_ACTIONS`) that names no subject in plain: its
    facts as canonical JSON in `detail`."""
    return column_values(
        AuditRecord(
            occurred_at=occurred_at,
            request_id=request_id,
            subject=None,
            credential_id=None,
            action=action,
            session_id=session_id,
            status=200,
            upstream_status=None,
            latency_ms=0.0,
            problem=None,
            detail=orjson.dumps(dict(facts), option=orjson.OPT_SORT_KEYS).decode(),
            subject_commitment=subject_commitment,
        )
    )


def personal_values(values: Mapping[str, str]) -> tuple[str, str]:
    """The `personal` and `personal_commitment` columns of values that belong to no subject (a
    client address): the values as JSON with a random salt, and an HMAC of the values under that
    salt. Erasing `personal` erases the salt with them, and the commitment can no longer be tested
    against a guess, however small the space of values."""
    salt = secrets.token_hex(32)
    body = orjson.dumps(dict(values), option=orjson.OPT_SORT_KEYS)
    commitment = hmac.new(bytes.fromhex(salt), body, hashlib.sha256).hexdigest()
    return orjson.dumps(
        {"salt": salt, "values": dict(values)}, option=orjson.OPT_SORT_KEYS
    ).decode(), commitment


def personal_matches(personal: str, commitment: str | None) -> bool:
    """Whether a stored `personal` column still matches its commitment."""
    try:
        document = orjson.loads(personal)
        salt = bytes.fromhex(document["salt"])
        body = orjson.dumps(document["values"], option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return False
    expected = hmac.new(salt, body, hashlib.sha256).hexdigest()
    return commitment is not None and hmac.compare_digest(expected, commitment)


# -- the canonical encoding -------------------------------------------------------------------------


def canonical_bytes(values: Mapping[Any, Any]) -> bytes:
    """The bytes a record's hash is taken over (see the module docstring). Raises ValueError for a
    value that has no canonical form (wrong type, NaN, infinity)."""
    return _canonical(values, HASHED_FIELDS, omit_null_detail=False)


def legacy_record_hash(values: Mapping[Any, Any]) -> str:
    """The unkeyed hash of the format before migration 0008: SHA-256 over the twelve members
    action, credential_id, latency_ms, occurred_at, prev_hash, problem, request_id, seq, session_id,
    status, subject, upstream_status, plus `detail` when not null, encoded as above. Only the
    migrations use it: 0003 to build that chain, 0008 to verify it before re-chaining."""
    return hashlib.sha256(_canonical(values, LEGACY_HASHED_FIELDS, omit_null_detail=True)).hexdigest()


def _canonical(values: Mapping[Any, Any], fields: tuple[str, ...], *, omit_null_detail: bool) -> bytes:
    document: dict[str, Any] = {}
    for name in fields:
        value = values.get(name) if name == "detail" else values[name]
        if omit_null_detail and name == "detail" and value is None:
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
    if values["subject"] is not None and values["subject_commitment"] is None:
        raise ValueError("audit record subject: written without its commitment")
    if values["personal"] is not None and values["personal_commitment"] is None:
        raise ValueError("audit record personal: written without its commitment")
    return values
