"""The OTLP/HTTP sink of S1t (scenarios/s1_tracing.py): a process of its own that takes span exports,
answers each with an empty ExportTraceServiceResponse (200), and counts them; nothing is kept.

    python bench/otlp_sink.py --port 4318

`POST <prefix>/v1/traces` (protobuf, identity, gzip or deflate) is counted under `<prefix>`, so each
proxy exports to a base URL of its own (OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318/<name>)
and one sink tells them apart. `GET /stats` answers the counts as JSON: per prefix, the export
requests, their bytes on the wire and the spans in them (counted by decoding the protobuf, with
upb, the C parser: a few microseconds per span, so the sink's CPU stays far below the proxy's; the
harness reports it). Its own process so that what it costs is not charged to the harness's GIL, and
can be read from /proc.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
import zlib
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TRACES_SUFFIX = "/v1/traces"
EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()


class Counts:
    """Export requests, bytes and spans per path prefix, and requests that could not be decoded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_prefix: dict[str, dict[str, int]] = {}

    def add(self, prefix: str, wire_bytes: int, spans: int, undecodable: bool) -> None:
        with self._lock:
            counts = self._by_prefix.setdefault(
                prefix, {"requests": 0, "bytes": 0, "spans": 0, "undecodable": 0}
            )
            counts["requests"] += 1
            counts["bytes"] += wire_bytes
            counts["spans"] += spans
            counts["undecodable"] += int(undecodable)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {prefix: dict(counts) for prefix, counts in self._by_prefix.items()}


def span_count(body: bytes, encoding: str) -> int:
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    export = ExportTraceServiceRequest.FromString(body)
    return sum(len(scope.spans) for resource in export.resource_spans for scope in resource.scope_spans)


def handler_for(counts: Counts) -> type[BaseHTTPRequestHandler]:
    class SinkHandler(BaseHTTPRequestHandler):
        # Keep-alive: the exporter holds one connection open between batches, as with a collector.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?")[0]
            if not path.endswith(TRACES_SUFFIX):
                self._answer(404, b"not a traces path", "text/plain")
                return
            encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
            try:
                spans, undecodable = span_count(body, encoding), False
            except Exception:  # any undecodable body is counted, never fatal to the sink
                spans, undecodable = 0, True
            counts.add(path.removesuffix(TRACES_SUFFIX).strip("/") or "/", len(body), spans, undecodable)
            # 200 even for an undecodable body: the exporter would retry a 4xx/5xx, adding load the
            # proxy under measurement would not see with a collector; the count says what happened.
            self._answer(200, EMPTY_RESPONSE, "application/x-protobuf")

        def do_GET(self) -> None:
            if self.path != "/stats":
                self._answer(404, b"", "text/plain")
                return
            self._answer(200, json.dumps(counts.snapshot()).encode(), "application/json")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a log line per export is work the sink need not do

    return SinkHandler


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(Counts()))
    server.daemon_threads = True
    print(f"otlp sink listening on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
