"""Signed checkpoints of the audit chain: the chain's head, signed with an Ed25519 key that never
lives in the database, and kept where the database's writers cannot rewrite it.

Why
---
The chain (`store/audit_chain.py`) shows any change short of rewriting every later hash and the
head row. Whoever can write the database can do exactly that: change a record, recompute the hashes
after it, delete the tail and lower the head, and `audit verify` passes. A checkpoint is a signed
statement "at time T the chain reached seq N, and record N's hash was H", written to the log stream
and optionally a file. Against it, such a rewrite shows: the record at N no longer has hash H
(`rewritten`), or the chain no longer reaches N (`truncated`). Forging a checkpoint needs the
private key, which the database host does not need to hold in any form the database could leak.

A checkpoint is one JSON line:

    {"type":"liveness-proxy.audit-checkpoint","v":1,"seq":N,"head_hash":"<64 hex>","anchor_seq":A,
     "at":"<ISO 8601 UTC, milliseconds, Z>","key":"<fingerprint>","signature":"<base64>"}

`key` is the first 16 hex digits of the SHA-256 of the raw 32-byte Ed25519 public key. `signature`
is Ed25519 over the canonical JSON (keys sorted, no whitespace, UTF-8: what orjson writes with
OPT_SORT_KEYS) of every other member, in standard base64 without `=` padding (86 characters: see
`encode_signature` for why no padding). All values are integers or ASCII strings, so the canonical
form can be rebuilt in any language from the parsed line.

What a checkpoint does not prove: anything about records after its seq (a later checkpoint covers
them), or that a purge was legitimate (a checkpoint at or before the purge anchor can no longer be
compared: `verify_checkpoints` counts it as such). A restore from a backup older than a checkpoint
reads as truncation: expected, and explained by the restore's date.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import orjson
import structlog
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from liveness_proxy.store.audit_chain import HEAD_ROW_ID, AuditChainMissing
from liveness_proxy.store.audit_verify import read_snapshot
from liveness_proxy.store.database import is_store_outage
from liveness_proxy.store.tables import audit_chain_head, audit_records

CHECKPOINT_TYPE = "liveness-proxy.audit-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_INTERVAL_SECONDS = 60.0
# Group-readable (a log shipper's group), never world-readable; the process's umask may narrow it.
CHECKPOINT_FILE_MODE = 0o640
# A key file is a few hundred bytes: a larger one is a mistake (a wrong path), not a key.
MAX_KEY_FILE_BYTES = 64 * 1024
# Seqs per query when checkpoints are compared with the chain (well under SQLite's variable limit).
_LOOKUP_BATCH = 500

_MEMBERS = frozenset({"type", "v", "seq", "head_hash", "anchor_seq", "at", "key", "signature"})
_HASH = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")
_SIGNATURE = re.compile(r"[A-Za-z0-9+/]{85}[AQgw]")  # 64 bytes: 86 characters, the last holding 2 bits
_INSTANT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


# -- keys -------------------------------------------------------------------------------------------


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw 32-byte public key: a checkpoint's `key`."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), what `openssl pkey -pubout` writes."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def new_signing_key_pem() -> bytes:
    """A fresh Ed25519 private key as unencrypted PKCS#8 PEM (what `openssl genpkey -algorithm
    ed25519` writes)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def read_key_file(path: Path) -> bytes:
    """A key file's bytes; ValueError (naming no content) when it cannot be read or is too large."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"the file is larger than {MAX_KEY_FILE_BYTES} bytes: not a key")
    return data


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM; ValueError for anything else (a private key included: hand
    auditors the public key, which `liveness-proxy audit signing-key` prints)."""
    if b"PRIVATE KEY" in data:
        raise ValueError("a private key: give the public key (PEM, 'BEGIN PUBLIC KEY')")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        # ValueError like every other refusal here: the callers report one kind of "unusable key".
        raise ValueError(f"not an Ed25519 key (it is {_key_kind(key)})")  # noqa: TRY004
    return key


class CheckpointSigner:
    """Signs checkpoints with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.fingerprint = key_fingerprint(self.public_key)

    @classmethod
    def from_pem(cls, data: bytes) -> CheckpointSigner:
        """From an unencrypted PKCS#8 PEM private key; ValueError (naming no key material) for
        anything else: another key type, an encrypted key, or not a key at all."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:  # cryptography's way of saying the key is encrypted
            raise ValueError(
                "the private key is encrypted: give an unencrypted PKCS#8 key and protect the file instead"
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            raise ValueError(
                "not a PEM private key (make one with `liveness-proxy audit signing-key --out FILE` "
                "or `openssl genpkey -algorithm ed25519`)"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"not an Ed25519 private key (it is {_key_kind(key)})")  # noqa: TRY004
        return cls(key)

    @classmethod
    def from_file(cls, path: Path) -> CheckpointSigner:
        return cls.from_pem(read_key_file(path))

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)

    def __repr__(self) -> str:  # never the key itself
        return f"CheckpointSigner(key={self.fingerprint})"


def _key_kind(key: object) -> str:
    kinds = (
        ((rsa.RSAPrivateKey, rsa.RSAPublicKey), "an RSA key"),
        ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "an EC key"),
        ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "an Ed448 key"),
        ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "a DSA key"),
        ((x25519.X25519PrivateKey, x25519.X25519PublicKey), "an X25519 key"),
        ((x448.X448PrivateKey, x448.X448PublicKey), "an X448 key"),
        ((Ed25519PublicKey,), "an Ed25519 public key"),
    )
    for types, kind in kinds:
        if isinstance(key, types):
            return kind
    return "another kind of key"


# -- the checkpoint ---------------------------------------------------------------------------------


class ChainHead(NamedTuple):
    """Where the chain ends (`seq`, `head_hash`) and, after a purge, where it now starts."""

    seq: int
    head_hash: str
    anchor_seq: int


async def read_head(engine: AsyncEngine) -> ChainHead:
    """The chain head as committed now; AuditChainMissing when the database was never migrated."""
    async with engine.connect() as connection:
        head, _anchor_hash = await _head(connection)
    return head


async def _head(connection: AsyncConnection) -> tuple[ChainHead, str]:
    """The head, and the anchor's hash (the last purged record's)."""
    head = audit_chain_head.c
    row = (
        await connection.execute(
            select(head.last_seq, head.last_hash, head.anchor_seq, head.anchor_hash).where(
                head.id == HEAD_ROW_ID
            )
        )
    ).one_or_none()
    if row is None:
        raise AuditChainMissing("the audit chain head is missing: run `liveness-proxy db upgrade`")
    return ChainHead(int(row.last_seq), str(row.last_hash), int(row.anchor_seq)), str(row.anchor_hash)


def format_instant(epoch: float) -> str:
    """ISO 8601 in UTC with milliseconds and `Z`: 2026-01-31T12:00:00.123Z."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def signed_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    """What the signature covers: every member but `signature`, canonical JSON."""
    return orjson.dumps(
        {name: value for name, value in checkpoint.items() if name != "signature"},
        option=orjson.OPT_SORT_KEYS,
    )


def make_checkpoint(signer: CheckpointSigner, head: ChainHead, *, at: float) -> dict[str, Any]:
    """A signed checkpoint of `head`, dated `at` (epoch seconds), in the documented member order."""
    checkpoint: dict[str, Any] = {
        "type": CHECKPOINT_TYPE,
        "v": CHECKPOINT_VERSION,
        "seq": head.seq,
        "head_hash": head.head_hash,
        "anchor_seq": head.anchor_seq,
        "at": format_instant(at),
        "key": signer.fingerprint,
    }
    checkpoint["signature"] = encode_signature(signer.sign(signed_bytes(checkpoint)))
    return checkpoint


def encode_signature(signature: bytes) -> str:
    """Standard base64 without the `=` padding: with it, the log redactor would read the signature
    as a `name=value` pair and mask the value whenever the part before the `=` happens to contain
    a secret-sounding word ("key", "auth", "pwd"…: about one signature in 200)."""
    return base64.b64encode(signature).decode("ascii").rstrip("=")


def decode_signature(text: str) -> bytes:
    """The 64 signature bytes; ValueError for anything but 86 characters of unpadded base64."""
    if not _SIGNATURE.fullmatch(text):
        raise ValueError("not an unpadded base64 Ed25519 signature")
    return base64.b64decode(text + "==", validate=True)


def checkpoint_line(checkpoint: Mapping[str, Any]) -> bytes:
    return orjson.dumps(checkpoint) + b"\n"


def append_line(path: Path, line: bytes) -> None:
    """Appends `line` to `path` in one write and syncs it. Opened per line: a rotated file is
    followed at once, and several processes (workers, replicas on a shared volume) appending to one
    file do not interleave within a line (O_APPEND on a local file system)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, CHECKPOINT_FILE_MODE)
    try:
        written = os.write(descriptor, line)
        if written != len(line):  # a full disk: the line is cut; the next period tries again
            raise OSError(f"short write ({written} of {len(line)} bytes)")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- writing them -----------------------------------------------------------------------------------


class CheckpointFileError(Exception):
    """The checkpoint was signed and logged, but could not be appended to the file."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.reason = error.strerror or str(error)


class CheckpointWriter:
    """Every `interval_seconds`, signs the chain head if it moved since this process's last
    checkpoint, logs it (event `audit_checkpoint`, member `checkpoint`) and appends it to `path`
    when set; once more on `close()`.

    Each process (every worker, every replica) runs its own writer and writes its own checkpoints:
    they are independent signed statements about one chain, so duplicates and interleaving are
    harmless, and no coordination is needed. A store outage or a file that cannot be written is
    logged (`audit_checkpoint_failed`) and tried again the next period; it never ends the process.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        signer: CheckpointSigner,
        *,
        logger: structlog.typing.FilteringBoundLogger,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        path: Path | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_seconds > 0:
            raise ValueError("interval_seconds must be greater than 0")
        self._engine = engine
        self._signer = signer
        self._logger = logger
        self._interval_seconds = interval_seconds
        self._path = path
        self._wall_clock = wall_clock
        self._last: tuple[int, str] | None = None  # (seq, head_hash) of the last checkpoint written
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the periodic task; the first checkpoint is taken at once."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit checkpoints")

    async def write_if_moved(self) -> dict[str, Any] | None:
        """Signs and writes a checkpoint if the head moved since the last one; returns it (None when
        the head did not move, or the chain is still empty). Raises what reading the head raised, or
        CheckpointFileError (after logging the checkpoint) when the file could not take it."""
        head = await read_head(self._engine)
        if head.seq == 0 or (head.seq, head.head_hash) == self._last:
            return None
        checkpoint = make_checkpoint(self._signer, head, at=self._wall_clock())
        self._logger.info("audit_checkpoint", checkpoint=checkpoint)
        if self._path is not None:
            # Off the event loop: fsync can take milliseconds. Not remembered as written until the
            # file has it, so a failed append is signed and written again next period.
            try:
                await asyncio.to_thread(append_line, self._path, checkpoint_line(checkpoint))
            except OSError as exc:
                raise CheckpointFileError(exc) from exc
        self._last = (head.seq, head.head_hash)
        return checkpoint

    async def close(self) -> None:
        """Stops the task, then writes one last checkpoint (the records written at shutdown: close
        this after the audit log). Never raises for a failed write: it is logged."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._attempt()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._attempt()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval_seconds)

    async def _attempt(self) -> None:
        try:
            await self.write_if_moved()
        except CheckpointFileError as exc:
            self._logger.warning("audit_checkpoint_failed", stage="file", reason=exc.reason)
        except Exception as exc:
            # The class name only: a driver's message may quote the database URL, password included.
            self._logger.warning(
                "audit_checkpoint_failed",
                stage="store",
                reason=type(exc).__name__,
                store_outage=is_store_outage(exc),
            )


# -- verifying them ---------------------------------------------------------------------------------

CheckpointProblemKind = Literal["unreadable", "forged", "truncated", "deleted", "rewritten"]


@dataclass(frozen=True, slots=True)
class CheckpointProblem:
    """A line that is not a checkpoint (`unreadable`), a checkpoint whose signature does not verify
    with any key given (`forged`), or one the chain contradicts: it ends before the checkpoint's seq
    (`truncated`), the record at that seq is missing (`deleted`), or has another hash
    (`rewritten`)."""

    line: int
    kind: CheckpointProblemKind
    seq: int | None
    detail: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.kind}: {self.detail}"


@dataclass(frozen=True, slots=True)
class VerifiedCheckpoint:
    line: int
    seq: int
    head_hash: str
    at: str
    key: str


@dataclass(frozen=True, slots=True)
class CheckpointReport:
    """`checked`: checkpoints found. `matched`: those the chain agrees with; `before_anchor`: those
    at or before the purge anchor, which can no longer be compared (neither is a problem);
    `other_lines`: log lines of other events, skipped (so the whole log stream can be given)."""

    checked: int
    matched: int
    before_anchor: int
    other_lines: int
    head_seq: int
    anchor_seq: int
    latest: VerifiedCheckpoint | None  # the matched checkpoint with the highest seq
    problems: tuple[CheckpointProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


class _Unreadable(ValueError):
    pass


def parse_checkpoint_line(text: str | bytes) -> dict[str, Any] | None:
    """The checkpoint a line holds: the checkpoint object itself, or a JSON log line whose
    `checkpoint` member holds it. None for a log line of another event (a JSON object with an
    `event` member). Raises ValueError (the reason) for anything else."""
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise _Unreadable("not JSON") from None
    if not isinstance(document, dict):
        raise _Unreadable("not a JSON object")
    if "checkpoint" in document and document.get("type") != CHECKPOINT_TYPE:
        document = document["checkpoint"]
        if not isinstance(document, dict):
            raise _Unreadable("its `checkpoint` member is not an object")
    elif document.get("type") != CHECKPOINT_TYPE:
        if "event" in document:
            return None
        raise _Unreadable("neither a checkpoint nor a log line holding one")
    _check_shape(document)
    return document


def _check_shape(checkpoint: dict[str, Any]) -> None:
    if checkpoint.get("type") != CHECKPOINT_TYPE:
        raise _Unreadable(f"its type is not {CHECKPOINT_TYPE}")
    if checkpoint.get("v") != CHECKPOINT_VERSION or type(checkpoint.get("v")) is not int:
        raise _Unreadable(f"version {checkpoint.get('v')!r} is not supported (this version reads 1)")
    if set(checkpoint) != _MEMBERS:
        extra, missing = sorted(set(checkpoint) - _MEMBERS), sorted(_MEMBERS - set(checkpoint))
        raise _Unreadable(f"a malformed checkpoint (missing {missing}, unknown {extra})")
    seq, anchor_seq = checkpoint["seq"], checkpoint["anchor_seq"]
    if type(seq) is not int or type(anchor_seq) is not int or not 0 <= anchor_seq <= seq:
        raise _Unreadable("a malformed checkpoint (seq and anchor_seq: integers, 0 <= anchor_seq <= seq)")
    for name, pattern in (("head_hash", _HASH), ("key", _FINGERPRINT), ("at", _INSTANT)):
        if type(checkpoint[name]) is not str or not pattern.fullmatch(checkpoint[name]):
            raise _Unreadable(f"a malformed checkpoint ({name})")
    if type(checkpoint["signature"]) is not str:
        raise _Unreadable("a malformed checkpoint (signature)")


def _signature_problem(checkpoint: dict[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str | None:
    key = keys.get(checkpoint["key"])
    if key is None:
        return (
            f"signed by key {checkpoint['key']}, which is none of the public keys given: forged, or "
            "signed with a key not passed (after a rotation, pass the old public key too)"
        )
    try:
        key.verify(decode_signature(checkpoint["signature"]), signed_bytes(checkpoint))
    except (binascii.Error, ValueError, InvalidSignature):
        return f"the signature does not verify with key {checkpoint['key']}: forged, or altered after signing"
    return None


async def verify_checkpoints(
    engine: AsyncEngine, lines: Iterable[str | bytes], public_keys: Iterable[Ed25519PublicKey]
) -> CheckpointReport:
    """Checks each checkpoint in `lines` (JSON lines, as written to the file or the log stream) for
    its signature, then against the chain as committed now, read in one snapshot."""
    keys = {key_fingerprint(key): key for key in public_keys}
    problems: list[CheckpointProblem] = []
    signed: list[tuple[int, dict[str, Any]]] = []
    checked = other_lines = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            checkpoint = parse_checkpoint_line(line)
        except _Unreadable as exc:
            problems.append(CheckpointProblem(number, "unreadable", None, str(exc)))
            continue
        if checkpoint is None:
            other_lines += 1
            continue
        checked += 1
        forged = _signature_problem(checkpoint, keys)
        if forged is not None:
            problems.append(CheckpointProblem(number, "forged", checkpoint["seq"], forged))
        else:
            signed.append((number, checkpoint))
    async with read_snapshot(engine) as connection:
        head, anchor_hash = await _head(connection)
        wanted = sorted({int(c["seq"]) for _, c in signed if head.anchor_seq < c["seq"] <= head.seq})
        stored: dict[int, str] = {}
        for start in range(0, len(wanted), _LOOKUP_BATCH):
            batch = wanted[start : start + _LOOKUP_BATCH]
            result = await connection.execute(
                select(audit_records.c.seq, audit_records.c.record_hash).where(audit_records.c.seq.in_(batch))
            )
            stored.update((int(row.seq), str(row.record_hash)) for row in result)
    matched = before_anchor = 0
    latest: VerifiedCheckpoint | None = None
    newest_before: tuple[int, int] | None = None  # (seq, line) of the newest one before the anchor
    for number, checkpoint in signed:
        problem = _compare(number, checkpoint, head, anchor_hash, stored)
        if problem is not None:
            problems.append(problem)
            continue
        seq = int(checkpoint["seq"])
        if seq <= head.anchor_seq:
            before_anchor += 1
            if newest_before is None or seq > newest_before[0]:
                newest_before = (seq, number)
            continue
        matched += 1
        if latest is None or seq >= latest.seq:
            latest = VerifiedCheckpoint(
                number, seq, checkpoint["head_hash"], checkpoint["at"], checkpoint["key"]
            )
    if newest_before is not None and latest is None:
        # The anchor sits in the head row, which is not signed: deleting every record and raising the
        # anchor to the head would leave nothing to compare. A purge on a retention schedule never
        # reaches the newest checkpoint (they are minutes apart, retention is days).
        seq, number = newest_before
        problems.append(
            CheckpointProblem(
                number,
                "truncated",
                seq,
                f"every checkpoint is at or before the purge anchor (seq {head.anchor_seq}): the chain was "
                "purged past its newest checkpoint, or wiped and its anchor raised",
            )
        )
    problems.sort(key=lambda problem: problem.line)
    return CheckpointReport(
        checked=checked,
        matched=matched,
        before_anchor=before_anchor,
        other_lines=other_lines,
        head_seq=head.seq,
        anchor_seq=head.anchor_seq,
        latest=latest,
        problems=tuple(problems),
    )


def _compare(
    number: int, checkpoint: dict[str, Any], head: ChainHead, anchor_hash: str, stored: Mapping[int, str]
) -> CheckpointProblem | None:
    seq, signed_hash, at = int(checkpoint["seq"]), str(checkpoint["head_hash"]), checkpoint["at"]
    if seq <= head.anchor_seq:
        # Purged: only the anchor itself can still be compared (its hash is the anchor hash).
        if seq == head.anchor_seq and signed_hash != anchor_hash:
            return CheckpointProblem(
                number,
                "rewritten",
                seq,
                f"signed at {at} for seq {seq} with hash {signed_hash[:16]}…; the purge anchor at that seq "
                f"has hash {anchor_hash[:16]}…: the chain was rewritten",
            )
        return None
    if seq > head.seq:
        return CheckpointProblem(
            number,
            "truncated",
            seq,
            f"signed at {at}, when the chain reached seq {seq}; it now ends at seq {head.seq}: its tail "
            "was truncated, or the database was restored from a backup older than this checkpoint",
        )
    record_hash = stored.get(seq)
    if record_hash is None:
        return CheckpointProblem(
            number,
            "deleted",
            seq,
            f"signed at {at} for seq {seq}, whose record is missing: truncated or deleted",
        )
    if record_hash != signed_hash:
        return CheckpointProblem(
            number,
            "rewritten",
            seq,
            f"signed at {at} for seq {seq} with hash {signed_hash[:16]}…; that record's hash is now "
            f"{record_hash[:16]}…: the chain was rewritten at or before seq {seq}",
        )
    return None
