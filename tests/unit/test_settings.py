"""Configuration: documented variable names, *_FILE secrets, one-line errors that never show values."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveness_proxy.errors import ConfigurationError
from liveness_proxy.settings import Settings, async_database_url, settings_from_mapping
from liveness_proxy.url_secrets import redact_url
from liveness_proxy.wiring import request_policy

REQUIRED = {
    "CYNOPSIS_CLIENT_ID": "client-1",
    "CYNOPSIS_CLIENT_SECRET": "super-secret-value-1",
    "CYNOPSIS_DOMAIN_ID": "domain-1",
    "LIVENESS_PROXY_API_KEY_PEPPER": "q" * 40,
}


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_defaults_follow_the_upstream_notes(environment: pytest.MonkeyPatch) -> None:
    settings = Settings.load()
    settings.require_proxy_secrets()
    assert settings.cynopsis_token_url == "https://crm-demo.cynopsis.co/oauth/token"
    assert settings.cynopsis_session_token_path == "/service/liveness-v2/get_session_token"
    assert settings.cynopsis_session_path == "/service/liveness-v2/liveness_session"
    assert settings.cynopsis_result_path == "/service/liveness-v2/liveness_result/{session_id}"
    assert settings.cynopsis_session_id_fields == ["session_id", "sessionId"]
    assert settings.liveness_proxy_host == "127.0.0.1"
    assert settings.liveness_proxy_port == 8080
    assert settings.liveness_proxy_max_body_bytes == 65536
    assert settings.database_url == "sqlite+aiosqlite:///./liveness-proxy.db"


def test_environment_variables_are_read(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("CYNOPSIS_API_BASE_URL", "https://d1.cynopsis.co")
    environment.setenv("LIVENESS_PROXY_PORT", "9000")
    environment.setenv("CYNOPSIS_TIMEOUT_SECONDS", "2.5")
    environment.setenv("CYNOPSIS_SESSION_ID_FIELDS", "id, sessionId")
    settings = Settings.load()
    assert settings.cynopsis_api_base_url == "https://d1.cynopsis.co"
    assert settings.liveness_proxy_port == 9000
    assert settings.cynopsis_timeout_seconds == 2.5
    assert settings.cynopsis_session_id_fields == ["id", "sessionId"]


def test_dotenv_file_is_read(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment.delenv("CYNOPSIS_DOMAIN_ID")
    (tmp_path / ".env").write_text("CYNOPSIS_DOMAIN_ID=from-dotenv\n")
    assert Settings.load().cynopsis_domain_id == "from-dotenv"


def test_secrets_can_come_from_files(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment.delenv("CYNOPSIS_CLIENT_SECRET")
    secret_file = tmp_path / "client-secret"
    secret_file.write_text("secret-from-file\n")
    environment.setenv("CYNOPSIS_CLIENT_SECRET_FILE", str(secret_file))
    pepper_file = tmp_path / "pepper"
    pepper_file.write_text("f" * 48)
    environment.setenv("LIVENESS_PROXY_API_KEY_PEPPER_FILE", str(pepper_file))
    settings = Settings.load()
    assert settings.cynopsis_client_secret.get_secret_value() == "secret-from-file"
    assert settings.liveness_proxy_api_key_pepper.get_secret_value() == "f" * 48


def test_unreadable_secret_file_names_the_variable(environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environment.setenv("CYNOPSIS_CLIENT_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match=r"^CYNOPSIS_CLIENT_SECRET_FILE: cannot read the file"):
        Settings.load()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LIVENESS_PROXY_PORT", "eighty", "LIVENESS_PROXY_PORT: "),
        ("LIVENESS_PROXY_PORT", "70000", "LIVENESS_PROXY_PORT: "),
        ("CYNOPSIS_TOKEN_URL", "ftp://x", "CYNOPSIS_TOKEN_URL: must be an absolute http(s) URL"),
        (
            "CYNOPSIS_API_BASE_URL",
            "https://user:pw@host",
            "CYNOPSIS_API_BASE_URL: must not carry credentials",
        ),
        ("CYNOPSIS_RESULT_PATH", "/result", "CYNOPSIS_RESULT_PATH: must be an absolute path containing"),
        ("CYNOPSIS_TIMEOUT_SECONDS", "-1", "CYNOPSIS_TIMEOUT_SECONDS: "),
        ("LIVENESS_PROXY_LOG_LEVEL", "loud", "LIVENESS_PROXY_LOG_LEVEL: "),
    ],
)
def test_invalid_values_stop_with_one_line_naming_the_variable(
    environment: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    environment.setenv(name, value)
    with pytest.raises(ConfigurationError) as raised:
        Settings.load()
    text = str(raised.value)
    assert text.startswith(message)
    assert "\n" not in text


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_missing_required_secret_names_the_variable(environment: pytest.MonkeyPatch, missing: str) -> None:
    environment.delenv(missing)
    settings = Settings.load()
    with pytest.raises(ConfigurationError, match=f"^{missing}: required"):
        settings.require_proxy_secrets()


def test_weak_pepper_is_refused(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("LIVENESS_PROXY_API_KEY_PEPPER", "changeme")
    with pytest.raises(ConfigurationError, match=r"^LIVENESS_PROXY_API_KEY_PEPPER: must be a random value"):
        Settings.load().require_proxy_secrets()


def test_errors_and_summaries_never_show_secret_values(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("LIVENESS_PROXY_DATABASE_URL", "postgresql://app:db-password-9@db/liveness")
    settings = Settings.load()
    summary = "\n".join(f"{k}={v}" for k, v in settings.redacted_summary().items())
    for secret in ("super-secret-value-1", "q" * 40, "db-password-9", "client-1"):
        assert secret not in summary
        assert secret not in repr(settings)
    assert "CYNOPSIS_CLIENT_SECRET=set (hidden)" in summary
    environment.setenv("LIVENESS_PROXY_MAX_BODY_BYTES", "super-secret-value-1")
    with pytest.raises(ConfigurationError) as raised:
        Settings.load()
    assert "super-secret-value-1" not in str(raised.value)


@pytest.mark.parametrize(
    ("variable", "url", "shown"),
    [
        (
            "LIVENESS_PROXY_DATABASE_URL",
            "postgresql+asyncpg://app@db/live?password=pg-query-pw&sslmode=require",
            "postgresql+asyncpg://app@db/live?password=***&sslmode=require",
        ),
        (
            "LIVENESS_PROXY_DATABASE_URL",
            "postgresql://app:pg-userinfo-pw@db/live?sslpassword=pg-key-pw",
            "postgresql://app:***@db/live?sslpassword=***",
        ),
        ("LIVENESS_PROXY_REDIS_URL", "redis://:redis-pw@cache:6379/0", "redis://:***@cache:6379/0"),
        (
            "LIVENESS_PROXY_REDIS_URL",
            "rediss://u:redis-pw@cache/0?password=redis-query-pw",
            "rediss://u:***@cache/0?password=***",
        ),
        (
            "LIVENESS_PROXY_WEBHOOK_URL",
            "https://backend.example/hooks?token=receiver-token&tenant=7",
            "https://backend.example/hooks?token=***&tenant=7",
        ),
    ],
)
def test_the_summary_shows_urls_without_any_form_of_password(variable: str, url: str, shown: str) -> None:
    summary = settings_from_mapping({**REQUIRED, variable: url}).redacted_summary()
    assert summary[variable] == shown


def test_a_refused_origin_is_quoted_without_its_password() -> None:
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_CORS_ORIGINS") as refused:
        settings_from_mapping(
            {"LIVENESS_PROXY_CORS_ORIGINS": "https://u:origin-pw@app.example/x?token=t0k3n"}
        )
    assert "origin-pw" not in str(refused.value)
    assert "t0k3n" not in str(refused.value)
    assert "https://u:***@app.example/x?token=***" in str(refused.value)
    with pytest.raises(ConfigurationError, match="is not an origin") as refused:
        settings_from_mapping({"LIVENESS_PROXY_CORS_ORIGINS": "https://u:origin-pw@app.example"})
    assert "origin-pw" not in str(refused.value)


def test_database_urls_get_async_drivers() -> None:
    assert async_database_url("sqlite:///data/x.db") == "sqlite+aiosqlite:///data/x.db"
    assert async_database_url("postgresql://u:p@h/db") == "postgresql+asyncpg://u:p@h/db"
    assert async_database_url("postgres://h/db") == "postgresql+asyncpg://h/db"
    assert redact_url("postgresql+asyncpg://u:p4ss@h/db") == "postgresql+asyncpg://u:***@h/db"


def test_jwks_url_must_be_https_except_on_loopback() -> None:
    for url in ("http://idp.example.com/jwks.json", "https://user:pw@idp.example.com/jwks.json", "ftp://x/y"):
        with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_JWT_JWKS_URL"):
            settings_from_mapping({"LIVENESS_PROXY_JWT_JWKS_URL": url})
    for url in ("https://idp.example.com/jwks.json", "http://127.0.0.1:9000/jwks", "http://localhost/jwks"):
        assert settings_from_mapping({"LIVENESS_PROXY_JWT_JWKS_URL": url}).liveness_proxy_jwt_jwks_url == url


def test_security_settings_refuse_dangerous_values() -> None:
    for name, value in (
        ("LIVENESS_PROXY_JWT_ALGORITHMS", "RS256,none"),
        ("LIVENESS_PROXY_JWT_ALGORITHMS", "HS256"),
        ("LIVENESS_PROXY_CORS_ORIGINS", "*"),
        ("LIVENESS_PROXY_CORS_ORIGINS", "https://*.example.com"),
        ("LIVENESS_PROXY_CORS_ORIGINS", "https://app.example.com/path"),
        ("LIVENESS_PROXY_RATE_LIMIT_RESULT", "lots"),
        ("LIVENESS_PROXY_METRICS_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("LIVENESS_PROXY_JWT_JWKS_REFETCH_INTERVAL_SECONDS", "0"),
    ):
        with pytest.raises(ConfigurationError, match=name):
            settings_from_mapping({name: value})


def test_upstream_urls_must_be_https_except_on_loopback_or_when_allowed() -> None:
    with pytest.raises(ConfigurationError, match="CYNOPSIS_TOKEN_URL: must use https"):
        settings_from_mapping({"CYNOPSIS_TOKEN_URL": "http://crm.cynopsis.co/oauth/token"})
    with pytest.raises(ConfigurationError, match="CYNOPSIS_API_BASE_URL: must use https"):
        settings_from_mapping({"CYNOPSIS_API_BASE_URL": "http://10.0.0.5:8081"})
    assert settings_from_mapping({"CYNOPSIS_API_BASE_URL": "http://127.0.0.1:8081"})
    allowed = settings_from_mapping(
        {"CYNOPSIS_API_BASE_URL": "http://sandbox:8081", "LIVENESS_PROXY_ALLOW_INSECURE_UPSTREAM": "true"}
    )
    assert allowed.cynopsis_api_base_url == "http://sandbox:8081"


def test_plain_http_upstream_is_refused_naming_the_flag_and_accepted_on_loopback_or_with_it(
    environment: pytest.MonkeyPatch,
) -> None:
    environment.setenv("CYNOPSIS_TOKEN_URL", "http://auth.cynopsis.example/oauth/token")
    with pytest.raises(ConfigurationError) as refused:
        Settings.load()
    message = str(refused.value)
    assert message.startswith("CYNOPSIS_TOKEN_URL: must use https")
    assert "LIVENESS_PROXY_ALLOW_INSECURE_UPSTREAM=true, for development only" in message
    # Names that only look like loopback are not.
    for host in ("localhost.cynopsis.example", "127.0.0.1.nip.io", "10.0.0.1"):
        environment.setenv("CYNOPSIS_TOKEN_URL", f"http://{host}/oauth/token")
        with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_ALLOW_INSECURE_UPSTREAM"):
            Settings.load()
    # The built-in sandbox only ever listens on loopback: http is fine there, IPv6 too.
    for origin in ("http://127.0.0.1:8081", "http://localhost:8081", "http://[::1]:8081", "http://127.0.0.2"):
        environment.setenv("CYNOPSIS_TOKEN_URL", f"{origin}/oauth/token")
        environment.setenv("CYNOPSIS_API_BASE_URL", origin)
        assert Settings.load().cynopsis_api_base_url == origin
    environment.setenv("CYNOPSIS_TOKEN_URL", "http://sandbox:8081/oauth/token")
    environment.setenv("CYNOPSIS_API_BASE_URL", "http://sandbox:8081")
    environment.setenv("LIVENESS_PROXY_ALLOW_INSECURE_UPSTREAM", "true")
    assert Settings.load().cynopsis_token_url == "http://sandbox:8081/oauth/token"
    environment.setenv("LIVENESS_PROXY_ALLOW_INSECURE_UPSTREAM", "false")
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_ALLOW_INSECURE_UPSTREAM"):
        Settings.load()


def test_webhook_settings_refuse_what_would_leak_or_never_verify(tmp_path: Path) -> None:
    from liveness_proxy.webhook_signing import new_webhook_secret

    secret = new_webhook_secret()
    base = {**REQUIRED, "LIVENESS_PROXY_WEBHOOK_SECRET": secret}
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_WEBHOOK_URL: must use https"):
        settings_from_mapping({**base, "LIVENESS_PROXY_WEBHOOK_URL": "http://backend.example/hooks"})
    with pytest.raises(ConfigurationError, match="must not carry credentials"):
        settings_from_mapping({**base, "LIVENESS_PROXY_WEBHOOK_URL": "https://u:p@backend.example/hooks"})
    url = {"LIVENESS_PROXY_WEBHOOK_URL": "https://backend.example/hooks"}
    settings_from_mapping({**base, **url}).require_proxy_secrets()
    settings_from_mapping(
        {**base, "LIVENESS_PROXY_WEBHOOK_URL": "http://127.0.0.1:9/h"}
    ).require_proxy_secrets()
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_WEBHOOK_SECRET: required"):
        settings_from_mapping({**REQUIRED, **url}).require_proxy_secrets()
    bad = "whsec_" + "A" * 8
    with pytest.raises(
        ConfigurationError, match="LIVENESS_PROXY_WEBHOOK_SECRET: secret 1 must decode"
    ) as refused:
        settings_from_mapping(
            {**REQUIRED, **url, "LIVENESS_PROXY_WEBHOOK_SECRET": bad}
        ).require_proxy_secrets()
    assert bad not in str(refused.value)
    secret_file = tmp_path / "webhook_secret"
    secret_file.write_text(secret + "\n")
    from_file = settings_from_mapping({**REQUIRED, **url, "LIVENESS_PROXY_WEBHOOK_SECRET_FILE": secret_file})
    assert from_file.liveness_proxy_webhook_secret.get_secret_value() == secret
    assert secret not in str(from_file.redacted_summary())


def test_finalizer_settings() -> None:
    defaults = settings_from_mapping(REQUIRED)
    assert defaults.liveness_proxy_finalizer is True
    assert defaults.liveness_proxy_finalizer_schedule == [3, 6, 12, 24, 48, 96, 192, 384]
    assert (
        settings_from_mapping({**REQUIRED, "LIVENESS_PROXY_FINALIZER": "off"}).liveness_proxy_finalizer
        is False
    )
    parsed = settings_from_mapping({**REQUIRED, "LIVENESS_PROXY_FINALIZER_SCHEDULE": "1, 2.5,10"})
    assert parsed.liveness_proxy_finalizer_schedule == [1, 2.5, 10]
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_FINALIZER_SCHEDULE: offsets must increase"):
        settings_from_mapping({**REQUIRED, "LIVENESS_PROXY_FINALIZER_SCHEDULE": "3,3,6"})
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE"):
        settings_from_mapping({**REQUIRED, "LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE": "0,-5"})
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE"):
        settings_from_mapping({**REQUIRED, "LIVENESS_PROXY_WEBHOOK_RETRY_SCHEDULE": ""})


def test_a_lease_shorter_than_a_job_is_refused_and_the_default_follows_the_timeouts() -> None:
    assert settings_from_mapping(REQUIRED).worker_lease_seconds == 60
    slow = settings_from_mapping({**REQUIRED, "CYNOPSIS_TIMEOUT_SECONDS": 60})
    assert slow.worker_lease_seconds == 130  # 2 x (60 s call + 5 s token)
    with pytest.raises(ConfigurationError, match="LIVENESS_PROXY_WORKER_LEASE_SECONDS: must be longer"):
        settings_from_mapping({**REQUIRED, "LIVENESS_PROXY_WORKER_LEASE_SECONDS": 10})  # webhook: 15 s
    with pytest.raises(ConfigurationError, match=r"longest job it covers \(6 s"):
        settings_from_mapping(
            {
                **REQUIRED,
                "LIVENESS_PROXY_WORKER_LEASE_SECONDS": 5,
                "LIVENESS_PROXY_WEBHOOK_TIMEOUT_SECONDS": 2,
                "CYNOPSIS_TIMEOUT_SECONDS": 4,
                "CYNOPSIS_TOKEN_TIMEOUT_SECONDS": 2,
            }
        )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LIVENESS_PROXY_EXTRA_BODY_FIELDS", "session_token"),
        ("LIVENESS_PROXY_EXTRA_BODY_FIELDS", "sessionToken"),
        ("LIVENESS_PROXY_EXTRA_BODY_FIELDS", "note,Session-Token"),
        ("LIVENESS_PROXY_EXTRA_BODY_FIELDS", "SESSION_TOKEN"),
        ("LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS", "sessionId"),
        ("LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS", "vendor,Confidence"),
        ("LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS", "expires-in"),
        ("LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS", "redactedFields"),
        ("LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS", "sessionToken"),
    ],
)
def test_an_extra_field_cannot_respell_a_declared_member(
    environment: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Another spelling of a declared member would reach (or leave) the upstream unchecked beside it,
    as lenient parsers read `sessionToken` and `session_token` as one: refused at start."""
    environment.setenv(name, value)
    with pytest.raises(ConfigurationError) as refused:
        Settings.load()
    assert str(refused.value).startswith(f"{name}: ")
    assert "declared member" in str(refused.value)


