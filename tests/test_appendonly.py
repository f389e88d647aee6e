"""A torn last line of an append-only file never breaks later reads (autokd.utils.appendonly and the journal).

The journal cases are real: a study written by Optuna through `make_storage`, torn by a real kill -9 of a
process that is writing a line, or by a real short write (a process whose file-size limit, like a full disk,
stops Optuna's own append half-way). That Optuna alone turns such a tail into a broken journal is checked
too, so the tests keep proving the premise of the fix.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from conftest import Logged, repo_pythonpath
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

from autokd.study.store import journal_path, make_storage
from autokd.utils.appendonly import append_line, cut_torn_tail, last_line_torn

DIRECTIONS = ["maximize", "minimize"]


def _study_with_trials(root: Path, n: int = 3) -> optuna.Study:
    """A journal study with `n` finished trials (and a running one): every kind of line a search writes."""
    study = optuna.create_study(study_name="s", storage=make_storage(None, root), directions=DIRECTIONS)
    for i in range(n):
        trial = study.ask()
        trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        trial.set_user_attr("curve", [0.5, 0.25 * i])
        study.tell(trial, [0.5 + i / 10, 1.0 + i])
    study.ask().set_user_attr("curve", [0.1])
    return study


def _finished(root: Path) -> list[tuple]:
    study = optuna.load_study(study_name="s", storage=make_storage(None, root))
    return [(t.number, t.params, t.values, t.user_attrs) for t in study.get_trials(deepcopy=False)
            if t.state.is_finished()]


def _torn_files(root: Path) -> list[Path]:
    return sorted(root.glob("optuna.journal.torn-*"))


def _resume_and_finish_one(root: Path) -> None:
    """What a resumed search does first: open the storage, append, then read it all again."""
    study = optuna.load_study(study_name="s", storage=make_storage(None, root))
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    study.tell(trial, [0.9, 0.5])


def _plain_optuna_breaks_on(journal: Path, tmp_path: Path) -> None:
    """The premise: on a copy, Optuna's own backend appends onto the torn line and cannot read its journal again."""
    copy = tmp_path / "plain" / "optuna.journal"
    copy.parent.mkdir()
    shutil.copy(journal, copy)
    # json.JSONDecodeError, "Invalid log format." or, for zeros, UnicodeDecodeError (which Optuna does not skip
    # even on the last line): all ValueErrors.
    with pytest.raises(ValueError):
        study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(copy))))
        study.set_user_attr("touched", True)  # appended onto the torn bytes: one broken line, skipped while last
        study.set_user_attr("again", True)  # the broken line is no longer the last
    with pytest.raises(ValueError):  # and no process can open the study again
        optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(copy))))


def _assert_cut_and_resumed(root: Path, tmp_path: Path, before: list[tuple], torn: bytes, logged: Logged) -> None:
    _plain_optuna_breaks_on(journal_path(root), tmp_path)
    _resume_and_finish_one(root)
    after = _finished(root)
    assert after[:len(before)] == before and len(after) == len(before) + 1  # every finished trial kept
    [kept] = _torn_files(root)
    assert kept.read_bytes() == torn
    warnings = [m for m in logged() if "torn last line" in m]
    assert len(warnings) == 1 and str(kept) in warnings[0] and f"{len(torn)} bytes" in warnings[0], warnings
    assert journal_path(root).read_bytes().endswith(b"\n") and not last_line_torn(journal_path(root))


