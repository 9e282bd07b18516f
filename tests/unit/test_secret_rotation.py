"""Rotating the Cynopsis client secret, on its own: a reload takes a new secret and keeps the old one
when the file is empty or gone, and a rotated secret stays redacted."""

from __future__ import annotations

import io
import secrets
from pathlib import Path

from liveness_proxy.observability import REDACTED, Redactor, build_logger
from liveness_proxy.upstream import (
    ClientSecretSource,
)
from rotation import assert_no_secret_in, new_secret, secret_file, write_atomically
from support import (
    CLIENT_SECRET,
)

# -- the secret source --------------------------------------------------------------------------------


def test_a_reload_takes_a_new_secret_and_keeps_the_old_one_when_the_file_is_empty_or_gone(
    tmp_path: Path,
) -> None:
    log = io.StringIO()
    redactor = Redactor([CLIENT_SECRET])
    logger = build_logger(level="debug", log_format="json", redactor=redactor, stream=log)
    learned: list[str] = []
    path = secret_file(tmp_path)
    source = ClientSecretSource(CLIENT_SECRET, path=path, logger=logger, on_new_secret=learned.append)

    assert source.reload(trigger="sighup") is False
    assert source.current() == CLIENT_SECRET
    rotated = new_secret()
    write_atomically(path, rotated)
    assert source.reload(trigger="sighup") is True
    assert source.current() == rotated
    assert learned == [rotated]  # the redactor learns it before it is used
    path.write_text("")  # a rotation half-way: the value we have stays
    assert source.reload() is False
    path.unlink()
    assert source.reload() is False
    assert source.current() == rotated
    assert source.reloads == 4

    text = log.getvalue()
    assert text.count('"client_secret_reloaded"') == 2
    assert '"changed":false' in text
    assert '"changed":true' in text
    assert "CYNOPSIS_CLIENT_SECRET_FILE: the file is empty" in text
    assert "CYNOPSIS_CLIENT_SECRET_FILE: cannot read the file (No such file or directory)" in text
    assert_no_secret_in(text, rotated)

    from_environment = ClientSecretSource(CLIENT_SECRET, path=None)
    assert from_environment.reload() is False
    assert from_environment.reloads == 0


def test_a_rotated_secret_stays_redacted_however_many_access_tokens_follow() -> None:
    # The redactor keeps only the last few values it is taught (access tokens rotate through
    # there); a rotated client secret must not drop out of it.
    redactor = Redactor([CLIENT_SECRET])
    rotated = new_secret()
    redactor.add_secret(rotated, permanent=True)
    for _ in range(100):
        redactor.add_secret("sbx_" + secrets.token_urlsafe(24))
    last_token = "sbx_" + secrets.token_urlsafe(24)
    redactor.add_secret(last_token)
    assert redactor.scrub(f"x {rotated} y {last_token} z {CLIENT_SECRET}") == (
        f"x {REDACTED} y {REDACTED} z {REDACTED}"
    )
