"""Atomic file writes and file digests, shared by every module that writes (no torch: report/scaleout stay light).

Every file autokd writes goes through a temp file in the same directory, fsync and `os.replace`, so a crash
or a full disk leaves either the old file or the new one, never a torn one. The file gets the permissions a plain
``open(path, "w")`` would give it (0o666 less the umask), not ``tempfile.mkstemp``'s 0o600: an exported model or a
report must be readable by whoever the user's umask lets read it (a service account, a web server).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: The mode a new file is created with before the umask applies: that of ``open(path, "w")``. A writer of a
#: secret (a token, a key) would pass ``mode=0o600``; no caller writes one today.
DEFAULT_MODE = 0o666


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = DEFAULT_MODE) -> Iterator[Path]:
    """A temporary path next to `path` for a writer that wants a file name; fsynced and renamed onto `path`
    on success. The file has ``mode`` less the process's umask, as ``open`` creates one, even when the writer
    made its own file at that name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path, mode)
    created = stat.S_IMODE(os.stat(tmp).st_mode)  # the mode with the umask applied by the kernel
    try:
        yield Path(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != created:
            # The writer replaced the file with one of its own making (safetensors' save_file writes 0o600).
            os.chmod(tmp, created)
        _fsync_file(tmp)  # whatever the writer did, the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # only still there when the block or the rename failed


def _create_temp(path: Path, mode: int) -> str:
    """A new, empty file ``.<name>.<random>.tmp`` beside ``path``, created exclusively (never through a symlink
    or over another file, like ``mkstemp``) with ``mode``: the kernel applies the umask (and a folder's default
    ACL) itself, so the umask is never read or changed here, which would race with other threads."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = DEFAULT_MODE) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename); permissions as
    `atomic_path` gives them."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomic text write (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write, pretty-printed with sorted keys."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks (weights files can be large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
