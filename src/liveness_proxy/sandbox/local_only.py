"""What a tool listening on loopback refuses, so that no web page can drive it. The sandbox's control
API (`control.py`) and the demo's own routes (`demo/handling.py`) share these checks.

Any page a browser shows can send requests to 127.0.0.1 without asking first: a form post, or a
`fetch` with a text/plain body or none ("simple" requests, no CORS preflight). The page cannot read
the answer, but the request has its effect: a fault injected, the tokens revoked. And a site whose
name is rebound to 127.0.0.1 (DNS rebinding) is, to the browser, the same origin as the tool, so it
can read answers too. Hence three rules:

- the Host is a name the tool answers under (loopback unless it was told otherwise), so a rebound
  name is refused;
- an Origin, when sent, is the request's own: browsers name the page's origin on every
  cross-origin POST, so another site's page (or a sandboxed one, "null") is refused;
- a body is JSON (`Content-Type: application/json`), which a page can send to another origin only
  after a CORS preflight, and neither tool answers one.

A client that is not a browser (curl, httpx, the tests, the demo calling its sandbox) sends no
Origin and names the host it connects to, so it passes.
"""

from __future__ import annotations

from starlette.datastructures import Headers

# Host names a tool on loopback answers under by default (IPv6 literals keep their brackets).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
# `--host` values that mean every address; only compared here, never bound.
WILDCARD_ADDRESSES = frozenset({"0.0.0." + "0", "::", ""})
JSON_MEDIA_TYPE = "application/json"


def hosts_to_answer(listen_host: str) -> frozenset[str] | None:
    """The Host names a tool listening on `listen_host` answers under: loopback and that address.
    Listening on every address means "reach me by any name": None, any (the caller warns)."""
    if listen_host in WILDCARD_ADDRESSES:
        return None
    return LOOPBACK_HOSTS | {f"[{listen_host}]" if ":" in listen_host else listen_host}


def host_name(headers: Headers) -> str:
    """The Host header's name, without the port (IPv6 literals keep their brackets)."""
    host = headers.get("host", "").lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def is_foreign_origin(headers: Headers) -> bool:
    """Whether an Origin header names another origin than the request's own (its Host). The scheme
    is not compared: one port serves one of the two, so the other cannot be a page of another site."""
    own = headers.get("host", "").lower()
    for origin in headers.getlist("origin"):
        scheme, separator, authority = origin.strip().lower().partition("://")
        if not (separator and scheme in ("http", "https") and authority == own):
            return True
    return False


def cross_site_refusal(headers: Headers, allowed_hosts: frozenset[str] | None) -> str | None:
    """Why a request must be refused as a web page's (the sentence for a 403), or None.
    `allowed_hosts`: the Host names answered under; None, any."""
    if allowed_hosts is not None and host_name(headers) not in allowed_hosts:
        return "This host name is not answered here (loopback names only, unless configured)."
    if is_foreign_origin(headers):
        return "Requests from another site's pages are refused."
    return None


def is_json(headers: Headers) -> bool:
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media_type == JSON_MEDIA_TYPE


def carries_body(headers: Headers) -> bool:
    """Whether the request says it has a body (a length above 0, or chunked)."""
    length = headers.get("content-length", "0").strip()
    return "transfer-encoding" in headers or length not in ("", "0")
