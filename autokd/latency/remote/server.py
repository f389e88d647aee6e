"""`autokd latency-server`: times uploaded ONNX students on the device that will run them, over HTTP.

Runs on the target with ONNX Runtime, onnx and numpy only: this module and what it imports must never import torch
or timm (a test pins that). One model is timed at a time, with the protocol of a local measurement
(:mod:`autokd.latency.protocol`). Contract: docs/latency.md, "Latency on a target device"; security model:
docs/reliability.md, "Security".
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from autokd.config import port_number, positive_int
from autokd.errors import UserError
from autokd.latency.remote.guard import RefusedModel, inspect_upload

DEFAULT_PORT = 8765
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_BATCH = 1024
TOKEN_ENV = "AUTOKD_LATENCY_TOKEN"
SERVICE = "autokd-latency-server"
#: A client that stalls mid-upload must not hold the one measurement slot forever.
SOCKET_TIMEOUT_S = 60.0
#: What a client hears when ONNX Runtime fails on a checked model: its message can quote server-side data.
RUNTIME_FAILURE = "ONNX Runtime could not load or run this model (the details are in the server's log)"

logger = logging.getLogger(__name__)

MeasureFn = Callable[[bytes, int, int], dict[str, Any]]
SignatureFn = Callable[[int], dict[str, Any]]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _query_int(query: dict[str, list[str]], name: str, default: int, high: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise ValueError(f"query parameter {name}={values[-1]!r} is not an integer") from None
    if not 1 <= value <= high:
        raise ValueError(f"query parameter {name}={value} is outside 1..{high}")
    return value


class _Handler(BaseHTTPRequestHandler):
    """GET /health (no token), GET /signature?threads=T and POST /measure?batch=B&threads=T (body: the ONNX
    file; ``Authorization: Bearer T``). An upload is parsed in memory and never written anywhere; a model that
    references external data (a path the uploader chooses) is refused before ONNX Runtime sees it."""

    server: LatencyHTTPServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(SOCKET_TIMEOUT_S)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            sys.stderr.write(f"latency-server: {self.address_string()} {format % args}\n")

    def _send(self, code: int, payload: dict[str, Any], close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="autokd"')
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str, close: bool = False) -> None:
        self._send(code, {"error": message}, close=close)

    def _authorised(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        if url.path == "/health":
            self._send(200, {"status": "ok", "service": SERVICE, "busy": self.server.busy,
                             "measured": self.server.measured})
            return
        if url.path != "/signature":
            self._error(404, f"no such endpoint {url.path!r}: use GET /health, GET /signature, POST /measure")
            return
        if not self._authorised():
            self._error(401, "missing or wrong bearer token")
            return
        try:
            threads = _query_int(parse_qs(url.query), "threads", 1, self.server.max_threads)
        except ValueError as exc:
            self._error(400, str(exc))
            return
        self._send(200, {"signature": self.server.signature_fn(threads)})

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        if url.path != "/measure":
            self._error(404, f"no such endpoint {url.path!r}: use POST /measure", close=True)
            return
        # Refuse before reading the body: an unauthorised or oversized upload costs nothing to reject.
        if not self._authorised():
            self._error(401, "missing or wrong bearer token", close=True)
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self._error(411, "Content-Length is required", close=True)
            return
        try:
            length = int(length_text)
        except ValueError:
            self._error(400, f"Content-Length {length_text!r} is not an integer", close=True)
            return
        if length > self.server.max_bytes:
            self._error(413, f"model of {length} bytes is over this server's limit of {self.server.max_bytes} "
                             "bytes (--max-bytes)", close=True)
            return
        if length <= 0:
            self._error(400, "empty body: POST the ONNX file as the request body", close=True)
            return
        try:
            query = parse_qs(url.query)
            batch = _query_int(query, "batch", 1, MAX_BATCH)
            threads = _query_int(query, "threads", 1, self.server.max_threads)
        except ValueError as exc:
            self._error(400, str(exc), close=True)
            return
        try:
            body = self.rfile.read(length)
        except OSError as exc:
            self._error(400, f"could not read the body: {exc}", close=True)
            return
        if len(body) != length:
            self._error(400, f"body ended after {len(body)} of {length} bytes", close=True)
            return
        try:
            checked = inspect_upload(body, batch=batch)
        except RefusedModel as refused:
            self._send(400, {"error": refused.reason, "category": refused.category})
            return
        with self.server.measure_lock:  # never two models at once: they would slow each other down
            self.server.busy = True
            try:
                result = self.server.measure_fn(checked.canonical, batch, threads)
                self.server.measured += 1
            except Exception:  # noqa: BLE001 - any failure of the runtime on an upload is the client's 400
                logger.warning("ONNX Runtime failed on a model from %s", self.address_string(), exc_info=True)
                self._send(400, {"error": RUNTIME_FAILURE, "category": "runtime"})
                return
            finally:
                self.server.busy = False
        self._send(200, {"result": result, "signature": self.server.signature_fn(threads)})


class LatencyHTTPServer(ThreadingHTTPServer):
    """The HTTP server: holds the token, the limits, the measurement function and the one-at-a-time lock."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], token: str | None, max_bytes: int = DEFAULT_MAX_BYTES,
                 measure_fn: MeasureFn | None = None, signature_fn: SignatureFn | None = None,
                 verbose: bool = False) -> None:
        host = address[0]
        if token is None and not is_loopback(host):
            raise UserError(f"refusing to listen on {host!r} without a token: anyone who reaches the port could "
                            f"make this machine run their uploads. Pass --token (or set {TOKEN_ENV}), or bind "
                            "to 127.0.0.1.")
        if token is not None and not token.strip():
            raise UserError("the token is empty: pass a long random string (e.g. `openssl rand -hex 16`)")
        if max_bytes < 1:
            raise UserError(f"--max-bytes must be >= 1, got {max_bytes}")
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.host = host
        self.token = token
        self.max_bytes = max_bytes
        self.max_threads = os.cpu_count() or 1
        self.measure_fn = measure_fn or _default_measure
        self.signature_fn = signature_fn or _default_signature
        self.measure_lock = threading.Lock()
        self.busy = False
        self.measured = 0  # models timed since the start (shown by /health)
        self.verbose = verbose
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{address[1]}: {exc.strerror or exc}; pick another --port "
                            "or --host") from None


