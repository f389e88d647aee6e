"""Workers on the GPUs of one machine: the device/slot plan (pure), bad `--devices`
input (exit 2 before any study), and an exact budget with several workers (real processes, on the CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import repo_pythonpath

from autokd.cli import main
from autokd.config import SearchSettings
from autokd.errors import UserError
from autokd.search.run import local_workers
from autokd.study.store import make_storage
from autokd.utils import devices
from autokd.utils.devices import CUDA_ENV, WorkerSlot, parse_devices, plan_workers, visible_ids


def test_plan_one_worker_per_device_and_slot() -> None:
    visible = ["0", "1", "2", "3"]
    plan = plan_workers(visible, [0, 1, 3], jobs_per_device=2)
    assert [(w.index, w.device_index) for w in plan] == [
        (0, 0), (1, 1), (2, 3),  # every device's first slot comes first
        (3, 0), (4, 1), (5, 3)]
    # Worker 0 is the process the user started: not re-pinned, it trains on cuda:<its index>.
    assert plan[0].env == {} and plan[0].device == "cuda:0"
    # A spawned worker sees only its own GPU, which is then its `cuda`.
    assert [w.env for w in plan[1:]] == [{CUDA_ENV: d} for d in ("1", "3", "0", "1", "3")]
    assert {w.device for w in plan[1:]} == {"cuda"}
    assert plan_workers(["0"], [0], 1) == [WorkerSlot(index=0, device_index=0, env={})]
    with pytest.raises(UserError, match="--jobs-per-device 0"):
        plan_workers(visible, [0], 0)


def test_plan_follows_the_users_cuda_visible_devices() -> None:
    """Device numbers are torch's (after the user's CUDA_VISIBLE_DEVICES); a worker is pinned by the entry that
    names that device, a number or a UUID."""
    assert visible_ids(2, None) == ["0", "1"]
    assert visible_ids(2, "4, 6") == ["4", "6"]
    assert visible_ids(1, "GPU-8e6f1d2a,GPU-0b2c") == ["GPU-8e6f1d2a"]  # CUDA stopped after the first
    plan = plan_workers(visible_ids(2, "4,6"), [1], jobs_per_device=3)
    assert [w.device_index for w in plan] == [1, 1, 1] and plan[0].device == "cuda:1"
    assert [w.env for w in plan[1:]] == [{CUDA_ENV: "6"}, {CUDA_ENV: "6"}]


@pytest.mark.parametrize(("text", "expected"), [("all", [0, 1, 2]), ("ALL", [0, 1, 2]), ("2", [2]),
                                                 ("2,0", [2, 0]), (" 0 , 1 ", [0, 1])])
def test_parse_devices(text: str, expected: list[int]) -> None:
    assert parse_devices(text, ["0", "1", "2"]) == expected


@pytest.mark.parametrize(("text", "fragments"), [
    ("3", ["device 3 is not there", "visible CUDA devices: 0 (H200), 1 (H200), 2 (H200)"]),
    ("0,x", ["'x' is not a device number", "0 (H200), 1 (H200), 2 (H200)"]),
    ("-1", ["'-1' is not a device number"]),
    ("", ["'' is not a device number"]),
    ("1,1", ["device 1 is listed twice", "--jobs-per-device"]),
])
def test_bad_devices_name_the_visible_ones(text: str, fragments: list[str]) -> None:
    with pytest.raises(UserError) as err:
        parse_devices(text, ["0", "1", "2"], ["H200"] * 3)
    for fragment in fragments:
        assert fragment in str(err.value)
    with pytest.raises(UserError, match="no CUDA device is visible"):
        parse_devices("all", [])


@pytest.fixture()
def two_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process believes it sees two GPUs (only what planning asks; nothing here touches a real one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")
    monkeypatch.delenv(CUDA_ENV, raising=False)


def test_local_workers_rules(two_fake_gpus: None) -> None:
    s = SearchSettings
    assert [w.device_index for w in local_workers(s(), "cuda")] == [0, 1]  # default: all visible GPUs
    assert [w.device_index for w in local_workers(s(devices="1", jobs_per_device=2), "cuda")] == [1, 1]
    assert local_workers(s(jobs=3), "cpu") == devices.cpu_workers(3)  # --jobs on the CPU: as before
    assert len(local_workers(s(jobs=2), "cuda:1")) == 2  # one explicit GPU: --jobs as before
    with pytest.raises(UserError, match="--jobs 2: on GPUs .* --jobs-per-device"):
        local_workers(s(jobs=2), "cuda")
    with pytest.raises(UserError, match="--devices places workers on GPUs, but this search trains on the CPU"):
        local_workers(s(devices="0", device="cpu"), "cpu")
    with pytest.raises(UserError, match="--jobs-per-device .* on the CPU use --jobs N"):
        local_workers(s(jobs_per_device=2, device="cpu"), "cpu")
    with pytest.raises(UserError, match="--device cuda:1 names one GPU"):
        local_workers(s(devices="0", device="cuda:1"), "cuda:1")


def _cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code or 0)


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--device", "cuda", "--devices", "0,5"], ["--devices 0,5: device 5 is not there",
                                                "visible CUDA devices: 0 (Fake GPU), 1 (Fake GPU)"]),
    (["--devices", "zero"], ["'zero' is not a device number"]),
    (["--device", "cuda", "--jobs", "4"], ["--jobs 4: on GPUs", "--jobs-per-device"]),
    (["--device", "cpu", "--devices", "0"], ["--devices places workers on GPUs", "--jobs N"]),
    (["--jobs-per-device", "0"], ["--jobs-per-device"]),
])
def test_cli_bad_devices_exit_2_before_any_study(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 two_fake_gpus: None, argv: list[str], fragments: list[str]) -> None:
    root = tmp_path / "studies"
    assert _cli(["--root", str(root), "search", *argv, "--no-mlflow", "--train-limit", "60"]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert not root.exists() or not (root / "optuna.journal").exists()


TWO_EPOCHS = """
name: tiny
epochs: 2
input_size: 16
students: {width: 0.25, depth: 0.25, families: [resnet]}
losses: {ce: {}}
optimizer: {name: adamw, lr: {low: 0.001, high: 0.03, log: true}, weight_decay: 0.0001}
batch_size: 32
pruning: {eta: 2, min_epoch: 1, min_peers: 2}
"""


@pytest.mark.slow
def test_three_workers_finish_exactly_the_budget(tmp_path: Path, tiny_teacher: tuple[str, Path]) -> None:
    """Three workers from one command (the spawn path GPU workers share, here with `--jobs 3` on the CPU)
    claim budget slots under the study lock: together exactly the budget, no trial twice, none left running."""
    arch, ckpt = tiny_teacher
    root = tmp_path / "studies"
    space = tmp_path / "space.yaml"
    space.write_text(TWO_EPOCHS)
    argv = ["--root", str(root), "search", "--space", str(space), "--teacher", arch, "--teacher-checkpoint",
            str(ckpt), "--train-limit", "160", "--device", "cpu", "--sampler", "random", "--budget", "7",
            "--study", "jobs3", "--jobs", "3", "--no-mlflow", "--no-prune"]
    env = dict(os.environ, PYTHONPATH=repo_pythonpath(), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "autokd.cli", *argv], cwd=tmp_path, env=env, timeout=600,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    for index in range(3):
        assert f"worker {index} of 3: 1 training thread(s)" in done.stdout, done.stdout[-3000:]
    study = optuna.load_study(study_name="jobs3", storage=make_storage(None, root))
    assert len(study.trials) == 7
    assert all(t.state.is_finished() for t in study.trials)
    assert sorted(t.number for t in study.trials) == list(range(7))
    assert {t.user_attrs["worker"]["gpu"] for t in study.trials} == {None}


def test_latency_device_with_an_index_is_refused_with_several_gpu_workers() -> None:
    from autokd.errors import UserError
    from autokd.search.run import check_latency_device_for_workers
    from autokd.utils.devices import WorkerSlot

    two = [WorkerSlot(index=0, device_index=0, env={}),
           WorkerSlot(index=1, device_index=1, env={"CUDA_VISIBLE_DEVICES": "1"})]
    with pytest.raises(UserError, match="--latency-device cuda:1 cannot be used with several GPU workers"):
        check_latency_device_for_workers("cuda:1", two)
    for fine in (None, "cuda", "cpu"):  # a worker's own GPU, or the CPU, mean the same in every worker
        check_latency_device_for_workers(fine, two)
    check_latency_device_for_workers("cuda:1", two[:1])  # one worker: cuda:N is what it says
