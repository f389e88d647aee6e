"""Command line: argument parsing, the search's progress lines, exit codes (2 = bad input, 130 = interrupted).

    autokd search --budget 50       run/resume a study (digits, default space, CPU/GPU automatically)
    autokd distill --family resnet  train one student against the cached teacher
    autokd report                   Pareto front table + studies/<name>/report/
    autokd export --pick knee       safetensors + config.json + ONNX (+ TorchScript)
    autokd ui                       MLflow UI for the local store (prints the study's runs page)
    autokd sync-mlflow              send MLflow calls kept on disk during a tracking-server outage
    autokd workers --machines 4     commands to run one study on several machines (PostgreSQL + MLflow server)
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autokd.config import (
    OPTIMIZERS,
    SAMPLERS,
    DistillSettings,
    SearchSettings,
    non_negative_int,
    port_number,
    positive_int,
    settings_from,
    studies_root,
)
from autokd.errors import FatalSearchError, Interrupted, UserError
from autokd.latency.remote import server as latency_server  # torch-free: its options are defined there

if TYPE_CHECKING:
    from autokd.search.objective import TrialOutcome
    from autokd.search.run import SearchSummary
    from autokd.search.worker_loop import SearchProgress

EXIT_BAD_INPUT = 2
EXIT_NO_RESULT = 1  # the command ran but produced nothing usable (a search without a completed trial)
EXIT_INTERRUPTED = 130
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _ui_port(text: str) -> int:
    """argparse type of `autokd ui --port`: a TCP port 1-65535 (the UI's link names the port, so 0 is refused)."""
    value = port_number(text)
    if value == 0:
        raise argparse.ArgumentTypeError("'0' is not a port the UI can print a link to: valid 1-65535")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits (built in, default), cifar10, cifar100, mnist, fashion-mnist, or folder:PATH")
    p.add_argument("--data-dir", help="dataset files: mnist/fashion-mnist IDX files (in DIR or DIR/<Name>/raw; "
                   "default: the system package, e.g. Debian's dataset-fashion-mnist), torchvision's for cifar")
    p.add_argument("--download", action="store_true", help="download a torchvision dataset if missing")
    p.add_argument("--input-size", type=positive_int, help="resize images to this side (default: dataset's)")
    p.add_argument("--teacher", help="timm architecture of the teacher (default: per dataset)")
    p.add_argument("--teacher-checkpoint", help="local teacher weights (.safetensors or .pt state dict)")
    p.add_argument("--teacher-pretrained", action="store_true",
                   help="start the teacher from timm pretrained weights (must already be in the local cache)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of every subcommand."""
    parser = argparse.ArgumentParser(prog="autokd", description="Search student architectures and KD settings "
                                     "together; pick a student from the accuracy/latency Pareto front.")
    parser.add_argument("--root", type=Path, default=None, help="outputs root (default: ./studies or $AUTOKD_STUDIES)")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run or resume a multi-objective study")
    s.add_argument("--budget", type=positive_int, default=50, help="total finished trials in the study (default 50)")
    s.add_argument("--space", default=None,
                   help="a built-in space name (default, cifar_gpu) or a search-space YAML file (default: default)")
    _add_data_args(s)
    s.add_argument("--study", help="study name (default: <dataset>-<space name>)")
    s.add_argument("--storage", help="Optuna storage: a .journal path or postgresql://USER@HOST/DB "
                   "(default studies/optuna.journal)")
    s.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    s.add_argument("--max-latency-ms", type=_positive_float, help="reject students slower than this before training")
    s.add_argument("--epochs", type=positive_int, help="max epochs per trial (default: from the space)")
    s.add_argument("--no-prune", action="store_true", help="train every trial to the max epochs")
    s.add_argument("--jobs", type=positive_int, default=1, help="worker processes on this machine (default 1)")
    s.add_argument("--tracking-uri", help="MLflow tracking server URI (default: local store under studies/)")
    s.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    s.add_argument("--latency-threads", type=positive_int, default=1, help="CPU threads for latency (default 1)")
    s.add_argument("--latency-batch", type=positive_int, default=1, help="batch size for latency (default 1)")
    s.add_argument("--latency-device", help="device latency is measured on (default: the training device)")
    s.add_argument("--latency-runtime", choices=("onnxruntime", "torch"),
                   help="what times the students: onnxruntime (the exported ONNX file; default on a CPU) or torch "
                        "(eager PyTorch; default on CUDA)")
    s.add_argument("--latency-precision", default="fp32", metavar="{fp32,int8}",
                   help="what is timed: the student's fp32 ONNX model (default) or its INT8 quantisation (needs "
                        "--latency-runtime onnxruntime); a study keeps one precision")
    s.add_argument("--latency-target", metavar="URL",
                   help="time students on another device: the http://HOST:PORT of `autokd latency-server` there")
    s.add_argument("--latency-token", help="the latency server's token (default: $AUTOKD_LATENCY_TOKEN)")
    s.add_argument("--latency-target-retry", type=_positive_float, default=30.0, metavar="SECONDS",
                   dest="latency_target_retry_s",
                   help="how long an unreachable latency target is retried before the trial fails (default 30)")
    s.add_argument("--allow-mixed-latency", action="store_true",
                   help="let this worker join a study whose latencies were measured on another kind of device")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile students (pays off on a GPU and in long trials; on CPU needs a C compiler)")
    s.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile); reduce-overhead adds CUDA graphs (GPU only)")
    s.add_argument("--devices", help="GPUs for workers: all (default with --device cuda/auto) or numbers, e.g. 0,1,3")
    s.add_argument("--jobs-per-device", type=positive_int, default=1,
                   help="worker processes on each GPU of --devices (default 1)")
    s.add_argument("--train-limit", type=positive_int, metavar="N",
                   help="search on a stratified subset of N training images (validation and test splits unchanged)")
    s.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)

    d = sub.add_parser("distill", help="distil one student from the (cached) teacher")
    d.add_argument("--from-trial", type=non_negative_int, metavar="N",
                   help="train trial N of --study again with its exact student and KD settings (every training "
                   "image unless --train-limit; its own epochs unless --epochs)")
    d.add_argument("--study", help="with --from-trial: the study (default: the only or most recent one)")
    d.add_argument("--storage", help="with --from-trial: the study's storage (default: the local journal)")
    d.add_argument("--train-limit", type=positive_int, metavar="N",
                   help="train on a stratified subset of N training images")
    # Defaults None: with --from-trial a given option is told apart from the trial's value; the settings'
    # defaults (family resnet, width/depth 0.5, loss kd, 10 epochs, ...) apply otherwise.
    d.add_argument("--family")
    d.add_argument("--width", type=_positive_float)
    d.add_argument("--depth", type=_positive_float)
    d.add_argument("--loss")
    d.add_argument("--temperature", type=float)
    d.add_argument("--alpha", type=float)
    d.add_argument("--beta", type=float)
    d.add_argument("--warmup", type=float)
    d.add_argument("--epochs", type=positive_int)
    d.add_argument("--batch-size", type=positive_int)
    d.add_argument("--lr", type=_positive_float)
    d.add_argument("--weight-decay", type=float)
    d.add_argument("--optimizer", choices=OPTIMIZERS)
    d.add_argument("--views", type=non_negative_int, metavar="N",
                   help="replayable augmented views per training image, as a space's `views` (default 0: none)")
    d.add_argument("--out", type=Path, help="where to save the student (default studies/distill/<name>)")
    _add_data_args(d)

    r = sub.add_parser("report", help="Pareto front, recommendations and report files of a study")
    r.add_argument("--study", help="study name (default: the only/most recent study)")
    r.add_argument("--storage", help="Optuna storage of the study (default studies/optuna.journal)")
    r.add_argument("--max-latency-ms", type=_positive_float, help="recommend the most accurate under this latency")
    r.add_argument("--tolerance", type=float, default=1.0,
                   help="fastest student within this many accuracy points of the best (default 1.0)")
    r.add_argument("--hv-ref-ms", type=_positive_float, help="latency of the hypervolume reference point")
    r.add_argument("--data-dir", help="data directory of the study's dataset (torchvision datasets)")

    e = sub.add_parser("export", help="export a student: safetensors + config.json + ONNX/TorchScript")
    e.add_argument("--study", help="study name (default: the only/most recent study)")
    e.add_argument("--storage", help="Optuna storage of the study (default studies/optuna.journal)")
    pick = e.add_mutually_exclusive_group(required=True)
    pick.add_argument("--trial", type=int, help="trial number")
    pick.add_argument("--pick", choices=("knee", "best", "fastest"), help="a recommendation of the front")
    pick.add_argument("--max-latency-ms", type=_positive_float, help="most accurate student under this latency")
    e.add_argument("--out", type=Path, required=True,
                   help="output folder: new or empty (a folder that holds files is refused unless --force)")
    e.add_argument("--force", action="store_true",
                   help="export into a folder that holds files: replace the files export writes, keep the others")
    e.add_argument("--format", default="safetensors,onnx,torchscript",
                   help="comma-separated: safetensors (always), onnx, torchscript")
    e.add_argument("--data-dir", help="data directory of the study's dataset (for the parity check inputs)")
    e.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (ONNX Runtime static quantisation, QDQ, per-channel weights), "
                        "with its test accuracy, latency and size beside the fp32 model's")
    e.add_argument("--calibration-images", type=positive_int,
                   help="training images that calibrate the INT8 model (default 256; with --int8)")
    e.add_argument("--max-int8-drop", type=float, metavar="POINTS",
                   help="warn when the INT8 test accuracy is more than this many points below fp32 (default 1.0)")

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the local store")
    u.add_argument("--port", type=_ui_port, default=5000)
    u.add_argument("--tracking-uri", help="store to browse (default: the local store under studies/); for a "
                   "tracking server, prints the study's page on it")
    u.add_argument("--study", help="study whose runs page to print (default: the most recent study)")
    u.add_argument("--start-timeout", type=_positive_float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the UI to answer before giving up (default 180)")

    y = sub.add_parser("sync-mlflow", help="send the MLflow calls kept on disk while the tracking server was down")
    y.add_argument("--study", help="study name (default: the only/most recent study)")
    y.add_argument("--storage", help="Optuna storage of the study (default studies/optuna.journal)")
    y.add_argument("--tracking-uri", help="MLflow store (default: the one the study logs to)")

    w = sub.add_parser("workers", help="print the commands that run one study on several machines",
                       description="Print the commands that run one study on several machines: the databases, "
                       "the MLflow server, and one `autokd search` line per machine. Arguments after `--` are "
                       "added to every search line.")
    w.add_argument("--machines", type=positive_int, default=2, help="number of machines (default 2)")
    w.add_argument("--jobs", type=positive_int, default=1, help="worker processes per machine (default 1)")
    w.add_argument("--storage", help="postgresql://USER@HOST[:PORT]/DB of the study (default: a placeholder)")
    w.add_argument("--tracking-uri", help="http://HOST:PORT of the MLflow server (default: a placeholder)")
    w.add_argument("--study", default="digits-default", help="study name (default digits-default)")
    w.add_argument("--budget", type=positive_int, default=50, help="total finished trials (default 50)")
    w.add_argument("--artifacts", default="/srv/mlflow-artifacts",
                   help="folder of the MLflow server's artifacts (default /srv/mlflow-artifacts)")
    w.add_argument("search_args", nargs=argparse.REMAINDER, help="-- then extra `autokd search` arguments")

    ls = sub.add_parser("latency-server", help="time uploaded students on this device, for a search elsewhere",
                        description=latency_server.DESCRIPTION)
    latency_server.add_server_args(ls)
    return parser


def _search(args: argparse.Namespace, root: Path) -> int:
    from autokd.search.processes import SETTINGS_ENV, settings_from_json
    from autokd.search.run import run_search

    if args.worker_index > 0 and SETTINGS_ENV in os.environ:  # a worker the first process started
        settings = settings_from_json(os.environ.pop(SETTINGS_ENV))
    else:
        settings = _search_settings(args, root)
    summary = run_search(settings, worker_index=args.worker_index, on_trial=_print_progress)
    if args.worker_index == 0:
        if summary.completed_in_study == 0:  # no report and nothing to export: not a success
            print(no_completed_trial(summary), file=sys.stderr)
            return EXIT_NO_RESULT
        print(f"done: {summary.finished_in_study}/{summary.budget} trials in study {summary.study_name!r}; "
              f"files under {summary.study_dir}/")
        print(_next_steps(args, summary))
    return 0


def no_completed_trial(summary: SearchSummary, shown: int = 8) -> str:
    """What `autokd search` prints (on stderr, exit 1) when its study holds no completed trial at the end: the
    distinct reasons its trials ended with, counted."""
    reasons = list(summary.not_completed.items())
    lines = [(f"autokd search: no completed trial: study {summary.study_name!r} used its budget "
              f"({summary.finished_in_study}/{summary.budget} trials) and none of them completed, so there is no "
              "Pareto front to report and no student to export. Its trials ended so:")]
    lines += [f"  {n} {reason}" for reason, n in reasons[:shown]]  # "2 FAIL: error: ValueError: ..."
    if len(reasons) > shown:
        rest = sum(n for _, n in reasons[shown:])
        lines.append(f"  ... {len(reasons) - shown} other reason(s), {rest} trial(s)")
    lines.append("Fix the cause (each trial's fail_reason and traceback are in optuna-dashboard and MLflow), then run "
                 "more trials with a larger --budget (this study keeps its trials), or start over with --study "
                 "NEW_NAME.")
    return "\n".join(lines)


def _search_settings(args: argparse.Namespace, root: Path) -> SearchSettings:
    """The settings of `autokd search` from its options: each field from the option of its name, but these."""
    from autokd.spaces import resolve_space

    return settings_from(
        SearchSettings, vars(args), space=resolve_space(args.space), prune=not args.no_prune,
        mlflow=not args.no_mlflow, compile=args.compile_mode or args.compile,
        latency_token=args.latency_token or os.environ.get(latency_server.TOKEN_ENV) or None, root=root)


def progress_line(outcome: TrialOutcome, progress: SearchProgress) -> str:
    """The line `autokd search` prints after each trial: the trial, then where the study stands."""
    p = outcome.params
    desc = (f"{p.family:<12} w={p.width:.2f} d={p.depth:.2f} {p.loss:<5}" if p else "(no params)")
    acc = f"val {outcome.val_acc:.4f}" if outcome.val_acc is not None else "val   —   "
    lat = f"{outcome.latency_ms:7.3f} ms" if outcome.latency_ms is not None else "      — ms"
    extra = f" ({outcome.reason})" if outcome.state in ("FAIL", "INFEASIBLE") and outcome.reason else ""
    return (f"[{progress.done:>3}/{progress.budget}] #{outcome.number:<3} {desc} {acc} {lat} {outcome.state:<10} "
            f"ep {outcome.epochs_trained:<2} {outcome.seconds:5.1f}s | pruned {progress.pruned} · "
            f"front {progress.front} · {_mm_ss(progress.elapsed_s)} elapsed · ETA {_mm_ss(progress.eta_s)}{extra}")


def _print_progress(outcome: TrialOutcome, progress: SearchProgress) -> None:
    print(progress_line(outcome, progress))


def _mm_ss(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _next_steps(args: argparse.Namespace, summary: SearchSummary) -> str:
    """The commands a user runs after a search: the report, the MLflow UI, the export of the knee student."""
    base = "autokd" + (f" --root {args.root}" if args.root else "")
    where = (f" --storage {args.storage}" if args.storage else "")
    lines = ["next:"]
    report = Path(summary.study_dir) / "report" / "report.html"
    if report.is_file():
        lines.append(f"  open {report}")
    else:
        lines.append(f"  {base} report --study {summary.study_name}{where}")
    if not args.no_mlflow:
        uri = f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else ""
        lines.append(f"  {base} ui --study {summary.study_name}{uri}")
    lines.append(f"  {base} export --study {summary.study_name}{where} --pick knee --out student/")
    return "\n".join(lines)


def _distill_settings(args: argparse.Namespace, root: Path) -> DistillSettings:
    """The settings of `autokd distill` from its options: each field from the option of its name, but these."""
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    if args.from_trial is not None:
        from autokd.search.retrain import TRIAL_FIELDS, settings_from_trial

        clash = [f"--{k.replace('_', '-')}" for k in TRIAL_FIELDS if k in given]
        if clash:
            raise UserError(f"{', '.join(clash)} cannot be given with --from-trial: the trial fixes the student, "
                            "its distillation settings, data and teacher (--epochs, --seed, --train-limit, "
                            "--data-dir, --teacher-checkpoint, --device and --out may change)")
        return settings_from_trial(args.study, args.storage, root, args.from_trial, given)
    if args.study is not None or args.storage is not None:
        raise UserError("--study and --storage only apply with --from-trial N (train a trial's student again)")
    loss_params = {k: given[k] for k in ("temperature", "alpha", "beta", "warmup") if k in given}
    return settings_from(DistillSettings, given, loss_params=loss_params, root=root)


def _distill(args: argparse.Namespace, root: Path) -> int:
    from autokd.model.distill import run_distill

    run_distill(_distill_settings(args, root))
    return 0


def _report(args: argparse.Namespace, root: Path) -> int:
    from autokd.report.build import report_command

    report_command(study_name=args.study, storage=args.storage, root=root, max_latency_ms=args.max_latency_ms,
                   tolerance_pp=args.tolerance, hv_ref_ms=args.hv_ref_ms, data_dir=args.data_dir)
    return 0


def _export(args: argparse.Namespace, root: Path) -> int:
    from autokd.export.layout import check_out_dir, export_files, parse_formats

    # Before torch is imported and the study opened: a wrong --out is refused at once, not after seconds.
    check_out_dir(args.out, args.force, export_files(parse_formats(args.format), args.int8))
    from autokd.export.int8 import int8_options
    from autokd.export.student import ParityError, export_command
    from autokd.latency.quantize import QuantizationError

    int8 = int8_options(args.int8, args.calibration_images, args.max_int8_drop)
    try:
        export_command(study_name=args.study, storage=args.storage, root=root, trial=args.trial, pick=args.pick,
                       max_latency_ms=args.max_latency_ms, out=args.out, formats=args.format, data_dir=args.data_dir,
                       int8=int8, force=args.force)
    # ParityError: export wrote nothing, its own files disagree with PyTorch. QuantizationError: the fp32
    # export is written, no INT8 file.
    except (ParityError, QuantizationError) as exc:
        print(f"autokd {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _ui(args: argparse.Namespace, root: Path) -> int:
    import os
    import shlex
    import signal
    import subprocess

    from autokd.tracking import default_tracking_uri, ui_command
    from autokd.tracking.ui import OutputTail, port_in_use, wait_until_answering

    if args.tracking_uri is None and not (Path(root) / "mlflow.db").is_file():
        raise UserError(f"no MLflow store at {Path(root) / 'mlflow.db'}: run `autokd search` first (or pass --root "
                        "/ $AUTOKD_STUDIES for another studies directory, or --tracking-uri)")
    uri = args.tracking_uri or default_tracking_uri(root)
    http = uri.startswith(("http://", "https://"))
    base = uri if http else f"http://127.0.0.1:{args.port}"
    page = _study_page(uri, base, args.study, root)
    if http:  # a tracking server already serves its UI
        print(f"MLflow UI of {uri}: {page}")
        return 0
    cmd = ui_command(uri, host="127.0.0.1", port=args.port)
    if port_in_use("127.0.0.1", args.port):
        raise UserError(f"--port {args.port}: something already listens on 127.0.0.1:{args.port} (another "
                        "`autokd ui`?); stop it or pass another --port")
    print(f"starting the MLflow UI for {uri} on port {args.port} (it can take a minute)...", file=sys.stderr,
          flush=True)
    # The UI is a process tree (mlflow -> uvicorn). It gets its own process group, stopped below however we
    # are stopped (Ctrl-C, SIGTERM from a service manager): otherwise it outlives us, holding the port.
    posix = hasattr(os, "killpg")
    proc = subprocess.Popen(cmd, start_new_session=posix, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    output = OutputTail(proc.stdout)  # type: ignore[arg-type]

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        # The address is printed once the server answers: printed earlier, it opened on "connection refused".
        problem = wait_until_answering(f"{base}/health", proc, args.start_timeout)
        if problem is None:
            print(f"MLflow UI for {uri}: {page}  (Ctrl-C to stop)", flush=True)
            output.forward(_to_stderr)
            return proc.wait()
        if proc.poll() is None:  # still starting when the time was up
            problem += " (on a slow or busy machine, pass a larger --start-timeout)"
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_process_group(proc, posix)
    output.join(timeout=5)  # the group is gone: its output ends
    tail = output.tail().rstrip() or "(nothing)"
    print(f"autokd ui: error: the MLflow UI ({shlex.join(cmd)}) {problem}; its last output:\n{tail}",
          file=sys.stderr)
    return 1


def _to_stderr(line: str) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()


def _study_page(uri: str, base: str, study: str | None, root: Path) -> str:
    """The runs page of the study's experiment (the given study, else the most recent one), else the UI's root."""
    from autokd.tracking import experiment_id_of, runs_page_url

    name = study
    if name is None:
        from autokd.study.store import storage_missing

        if not storage_missing(None, root):
            from autokd.report.build import resolve_study

            try:
                name = resolve_study(None, None, root).study_name
            except UserError:
                name = None
    if name is None:
        return base + "/"
    try:
        experiment_id = experiment_id_of(uri, name)
    except Exception as exc:
        raise UserError(f"cannot read MLflow store {uri!r}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    if experiment_id is None:
        if study is not None:
            raise UserError(f"--study {study!r}: no MLflow experiment of that name in {uri} (was it run with "
                            "--no-mlflow, or with another --tracking-uri?)")
        return base + "/"
    return runs_page_url(base, experiment_id)


def _sync_mlflow(args: argparse.Namespace, root: Path) -> int:
    from autokd.report.build import resolve_study
    from autokd.study.record import MLFLOW_PARENT_RUN_ATTR, MLFLOW_TRACKING_URI_ATTR
    from autokd.tracking import make_tracker, spool_dir

    study = resolve_study(args.study, args.storage, root)
    uri = args.tracking_uri or study.user_attrs.get(MLFLOW_TRACKING_URI_ATTR)
    if not study.user_attrs.get(MLFLOW_PARENT_RUN_ATTR):
        raise UserError(f"study {study.study_name!r} does not log to MLflow (it was run with --no-mlflow)")
    spools = spool_dir(root, study.study_name)
    waiting = len(list(spools.glob("*.jsonl"))) if spools.is_dir() else 0
    make_tracker(uri, True, root, experiment_name=study.study_name)  # sends what spools it finds (and says so)
    left = len(list(spools.glob("*.jsonl"))) if spools.is_dir() else 0
    print(f"study {study.study_name!r}: {waiting - left} spool(s) sent to {uri}"
          + (f", {left} kept (their worker still runs, or the store does not answer)" if left else "")
          + ("" if waiting else " (nothing was waiting)"))
    return 0 if not left else 1


def _stop_process_group(proc: Any, posix: bool) -> None:
    """SIGTERM the process group led by `proc`, wait up to 15 s for all of it to go, then SIGKILL what is left."""
    import os
    import signal
    import subprocess
    import time

    if not posix:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group never looks empty
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _workers(args: argparse.Namespace, root: Path) -> int:
    from autokd.study.scaleout import worker_commands

    extra = args.search_args[1:] if args.search_args[:1] == ["--"] else args.search_args
    print(worker_commands(args.machines, args.storage, args.tracking_uri, args.study, args.budget, jobs=args.jobs,
                          extra=extra, artifacts=args.artifacts))
    return 0


def _latency_server(args: argparse.Namespace, root: Path) -> int:
    server = latency_server.server_from_args(args)
    print(latency_server.listening_line(server), flush=True)
    latency_server.serve(server)
    return 0


COMMANDS = {"search": _search, "distill": _distill, "report": _report, "export": _export, "ui": _ui,
            "workers": _workers, "sync-mlflow": _sync_mlflow, "latency-server": _latency_server}


_STDERR_LOGGER = "autokd.tracking"


class _ConsoleHandler(logging.Handler):
    """The CLI's one handler on the library's ``autokd`` logger: each message bare, as the commands print them.

    Progress and the library's ``warning: ...`` lines go to stdout; the MLflow writer's warnings
    (``autokd.tracking``) go to stderr, out of the progress lines, where they went before the CLI had a handler.
    """

    def emit(self, record: logging.LogRecord) -> None:
        # Looked up per message, not held: pytest's capsys and contextlib.redirect_stdout swap sys.stdout.
        to_stderr = record.name == _STDERR_LOGGER or record.name.startswith(_STDERR_LOGGER + ".")
        stream = sys.stderr if to_stderr else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own policy: report through handleError, never raise
            self.handleError(record)


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """Print the library's INFO-and-above messages while one command runs, then restore the ``autokd`` logger
    (``main`` may run several times in one process: tests, a program that wraps the CLI)."""
    logger = logging.getLogger("autokd")
    handler, level = _ConsoleHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `autokd` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    root = args.root or studies_root()
    with console_logging():
        try:
            return COMMANDS[args.command](args, root)
        except UserError as exc:
            print(f"autokd {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print(f"autokd {args.command}: interrupted; finished trials are kept — rerun the same command to resume",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        except Interrupted as exc:
            print(f"autokd {args.command}: terminated ({exc}); finished trials are kept — rerun the same command "
                  "to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        except FatalSearchError as exc:
            print(f"autokd {args.command}: stopped: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