def _default_measure(model: bytes, batch: int, threads: int) -> dict[str, Any]:
    from dataclasses import asdict

    from autokd.latency import protocol

    return asdict(protocol.time_onnx(model, threads=threads, batch=batch))


def _default_signature(threads: int) -> dict[str, Any]:
    from autokd.latency import protocol

    return protocol.signature(threads)


def listening_line(server: LatencyHTTPServer) -> str:
    """The line the commands print once ``server`` listens: its URL, whether it needs a token, its size limit."""
    return (f"autokd latency-server on http://{server.host}:{server.server_address[1]} "
            f"({'token required' if server.token else 'no token: loopback only'}; up to {server.max_bytes} bytes "
            "per model)")


def serve(server: LatencyHTTPServer) -> None:
    """Run ``server`` until Ctrl-C / SIGTERM, then close it."""
    import signal

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


#: What `autokd latency-server --help` (and `python -m autokd.latency.remote.server --help`) says it is for.
DESCRIPTION = ("Run on the device that will run the students (needs onnxruntime, onnx and numpy, not torch). A "
               "search points at it with --latency-target http://HOST:PORT --latency-token T.")


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The options of the latency server, one definition for `autokd latency-server` and for
    `python -m autokd.latency.remote.server` (which needs no torch)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"port, 0-65535 (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--token", help=f"bearer token clients must send (default: ${TOKEN_ENV}; "
                   "required unless listening on loopback)")
    p.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                   help=f"largest model accepted, in bytes (default {DEFAULT_MAX_BYTES // 2**20} MiB)")


def server_from_args(args: argparse.Namespace) -> LatencyHTTPServer:
    """The server of the options of `add_server_args`, listening: the token from $AUTOKD_LATENCY_TOKEN when not
    given, each request logged on stderr."""
    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    return LatencyHTTPServer((args.host, args.port), token, max_bytes=args.max_bytes, verbose=True)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m autokd.latency.remote.server`."""
    parser = argparse.ArgumentParser(prog="python -m autokd.latency.remote.server", description=DESCRIPTION)
    add_server_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m autokd.latency.remote.server`: the same as `autokd latency-server`, for a device without torch."""
    args = build_parser().parse_args(argv)
    try:
        server = server_from_args(args)
    except UserError as exc:
        print(f"autokd latency-server: error: {exc}", file=sys.stderr)
        return 2
    print(listening_line(server), flush=True)
    serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_PORT", "DESCRIPTION", "LatencyHTTPServer", "TOKEN_ENV", "add_server_args",
    "build_parser", "is_loopback", "listening_line", "serve", "server_from_args",
]
