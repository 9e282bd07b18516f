"""uvicorn's request cycle with one socket write per answer instead of two.

uvicorn's `RequestResponseCycle.send` writes a response's head to the transport as soon as the app
sends `http.response.start`, and its body when the app sends `http.response.body`: two `send()`
system calls, and two TCP segments on the wire, for every answer. Every answer of this app is one
start and one complete body, sent back to back, so `CoalescingCycle` holds the head and writes it
with the first body part (profiled in S1: the second system call was a few percent of a request).

Everything else is uvicorn 0.54's `send`, kept in the same order: flow control, a client gone away,
the checks of header names and values (one regular-expression search over all names and one over
all values, instead of two per header), `content-length`, `transfer-encoding: chunked`,
`connection: close`, HEAD, and the completion that lets the next pipelined request start. A head
held when the app fails before its body is never written: uvicorn then closes the connection, as it
does after a head already sent.

It subclasses uvicorn internals: an upgrade of uvicorn must re-run tests/e2e/test_serve_limits.py,
test_serve_abuse.py, test_shutdown.py and tests/unit/test_serving_cycle.py.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)


class CoalescingCycle(RequestResponseCycle):
    """A request cycle whose response head goes out in the same write as its body."""

    # The response head, between `http.response.start` and the first body part.
    held_head: bytes = b""

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{message['type']}'."
                )
            self.response_started = True
            self.waiting_for_100_continue = False
            self.held_head = self._head(
                message["status"], [*self.default_headers, *message.get("headers", ())]
            )
            return
        if self.response_complete:
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent, after response already completed."
            )
        if message["type"] != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{message['type']}'.")
        body: bytes = message.get("body", b"")
        more_body: bool = message.get("more_body", False)
        head, self.held_head = self.held_head, b""
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            out = head
        elif self.chunked_encoding:
            out = head + (b"%x\r\n%b\r\n" % (len(body), body) if body else b"")
            if not more_body:
                out += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            out = head + body
        if out:
            self.transport.write(out)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def _head(self, status_code: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The status line and header fields, with uvicorn's checks and the framing it derives."""
        # Joined with characters each check allows (`-` in a name, a tab in a value): one search
        # each finds what a search per header would.
        if HEADER_RE.search(b"-".join(name for name, _ in headers)):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"\t".join(value for _, value in headers)):
            raise RuntimeError("Invalid HTTP header value.")
        content = [STATUS_LINE[status_code]]
        has_connection_close = False
        for raw_name, value in headers:
            name = raw_name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and b"close" in [token.lower().strip() for token in value.split(b",")]:
                self.keep_alive = False
                has_connection_close = True
            content.append(b"%b: %b\r\n" % (name, value))
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status_code not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)
