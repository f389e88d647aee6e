"""The MLflow UI that `autokd ui` starts: its address is told only once it answers (MLflow takes tens of seconds to
start), and when it never does, its own output says why."""
from __future__ import annotations

import collections
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, Any

__all__ = ["OutputTail", "port_in_use", "wait_until_answering"]


def port_in_use(host: str, port: int) -> bool:
    """Something already accepts connections on ``host:port`` (another UI: ours would fail to bind, and polling the
    port would find the other one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


class OutputTail:
    """Reads a child's output (a binary pipe) on a daemon thread: keeps its last ``keep`` lines, and once
    :meth:`forward` is called passes each new line on instead.

    The pipe is always drained, so the child never blocks on a full pipe however long it runs.
    """

    def __init__(self, pipe: IO[bytes], keep: int = 40) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._sink: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(pipe,), name="ui-output", daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace")
            with self._lock:
                sink = self._sink
                if sink is None:
                    self._lines.append(line)
            if sink is not None:
                sink(line)
        pipe.close()

    def forward(self, sink: Callable[[str], None]) -> None:
        """From now on, pass each line to ``sink`` (the lines kept so far are not repeated)."""
        with self._lock:
            self._sink = sink

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the end of the output (the child and its children closed the pipe)."""
        self._thread.join(timeout)

    def tail(self) -> str:
        """The kept lines, as one text."""
        with self._lock:
            return "".join(self._lines)


def wait_until_answering(url: str, proc: Any, timeout_s: float, interval_s: float = 0.25) -> str | None:
    """Poll ``url`` until it answers HTTP 200 while ``proc`` (a ``subprocess.Popen``) runs.

    Returns None once it has answered, else why not: the process exited, or no answer within ``timeout_s`` seconds.
    """
    # No proxy: the environment's http_proxy must not stand between us and a server on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        if code is not None:
            return f"exited with code {code} before answering at {url}"
        try:
            with opener.open(url, timeout=max(0.5, min(5.0, deadline - time.monotonic()))) as resp:
                if resp.status == 200:
                    code = proc.poll()
                    return None if code is None else f"exited with code {code} (something else answered at {url})"
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            pass  # not listening yet, or not ready: HTTPError (an error status) is a URLError
        if time.monotonic() >= deadline:
            return f"did not answer at {url} within {timeout_s:g} s"
        time.sleep(interval_s)
