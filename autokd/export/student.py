"""Export a trial's student: safetensors + config.json (+ ONNX, TorchScript), each verified against PyTorch.

Owns trial selection, the format writers and the parity checks (:class:`ParityError`, never a silent
success). The ONNX file comes from :func:`autokd.onnx_export.export_onnx`, the function a search times, so
what was timed is what ships; reading model files and loading weights is :mod:`autokd.model.checkpoint`'s job.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autokd.errors import UserError, as_user_error, did_you_mean
from autokd.export.layout import (
    EXPORT_FORMAT,
    FORMAT_FILES,
    INT8_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    check_out_dir,
    earlier_export_files,
    export_files,
    parse_formats,
)
from autokd.latency.onnx_export import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, example_batch, export_onnx, quiet_exporter
from autokd.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    load_trial_student,
    load_weights,
    read_weights,
)
from autokd.study.record import (
    ARCH_KEY_ATTR,
    CURVE_ATTR,
    DATASET_ATTR,
    DEVICE_ATTR,
    LATENCY_ATTR,
    TEACHER_ATTR,
    TEACHER_VAL_ACC_ATTR,
    State,
    outcome_reason,
    sampled_params,
    trial_state,
)

if TYPE_CHECKING:
    from autokd.export.int8 import Int8Options
    from autokd.model.data import DataSplits


PICKS = ("knee", "best", "fastest")
PARITY_ATOL = 1e-4
PARITY_BATCH = 32  # validation images used for the parity check

logger = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """An exported file does not reproduce the trial's model within the tolerance."""


@dataclass
class ExportResult:
    """What `export_trial` wrote and measured."""

    out_dir: Path
    study: str
    trial: int
    files: dict[str, Path]                 # format -> path (plus "config")
    parity: dict[str, float]               # format -> max |logit difference| vs the trial's PyTorch model
    config: dict[str, Any]
    onnx_exporter: str | None = None
    messages: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Loading an export


def load_student(path: str | os.PathLike) -> nn.Module:
    """Load an exported student directory (``model.safetensors`` + ``config.json``) as a timm model in eval mode.

    Also accepts a trial checkpoint directory (``studies/<study>/trials/<n>``). Missing, corrupt or
    mismatching files raise :class:`UserError` naming the file.

    ``config.json`` is a superset of timm's hub format (``architecture``, ``num_classes``, ``model_args``,
    ``pretrained_cfg``, ``label_names``), so an export also loads with
    ``timm.create_model("local-dir:DIR", pretrained=True)`` once ``autokd.model.students`` is imported (three of the
    families are timm entry points registered there).
    """
    import timm

    import autokd.model.students  # noqa: F401 - registers the autokd_* timm entry points

    folder = Path(path)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise UserError(f"load_student({str(path)!r}): not a directory; expected a folder written by `autokd export` "
                        f"holding {WEIGHTS_FILE} and {CONFIG_FILE}")
    for file in (cfg_path, weights_path):
        if not file.is_file():
            raise UserError(f"{file} is missing: load_student expects a folder written by `autokd export` "
                            f"({WEIGHTS_FILE} + {CONFIG_FILE})")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError(f"top level is a {type(cfg).__name__}, not an object")
    except (OSError, ValueError) as exc:
        raise UserError(f"{cfg_path} is not a valid config ({exc})") from exc
    arch, model_args, num_classes = _arch_from_config(cfg, cfg_path)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
    except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/TypeError/ValueError for bad configs
        raise UserError(f"{cfg_path}: cannot build timm model {arch!r} with num_classes={num_classes} and "
                        f"{model_args}: {exc.__class__.__name__}: {exc}") from exc
    state = read_weights(weights_path)
    load_weights(model, state, weights_path,
                 f"the weights in {weights_path} do not fit the architecture {arch} as configured in {cfg_path}")
    model.eval()
    pre = cfg.get("pretrained_cfg")
    if isinstance(pre, dict):  # so timm.data.resolve_data_config(model=model) sees the right mean/std/size
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **pre}
    return model


