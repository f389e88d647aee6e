"""autokd.atomic: a write either leaves the old file or the new one, never a torn one or a stray temp file."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from autokd.utils.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, file_digest


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_create_parents_and_replace_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "f.bin"
    atomic_write_bytes(target, b"first version, longer than the second")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_bytes() == "héllo".encode("utf-8")
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": Path("x")})
    text = (tmp_path / "j.json").read_text()
    assert json.loads(text) == {"a": "x", "b": 1} and text.index('"a"') < text.index('"b"') and text.endswith("\n")
    assert _leftovers(target.parent) == [] and _leftovers(tmp_path) == []


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_failing_fsync_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.json"
    target.write_text("{}")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(target, {"new": True})
    assert target.read_text() == "{}"
    assert _leftovers(tmp_path) == []


def test_the_temp_file_sits_next_to_the_target(tmp_path: Path) -> None:
    """Same directory, so the final os.replace is a rename on one file system (atomic), never a copy."""
    target = tmp_path / "sub" / "w.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".w.safetensors.") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_file_digest_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) + 12345)  # more than one 1 MiB chunk
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    assert file_digest(path, "sha1") == hashlib.sha1(data).hexdigest()


def test_a_writer_that_writes_by_name_is_fsynced_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers that want a file name (safetensors, ONNX) get the same durability as atomic_write_bytes."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    with atomic_path(tmp_path / "w.bin") as tmp:
        tmp.write_bytes(b"weights")
        assert synced == []
    assert len(synced) == 1 and (tmp_path / "w.bin").read_bytes() == b"weights"