def test_a_line_torn_by_a_real_kill_9_mid_write_is_cut_and_the_study_goes_on(tmp_path: Path, logged: Logged) -> None:
    root = tmp_path / "studies"
    _study_with_trials(root)
    before = _finished(root)
    journal = journal_path(root)
    size = journal.stat().st_size
    # A process appends one long journal line a few bytes at a time and is killed while it writes. It writes
    # without Optuna's journal lock: a writer killed while holding it leaves the lock stale, which Optuna takes
    # over only after its 30 s grace period (docs/reliability.md); the torn line on disk is the same.
    line = json.dumps({"op_code": 8, "worker_id": "w", "trial_id": 3, "user_attr": {"curve": [0.5] * 1000}})
    script = textwrap.dedent(f"""
        import sys, time
        with open({str(journal)!r}, "ab", buffering=0) as f:
            data = {line!r}.encode() + b"\\n"
            for i in range(0, len(data), 16):
                f.write(data[i:i + 16])
                if i == 0:
                    print("writing", flush=True)
                time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
        time.sleep(0.3)  # well inside the line, which takes several seconds to write
        proc.kill()
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    torn = journal.read_bytes()[size:]
    assert torn and not torn.endswith(b"\n") and line.encode().startswith(torn)  # killed mid-line
    _assert_cut_and_resumed(root, tmp_path, before, torn, logged)


def test_a_short_write_from_a_full_disk_is_cut_before_the_next_append(tmp_path: Path, logged: Logged) -> None:
    """Optuna's own append stops half-way (RLIMIT_FSIZE: the write fails with EFBIG as on a full disk) in a
    worker that goes on; the next opening of the journal cuts what it left."""
    root = tmp_path / "studies"
    _study_with_trials(root)
    before = _finished(root)
    journal = journal_path(root)
    size = journal.stat().st_size
    script = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
        study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend({str(journal)!r})))
        resource.setrlimit(resource.RLIMIT_FSIZE, ({size} + 40, resource.RLIM_INFINITY))
        try:
            study.set_user_attr("notes", "x" * 2000)
        except OSError as exc:
            print("write failed:", exc.errno)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    assert proc.returncode == 0 and "write failed: 27" in proc.stdout, proc.stdout + proc.stderr  # EFBIG
    torn = journal.read_bytes()[size:]
    assert len(torn) == 40 and not torn.endswith(b"\n")  # the first bytes of the line, up to the limit
    _assert_cut_and_resumed(root, tmp_path, before, torn, logged)


@pytest.mark.parametrize("damage", ["cut short", "zeros after a power cut"])
def test_a_last_line_cut_short_or_not_json_is_cut(tmp_path: Path, logged: Logged, damage: str) -> None:
    root = tmp_path / "studies"
    study = _study_with_trials(root)
    study.set_user_attr("last", "x" * 100)  # a last line no finished trial depends on
    before = _finished(root)
    journal = journal_path(root)
    data = journal.read_bytes()
    last = data[data.rindex(b"\n", 0, len(data) - 1) + 1:]
    if damage == "cut short":  # the write of the last line stopped before its end
        torn = last[:len(last) // 2]
    else:  # a file system that had reserved the line but not written it: zeros, then a line end
        torn = b"\0" * (len(last) - 1) + b"\n"
    journal.write_bytes(data[:len(data) - len(last)] + torn)
    _assert_cut_and_resumed(root, tmp_path, before, torn, logged)


def test_a_whole_journal_is_left_alone(tmp_path: Path, logged: Logged) -> None:
    root = tmp_path / "studies"
    _study_with_trials(root)
    data = journal_path(root).read_bytes()
    assert cut_torn_tail(journal_path(root), JournalFileSymlinkLock(str(journal_path(root)))) is None
    _resume_and_finish_one(root)
    assert journal_path(root).read_bytes().startswith(data)
    assert _torn_files(root) == [] and not [m for m in logged() if "torn" in m]


def test_a_torn_line_longer_than_a_read_is_cut_whole(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    whole = b'{"a": 1}\n' * 3
    torn = b'{"b": "' + b"x" * 300_000  # the tail is read from the end in pieces
    path.write_bytes(whole + torn)
    kept = cut_torn_tail(path)
    assert kept is not None and kept.read_bytes() == torn and path.read_bytes() == whole
    path.write_bytes(b'{"only": "torn')  # a file that is one torn line
    assert cut_torn_tail(path) is not None and path.read_bytes() == b""
    assert cut_torn_tail(tmp_path / "missing.jsonl") is None


def test_the_cut_waits_for_the_journal_lock_and_never_cuts_a_line_being_written(tmp_path: Path) -> None:
    """A writer holds Optuna's journal lock while its line is half on disk: the cut waits for it and then finds
    the line whole."""
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(b'{"op_code": 0}\n{"op_code": 1, "half": ')
    writer = JournalFileSymlinkLock(str(journal))
    writer.acquire()
    cut: list[Path | None] = []
    thread = threading.Thread(target=lambda: cut.append(cut_torn_tail(journal, JournalFileSymlinkLock(str(journal)))))
    thread.start()
    try:
        time.sleep(0.3)  # the cut is waiting for the lock now
        with open(journal, "ab") as f:
            f.write(b'"written"}\n')
    finally:
        writer.release()
    thread.join(timeout=30)
    assert cut == [None]
    assert journal.read_bytes() == b'{"op_code": 0}\n{"op_code": 1, "half": "written"}\n'
    assert not list(tmp_path.glob("*.torn-*"))


def test_append_line_writes_a_whole_line_or_nothing(tmp_path: Path) -> None:
    """A real short write (RLIMIT_FSIZE: the disk is full half-way through the line): the part written is cut
    off again, the error is raised, and the next line starts on a line of its own."""
    path = tmp_path / "spool.jsonl"
    path.write_bytes(b'{"n": 0}\n')
    script = textwrap.dedent(f"""
        import resource, signal
        from autokd.utils.appendonly import append_line
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        with open({str(path)!r}, "ab") as f:
            resource.setrlimit(resource.RLIMIT_FSIZE, (20, resource.RLIM_INFINITY))
            try:
                append_line(f, b'{{"n": 1, "long": "' + b"x" * 100 + b'"}}\\n')
            except OSError as exc:
                print("failed:", exc.errno)
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            append_line(f, b'{{"n": 2}}\\n')
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    assert proc.returncode == 0 and "failed: 27" in proc.stdout, proc.stdout + proc.stderr
    assert path.read_bytes() == b'{"n": 0}\n{"n": 2}\n'
    with open(path, "ab") as f, pytest.raises(ValueError, match="line end"):
        append_line(f, b"no line end")


def test_a_worker_whose_own_append_was_cut_short_cuts_it_before_its_next_one(tmp_path: Path, logged: Logged) -> None:
    """The same process goes on after its append failed half-way (the disk had a few bytes left): its next
    append, through the same storage object, first cuts what the failed one left."""
    root = tmp_path / "studies"
    study = _study_with_trials(root)
    with open(journal_path(root), "ab") as f:
        f.write(b'{"op_code": 8, "worker_id": "w", "tri')  # what the failed append left
    trial = study.ask()
    study.tell(trial, [0.7, 0.7])
    assert [t.state for t in _load(root).trials][-1] == TrialState.COMPLETE
    assert len(_torn_files(root)) == 1 and len([m for m in logged() if "torn last line" in m]) == 1


def _load(root: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=make_storage(None, root))