def _arch_from_config(cfg: dict[str, Any], cfg_path: Path) -> tuple[str, dict[str, Any], int]:
    if "architecture" in cfg:  # an export
        try:
            arch, args, num_classes = cfg["architecture"], dict(cfg.get("model_args") or {}), int(cfg["num_classes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{cfg_path}: bad or missing 'num_classes'/'model_args' ({exc!r})") from exc
        if "in_chans" not in args and "in_chans" in cfg:
            args["in_chans"] = int(cfg["in_chans"])
        return str(arch), args, num_classes
    if isinstance(cfg.get("student"), dict):  # a trial checkpoint
        s = cfg["student"]
        try:
            return str(s["model_name"]), {**s["kwargs"], "in_chans": int(s["in_chans"])}, int(s["num_classes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{cfg_path}: the 'student' entry is incomplete ({exc!r})") from exc
    raise UserError(f"{cfg_path}: neither an autokd export (no 'architecture' key) nor a trial checkpoint "
                    f"(no 'student' key); keys: {', '.join(sorted(cfg)) or 'none'}")


# ---------------------------------------------------------------------------------------------------------
# Choosing and loading a trial


def select_trial(study: optuna.Study, trial: int | None = None, pick: str | None = None,
                 max_latency_ms: float | None = None, tolerance_pp: float = 1.0) -> tuple[int, str]:
    """The trial number to export and why (``--trial``, a recommendation of the front, or a latency limit)."""
    from autokd.report.build import trial_points
    from autokd.select.pareto import check_picks, front_points, recommend

    given = [name for name, v in (("--trial", trial), ("--pick", pick), ("--max-latency-ms", max_latency_ms))
             if v is not None]
    if len(given) != 1:
        raise UserError(f"export needs exactly one of --trial N, --pick {{{','.join(PICKS)}}} or --max-latency-ms X; "
                        f"got {', '.join(given) or 'none'}")
    name = study.study_name
    if trial is not None:
        return int(trial), "chosen with --trial"
    if pick is not None and pick not in PICKS:
        raise UserError(f"--pick {pick!r}: unknown pick{did_you_mean(pick, PICKS)}; valid: {', '.join(PICKS)}")
    points = trial_points(study)
    front = front_points(points)
    if not front:
        counts: dict[str, int] = {}
        for p in points:
            counts[p.state] = counts.get(p.state, 0) + 1
        seen = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
        what = f"--pick {pick}" if pick is not None else f"--max-latency-ms {max_latency_ms:g}"
        raise UserError(f"{what}: study {name!r} has no completed trial to export ({seen}); run more trials with "
                        f"`autokd search --study {name}`, or export a given trial with --trial N")
    with as_user_error():  # --max-latency-ms: the picks' own check and message
        check_picks(max_latency_ms, tolerance_pp)
    rec = recommend(front, max_latency_ms=max_latency_ms, tolerance_pp=tolerance_pp)
    if pick == "knee":
        chosen, why = rec["knee"], "knee of the Pareto front"
    elif pick == "best":
        chosen = max(front, key=lambda p: (p.val_acc, -p.latency_ms, -p.number))
        why = "most accurate on the Pareto front"
    elif pick == "fastest":
        chosen, why = rec["fastest_within_tolerance"], f"fastest within {tolerance_pp:g} pp of the best accuracy"
    else:
        chosen, why = rec["best_under_latency"], f"most accurate under {max_latency_ms:g} ms"
        if chosen is None:
            fastest = min(front, key=lambda p: (p.latency_ms, -p.val_acc))
            raise UserError(f"--max-latency-ms {max_latency_ms:g}: no completed trial of study {name!r} is that fast; "
                            f"the fastest available latency is {fastest.latency_ms:.4g} ms (trial {fastest.number}, "
                            f"val acc {fastest.val_acc:.2%}). Raise the limit or use --pick fastest.")
    assert chosen is not None  # a non-empty front always has a knee and a fastest point
    return chosen.number, why


def _frozen_trial(study: optuna.Study, number: int) -> FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    what = f"study {study.study_name!r} trial {number}"
    completed = [t.number for t in trials if t.state == TrialState.COMPLETE]
    listing = f"completed trials: {_short_list(completed)}" if completed else "the study has no completed trial yet"
    if number not in by_number:
        span = f"trials 0..{max(by_number)}" if by_number else "no trials"
        raise UserError(f"{what} does not exist (the study has {span}); {listing}")
    return by_number[number]


def _short_list(numbers: list[int], n: int = 12) -> str:
    text = ", ".join(str(x) for x in numbers[:n])
    return text + (f", ... ({len(numbers)} in all)" if len(numbers) > n else "")


def load_trial(study: optuna.Study, number: int, root: Path) -> tuple[nn.Module, dict[str, Any], FrozenTrial]:
    """The trained student of a COMPLETE trial, rebuilt from its checkpoint: (model in eval mode, config, trial).

    Any other state, a missing trial, or a missing/corrupt/mismatching checkpoint is a UserError naming the
    study and the trial.
    """
    from autokd.study import scaleout
    from autokd.study.store import study_dir

    ft = _frozen_trial(study, number)
    what = f"study {study.study_name!r} trial {number}"
    state = "WAITING" if ft.state == TrialState.WAITING else trial_state(ft)
    if state != State.COMPLETE:
        reason = outcome_reason(ft)
        still = {"RUNNING": "still RUNNING", "WAITING": "WAITING (queued, not started)"}.get(state, state)
        completed = [t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        listing = (f"completed trials: {_short_list(completed)} (or use --pick knee)" if completed
                   else "the study has no completed trial yet")
        raise UserError(f"{what} is {still}{f' ({reason})' if reason else ''}: only a completed trial has a "
                        f"trained student to export; {listing}")
    trial_dir = study_dir(root, study.study_name) / "trials" / str(number)
    scaleout.fetch_trial_checkpoints(study, trial_dir.parent, [number])  # if trained on another machine
    model, cfg = load_trial_student(trial_dir, what, study=study.study_name, trial=number)
    return model, cfg, ft


# ---------------------------------------------------------------------------------------------------------
# Writing the formats


def export_torchscript(model: nn.Module, example: torch.Tensor) -> bytes:
    """TorchScript (``torch.jit.trace``) bytes of ``model``; checked for parity by the caller, not by the tracer."""
    with quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Verifying


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return float((a.double() - b.double()).abs().max().item())


def verify_files(folder: Path, formats: list[str], reference: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Max |logit difference| between each written format and ``reference`` on ``x`` (and on ``x[:1]``)."""
    with torch.inference_mode():
        refs = [reference(x), reference(x[:1])]
    out: dict[str, float] = {}
    reloaded = load_student(folder)
    with torch.inference_mode():
        out["safetensors"] = max(_max_diff(reloaded(b), r) for b, r in zip((x, x[:1]), refs))
    if "onnx" in formats:
        from autokd.latency.protocol import make_session

        sess = make_session(folder / ONNX_FILE, threads=max(1, torch.get_num_threads()))
        out["onnx"] = max(_max_diff(torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: b.numpy()})[0]), r)
                          for b, r in zip((x, x[:1]), refs))
    if "torchscript" in formats:
        with quiet_exporter():
            scripted = torch.jit.load(str(folder / TORCHSCRIPT_FILE), map_location="cpu")
        with torch.inference_mode():
            out["torchscript"] = max(_max_diff(scripted(b), r) for b, r in zip((x, x[:1]), refs))
    return out


# ---------------------------------------------------------------------------------------------------------
# The export itself


def _distillation(cfg: dict[str, Any], ft: FrozenTrial, study: optuna.Study) -> dict[str, Any]:
    from autokd.model.space import TrialParams

    flat = cfg.get("params") or sampled_params(ft.user_attrs)
    out: dict[str, Any] = {"teacher": cfg.get("teacher") or study.user_attrs.get(TEACHER_ATTR),
                           "teacher_id": study.user_attrs.get(TEACHER_ATTR),
                           "teacher_val_acc": study.user_attrs.get(TEACHER_VAL_ACC_ATTR)}
    try:
        tp = TrialParams.from_flat(flat)
        out.update({"loss": tp.loss, "loss_params": tp.loss_params, "optimizer": tp.optimizer, "lr": tp.lr,
                    "weight_decay": tp.weight_decay, "batch_size": tp.batch_size, "epochs": tp.epochs,
                    "lr_schedule": "cosine"})
    except (KeyError, TypeError, ValueError):
        pass  # params of an unexpected shape: the raw dict below still says everything
    out["epochs_trained"] = len(ft.user_attrs.get(CURVE_ATTR) or []) or None
    out["params"] = flat
    return out


def _build_config(model: nn.Module, cfg: dict[str, Any], ft: FrozenTrial, study: optuna.Study, data: DataSplits,
                  test_acc: float | None, formats: list[str], why: str, storage: str | None) -> dict[str, Any]:
    from autokd._version import __version__

    s = cfg["student"]
    in_chans, size = int(s["in_chans"]), int(s["input_size"])
    input_size = [in_chans, size, size]
    mean, std = [float(v) for v in data.mean], [float(v) for v in data.std]
    latency = dict(ft.user_attrs.get(LATENCY_ATTR) or {})
    from autokd.latency import retiming

    retimed = retiming.stored(study).get(ft.user_attrs.get(ARCH_KEY_ATTR) or "")
    if retimed:  # the front's re-timing (all candidates together) is the figure the report and the picks used
        latency = {**latency, "first_median_ms": latency.get("median_ms"), **retimed, "retimed": True}
    return {
        "format": EXPORT_FORMAT,
        "autokd_version": __version__,
        # timm hub keys: timm.create_model("local-dir:DIR", pretrained=True) reads these
        "architecture": s["model_name"],
        "num_classes": int(s["num_classes"]),
        "num_features": int(getattr(model, "num_features", 0)) or None,
        "model_args": {**s["kwargs"], "in_chans": in_chans},
        "label_names": list(data.class_names),
        "pretrained_cfg": {"input_size": input_size, "mean": mean, "std": std, "num_classes": int(s["num_classes"]),
                           "interpolation": "bilinear", "crop_pct": 1.0,
                           # timm passes img_size to the model when this is set: only models taking it may
                           "fixed_input_size": "img_size" in s["kwargs"]},
        # the same, flat, for people and other tools
        "in_chans": in_chans,
        "input_size": input_size,
        "mean": mean,
        "std": std,
        "preprocessing": "pixels scaled to [0, 1] (in_chans channels), resized to input_size x input_size "
                         "(bilinear, antialiased), then (x - mean) / std per channel; the model returns logits "
                         "over label_names",
        "student": {k: s[k] for k in ("family", "width", "depth", "key") if k in s},
        "metrics": {"val_acc": float(cfg["val_acc"]) if cfg.get("val_acc") is not None else ft.values[0],
                    "test_acc": test_acc,
                    "latency_ms": latency.get("median_ms", cfg.get("latency_ms")),
                    "latency": latency or None},
        "distillation": _distillation(cfg, ft, study),
        "source": {"study": study.study_name, "trial": ft.number, "selected_by": why, "storage": storage,
                   "dataset": cfg.get("dataset") or study.user_attrs.get(DATASET_ATTR),
                   "data_fingerprint": cfg.get("data_fingerprint"), "train_device": study.user_attrs.get(DEVICE_ATTR),
                   "arch_key": ft.user_attrs.get(ARCH_KEY_ATTR)},
        "files": {f: FORMAT_FILES[f] for f in formats},
    }


def export_trial(study: optuna.Study, number: int, root: Path, out: Path, formats: list[str] | str | None = None,
                 data: DataSplits | None = None, data_dir: str | None = None, why: str = "",
                 storage: str | None = None, int8: Int8Options | None = None, force: bool = False) -> ExportResult:
    """Export COMPLETE trial ``number`` of ``study`` to ``out``; every written format is verified for parity.

    ``out`` must be a new or empty folder unless ``force`` (:func:`check_out_dir`, before anything is loaded).

    Everything is written into a staging folder inside ``out`` first and checked there on a batch of the
    study's validation images: the weights reloaded through timm (:func:`load_student`), the ONNX file run by
    ONNX Runtime (CPU), the TorchScript file by ``torch.jit.load``; each must match the trial's own model
    within :data:`PARITY_ATOL`, else :class:`ParityError`. Only then do the files move into ``out``
    (``config.json`` last, so a complete config always describes the files next to it); the ONNX exporter used
    is recorded in ``config.json``.

    ``int8`` (:class:`autokd.export.int8.Int8Options`) adds ``model.int8.onnx`` once the fp32 files are verified; if ONNX
    Runtime cannot quantise the model, the fp32 export is still published and the QuantizationError raised after.
    """
    from autokd.report.build import study_data
    from autokd.report.evaluation import test_accuracy

    formats = parse_formats(formats)
    check_out_dir(Path(out), force, export_files(formats, int8 is not None))
    what = f"study {study.study_name!r} trial {number}"
    model, ckpt, ft = load_trial(study, number, root)
    if data is None:
        data = study_data(study, data_dir)
    s = ckpt["student"]
    if (data.in_chans, data.input_size) != (s["in_chans"], s["input_size"]):
        raise UserError(f"{what}: the student takes {s['in_chans']}x{s['input_size']}px inputs but the study's data "
                        f"loads as {data.in_chans}x{data.input_size}px; pass the --data-dir the study was run with")
    try:
        test_acc: float | None = test_accuracy(study, number, root, data)
    except ImportError:  # the evaluation loop is not part of this install; the export does not need it
        test_acc = None
    x = data.x_val[:PARITY_BATCH].detach().to("cpu", torch.float32).contiguous()
    if len(x) == 0:
        raise UserError(f"{what}: the study's validation split is empty; no real inputs to check the export on")

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".autokd-export-"))
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the output directory ({exc})") from exc
    result = ExportResult(out_dir=out, study=study.study_name, trial=number, files={}, parity={}, config={})
    try:
        config = _build_config(model, ckpt, ft, study, data, test_acc, formats, why, storage)
        atomic_save_tensors(staging / WEIGHTS_FILE, model.state_dict(), metadata={"format": "pt"})
        atomic_write_json(staging / CONFIG_FILE, config)  # load_student needs it for the reload check
        example = example_batch(x)
        if "onnx" in formats:
            t0 = time.perf_counter()
            blob, exporter, notes = export_onnx(model, example)
            atomic_write_bytes(staging / ONNX_FILE, blob)
            result.onnx_exporter = exporter
            result.messages += notes
            config["onnx"] = {"opset": ONNX_OPSET, "exporter": f"torch.onnx.export(dynamo={exporter == 'dynamo'})",
                              "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "dynamic_batch": True,
                              "seconds": round(time.perf_counter() - t0, 2)}
        if "torchscript" in formats:
            atomic_write_bytes(staging / TORCHSCRIPT_FILE, export_torchscript(model, example))
            config["torchscript"] = {"method": "torch.jit.trace", "torch_version": torch.__version__}
        parity = verify_files(staging, formats, model, x)
        result.parity = parity
        config["parity"] = {"max_abs_logit_diff": parity, "tolerance": PARITY_ATOL, "images": len(x),
                            "inputs": "validation images of the study's dataset (full batch and batch 1)"}
        bad = {f: d for f, d in parity.items() if not d <= PARITY_ATOL}
        if bad:
            raise ParityError(f"{what}: exported {', '.join(bad)} differ from the trial's PyTorch model by "
                              + ", ".join(f"{f} {d:.3g}" for f, d in bad.items())
                              + f" (max |logit difference| on {len(x)} validation images; limit {PARITY_ATOL:g}); "
                              f"nothing was written to {out}")
        int8_error = _int8_step(int8, staging, config, study, data, formats)
        atomic_write_json(staging / CONFIG_FILE, config)
        result.files = _publish(staging, out)
        result.config = config
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if int8_error is not None:
        raise int8_error
    return result


def _int8_step(int8: Int8Options, staging: Path, config: dict[str, Any], study: optuna.Study, data: DataSplits,
               formats: list[str]) -> Exception | None:
    """``model.int8.onnx`` into ``staging`` and its entry into ``config``; the QuantizationError if it fails."""
    if int8 is None:
        return None
    from autokd.export.int8 import export_int8
    from autokd.latency.quantize import QuantizationError
    from autokd.report.evaluation import study_views

    try:
        config["int8"] = export_int8(staging, ONNX_FILE, data, study_views(study), int8)
    except QuantizationError as exc:
        return QuantizationError(f"{exc}. The fp32 export ({', '.join(FORMAT_FILES[f] for f in formats)}) was "
                                 f"written and verified; no {INT8_FILE}", exc.operator, exc.nodes)
    config["files"]["int8"] = INT8_FILE
    return None


def _publish(staging: Path, out: Path) -> dict[str, Path]:
    """Move the verified files into ``out``, config.json last; remove a format file this export did not write
    only when an earlier autokd export in ``out`` wrote it (its config.json lists it), keep any other."""
    earlier = earlier_export_files(out)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # until the new config lands, the folder is not a complete export
    files: dict[str, Path] = {}
    for key, name in [*FORMAT_FILES.items(), ("int8", INT8_FILE)]:
        if (staging / name).is_file():
            os.replace(staging / name, out / name)
            files[key] = out / name
        elif name in earlier:
            # An INT8 or TorchScript file of the earlier export would sit beside a new model it was not made from.
            (out / name).unlink(missing_ok=True)
        elif (out / name).exists():
            logger.warning(f"warning: kept {out / name}: this export did not write it and no config.json of an "
                           f"earlier autokd export in {out} lists it, so it is not the exported student's; remove it "
                           "if it is stale")
    os.replace(staging / CONFIG_FILE, out / CONFIG_FILE)
    files["config"] = out / CONFIG_FILE
    return files


def format_summary(result: ExportResult) -> str:
    """The short text `autokd export` prints."""
    cfg = result.config
    m = cfg["metrics"]
    test = f", test acc {m['test_acc']:.2%}" if m.get("test_acc") is not None else ""
    lat = f", latency {m['latency_ms']:.4g} ms" if m.get("latency_ms") is not None else ""
    lines = [f"exported study {result.study!r} trial {result.trial} ({cfg['source']['selected_by']}): "
             f"{cfg['architecture']} [{cfg['student'].get('key', '')}], val acc {m['val_acc']:.2%}{test}{lat}",
             f"to {result.out_dir}/"]
    checks = {"safetensors": "reloaded through timm", "onnx": "ONNX Runtime (CPU)", "torchscript": "torch.jit.load"}
    for fmt, path in result.files.items():
        size = path.stat().st_size
        note = (f"{checks[fmt]}: max |logit diff| {result.parity[fmt]:.2e}" if fmt in result.parity else "")
        if fmt == "onnx":
            note += f"  (opset {ONNX_OPSET}, {result.onnx_exporter} exporter, dynamic batch)"
        lines.append(f"  {path.name:<22}{_human(size):>10}  {note}".rstrip())
    lines.append(f"parity on {cfg['parity']['images']} validation images, limit {PARITY_ATOL:g}: ok")
    if cfg.get("int8"):
        from autokd.export.int8 import summary_lines

        lines += summary_lines(cfg["int8"])
    for msg in result.messages:
        lines.append(f"note: {msg}")
    c, h, w = cfg["input_size"]
    lines += ["use it:",
              "  import autokd",
              f"  model = autokd.load_student({str(result.out_dir)!r})   # timm model, eval mode",
              f"  logits = model(x)   # x: float [B, {c}, {h}, {w}]: pixels in [0, 1], then (x - mean) / std "
              "from config.json"]
    if cfg.get("int8"):
        lines.append(f"  int8 = autokd.load_student({str(result.out_dir)!r}, int8=True)   # ONNX Runtime, same call")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def export_command(study_name: str | None, storage: str | None, root: Path, trial: int | None, pick: str | None,
                   max_latency_ms: float | None, out: Path, formats: str | None, data_dir: str | None,
                   int8: Int8Options | None = None, force: bool = False) -> ExportResult:
    """`autokd export`: choose the trial, export it, log the summary. A bad ``--format`` or ``--out`` (a file, a
    folder that holds files without ``force``) fails before the study is opened."""
    from autokd.report.build import resolve_study

    fmts = parse_formats(formats)
    if int8 is not None and "onnx" not in fmts:
        raise UserError(f"--int8 quantises model.onnx: add onnx to --format (got {','.join(fmts)})")
    check_out_dir(Path(out), force, export_files(fmts, int8 is not None))
    try:
        study = resolve_study(study_name, storage, Path(root))
    except UserError as exc:
        target = f"trial {trial}" if trial is not None else (f"--pick {pick}" if pick else "a trial")
        raise UserError(f"cannot export {target}: {exc}") from exc
    number, why = select_trial(study, trial=trial, pick=pick, max_latency_ms=max_latency_ms)
    logger.info(f"exporting study {study.study_name!r} trial {number} ({why}) as {', '.join(fmts)} ...")
    result = export_trial(study, number, Path(root), Path(out), fmts, data_dir=data_dir, why=why, storage=storage,
                          int8=int8, force=force)
    logger.info(format_summary(result))
    return result
