"""The measuring process of `autokd latency-server`: uploaded models run here, never in the server itself.

ONNX Runtime runs a model in C++, where Python cannot interrupt it: a ``Loop`` of 2^62 trips never returns, a
``ConstantOfShape`` of a few bytes allocates gigabytes. So the server keeps one child process for that
(:class:`MeasuringProcess`), warm between requests, under an address-space limit (``RLIMIT_AS``) the child sets on
itself, and waits for each measurement at most the server's time limit; on a breach or a crash the child is killed
(SIGKILL) and another one started. The child runs ``python -m autokd.latency.remote.worker`` in an empty temporary
directory of its own and talks over its stdin/stdout: length-prefixed frames; a request is a JSON header, then the
model's bytes; an answer is one JSON frame.

The server side of this module imports neither torch nor onnxruntime: ONNX Runtime is loaded in the child only.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, Callable

from autokd.errors import UserError

DEFAULT_MAX_MEASURE_SECONDS = 60
DEFAULT_MAX_MEMORY_MB = 4096
#: What a client hears when ONNX Runtime fails on a checked model: its message can quote server-side data.
RUNTIME_FAILURE = "ONNX Runtime could not load or run this model (the details are in the server's log)"
#: How long a new measuring process may take to load ONNX Runtime and run its self-test.
START_TIMEOUT_S = 120.0
#: Address space a measuring process needs beyond what it maps with ONNX Runtime loaded, to run a small model.
HEADROOM_MB = 64
_FRAME = struct.Struct(">Q")
#: What ONNX Runtime's and numpy's messages say when an allocation fails (under the address-space limit).
_OUT_OF_MEMORY = ("Failed to allocate memory", "bad_alloc", "bad allocation", "Cannot allocate memory",
                  "out of memory", "MemoryError")


@dataclass(frozen=True)
class Limits:
    """What one measurement may use: bytes of the inputs built for the model, wall time (from the request reaching
    the measuring process to its answer) and address space of the measuring process."""

    max_input_bytes: int  # the server's default is the guard's (guard.DEFAULT_MAX_INPUT_BYTES)
    max_measure_seconds: int = DEFAULT_MAX_MEASURE_SECONDS
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB

    def time_message(self) -> str:
        return (f"measurement exceeded this server's {self.max_measure_seconds} s time limit "
                "(--max-measure-seconds)")

    def memory_message(self) -> str:
        return f"measurement exceeded this server's {self.max_memory_mb} MiB memory limit (--max-memory-mb)"


class Refusal(Exception):
    """A request the server answers with an error: HTTP ``status``, a ``category`` a program can test, and a
    message for the user (fixed texts and autokd's own; never a runtime's error text)."""

    def __init__(self, status: int, category: str, message: str) -> None:
        super().__init__(message)
        self.status, self.category, self.message = status, category, message


# -- the server's side -------------------------------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    """The child's environment: this checkout's autokd importable whatever the working directory (PYTHONPATH made
    absolute), and a small address-space footprint, so that the memory limit counts what models use."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])  # the directory that holds the autokd package
    paths = [root, *(os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # glibc reserves 64 MiB of address space for each thread's malloc arena and OpenBLAS starts a thread per core:
    # both inflate what RLIMIT_AS counts without being used. ONNX Runtime allocates through its own arena.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, n: int, deadline: float) -> bytes | None:
    """``n`` bytes from ``fd``; None at end of file; TimeoutError after ``deadline`` (time.monotonic)."""
    chunks, got = [], 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class MeasuringProcess:
    """The server's measuring process: :meth:`start` starts it, :meth:`measure` times one model in it and replaces
    it after a breach of the limits or a crash, :meth:`close` kills it. ``measure`` is called by one thread at a
    time (the server serialises measurements); ``close`` may come from any thread, at any time."""

    def __init__(self, limits: Limits, log: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        self.log = log or (lambda line: None)
        self.address_space_mb: float | None = None  # what the process maps when ready (ONNX Runtime loaded)
        self._env = _child_env()
        self._base_signature: dict[str, Any] | None = None
        self._proc: subprocess.Popen | None = None
        self._workdir: str | None = None
        self._ready = False
        self._closed = False
        self._state = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The current measuring process's id (None between a breach and its replacement)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def start(self) -> None:
        """Start the measuring process and wait until it is ready; UserError if it cannot start (the memory limit
        is below what ONNX Runtime needs, onnxruntime is missing)."""
        self._spawn()
        self._await_ready()

    def signature(self, threads: int) -> dict[str, Any]:
        """The device signature of measurements with ``threads`` threads (device, runtime, version, provider)."""
        if self._base_signature is None:
            self.start()
        assert self._base_signature is not None
        return {**self._base_signature, "threads": int(threads)}

    def _spawn(self) -> None:
        with self._state:
            if self._closed:
                raise Refusal(503, "shutting-down", "the server is shutting down")
            workdir = tempfile.mkdtemp(prefix="autokd-latency-worker-")  # empty: nothing relative to find there
            cmd = [sys.executable, "-m", "autokd.latency.remote.worker",
                   "--max-memory-mb", str(self.limits.max_memory_mb),
                   "--max-measure-seconds", str(self.limits.max_measure_seconds)]
            # A session of its own: Ctrl-C in the server's terminal is the server's to handle (it kills this).
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=workdir,
                                          env=self._env, bufsize=0, start_new_session=True)
            self._workdir, self._ready = workdir, False

    def _await_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        try:
            message = self._read_message(proc, time.monotonic() + START_TIMEOUT_S)
        except TimeoutError:
            message = None
        if message is None or "ready" not in message:
            code = self._reap(proc)
            raise UserError(message["error"] if message and "error" in message else
                            f"the measuring process did not start ({_exit_text(code)}; its messages, if any, are "
                            "above): the latency server needs onnxruntime and numpy")
        self._base_signature = message["signature"]
        self.address_space_mb = message["address_space_mb"]
        self._ready = True
        self.log(f"measuring process {proc.pid} ready: {self.address_space_mb:.0f} MiB of address space mapped, "
                 f"limit {self.limits.max_memory_mb} MiB, {self.limits.max_measure_seconds} s per measurement")

    @staticmethod
    def _read_message(proc: subprocess.Popen, deadline: float) -> dict[str, Any] | None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        head = _read_exactly(fd, _FRAME.size, deadline)
        body = _read_exactly(fd, _FRAME.unpack(head)[0], deadline) if head is not None else None
        return json.loads(body) if body is not None else None

    def _reap(self, proc: subprocess.Popen) -> int | None:
        """Kill ``proc`` (SIGKILL), wait for it, remove its working directory; its exit code."""
        with self._state:
            workdir = self._workdir if self._proc is proc else None
            if self._proc is proc:
                self._proc, self._workdir, self._ready = None, None, False
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        code = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()  # type: ignore[union-attr]
            except OSError:
                pass
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        return code

    def _replace(self, proc: subprocess.Popen, why: str) -> int | None:
        """Kill ``proc`` and start its successor at once (it loads ONNX Runtime while the client gets its answer)."""
        code = self._reap(proc)
        self.log(f"measuring process {proc.pid} {why} ({_exit_text(code)}); starting another")
        try:
            self._spawn()
        except Refusal:
            pass  # shutting down: no successor
        return code

    def _ready_process(self) -> subprocess.Popen:
        proc = self._proc
        if proc is not None and proc.poll() is not None:  # died while idle (killed from outside)
            self._replace(proc, "died while idle")
            proc = self._proc
        if proc is None:
            self._spawn()
            proc = self._proc
        assert proc is not None
        if not self._ready:
            try:
                self._await_ready()
            except UserError as exc:
                self.log(f"cannot start a measuring process: {exc}")
                raise Refusal(503, "unavailable",
                              "the server cannot start its measuring process; see its log") from None
        return proc

    def measure(self, model: bytes, batch: int, threads: int,
                inputs: list[tuple[str, list[int], str]] | None = None) -> dict[str, Any]:
        """The timing of ``model`` (a dict of :class:`autokd.latency.protocol.Timing`'s fields); ``inputs``
        (name, shape, numpy dtype string) when the guard has read them, else the process reads the session's.
        Raises :class:`Refusal` for a model that breaks a limit, crashes ONNX Runtime or cannot be run."""
        proc = self._ready_process()
        assert proc.stdin is not None
        header = json.dumps({"batch": int(batch), "threads": int(threads), "inputs": inputs,
                             "max_input_bytes": self.limits.max_input_bytes}).encode()
        deadline = time.monotonic() + self.limits.max_measure_seconds
        try:
            _write_all(proc.stdin.fileno(), _FRAME.pack(len(header)) + header + _FRAME.pack(len(model)))
            _write_all(proc.stdin.fileno(), model)
            reply = self._read_message(proc, deadline)
        except TimeoutError:
            self._replace(proc, "exceeded the time limit")
            raise Refusal(422, "time-limit", self.limits.time_message()) from None
        except OSError:  # the pipe broke: the process is gone (or the server is closing)
            reply = None
        if reply is None:
            code = self._replace(proc, "died")
            if self._closed:
                raise Refusal(503, "shutting-down", "the server is shutting down")
            raise Refusal(422, "crashed", f"ONNX Runtime crashed on this model (the measuring process was "
                                          f"{_exit_text(code)}; a crash can also be the server's "
                                          f"{self.limits.max_memory_mb} MiB memory limit, --max-memory-mb)")
        if "result" in reply:
            return reply["result"]
        category = reply["category"]
        self.log(f"model refused ({category}): {reply.get('detail') or reply.get('message', '')}")
        if category == "memory-limit":
            self._replace(proc, "exceeded the memory limit")
            raise Refusal(422, category, self.limits.memory_message())
        if category in ("input-too-large", "unsupported-input"):
            raise Refusal(400, category, reply["message"])
        raise Refusal(400, "runtime", RUNTIME_FAILURE)

    def close(self) -> None:
        """Kill the measuring process (a measurement in progress included); no successor is started."""
        with self._state:
            self._closed = True
            proc, workdir = self._proc, self._workdir
        if proc is not None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            proc.wait()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


# -- the measuring process's side --------------------------------------------------------------------------------
def _address_space_mb() -> float:
    """What this process maps (VmSize), in MiB; 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _tiny_model() -> bytes:
    """A one-node ONNX model (Identity on a float tensor of shape [1], IR 7, opset 13), written as protobuf by
    hand so that the measuring process does not load onnx. The self-test of a new measuring process runs it."""
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    def field(number: int, value: bytes | int) -> bytes:
        if isinstance(value, int):
            return varint(number << 3) + varint(value)
        return varint(number << 3 | 2) + varint(len(value)) + value

    tensor_type = field(1, field(1, 1) + field(2, field(1, field(1, 1))))  # float, shape [1]
    graph = (field(1, field(1, b"x") + field(2, b"y") + field(4, b"Identity")) + field(2, b"g")
             + field(11, field(1, b"x") + field(2, tensor_type)) + field(12, field(1, b"y") + field(2, tensor_type)))
    return field(1, 7) + field(7, graph) + field(8, field(2, 13))


def _cpu_backstop(seconds: int | None, threads: int = 1) -> None:
    """A measuring process whose server was killed (SIGKILL) mid-measurement must not spin for ever: the kernel
    ends it (SIGXCPU) after twice the CPU time the server would have allowed. ``None``: no limit."""
    soft = resource.RLIM_INFINITY
    if seconds is not None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(usage.ru_utime + usage.ru_stime + 2 * seconds * max(threads, 1) + 10)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if hard != resource.RLIM_INFINITY:
        soft = hard if soft == resource.RLIM_INFINITY else min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (n,) = _FRAME.unpack(head)
    body = stream.read(n)
    return body if len(body) == n else None


def _write_frame(stream: BinaryIO, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    stream.write(_FRAME.pack(len(data)) + data)
    stream.flush()


def _measure(request: dict[str, Any], model: bytes, protocol: ModuleType, max_seconds: int) -> dict[str, Any]:
    """One request: the timing, or a refusal (``category``; ``message`` for the client, ``detail`` for the log)."""
    import numpy as np

    threads, batch, max_input_bytes = int(request["threads"]), int(request["batch"]), int(request["max_input_bytes"])
    _cpu_backstop(max_seconds, threads)
    session = feed = None
    try:
        session = protocol.make_session(model, threads)
        try:
            specs = ([(name, tuple(shape), np.dtype(dtype)) for name, shape, dtype in request["inputs"]]
                     if request.get("inputs") is not None else protocol.input_specs(session, batch))
        except (ValueError, TypeError) as exc:
            return {"category": "unsupported-input", "message": str(exc)}
        # Refused before anything is allocated (the guard checked the declared shapes already: this is the
        # same bound on what is actually built).
        nbytes = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in specs)
        if nbytes > max_input_bytes:
            return {"category": "input-too-large",
                    "message": f"the model's inputs at batch {batch} take {nbytes} bytes, over this server's limit "
                               f"of {max_input_bytes} bytes (--max-input-mb)"}
        feed = protocol.make_inputs(specs)
        # Waiting out a slow phase of this host stays well inside the time limit (an unsettled figure says so).
        wait = min(protocol.DEFAULT_MAX_WAIT_S, max_seconds / 4) if max_seconds else protocol.DEFAULT_MAX_WAIT_S
        timing = protocol.time_runners({"model": functools.partial(session.run, None, feed)},
                                       max_wait_s=wait)["model"]
        return {"result": asdict(timing)}
    except MemoryError:
        return {"category": "memory-limit", "detail": "MemoryError"}
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error: logged by the server, never sent
        detail = f"{exc.__class__.__name__}: {str(exc)[:2000]}"
        return {"category": "memory-limit" if any(s in detail for s in _OUT_OF_MEMORY) else "runtime",
                "detail": detail}
    finally:
        session = feed = None
        _cpu_backstop(None)


def main(argv: list[str] | None = None) -> int:
    """The measuring process: load ONNX Runtime, limit the address space, say ready, then answer requests until
    its stdin closes (the server went away)."""
    parser = argparse.ArgumentParser(prog="python -m autokd.latency.remote.worker",
                                     description="the measuring process of autokd latency-server (started by it)")
    parser.add_argument("--max-memory-mb", type=int, required=True)
    parser.add_argument("--max-measure-seconds", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it kills this process
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a model that ends here must not leave gigabytes of core
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to the server's log, never into the answers
    requests = sys.stdin.buffer

    from autokd.latency import protocol  # numpy and onnxruntime

    limit_mb = args.max_memory_mb
    mapped = _address_space_mb()
    if mapped + HEADROOM_MB > limit_mb:
        _write_frame(answers, {"error": f"--max-memory-mb {limit_mb} is too small: the measuring process maps "
                                        f"{mapped:.0f} MiB with ONNX Runtime loaded and needs about "
                                        f"{mapped + HEADROOM_MB:.0f} MiB to run a small model"})
        return 2
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 2**20, limit_mb * 2**20))
    except (ValueError, OSError) as exc:
        _write_frame(answers, {"error": f"this system does not let the measuring process limit its address space "
                                        f"(RLIMIT_AS: {exc}), so --max-memory-mb cannot be enforced here"})
        return 2
    try:  # a one-node model: loads the session machinery (threads, arenas) and proves the limit leaves room
        session = protocol.make_session(_tiny_model(), threads=1)
        session.run(None, protocol.make_input(session))
        del session
    except Exception as exc:  # noqa: BLE001 - reported to the server, which exits with it
        detail = f"{exc.__class__.__name__}: {str(exc)[:500]}"
        _write_frame(answers, {"error": f"--max-memory-mb {limit_mb} is too small: the measuring process "
                                        f"({_address_space_mb():.0f} MiB mapped) cannot run a one-node model under "
                                        f"it ({detail})" if any(s in detail for s in _OUT_OF_MEMORY) else
                                        f"the measuring process cannot run a one-node model: {detail}"})
        return 2
    base = {k: v for k, v in protocol.signature(1).items() if k != "threads"}
    _write_frame(answers, {"ready": True, "signature": base, "address_space_mb": _address_space_mb()})
    while True:
        header = _read_frame(requests)
        model = _read_frame(requests) if header is not None else None
        if model is None:
            return 0
        _write_frame(answers, _measure(json.loads(header), model, protocol, args.max_measure_seconds))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DEFAULT_MAX_MEASURE_SECONDS", "DEFAULT_MAX_MEMORY_MB", "HEADROOM_MB", "RUNTIME_FAILURE", "Limits",
           "MeasuringProcess", "Refusal", "main"]
