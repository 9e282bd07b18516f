"""The OpenAPI 3.1 document, generated once per app from the route table (`routes.py`: paths and
methods) and the models in `schemas`; here is only each operation's text (the webhooks the proxy
sends are described in `openapi_webhooks.py`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from liveness_proxy._version import __version__
from liveness_proxy.api.openapi_webhooks import webhooks_section
from liveness_proxy.api.paths import SESSION_ID_REGEX, SESSION_RESULT_PATH
from liveness_proxy.api.routes import ROUTES, RouteSpec
from liveness_proxy.api.session_list_query import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from liveness_proxy.schemas import json_schema_components
from liveness_proxy.store import SESSION_STATUSES

SESSION_ID_PATTERN = f"^{SESSION_ID_REGEX}$"
# The Location of a new session: the result path with its id filled in.
LOCATION_PATTERN = "^" + SESSION_RESULT_PATH.replace("{session_id}", SESSION_ID_REGEX) + "$"
_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
_REQUEST_ID_HEADER = {"$ref": "#/components/headers/X-Request-ID"}
# An OpenAPI runtime expression (the link from a session token to its create), not a password.
SESSION_TOKEN_OF_ANSWER = "$response.body#/session_token"  # nosec B105


# Where a result came from (api/result_reads.py).
_RESULT_SOURCE_HEADER = {
    "description": "Where this answer came from: `upstream` (this request's own Cynopsis call), "
    "`shared` (the call of a concurrent or very recent read of the same session by its owner or an "
    "admin, within LIVENESS_PROXY_RESULT_REUSE_SECONDS) or `stored` (the final result from the "
    "proxy's own record, written with its verdict; no Cynopsis call).",
    "required": True,
    "schema": {"type": "string", "enum": ["upstream", "shared", "stored"]},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str, *, retry_after: bool = False, authenticate: bool = False) -> dict[str, Any]:
    headers: dict[str, Any] = {"X-Request-ID": _REQUEST_ID_HEADER}
    if retry_after:
        headers["Retry-After"] = {
            "description": "Seconds to wait before retrying.",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    if authenticate:
        headers["WWW-Authenticate"] = {
            "description": "Bearer challenge.",
            "required": True,
            "schema": {"type": "string", "pattern": "^Bearer "},
        }
    return {
        "description": description,
        "headers": headers,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _ok(description: str, schema: str, status_headers: dict[str, Any] | None = None) -> dict[str, Any]:
    headers: dict[str, Any] = {"X-Request-ID": _REQUEST_ID_HEADER}
    headers.update(status_headers or {})
    return {
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": _ref(schema)}},
    }


def _any_route_errors() -> dict[str, Any]:
    """What any route can answer: the server's own refusals before a handler runs (the connection
    is then closed), and the last-resort answer to a bug."""
    return {
        "408": _problem(
            "The request head or body did not arrive within LIVENESS_PROXY_HEADER_TIMEOUT_SECONDS / "
            "LIVENESS_PROXY_BODY_TIMEOUT_SECONDS."
        ),
        "431": _problem("The request line and headers are larger than LIVENESS_PROXY_MAX_HEADER_BYTES."),
        "500": _problem("Internal error (a bug); only the request id is shown."),
    }


def _caller_errors() -> dict[str, Any]:
    """What every authenticated route can answer besides its own result."""
    return {
        "401": _problem(
            "Missing or invalid credentials, or more than one (Authorization and X-API-Key, or "
            "either repeated).",
            authenticate=True,
        ),
        **_any_route_errors(),
    }


def _upstream_errors() -> dict[str, Any]:
    return {
        **_caller_errors(),
        "429": _problem(
            "Rate limited: a per-caller limit or the daily attempt cap (`limit` names it), "
            "or the liveness service's own limit.",
            retry_after=True,
        ),
        "502": _problem(
            "The liveness service failed or answered something unusable (`upstream-malformed`: also "
            "an answer that contains a credential, or a result for another session)."
        ),
        "503": _problem(
            "No upstream access token can be obtained right now, the liveness service failed repeatedly "
            "and is not called for a while (circuit open), too many upstream calls are in flight, the "
            "JWT verification keys are unavailable, or the proxy's database cannot be reached.",
            retry_after=True,
        ),
        "504": _problem("The liveness service did not answer in time."),
    }


_BODY_422 = (
    "The body is JSON but not its declared shape: not an object, a member the document does not "
    "declare (named in `detail`; LIVENESS_PROXY_EXTRA_BODY_FIELDS lists any the operator accepts), a "
    "member of the wrong type or out of bounds, or nesting deeper than 254 levels."
)


def _body_errors(unprocessable: str = _BODY_422) -> dict[str, Any]:
    return {
        "400": _problem("The body is not valid JSON, is empty where required, or Content-Length is invalid."),
        "413": _problem("The body is larger than LIVENESS_PROXY_MAX_BODY_BYTES."),
        "415": _problem("The body is not application/json."),
        "422": _problem(unprocessable),
    }


_IDEMPOTENCY_KEY_PARAMETER: dict[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes the create safe to retry: the first answer given once the Cynopsis call "
    "went out (a success or an upstream error) is stored per caller and key, and replayed for "
    "LIVENESS_PROXY_IDEMPOTENCY_TTL_SECONDS with `Idempotent-Replayed: true`, without calling "
    "Cynopsis or counting an attempt. Generate a new key (e.g. a UUID) per intended session.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
}
_REPLAYED_HEADER: dict[str, Any] = {
    "description": "`true` on an answer replayed for a repeated Idempotency-Key.",
    "required": False,
    "schema": {"type": "string", "enum": ["true"]},
}


def _rejections() -> dict[str, Any]:
    return {
        "4XX": _problem("The liveness service rejected the request; same status, sanitized detail."),
    }


_REFRESH_PARAMETER: dict[str, Any] = {
    "name": "refresh",
    "in": "query",
    "required": False,
    "description": "true: read the result upstream now when no verdict is stored yet.",
    "schema": {"type": "boolean", "default": False},
}


_DRY_RUN_PARAMETER: dict[str, Any] = {
    "name": "dry_run",
    "in": "query",
    "required": False,
    "description": "true: count what would be erased, erase nothing.",
    "schema": {"type": "boolean", "default": False},
}


def _admin_errors() -> dict[str, Any]:
    """What an admin route without an upstream call can answer besides its own result and 400."""
    return {
        "403": _problem("The caller lacks the liveness:admin scope."),
        "429": _problem("Rate limited (the result-read limit).", retry_after=True),
        "503": _problem(
            "The JWT verification keys are unavailable, or the proxy's database cannot be reached.",
            retry_after=True,
        ),
        **_caller_errors(),
    }


_ERASURE_TEXT = (
    "Idempotent: a repeat, or a subject or session the proxy holds nothing about, answers 200 with "
    "zeros. `dry_run` counts what would be erased and changes nothing. The audit chain stays "
    "verifiable: the erased records keep their commitments, and a chained event records the "
    "commitment and the counts, never the subject. Counts against the result-read limit."
)


def _list_parameters() -> list[dict[str, Any]]:
    def query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}

    text = {"type": "string", "minLength": 1, "maxLength": 255}
    moment = {"type": "string", "format": "date-time"}
    return [
        query("subject", "Only sessions created by this subject.", text),
        query("reference", "Only sessions created for this business reference.", text),
        query(
            "status",
            "SUCCEEDED, FAILED or EXPIRED: the recorded verdict. Without a verdict yet: `following` "
            "(the finalizer still reads it), `unresolved` (past the finalizer's deadline), or "
            "`pending` (any session without a verdict, followed or not).",
            {"type": "string", "enum": list(SESSION_STATUSES)},
        ),
        query("created_after", "Created at or after this moment (RFC 3339, with its offset).", moment),
        query("created_before", "Created strictly before this moment (RFC 3339, with its offset).", moment),
        query(
            "cursor",
            "The `next_cursor` of the page before; opaque.",
            {"type": "string", "pattern": "^[A-Za-z0-9_-]+$", "maxLength": 512},
        ),
        query(
            "limit",
            f"Sessions per page (default {DEFAULT_PAGE_SIZE}).",
            {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE},
        ),
    ]


def _operations(session_id_parameter: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every documented operation, by its operationId; the route table says where each one lives."""
    operations: dict[str, dict[str, Any]] = {
        "getSessionToken": {
            "summary": "Start a liveness workflow: a one-time session token for the frontend SDK.",
            "description": "The token is bound to the caller: only the same subject can create a "
            "session with it, once, before it expires (unless LIVENESS_PROXY_SESSION_TOKEN_BINDING is "
            "off). Not idempotent, and need not be: retrying yields another token.",
            "security": _SECURITY,
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": _ref("SessionTokenRequest")}},
            },
            "responses": {
                "200": {
                    **_ok(
                        "The upstream session token, reduced to its declared shape.", "SessionTokenResponse"
                    ),
                    "links": {
                        "createSession": {
                            "operationId": "createSession",
                            "requestBody": {"session_token": SESSION_TOKEN_OF_ANSWER},
                            "description": "Create the session with this token (same caller).",
                        }
                    },
                },
                **_body_errors(),
                **_upstream_errors(),
                **_rejections(),
            },
        },
        "createSession": {
            "summary": "Create a liveness session, bound to the calling subject.",
            "description": "Spends one of the caller's daily attempts once the Cynopsis call goes "
            "out, and the session token's one use. Send an Idempotency-Key to make retries safe.",
            "security": _SECURITY,
            "parameters": [_IDEMPOTENCY_KEY_PARAMETER],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("CreateSessionRequest")}},
            },
            "responses": {
                "201": {
                    **_ok(
                        "The upstream session, reduced to its declared shape; its id is now bound to "
                        "the caller.",
                        "SessionResponse",
                        {
                            "Location": {
                                "description": "The result URL.",
                                "required": True,
                                "schema": {
                                    "type": "string",
                                    "pattern": LOCATION_PATTERN,
                                },
                            },
                            "Idempotent-Replayed": _REPLAYED_HEADER,
                        },
                    ),
                    "links": {
                        "getLivenessResult": {
                            "operationId": "getLivenessResult",
                            "parameters": {"session_id": "$response.body#/session_id"},
                            "description": "Read this session's result.",
                        }
                    },
                },
                "409": _problem(
                    "`idempotency-key-in-flight`: a request with this Idempotency-Key is still being "
                    "processed; retry after Retry-After.",
                    retry_after=True,
                ),
                **_body_errors(
                    _BODY_422 + " `session-token-invalid`: the session token is unknown, was obtained by "
                    "another caller, was used already or expired (one answer for all four). "
                    "`idempotency-key-reused`: this Idempotency-Key came with another body."
                ),
                **_upstream_errors(),
                **_rejections(),
            },
        },
        "getLivenessResult": {
            "summary": "The session's result; only its creator or a liveness:admin caller may read it.",
            "security": _SECURITY,
            "parameters": [session_id_parameter],
            "responses": {
                "200": _ok(
                    "The result, reduced to its declared shape (images never pass by default).",
                    "LivenessResult",
                    {"X-Liveness-Result-Source": _RESULT_SOURCE_HEADER},
                ),
                "400": _problem("The session id is malformed."),
                "404": _problem("No such session for this caller."),
                **_upstream_errors(),
                **_rejections(),
            },
        },
        "getSessionRecord": {
            "summary": "Admin only (liveness:admin): the session's owner, reference, finalizer state, "
            "the verdict the proxy read from Cynopsis and its webhook deliveries, for a backend that "
            "must not trust the frontend.",
            "description": "With `refresh=true`, a session without a stored verdict is read upstream "
            "first (as its owner's result read would be) and a terminal status is recorded as its "
            "verdict, with its audit event and webhook. A session with a verdict is never read again. "
            "Audited as `session.read`, or `session.refresh` when refresh=true was asked.",
            "security": _SECURITY,
            "parameters": [session_id_parameter, _REFRESH_PARAMETER],
            "responses": {
                "200": _ok("The session record.", "SessionRecord"),
                "400": _problem("The session id is malformed, or `refresh` is not true or false."),
                "403": _problem("The caller lacks the liveness:admin scope."),
                "404": _problem(
                    "No such session (with refresh=true: also when the liveness service does not know it)."
                ),
                # Only with refresh=true can the upstream's answers reach the caller.
                **_upstream_errors(),
                **_rejections(),
            },
        },
        "listSessions": {
            "summary": "Admin only (liveness:admin): the sessions, newest first, filtered and "
            "keyset-paginated.",
            "description": "Follow `next_cursor` with the same filters until it is null: a page "
            "starts strictly after the last session of the page before, so sessions created "
            "meanwhile neither repeat nor shift a page. Each session is a `SessionSummary`: its "
            "webhook deliveries are on `GET /v1/liveness/sessions/{session_id}`. Any query "
            "parameter not listed here, or given twice, is refused (400): a misspelt filter never "
            "lists every session. Audited as `session.list`; counts against the result-read limit.",
            "security": _SECURITY,
            "parameters": _list_parameters(),
            "responses": {
                "200": _ok("One page of sessions.", "SessionList"),
                "400": _problem(
                    "A query parameter is unknown, repeated or malformed, or the cursor is not one "
                    "this route returned."
                ),
                **_admin_errors(),
            },
        },
        "eraseSubject": {
            "summary": "Admin only (liveness:admin): forget a subject everywhere the proxy keeps it.",
            "description": "Removes the subject's sessions (bindings, verdicts, stored results), "
            "idempotency records and session-token bindings; cancels its undelivered webhook events "
            "and erases their payloads; erases the plain values of its audit records; revokes its "
            "API keys; and destroys its secret, so that nothing left can be linked to it. A subject "
            "that comes back gets a new secret and starts clean. The subject goes in the body, "
            "never in a URL, where access logs would keep it. " + _ERASURE_TEXT + " Audited as "
            "`subject.erase`, under the admin who asked: the erased subject is in no audit record "
            "and no log line.",
            "security": _SECURITY,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("EraseSubjectRequest")}},
            },
            "responses": {
                "200": _ok("What was erased (or, with dry_run, would be).", "ErasureResult"),
                **_body_errors(
                    "The body is JSON but not its declared shape: not an object, a member other than "
                    "`subject` and `dry_run` (named in `detail`; LIVENESS_PROXY_EXTRA_BODY_FIELDS does "
                    "not apply here), a member of the wrong type or out of bounds. Also the admin's own "
                    "subject: this request's audit record would name it after its secret is gone (ask "
                    "another admin, or run `liveness-proxy subjects erase`)."
                ),
                **_admin_errors(),
            },
        },
        "eraseSession": {
            "summary": "Admin only (liveness:admin): forget one session: its binding, verdict and "
            "stored result, its webhook payloads, and the plain values of its audit records.",
            "description": _ERASURE_TEXT + " An unknown session and an already erased one get the "
            "same 200 with zeros, not a 404: erasure is idempotent, so a retried DELETE succeeds, and "
            "whether a session existed is told to no one but an admin (any other caller gets 403 "
            "before the session is looked up). Audited as `session.erase`, under the admin who asked; "
            "that record does not name the session (an erasure of it would erase its plain values "
            "too): the chained `session.erased` event does, under the same request id.",
            "security": _SECURITY,
            "parameters": [session_id_parameter, _DRY_RUN_PARAMETER],
            "responses": {
                "200": _ok("What was erased (or, with dry_run=true, would be).", "ErasureResult"),
                "400": _problem("The session id is malformed, or `dry_run` is not true or false."),
                **_admin_errors(),
            },
        },
        "health": {
            "summary": "The process is alive.",
            "security": [],
            "responses": {"200": _ok("Alive.", "Health"), **_any_route_errors()},
        },
        "readiness": {
            "summary": "The store is reachable and an upstream access token is cached or obtainable.",
            "security": [],
            "responses": {
                "200": _ok(
                    "Ready (`degraded` while Redis is unreachable: still serving, with per-process limits).",
                    "Readiness",
                ),
                "503": _problem(
                    "Not ready (`checks` names what failed), or still starting.", retry_after=True
                ),
                **_any_route_errors(),
            },
        },
        "metrics": {
            "summary": "Prometheus metrics (text format). Only from "
            "LIVENESS_PROXY_METRICS_ALLOWED_NETWORKS; with LIVENESS_PROXY_METRICS_TOKEN set, also "
            "needs that bearer token. Absent when LIVENESS_PROXY_METRICS_ENABLED is false.",
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format 0.0.4.",
                    "headers": {"X-Request-ID": _REQUEST_ID_HEADER},
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": _problem("The metrics token is missing or wrong.", authenticate=True),
                "404": _problem("The client is outside the allowed networks."),
                **_any_route_errors(),
            },
        },
        "openapi": {
            "summary": "This document.",
            "security": [],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "headers": {"X-Request-ID": _REQUEST_ID_HEADER},
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **_any_route_errors(),
            },
        },
    }
    for operation, media_type, summary in (
        (
            "jsClient",
            "text/javascript",
            "The browser client: a dependency-free ES module (docs/integration.md).",
        ),
        (
            "jsClientTypes",
            "application/typescript",
            "TypeScript declarations of the browser client.",
        ),
    ):
        operations[operation] = {  # the two files of the JS client
            "summary": summary,
            "security": [],
            "responses": {
                "200": {
                    "description": "The file, cacheable for 5 minutes; revalidate with its ETag.",
                    "headers": {"X-Request-ID": _REQUEST_ID_HEADER},
                    "content": {media_type: {"schema": {"type": "string"}}},
                },
                "304": {"description": "Unchanged since the ETag sent in If-None-Match."},
                **_any_route_errors(),
            },
        }
    return operations


