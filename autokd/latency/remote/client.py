"""Client of `autokd latency-server`: send a student's ONNX file to the target device, get its latency back.

Used by the search's latency meter with ``--latency-target URL``. Standard library only.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode, urlsplit

from autokd.errors import UserError

#: Per-try timeout of a measurement before the server's limits are known (a server that does not send them).
DEFAULT_TIMEOUT_S = 300.0
#: Added to the server's own bound on a request (its turn in the queue, then the measurement) for the upload and
#: the answer's way back.
TIMEOUT_MARGIN_S = 30.0
#: Back-off between attempts when the target cannot be reached (it may be restarting): 30 s in all.
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)

logger = logging.getLogger(__name__)


def backoff_delays(total_s: float, first_s: float = 1.0) -> tuple[float, ...]:
    """Doubling delays (1, 2, 4, ... s) that add up to ``total_s``: how long an unreachable target is retried."""
    delays: list[float] = []
    step = first_s
    while sum(delays) < total_s:
        delays.append(min(step, total_s - sum(delays)))
        step *= 2
    return tuple(delays)


class RemoteLatencyError(RuntimeError):
    """The target could not time this model (unreachable after retries, or it refused the model)."""


def validate_target_url(url: str) -> str:
    """``http(s)://host:port`` without a trailing slash; UserError (exit 2) for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--latency-target {url!r} is not a URL like http://HOST:PORT (the address "
                        "`autokd latency-server` prints when it starts)")
    if parts.path not in ("", "/") or parts.query:
        raise UserError(f"--latency-target {url!r}: give the server's base URL only (http://HOST:PORT)")
    return f"{parts.scheme}://{parts.netloc}"


class RemoteTarget:
    """One latency server. ``measure`` retries while the server is unreachable, then raises."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float | None = None,
                 retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S) -> None:
        self.url = validate_target_url(url)
        self.token = token
        self.timeout_s = timeout_s  # None: from the server's limits (see try_timeout_s)
        self.retry_delays_s = retry_delays_s
        self.limits: dict[str, Any] | None = None  # the server's, from GET /signature (check) and each answer

    def try_timeout_s(self) -> float:
        """How long one try of a measurement waits for the answer: the given ``timeout_s``, else what the server
        can take at most (a request waits for its turn at most one measurement's limit, then its own measurement
        takes at most that limit; then the server answers 503 or 422) plus :data:`TIMEOUT_MARGIN_S`."""
        if self.timeout_s is not None:
            return self.timeout_s
        limit = (self.limits or {}).get("max_measure_seconds")
        return 2.0 * float(limit) + TIMEOUT_MARGIN_S if limit else DEFAULT_TIMEOUT_S

    def _request(self, method: str, path: str, body: bytes | None = None,
                 timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.try_timeout_s()) as resp:  # noqa: S310 - http(s)
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read() or b"{}")
            except ValueError:
                payload = {}
            return exc.code, payload

    def check(self, threads: int) -> dict[str, Any]:
        """At start: the server answers and takes the token; returns its device signature. UserError if not."""
        try:
            status, payload = self._request("GET", "/health", timeout=10.0)
        except (OSError, ValueError) as exc:
            raise UserError(f"latency target {self.url} is unreachable ({_reason(exc)}): start "
                            "`autokd latency-server` on the target device, or fix --latency-target") from None
        if status != 200 or payload.get("service") != "autokd-latency-server":
            raise UserError(f"{self.url} answered GET /health with {status} but is not an autokd latency server")
        status, payload = self._request("GET", f"/signature?threads={int(threads)}", timeout=10.0)
        if status == 401:
            raise UserError(f"latency target {self.url} refused the token: pass the server's token with "
                            "--latency-token")
        if status != 200 or "signature" not in payload:
            raise UserError(f"latency target {self.url}: GET /signature answered {status}: "
                            f"{payload.get('error', payload)}")
        self.limits = payload.get("limits") or self.limits
        return payload["signature"]

    def measure(self, onnx_model: bytes, batch_size: int, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(result, signature) for ``onnx_model`` timed on the target; RemoteLatencyError when the server refuses
        the model (4xx: not retried, it would refuse it again; a model over the server's size limit is refused
        here, not uploaded) or stays unreachable (and 5xx) after the retries."""
        max_bytes = (self.limits or {}).get("max_bytes")
        if max_bytes is not None and len(onnx_model) > max_bytes:
            raise RemoteLatencyError(f"the ONNX file is {len(onnx_model)} bytes, over latency target {self.url}'s "
                                     f"limit of {max_bytes} bytes (its --max-bytes); not uploaded")
        query = urlencode({"batch": int(batch_size), "threads": int(threads)})
        last = ""
        for attempt, delay in enumerate((*self.retry_delays_s, None)):
            try:
                status, payload = self._request("POST", f"/measure?{query}", body=onnx_model,
                                                timeout=self.try_timeout_s())
            except (OSError, ValueError) as exc:
                last = _reason(exc)
                if delay is None:
                    break
                if attempt == 0:
                    logger.warning(f"latency target {self.url} unreachable ({last}); retrying for "
                                   f"{sum(self.retry_delays_s):.0f} s")
                time.sleep(delay)
                continue
            if status == 200:
                self.limits = payload.get("limits") or self.limits
                return payload["result"], payload["signature"]
            if status >= 500 and delay is not None:
                last = f"HTTP {status}: {payload.get('error', '')}"
                time.sleep(delay)
                continue
            raise RemoteLatencyError(f"latency target {self.url} answered {status}: {payload.get('error', payload)}")
        raise RemoteLatencyError(f"latency target {self.url} unreachable after {len(self.retry_delays_s) + 1} "
                                 f"attempts over {sum(self.retry_delays_s):.0f} s: {last}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and exc.reason is not None:
        return str(exc.reason)
    return f"{exc.__class__.__name__}: {exc}"


__all__ = ["DEFAULT_TIMEOUT_S", "RemoteLatencyError", "RemoteTarget", "TIMEOUT_MARGIN_S", "backoff_delays",
           "validate_target_url"]
