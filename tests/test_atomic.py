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


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_permissions_of_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """As `open(path, "w")` creates a file, not `mkstemp`'s 0o600: a service account must be able to read an
    exported model when the umask lets it."""
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "b.bin", b"x")
        atomic_write_json(tmp_path / "c.json", {})
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            tmp.write_bytes(b"weights")
        (tmp_path / "plain.txt").write_text("as open() does it")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"b.bin": mode, "c.json": mode, "w.safetensors": mode, "plain.txt": mode}


def test_an_explicit_mode_keeps_a_secret_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "token", b"s3cret", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600


def test_a_symlink_at_the_temp_name_is_never_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp file is created exclusively: a name that already exists (a planted symlink) is skipped."""
    from autokd.utils import atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (tmp_path / ".f.bin.aaaa.tmp").symlink_to(victim)
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    atomic_write_bytes(tmp_path / "f.bin", b"new")
    assert victim.read_text() == "untouched" and (tmp_path / "f.bin").read_bytes() == b"new"
    assert (tmp_path / ".f.bin.aaaa.tmp").is_symlink()


def test_a_writer_that_makes_its_own_private_file_still_gets_the_umask(tmp_path: Path) -> None:
    """safetensors' save_file replaces the file it is given with a 0o600 one of its own."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