def build_openapi(
    routes: Sequence[RouteSpec] = ROUTES,
    *,
    extra_body_fields: Iterable[str] = (),
    extra_response_fields: Iterable[str] = (),
) -> dict[str, Any]:
    """The document of `routes` (the route table): each route's path and method, its operation's
    text, and the declared shapes with the operator's extra members added."""
    session_id_parameter = {
        "name": "session_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": SESSION_ID_PATTERN},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "liveness-proxy",
            "version": __version__,
            "description": "Authenticated, audited access to the Cynopsis Liveness API. "
            "Errors are RFC 9457 problem details carrying the request id.",
        },
        "paths": _paths(routes, _operations(session_id_parameter)),
        "webhooks": webhooks_section(),
        "components": {
            "schemas": _with_extra_fields(
                json_schema_components(), list(extra_body_fields), list(extra_response_fields)
            ),
            "headers": {
                "X-Request-ID": {
                    "description": "The request id: the caller's own X-Request-ID when it is 1-128 "
                    "characters of A-Za-z0-9._:-, else a generated one; also in every problem body. "
                    "On every response.",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                }
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (lpk_…) or, when configured, a JWT of the identity provider.",
                },
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


def _with_extra_fields(
    schemas: dict[str, Any], body_fields: list[str], response_fields: list[str]
) -> dict[str, Any]:
    """The closed shapes opened exactly as far as the operator allowed: each extra member, of any
    JSON type, in the request bodies or the three proxied answers."""
    for names, models, description in (
        (body_fields, ("SessionTokenRequest", "CreateSessionRequest"), "LIVENESS_PROXY_EXTRA_BODY_FIELDS"),
        (
            response_fields,
            ("SessionTokenResponse", "SessionResponse", "LivenessResult"),
            "LIVENESS_PROXY_EXTRA_RESPONSE_FIELDS",
        ),
    ):
        for model in models:
            properties = schemas[model].setdefault("properties", {})
            for name in names:
                properties.setdefault(name, {"description": f"Passed on as is ({description})."})
    return schemas


def _paths(routes: Sequence[RouteSpec], operations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    documented = set(operations)
    routed = {route.operation_id for route in routes}
    if documented != routed:
        # A route without its text, or text for no route: a bug, caught by the first app built.
        raise ValueError(f"routes and documented operations differ: {sorted(documented ^ routed)}")
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = {
            "operationId": route.operation_id,
            **operations[route.operation_id],
        }
    return paths