def test_extra_fields_that_only_resemble_a_declared_member_are_allowed() -> None:
    settings = settings_from_mapping(
        {
            "LIVENESS_PROXY_EXTRA_BODY_FIELDS": "session_token_hint,token,note",
            "LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS": "session,confidence_band,vendor",
        }
    )
    assert settings.liveness_proxy_extra_body_fields == ["session_token_hint", "token", "note"]
    assert settings.liveness_proxy_extra_response_fields == ["session", "confidence_band", "vendor"]


def test_an_idempotency_lease_outlasts_every_wait_of_a_create() -> None:
    """72 s by default; each configured wait lengthens it by as much as a create may spend in it:
    the gate once, an access token and the call twice (the retry after a 401), a store write four
    times (the claim, the token's use, the binding, the answer)."""

    def lease(**overrides: float) -> float:
        return request_policy(settings_from_mapping({**REQUIRED, **overrides})).idempotency_lease_seconds

    default = lease()
    assert default == 72
    assert lease(LIVENESS_PROXY_UPSTREAM_QUEUE_TIMEOUT_SECONDS=12) - default >= 10
    assert lease(CYNOPSIS_TOKEN_TIMEOUT_SECONDS=15) - default >= 2 * 10
    assert lease(CYNOPSIS_TIMEOUT_SECONDS=25) - default >= 2 * 10
    assert lease(LIVENESS_PROXY_DATABASE_POOL_TIMEOUT_SECONDS=15) - default >= 4 * 10
    slowest = {
        "LIVENESS_PROXY_UPSTREAM_QUEUE_TIMEOUT_SECONDS": 60,
        "CYNOPSIS_TOKEN_TIMEOUT_SECONDS": 120,
        "CYNOPSIS_TIMEOUT_SECONDS": 300,
        "LIVENESS_PROXY_DATABASE_POOL_TIMEOUT_SECONDS": 120,
    }
    assert lease(**slowest) > 60 + 2 * 120 + 2 * 300 + 4 * 120


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LIVENESS_PROXY_SEND_TIMEOUT_SECONDS", "0"),
        ("LIVENESS_PROXY_SEND_TIMEOUT_SECONDS", "301"),
        ("LIVENESS_PROXY_SEND_TIMEOUT_SECONDS", "soon"),
        ("LIVENESS_PROXY_MAX_PIPELINED_REQUESTS", "0"),
        ("LIVENESS_PROXY_MAX_PIPELINED_REQUESTS", "1025"),
    ],
)
def test_the_slow_client_limits_refuse_values_that_would_disable_them(
    environment: pytest.MonkeyPatch, name: str, value: str
) -> None:
    environment.setenv(name, value)
    with pytest.raises(ConfigurationError) as raised:
        Settings.load()
    assert str(raised.value).startswith(f"{name}: ")


def test_the_slow_client_limits_default_to_30_seconds_and_16_requests(
    environment: pytest.MonkeyPatch,
) -> None:
    settings = Settings.load()
    assert settings.liveness_proxy_send_timeout_seconds == 30
    assert settings.liveness_proxy_max_pipelined_requests == 16
