"""Signed audit checkpoints without a database (store/audit_checkpoints.py): the keys, the format,
the signature, and what a line may be. Against the chain: tests/integration/test_audit_checkpoints.py."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from liveness_proxy.cli.check import audit_checkpoints_line
from liveness_proxy.errors import ConfigurationError
from liveness_proxy.observability import Redactor, build_logger
from liveness_proxy.settings import Settings
from liveness_proxy.store.audit_checkpoints import (
    CHECKPOINT_TYPE,
    ChainHead,
    CheckpointSigner,
    format_instant,
    key_fingerprint,
    load_public_key_pem,
    make_checkpoint,
    new_signing_key_pem,
    parse_checkpoint_line,
    public_key_pem,
)
from liveness_proxy.wiring import audit_checkpoint_options, check_startable
from support import proxy_settings

HEAD = ChainHead(seq=42, head_hash="ab" * 32, anchor_seq=7)
AT = 1_767_225_600.1239  # 2026-01-01T00:00:00.123Z (milliseconds, truncated)


def pkcs8(key: object) -> bytes:
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def independent_check(checkpoint: dict[str, object], public_key: Ed25519PublicKey) -> None:
    """The documented signature, checked with the standard library's JSON and cryptography only:
    every member but `signature`, keys sorted, no whitespace."""
    unsigned = {name: value for name, value in checkpoint.items() if name != "signature"}
    message = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    signature = str(checkpoint["signature"])
    assert re.fullmatch(r"[A-Za-z0-9+/]{86}", signature)  # standard base64, no padding
    public_key.verify(base64.b64decode(signature + "=="), message)  # raises if it does not hold


def test_a_checkpoint_has_the_documented_members_and_an_independently_verifiable_signature() -> None:
    signer = CheckpointSigner.from_pem(new_signing_key_pem())
    checkpoint = make_checkpoint(signer, HEAD, at=AT)
    assert list(checkpoint) == ["type", "v", "seq", "head_hash", "anchor_seq", "at", "key", "signature"]
    assert checkpoint["type"] == CHECKPOINT_TYPE == "liveness-proxy.audit-checkpoint"
    assert (checkpoint["v"], checkpoint["seq"], checkpoint["head_hash"], checkpoint["anchor_seq"]) == (
        1,
        42,
        "ab" * 32,
        7,
    )
    assert checkpoint["at"] == "2026-01-01T00:00:00.123Z"
    raw = signer.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert checkpoint["key"] == hashlib.sha256(raw).hexdigest()[:16] == key_fingerprint(signer.public_key)
    independent_check(checkpoint, signer.public_key)
    assert parse_checkpoint_line(json.dumps(checkpoint)) == checkpoint


def test_signatures_pass_the_log_redactor_unchanged() -> None:
    """With base64 padding, about one signature in 200 read to the redactor as `name=value` with a
    secret-sounding name (`…key…=`), and reached the log stream masked."""
    signer = CheckpointSigner.from_pem(new_signing_key_pem())
    stream = io.StringIO()
    logger = build_logger(level="info", log_format="json", redactor=Redactor(), stream=stream)
    written = [make_checkpoint(signer, HEAD._replace(seq=seq), at=AT) for seq in range(7, 3007)]
    for checkpoint in written:
        logger.info("audit_checkpoint", checkpoint=checkpoint)
    logged = [parse_checkpoint_line(line) for line in stream.getvalue().splitlines()]
    assert logged == written


def test_format_instant_is_utc_with_milliseconds_and_z() -> None:
    assert format_instant(0) == "1970-01-01T00:00:00.000Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", format_instant(1_800_000_000.5))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_key_made_by_openssl_signs_and_its_public_key_from_openssl_verifies(tmp_path: Path) -> None:
    private = tmp_path / "signing.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True)
    public = subprocess.run(
        ["openssl", "pkey", "-in", str(private), "-pubout"], check=True, capture_output=True
    ).stdout
    signer = CheckpointSigner.from_file(private)
    verifier = load_public_key_pem(public)
    assert key_fingerprint(verifier) == signer.fingerprint
    assert public_key_pem(signer.public_key) == public  # what we print is what openssl prints
    independent_check(make_checkpoint(signer, HEAD, at=AT), verifier)


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (
            pkcs8(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "not an Ed25519 private key (it is an RSA key)",
        ),
        (pkcs8(ec.generate_private_key(ec.SECP256R1())), "not an Ed25519 private key (it is an EC key)"),
        (pkcs8(ed448.Ed448PrivateKey.generate()), "not an Ed25519 private key (it is an Ed448 key)"),
        (b"not a key at all", "not a PEM private key"),
        (
            Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            ),
            "the private key is encrypted",
        ),
        (public_key_pem(Ed25519PrivateKey.generate().public_key()), "not a PEM private key"),
    ],
    ids=["rsa", "ec", "ed448", "garbage", "encrypted", "public-key"],
)
def test_other_keys_are_refused_with_a_clear_value_error(pem: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        CheckpointSigner.from_pem(pem)
    assert "BEGIN" not in str(refused.value)  # never key material in the message


def test_an_unreadable_or_huge_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read the file \(No such file or directory\)"):
        CheckpointSigner.from_file(tmp_path / "missing.pem")
    huge = tmp_path / "huge.pem"
    huge.write_bytes(b"x" * 70_000)
    with pytest.raises(ValueError, match="larger than"):
        CheckpointSigner.from_file(huge)


def test_public_keys_must_be_ed25519_public_keys() -> None:
    private = new_signing_key_pem()
    with pytest.raises(ValueError, match="a private key: give the public key"):
        load_public_key_pem(private)
    rsa_public = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match=r"not an Ed25519 key \(it is an RSA key\)"):
        load_public_key_pem(rsa_public)
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


def test_the_signer_never_shows_its_key() -> None:
    pem = new_signing_key_pem()
    signer = CheckpointSigner.from_pem(pem)
    assert repr(signer) == f"CheckpointSigner(key={signer.fingerprint})"


# -- lines ------------------------------------------------------------------------------------------


def test_a_log_line_holding_a_checkpoint_is_read_and_other_log_lines_are_skipped() -> None:
    checkpoint = make_checkpoint(CheckpointSigner.from_pem(new_signing_key_pem()), HEAD, at=AT)
    log_line = json.dumps(
        {
            "checkpoint": checkpoint,
            "event": "audit_checkpoint",
            "level": "info",
            "timestamp": "2026-01-01T00:00:00Z",
        }
    )
    assert parse_checkpoint_line(log_line) == checkpoint
    assert parse_checkpoint_line(log_line.encode()) == checkpoint
    assert parse_checkpoint_line('{"event": "request", "status": 200}') is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, "version 2 is not supported"),
        ({"v": True}, "version True is not supported"),
        ({"extra": 1}, "unknown ['extra']"),
        ({"seq": "42"}, "seq and anchor_seq"),
        ({"anchor_seq": 43}, "seq and anchor_seq"),
        ({"seq": -1, "anchor_seq": 0}, "seq and anchor_seq"),
        ({"head_hash": "AB" * 32}, "(head_hash)"),
        ({"key": "xyz"}, "(key)"),
        ({"at": "2026-01-01T00:00:00Z"}, "(at)"),
        ({"signature": 12}, "(signature)"),
    ],
)
def test_a_malformed_checkpoint_is_refused_with_its_reason(change: dict[str, object], reason: str) -> None:
    checkpoint = {**make_checkpoint(CheckpointSigner.from_pem(new_signing_key_pem()), HEAD, at=AT), **change}
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_checkpoint_line(json.dumps(checkpoint))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"hello": "world"}', "neither a checkpoint nor a log line holding one"),
        ('{"event": "audit_checkpoint", "checkpoint": "text"}', "`checkpoint` member is not an object"),
        ('{"type": "liveness-proxy.audit-checkpoint", "v": 1}', "missing"),
    ],
)
def test_a_line_that_is_not_a_checkpoint_is_refused(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_checkpoint_line(line)


# -- the settings and the wiring --------------------------------------------------------------------


def checkpoint_settings(tmp_path: Path, **values: object) -> Settings:
    return proxy_settings("http://127.0.0.1:9", tmp_path / "proxy.db", **values)


def test_without_a_signing_key_no_checkpoints_are_written(tmp_path: Path) -> None:
    settings = checkpoint_settings(tmp_path)
    assert audit_checkpoint_options(settings) is None
    assert audit_checkpoints_line(settings) == (
        "audit checkpoints: off (no LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE: none are written)"
    )
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_AUDIT_CHECKPOINT_FILE: set only together"):
        audit_checkpoint_options(
            checkpoint_settings(tmp_path, LIVENESS_PROXY_AUDIT_CHECKPOINT_FILE=str(tmp_path / "c.jsonl"))
        )


def test_a_signing_key_turns_checkpoints_on(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    key.write_bytes(new_signing_key_pem())
    settings = checkpoint_settings(
        tmp_path,
        LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE=str(key),
        LIVENESS_PROXY_AUDIT_CHECKPOINT_FILE=str(tmp_path / "c.jsonl"),
        LIVENESS_PROXY_AUDIT_CHECKPOINT_SECONDS="30",
    )
    options = audit_checkpoint_options(settings)
    assert options is not None
    assert options.signer.fingerprint == CheckpointSigner.from_file(key).fingerprint
    assert (options.interval_seconds, options.file) == (30.0, tmp_path / "c.jsonl")
    assert "BEGIN" not in repr(options)
    check_startable(settings)
    assert audit_checkpoints_line(settings) == (
        f"audit checkpoints: signed with key {options.signer.fingerprint}, every 30 s while the chain "
        f"grows, to the log stream and {tmp_path / 'c.jsonl'}"
    )


def test_a_bad_signing_key_stops_the_start_naming_the_variable(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    key.write_bytes(pkcs8(ec.generate_private_key(ec.SECP256R1())))
    for settings, message in (
        (
            checkpoint_settings(tmp_path, LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE=str(key)),
            "LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE: not an Ed25519 private key (it is an EC key)",
        ),
        (
            checkpoint_settings(tmp_path, LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE=str(tmp_path / "none.pem")),
            "LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE: cannot read the file (No such file or directory)",
        ),
    ):
        with pytest.raises(ConfigurationError) as refused:
            check_startable(settings)
        assert str(refused.value) == message


def test_checkpoints_that_the_log_level_would_hide_need_a_file(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    key.write_bytes(new_signing_key_pem())
    quiet = {"LIVENESS_PROXY_AUDIT_SIGNING_KEY_FILE": str(key), "LIVENESS_PROXY_LOG_LEVEL": "warning"}
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_LOG_LEVEL=warning hides"):
        audit_checkpoint_options(checkpoint_settings(tmp_path, **quiet))
    assert audit_checkpoint_options(
        checkpoint_settings(tmp_path, **quiet, LIVENESS_PROXY_AUDIT_CHECKPOINT_FILE=str(tmp_path / "c.jsonl"))
    )


@pytest.mark.parametrize("seconds", ["0", "-1", "86401"])
def test_the_checkpoint_interval_is_bounded(tmp_path: Path, seconds: str) -> None:
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_AUDIT_CHECKPOINT_SECONDS"):
        checkpoint_settings(tmp_path, LIVENESS_PROXY_AUDIT_CHECKPOINT_SECONDS=seconds)
