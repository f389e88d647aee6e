"""autokd.cli: how each kind of failure maps to an exit code and a message, and what the parser refuses."""
from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from autokd import cli
from autokd.config import settings_from
from autokd.errors import FatalSearchError, Interrupted, UserError


def _raising(exc: BaseException) -> Callable[[argparse.Namespace, Path], int]:
    def command(args: argparse.Namespace, root: Path) -> int:
        raise exc

    return command


def _failure_kinds() -> list[tuple[BaseException, int, str]]:
    return [
        (UserError("--budget 0: must be at least 1"), 2, "autokd report: error: --budget 0: must be at least 1"),
        (KeyboardInterrupt(), 130, "interrupted; finished trials are kept"),
        (Interrupted("signal 15"), 130, "terminated (signal 15); finished trials are kept"),
        (FatalSearchError("disk full"), 1, "autokd report: stopped: disk full"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_each_failure_kind_has_its_exit_code_and_message(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    exc, code, message = _failure_kinds()[index]
    monkeypatch.setitem(cli.COMMANDS, "report", _raising(exc))
    assert cli.main(["--root", str(tmp_path), "report"]) == code
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["parity", "quantization"])
def test_export_failures_after_checks_exit_1_with_the_reason(kind: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import autokd.export.student
    from autokd.export.student import ParityError
    from autokd.latency.quantize import QuantizationError

    exc = ParityError("onnx differs by 0.1") if kind == "parity" else QuantizationError("no calibration data")

    def export_command(**kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(autokd.export.student, "export_command", export_command)
    assert cli.main(["--root", str(tmp_path), "export", "--pick", "knee", "--out", str(tmp_path / "s")]) == 1
    assert f"autokd export: error: {exc}" in capsys.readouterr().err


def test_an_unexpected_error_is_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "report", _raising(ZeroDivisionError("bug")))
    with pytest.raises(ZeroDivisionError):  # a traceback for a bug, not an exit code that hides it
        cli.main(["--root", str(tmp_path), "report"])


@pytest.mark.parametrize("argv, fragment", [
    (["search", "--budget", "0"], "'0' must be >= 1"),
    (["search", "--budget", "many"], "'many' is not an integer"),
    (["search", "--max-latency-ms", "-1"], "'-1' must be > 0"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["latency-server", "--port", "70000"], "argument --port: '70000' is not a TCP port: valid 0-65535"),
    (["latency-server", "--port", "-1"], "argument --port: '-1' is not a TCP port: valid 0-65535"),
    (["ui", "--port", "70000"], "argument --port: '70000' is not a TCP port: valid 0-65535"),
    (["ui", "--port", "0"], "argument --port: '0' is not a port the UI can print a link to: valid 1-65535"),
    ([], "the following arguments are required: command"),
])
def test_the_parser_refuses_bad_values_with_exit_2(argv: list[str], fragment: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert fragment in capsys.readouterr().err


def test_latency_server_port_0_listens_on_a_free_port_and_says_which() -> None:
    from autokd.latency.remote import server

    args = cli.build_parser().parse_args(["latency-server", "--port", "0"])
    listening = server.server_from_args(args)
    try:
        port = listening.server_address[1]
        assert 0 < port <= 65535
        assert f"on http://127.0.0.1:{port} " in server.listening_line(listening)
    finally:
        listening.server_close()


def test_a_search_without_a_completed_trial_names_the_reasons_counted(tmp_path: Path) -> None:
    reasons = {f"FAIL: error: E{i}" for i in range(9)}
    summary = SimpleNamespace(study_name="s", finished_in_study=12, budget=12,
                              not_completed={"INFEASIBLE: latency 3 ms > --max-latency-ms 1": 3,
                                             **{r: 1 for r in sorted(reasons)}})
    lines = cli.no_completed_trial(summary).splitlines()
    assert lines[0].startswith("autokd search: no completed trial: study 's' used its budget (12/12 trials)")
    assert lines[1] == "  3 INFEASIBLE: latency 3 ms > --max-latency-ms 1"
    assert lines[2:9] == [f"  1 FAIL: error: E{i}" for i in range(7)]
    assert lines[9] == "  ... 2 other reason(s), 2 trial(s)"
    assert "--budget" in lines[10] and "export" not in "\n".join(lines[1:])


def test_read_only_commands_on_a_missing_study_exit_2_and_create_nothing(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "studies"
    for command in (["report"], ["export", "--pick", "knee", "--out", str(tmp_path / "student")]):
        assert cli.main(["--root", str(root), *command, "--study", "nope"]) == 2
        assert "nope" in capsys.readouterr().err
    assert not root.exists() and not (tmp_path / "student").exists()


def test_next_steps_name_the_report_ui_and_export(tmp_path: Path) -> None:
    args = SimpleNamespace(root=None, storage=None, no_mlflow=False, tracking_uri=None)
    summary = SimpleNamespace(study_dir=tmp_path / "digits-default", study_name="digits-default")
    lines = cli._next_steps(args, summary).splitlines()  # noqa: SLF001 - the text a user reads after a search
    assert lines == ["next:", "  autokd report --study digits-default", "  autokd ui --study digits-default",
                     "  autokd export --study digits-default --pick knee --out student/"]

    (tmp_path / "digits-default" / "report").mkdir(parents=True)
    (tmp_path / "digits-default" / "report" / "report.html").write_text("<html></html>")
    args = SimpleNamespace(root=Path("runs"), storage="postgresql://db/x", no_mlflow=True, tracking_uri=None)
    lines = cli._next_steps(args, summary).splitlines()  # noqa: SLF001
    assert lines[1] == f"  open {tmp_path / 'digits-default' / 'report' / 'report.html'}"
    assert lines[2:] == ["  autokd --root runs export --study digits-default --storage postgresql://db/x --pick knee "
                         "--out student/"]


def test_search_options_set_the_settings_fields_of_their_names(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `autokd search` option sets the `SearchSettings` field of its name (a few are derived from theirs), and
    with no option given the settings are the dataclass's defaults."""
    from autokd.config import SearchSettings
    from autokd.spaces import resolve_space

    monkeypatch.delenv("AUTOKD_LATENCY_TOKEN", raising=False)
    parse = cli.build_parser().parse_args
    assert cli._search_settings(parse(["search"]), tmp_path) == SearchSettings(root=tmp_path)
    argv = ["search", "--budget", "3", "--space", "cifar_gpu", "--dataset", "mnist", "--data-dir", "d", "--download",
            "--input-size", "20", "--teacher", "resnet18", "--teacher-checkpoint", "t.pt", "--teacher-pretrained",
            "--device", "cuda", "--seed", "7", "--study", "s", "--storage", "x.journal", "--sampler", "nsga2",
            "--max-latency-ms", "2.5", "--epochs", "4", "--no-prune", "--jobs", "2", "--tracking-uri", "http://m:5000",
            "--no-mlflow", "--latency-threads", "2", "--latency-batch", "8", "--latency-device", "cpu",
            "--latency-runtime", "torch", "--latency-precision", "int8", "--latency-target", "http://t:1",
            "--latency-token", "tok", "--latency-target-retry", "5", "--allow-mixed-latency", "--compile-mode",
            "max-autotune", "--devices", "0,1", "--jobs-per-device", "2", "--train-limit", "100"]
    assert cli._search_settings(parse(argv), tmp_path) == SearchSettings(
        budget=3, space=resolve_space("cifar_gpu"), dataset="mnist", data_dir="d", download=True, input_size=20,
        teacher="resnet18", teacher_checkpoint="t.pt", teacher_pretrained=True, device="cuda", seed=7, study="s",
        storage="x.journal", sampler="nsga2", max_latency_ms=2.5, epochs=4, prune=False, jobs=2,
        tracking_uri="http://m:5000", mlflow=False, latency_threads=2, latency_batch=8, latency_device="cpu",
        latency_runtime="torch", latency_precision="int8", latency_target="http://t:1", latency_token="tok",
        latency_target_retry_s=5.0, allow_mixed_latency=True, compile="max-autotune", devices="0,1",
        jobs_per_device=2, train_limit=100, root=tmp_path)
    monkeypatch.setenv("AUTOKD_LATENCY_TOKEN", "from-env")
    settings = cli._search_settings(parse(["search", "--compile"]), tmp_path)
    assert settings.latency_token == "from-env" and settings.compile is True


def test_the_search_settings_groups(tmp_path: Path) -> None:
    from autokd.config import DataSettings, LatencySettings, SearchSettings, TrackingSettings, WorkerSettings

    assert SearchSettings().data == DataSettings()
    s = SearchSettings(dataset="mnist", train_limit=9, latency_threads=2, latency_device="cpu", latency_token="t",
                       latency_target_retry_s=5.0, allow_mixed_latency=True, jobs=3, devices="0",
                       tracking_uri="http://m:5000", mlflow=False, root=tmp_path)
    assert s.data == DataSettings(dataset="mnist", train_limit=9)
    assert s.latency == LatencySettings(threads=2, batch=1, device="cpu", runtime=None, precision="fp32", target=None,
                                        token="t", target_retry_s=5.0, allow_mixed=True)
    assert s.workers == WorkerSettings(jobs=3, devices="0", jobs_per_device=1)
    assert s.tracking == TrackingSettings(uri="http://m:5000", mlflow=False)


def test_distill_options_set_the_settings_fields_of_their_names(tmp_path: Path) -> None:
    from autokd.config import DataSettings, DistillSettings

    parse = cli.build_parser().parse_args
    assert cli._distill_settings(parse(["distill"]), tmp_path) == DistillSettings(root=tmp_path)
    argv = ["distill", "--family", "mobilenetv3", "--width", "0.75", "--depth", "1", "--loss", "dkd", "--alpha", "1",
            "--beta", "8", "--epochs", "3", "--batch-size", "32", "--lr", "0.1", "--weight-decay", "0", "--optimizer",
            "sgd", "--out", "o", "--dataset", "cifar10", "--data-dir", "d", "--download", "--input-size", "24",
            "--teacher", "resnet18", "--teacher-checkpoint", "t.pt", "--teacher-pretrained", "--device", "cpu",
            "--seed", "5", "--views", "4"]
    assert cli._distill_settings(parse(argv), tmp_path) == DistillSettings(
        family="mobilenetv3", width=0.75, depth=1.0, loss="dkd", loss_params={"alpha": 1.0, "beta": 8.0}, epochs=3,
        batch_size=32, lr=0.1, weight_decay=0.0, optimizer="sgd", out=Path("o"),
        data=DataSettings(dataset="cifar10", data_dir="d", download=True, input_size=24), teacher="resnet18",
        teacher_checkpoint="t.pt", teacher_pretrained=True, device="cpu", seed=5, views=4, root=tmp_path)
    with pytest.raises(TypeError, match="no field nonsense"):
        settings_from(DistillSettings, {}, nonsense=1)


def test_the_library_logs_and_the_command_prints_the_bare_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """What the library logs, the CLI prints as it always did: bare lines, progress and ``warning: ...`` on stdout,
    the MLflow writer's warnings on stderr; the ``autokd`` logger is left as it was found."""
    import logging

    def command(args: argparse.Namespace, root: Path) -> int:
        logging.getLogger("autokd.report.build").info("hypervolume 0.5000 — report: x/report.html")
        logging.getLogger("autokd.latency.retiming").warning("warning: latency: could not re-time (100%)")
        logging.getLogger("autokd.tracking._mlflow").warning("MLflow: %s failed (%s); continuing without it", "a", "b")
        logging.getLogger("autokd.model.teacher").debug("not shown")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "report", command)
    before = logging.getLogger("autokd").level
    assert cli.main(["--root", str(tmp_path), "report"]) == 0
    out, err = capsys.readouterr()
    assert out == "hypervolume 0.5000 — report: x/report.html\nwarning: latency: could not re-time (100%)\n"
    assert err == "MLflow: a failed (b); continuing without it\n"
    assert logging.getLogger("autokd").level == before
    assert not [h for h in logging.getLogger("autokd").handlers if isinstance(h, cli._ConsoleHandler)]  # noqa: SLF001
    logging.getLogger("autokd.report.build").info("after the command: not printed")
    assert capsys.readouterr() == ("", "")
