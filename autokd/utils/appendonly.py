"""Append-only files of JSON lines whose last line a crash may have torn (kill -9, a full disk mid-write).

A reader that skips a torn last line copes with it until the next append lands on it: the torn bytes and the
new line then form one broken line inside the file, and every later read fails. `cut_torn_tail` takes such a
tail off before anything appends (keeping its bytes beside the file); `append_line` writes one whole line or,
when the write fails, nothing. Both read or write only the end of the file.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Protocol

from autokd.utils.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

_CHUNK = 1 << 16
TORN_SUFFIX = ".torn-"


class Lock(Protocol):
    """A lock with the interface of Optuna's journal file locks (`JournalFileSymlinkLock`, `JournalFileOpenLock`)."""

    def acquire(self) -> bool: ...

    def release(self) -> None: ...


def _last_line_start(handle: BinaryIO, end: int) -> int:
    """Offset of the file's last line: just past the last line end before its final byte (0 if there is none)."""
    pos = end - 1  # the final byte may be the line end of the last line itself
    while pos > 0:
        start = max(0, pos - _CHUNK)
        handle.seek(start)
        found = handle.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        pos = start
    return 0


def _read_last_line(handle: BinaryIO) -> tuple[int, bytes]:
    end = handle.seek(0, os.SEEK_END)
    if end == 0:
        return 0, b""
    start = _last_line_start(handle, end)
    handle.seek(start)
    return start, handle.read(end - start)


def torn_reason(line: bytes) -> str | None:
    """Why `line` (with its line end) is not a whole JSON-object line, in words; None when it is one."""
    if not line.endswith(b"\n"):
        return "no line end"
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError (not UTF-8), nested too deep
        return "not JSON"
    return None if isinstance(record, dict) else "not a JSON object"


def last_line_torn(path: Path) -> bool:
    """Whether the last line of the file at `path` is torn (see `torn_reason`); False for a missing or empty file."""
    try:
        with open(path, "rb") as handle:
            _, line = _read_last_line(handle)
    except FileNotFoundError:
        return False
    return bool(line) and torn_reason(line) is not None


def ends_with_line_end(path: Path) -> bool:
    """Whether the file at `path` is empty, missing, or ends with a line end: one byte read, for every append."""
    try:
        with open(path, "rb") as handle:
            if handle.seek(0, os.SEEK_END) == 0:
                return True
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def _held(lock: Lock | None):  # type: ignore[no-untyped-def]
    if lock is None:
        yield
        return
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def torn_path(path: Path) -> Path:
    """Where `cut_torn_tail` keeps the torn bytes of `path`: `<path>.torn-<UTC time>`."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return path.with_name(f"{path.name}{TORN_SUFFIX}{stamp}")


def cut_torn_tail(path: Path, lock: Lock | None = None) -> Path | None:
    """Cut a torn last line off the append-only file at `path`; return where its bytes were kept (None: not torn).

    The last line is torn when it has no line end or is not a JSON object. It is checked under `lock` (the lock
    the file's writers append under; None when the caller already keeps other writers out) and cut there, so a
    writer that is just finishing the line is never cut short. Its bytes are first written to `torn_path(path)`,
    then the file is truncated and fsynced; one warning says what was cut and where the bytes are. Lines before
    it are not touched (nothing a reader ever saw is lost), and only the file's tail is read.
    """
    path = Path(path)
    if not last_line_torn(path):  # the common case, without taking the lock
        return None
    with _held(lock), open(path, "r+b") as handle:
        start, line = _read_last_line(handle)
        reason = torn_reason(line) if line else None
        if reason is None:
            return None  # a writer finished the line while we waited for the lock
        kept = torn_path(path)
        atomic_write_bytes(kept, line)
        handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())
    logger.warning(f"{path}: cut off its torn last line ({len(line)} bytes, {reason}: a write interrupted by a crash "
                   f"or a full disk) so that later writes do not land on it; every line before it is kept, and its "
                   f"bytes are in {kept}")
    return kept


def append_line(handle: BinaryIO, line: bytes) -> None:
    """Append `line` (ending with a line end) to the file open in `handle` (binary, appending): all of it, or,
    when the write fails (a full disk), nothing: the part written is cut off again before the error is raised.

    The caller keeps other writers out (the file is its own, or it holds the file's lock).
    """
    if not line.endswith(b"\n"):
        raise ValueError("append_line: a line must end with a line end")
    handle.flush()
    fd = handle.fileno()
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise
