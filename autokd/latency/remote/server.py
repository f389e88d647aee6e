"""`autokd latency-server`: times uploaded ONNX students on the device that will run them, over HTTP.

Runs on the target with ONNX Runtime, onnx and numpy only: this module and what it imports must never import torch
or timm (a test pins that), and ONNX Runtime itself runs only in the measuring process
(:mod:`autokd.latency.remote.worker`), under a time and a memory limit. One model is timed at a time, with the
protocol of a local measurement (:mod:`autokd.latency.protocol`). Contract: docs/latency.md, "Latency on a target
device"; security model: docs/reliability.md, "Security".
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import selectors
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from autokd.config import port_number, positive_int
from autokd.errors import UserError
from autokd.latency.remote.guard import DEFAULT_MAX_INPUT_BYTES, INPUT_TOO_LARGE, RefusedModel, inspect_upload
from autokd.latency.remote.worker import (DEFAULT_MAX_MEASURE_SECONDS, DEFAULT_MAX_MEMORY_MB, RUNTIME_FAILURE,
                                          Limits, MeasuringProcess, Refusal)

DEFAULT_PORT = 8765
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_MAX_INPUT_MB = DEFAULT_MAX_INPUT_BYTES // 2**20
MAX_BATCH = 1024
TOKEN_ENV = "AUTOKD_LATENCY_TOKEN"
SERVICE = "autokd-latency-server"
#: How long a connection may stay silent (an idle keep-alive, a stalled upload) before the server closes it.
SOCKET_TIMEOUT_S = 30.0
#: A refused upload is still read (and discarded) for this long and up to this many bytes after the answer, so
#: that the client, which sends its whole body before it reads, sees the answer instead of a reset connection.
LINGER_S = 10.0
LINGER_MAX_BYTES = 256 * 1024 * 1024
#: Refused connections lingering at once; beyond that they are closed at once.
MAX_LINGERING = 64


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


@dataclass
class Upload:
    """An upload the guard let through: the bytes ONNX Runtime loads, and the inputs to feed it when the guard
    read them from the graph ((name, shape, numpy dtype string); None: the measuring process reads the session's)."""

    model: bytes
    inputs: list[tuple[str, list[int], str]] | None = None


def check_upload(body: bytes, *, batch: int, max_input_bytes: int) -> Upload:
    """The one place the server runs the upload guard (:mod:`autokd.latency.remote.guard`) on a body, before
    ONNX Runtime sees it; raises :class:`Refusal` for a model that must not be loaded. ``max_input_bytes`` is
    --max-input-mb in bytes (the measuring process checks the inputs it builds against it too)."""
    try:
        checked = inspect_upload(body, batch=batch, max_input_bytes=max_input_bytes)
    except RefusedModel as refused:
        option = " (--max-input-mb)" if refused.category == INPUT_TOO_LARGE else ""
        raise Refusal(400, refused.category, refused.reason + option) from None
    return Upload(checked.canonical, [(spec.name, list(spec.shape), spec.dtype.str) for spec in checked.inputs])


def _json_reply(code: int, payload: dict[str, Any], close: bool = False) -> bytes:
    """A whole HTTP/1.1 response, for a connection that gets no handler (turned away at the connection cap)."""
    body = json.dumps(payload).encode()
    reason = BaseHTTPRequestHandler.responses.get(code, ("",))[0]
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + body


class _Lingerer:
    """Closes refused connections gently, in one thread: after the answer, what the client still sends is read and
    discarded (up to a bound in bytes and time), then the connection is closed. Closing with unread bytes would
    reset it, and a client still uploading would see the reset, not the answer."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._new: list[tuple[socket.socket, int]] = []
        self._open: dict[socket.socket, list[float]] = {}  # socket -> [deadline, bytes still to read]
        self._closed = False
        threading.Thread(target=self._run, name="latency-server-linger", daemon=True).start()

    def add(self, sock: socket.socket, budget: int) -> None:
        """Take ``sock`` (the answer already sent), shut its sending side and close it once drained."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        with self._lock:
            if self._closed or len(self._open) + len(self._new) >= MAX_LINGERING:
                sock.close()
                return
            self._new.append((sock, max(int(budget), 1)))
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._closed:
            now = time.monotonic()
            timeout = max(0.0, min((d for d, _ in self._open.values()), default=now + 1.0) - now)
            for key, _ in self._selector.select(timeout):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._take_new()
                    continue
                try:
                    data = sock.recv(1 << 16)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                entry = self._open[sock]  # type: ignore[index]
                entry[1] -= len(data)
                if not data or entry[1] <= 0:
                    self._drop(sock)  # type: ignore[arg-type]
            now = time.monotonic()
            for sock in [s for s, (deadline, _) in self._open.items() if deadline <= now]:
                self._drop(sock)

    def _take_new(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._lock:
            new, self._new = self._new, []
        for sock, budget in new:
            self._open[sock] = [time.monotonic() + LINGER_S, budget]
            self._selector.register(sock, selectors.EVENT_READ)

    def _drop(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        del self._open[sock]
        sock.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass


class _Handler(BaseHTTPRequestHandler):
    """GET /health (no token), GET /signature?threads=T and POST /measure?batch=B&threads=T (body: the ONNX
    file; ``Authorization: Bearer T``). An upload is parsed in memory and never written anywhere; a model that
    references external data (a path the uploader chooses) is refused before ONNX Runtime sees it."""

    server: LatencyHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        self.server.log(f"{self.address_string()} {format % args}")

    def _send(self, code: int, payload: dict[str, Any], close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="autokd"')
        if code == 503:
            self.send_header("Retry-After", "1")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str, category: str, close: bool = False) -> None:
        self._send(code, {"error": message, "category": category}, close=close)

    def _refuse_upload(self, code: int, message: str, category: str) -> None:
        """Answer a POST whose body is not read, then let the lingerer drain it: a client sends its whole body
        before it reads the answer, and closing on unread bytes would reset the connection under it."""
        self._error(code, message, category, close=True)
        try:
            declared = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            declared = 0
        if declared > 0:
            try:
                self.server.lingerer.add(self.connection.dup(), min(declared, LINGER_MAX_BYTES))
            except OSError:
                pass

    def _authorised(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def _upload_refusal(self) -> tuple[int, str, str] | None:
        """Why a POST must be refused before its body is read (status, message, category), or None."""
        if not self._authorised():
            return 401, "missing or wrong bearer token", "token"
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return 411, "Content-Length is required", "length"
        try:
            length = int(length_text)
        except ValueError:
            return 400, f"Content-Length {length_text[:40]!r} is not an integer", "length"
        if length > self.server.max_bytes:
            return 413, (f"model of {length} bytes is over this server's limit of {self.server.max_bytes} bytes "
                         "(--max-bytes)"), "too-large"
        if length <= 0:
            return 400, "empty body: POST the ONNX file as the request body", "length"
        return None

    def handle_expect_100(self) -> bool:
        # A client that asks first (curl does for large bodies) gets the refusal before it sends anything.
        refusal = self._upload_refusal() if self.command == "POST" else None
        if refusal is not None:
            self._error(*refusal, close=True)
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        if url.path == "/health":
            self._send(200, {"status": "ok", "service": SERVICE, "busy": self.server.busy,
                             "measured": self.server.measured})
            return
        if url.path != "/signature":
            self._error(404, f"no such endpoint {url.path[:200]!r}: use GET /health, GET /signature, POST /measure",
                        "endpoint")
            return
        if not self._authorised():
            self._error(401, "missing or wrong bearer token", "token")
            return
        try:
            threads = _query_int(parse_qs(url.query), "threads", 1, self.server.max_threads)
        except ValueError as exc:
            self._error(400, str(exc), "query")
            return
        self._send(200, {"signature": self.server.measurer.signature(threads), "limits": self.server.limits_info()})

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        if url.path != "/measure":
            self._refuse_upload(404, f"no such endpoint {url.path[:200]!r}: use POST /measure", "endpoint")
            return
        # Refuse before reading the body: an unauthorised or oversized upload costs nothing to reject.
        refusal = self._upload_refusal()
        if refusal is not None:
            self._refuse_upload(*refusal)
            return
        length = int(self.headers["Content-Length"])
        try:
            query = parse_qs(url.query)
            batch = _query_int(query, "batch", 1, MAX_BATCH)
            threads = _query_int(query, "threads", 1, self.server.max_threads)
        except ValueError as exc:
            self._refuse_upload(400, str(exc), "query")
            return
        body = self.rfile.read(length)  # a silent client: TimeoutError after SOCKET_TIMEOUT_S, handled above us
        if len(body) != length:
            self._error(400, f"body ended after {len(body)} of {length} bytes", "length", close=True)
            return
        try:
            upload = check_upload(body, batch=batch, max_input_bytes=self.server.limits.max_input_bytes)
            result = self.server.measure(upload, batch, threads)
        except Refusal as refusal:
            self._error(refusal.status, refusal.message, refusal.category)
            return
        self._send(200, {"result": result, "signature": self.server.measurer.signature(threads),
                         "limits": self.server.limits_info()})


class LatencyHTTPServer(ThreadingHTTPServer):
    """The HTTP server: holds the token, the limits, the measuring process, the one-at-a-time lock and the cap on
    connections. Starting it starts the measuring process (UserError if it cannot start)."""

    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted (then handled, or turned away over the cap)

    def __init__(self, address: tuple[str, int], token: str | None, max_bytes: int = DEFAULT_MAX_BYTES,
                 limits: Limits | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS,
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
        if max_connections < 1:
            raise UserError(f"--max-connections must be >= 1, got {max_connections}")
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.host = host
        self.token = token
        self.max_bytes = max_bytes
        self.limits = limits or Limits(max_input_bytes=DEFAULT_MAX_INPUT_BYTES)
        self.max_connections = max_connections
        self.max_threads = os.cpu_count() or 1
        self.measure_lock = threading.Lock()
        self.busy = False
        self.measured = 0  # models timed since the start (shown by /health)
        self.verbose = verbose
        self._slots = threading.BoundedSemaphore(max_connections)
        self._full_logged = False
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{address[1]}: {exc.strerror or exc}; pick another --port "
                            "or --host") from None
        self.lingerer = _Lingerer()
        self.measurer = MeasuringProcess(self.limits, log=self.log)
        try:
            self.measurer.start()
        except BaseException:
            self.server_close()
            raise

    def log(self, line: str) -> None:
        """One line on the server's log (stderr), when verbose."""
        if self.verbose:
            sys.stderr.write(f"latency-server: {line}\n")

    def limits_info(self) -> dict[str, int]:
        """The limits a client needs to know (sent with the signature)."""
        return {"max_bytes": self.max_bytes, "max_input_bytes": self.limits.max_input_bytes,
                "max_measure_seconds": self.limits.max_measure_seconds, "max_memory_mb": self.limits.max_memory_mb}

    def measure(self, upload: Upload, batch: int, threads: int) -> dict[str, Any]:
        """Time ``upload`` in the measuring process, one model at a time; Refusal when it breaks a limit. A request
        that waits longer than one measurement's limit for its turn is answered 503 (try again)."""
        if not self.measure_lock.acquire(timeout=self.limits.max_measure_seconds):
            raise Refusal(503, "busy", "the server is busy with other measurements; try again")
        self.busy = True
        try:
            result = self.measurer.measure(upload.model, batch, threads, upload.inputs)
            self.measured += 1
            return result
        finally:
            self.busy = False
            self.measure_lock.release()

    # -- connections ------------------------------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._turn_away(request)
            return
        self._full_logged = False
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _turn_away(self, request: socket.socket) -> None:
        """Over the connection cap: a 503 at once (no thread), then the lingerer closes the connection."""
        if not self._full_logged:
            self.log(f"{self.max_connections} connections open (--max-connections): turning new ones away with 503")
            self._full_logged = True
        try:
            request.setblocking(False)
            request.send(_json_reply(503, {"error": f"the server has {self.max_connections} connections open "
                                                    "(--max-connections); try again", "category": "busy"},
                                     close=True))
        except OSError:
            request.close()
            return
        self.lingerer.add(request, self.max_bytes + (1 << 16))

    def shutdown_request(self, request: Any) -> None:
        try:
            super().shutdown_request(request)
        except OSError:
            pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # the client left or went silent: not our fault
            self.log(f"{client_address[0]} left before the answer ({exc.__class__.__name__})")
            return
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        if hasattr(self, "lingerer"):
            self.lingerer.close()
        if hasattr(self, "measurer"):
            self.measurer.close()


def listening_line(server: LatencyHTTPServer) -> str:
    """The line the commands print once ``server`` listens: its URL, whether it needs a token, its limits."""
    limits = server.limits
    return (f"autokd latency-server on http://{server.host}:{server.server_address[1]} "
            f"({'token required' if server.token else 'no token: loopback only'}; up to {server.max_bytes} bytes "
            f"per model, {limits.max_input_bytes // 2**20} MiB of inputs, {limits.max_measure_seconds} s and "
            f"{limits.max_memory_mb} MiB per measurement, {server.max_connections} connections)")


def enter_empty_directory() -> str:
    """Make the working directory a new, empty temporary directory (returned; the caller removes it): nothing an
    upload names relative to it can exist. Relative entries of ``sys.path`` and ``$PYTHONPATH`` are made absolute
    first, so imports still find what they found."""
    sys.path[:] = [os.path.abspath(p) for p in sys.path]
    if os.environ.get("PYTHONPATH"):
        os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in
                                                   os.environ["PYTHONPATH"].split(os.pathsep) if p)
    workdir = tempfile.mkdtemp(prefix="autokd-latency-server-")
    os.chdir(workdir)
    return workdir


def serve(server: LatencyHTTPServer) -> None:
    """Run ``server`` until Ctrl-C / SIGTERM, in an empty temporary working directory, then close it (the
    measuring process killed, a measurement in progress included)."""
    import shutil
    import signal

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = os.getcwd()
    workdir = enter_empty_directory()
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        os.chdir(previous)
        shutil.rmtree(workdir, ignore_errors=True)


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
    p.add_argument("--max-input-mb", type=positive_int, default=DEFAULT_MAX_INPUT_MB,
                   help=f"largest inputs a model may declare, all together at the batch asked, in MiB (default "
                        f"{DEFAULT_MAX_INPUT_MB})")
    p.add_argument("--max-measure-seconds", type=positive_int, default=DEFAULT_MAX_MEASURE_SECONDS,
                   help=f"wall time one measurement may take, loading included (default "
                        f"{DEFAULT_MAX_MEASURE_SECONDS}); beyond it the measuring process is killed and the client "
                        "gets 422")
    p.add_argument("--max-memory-mb", type=positive_int, default=DEFAULT_MAX_MEMORY_MB,
                   help=f"address space of the measuring process, in MiB (default {DEFAULT_MAX_MEMORY_MB}; the log "
                        "says what it maps with ONNX Runtime loaded); beyond it the client gets 422")
    p.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"connections served at once (default {DEFAULT_MAX_CONNECTIONS}); more are answered 503")


def server_from_args(args: argparse.Namespace) -> LatencyHTTPServer:
    """The server of the options of `add_server_args`, listening, its measuring process ready: the token from
    $AUTOKD_LATENCY_TOKEN when not given, each request logged on stderr."""
    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    limits = Limits(max_measure_seconds=args.max_measure_seconds, max_memory_mb=args.max_memory_mb,
                    max_input_bytes=args.max_input_mb * 2**20)
    return LatencyHTTPServer((args.host, args.port), token, max_bytes=args.max_bytes, limits=limits,
                             max_connections=args.max_connections, verbose=True)


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
    "DEFAULT_MAX_BYTES", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_INPUT_MB", "DEFAULT_PORT", "DESCRIPTION",
    "LatencyHTTPServer", "RUNTIME_FAILURE", "TOKEN_ENV", "Upload", "add_server_args", "build_parser", "check_upload",
    "enter_empty_directory", "is_loopback", "listening_line", "serve", "server_from_args",
]
