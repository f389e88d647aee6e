"""INT8 students: ONNX Runtime static quantisation of an exported ONNX student, checked on real images.

``export_int8`` is ``autokd export --int8`` (quantise the verified ``model.onnx``, calibrated on training
views, never the validation or test split; then measure both files); ``quantize_for_latency`` is the search's
``--latency-precision int8`` and imports no torch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from autokd.errors import UserError, did_you_mean
from autokd.ort_timing import make_session

if TYPE_CHECKING:
    import onnx
    import optuna

    from autokd.data import DataSplits, TrainViews


INT8_FILE = "model.int8.onnx"
DEFAULT_CALIBRATION_IMAGES = 256
DEFAULT_MAX_DROP_PP = 1.0
LATENCY_CALIBRATION_IMAGES = 8
CALIBRATION_BATCH = 32
EVAL_BATCH = 256
# The quantiser's settings, recorded in config.json as they are passed (see _quantize).
QUANT_SETTINGS: dict[str, Any] = {"format": "QDQ", "per_channel": True, "weight_type": "QInt8",
                                  "activation_type": "QUInt8", "reduce_range": False, "calibrate_method": "MinMax"}
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear")  # plus any QLinear* / *Integer operator
QUANTISE_STAGE = "quantisation (quantize_static, then a first run of its result)"


class QuantizationError(RuntimeError):
    """ONNX Runtime could not quantise the model (``operator``: the op type it fails on, when isolated)."""

    def __init__(self, message: str, operator: str | None = None, nodes: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.operator = operator
        self.nodes = list(nodes)


@dataclass(frozen=True)
class Int8Options:
    """``autokd export --int8`` settings."""

    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    max_drop_pp: float = DEFAULT_MAX_DROP_PP


def int8_options(enabled: bool, calibration_images: int | None = None,
                 max_drop_pp: float | None = None) -> Int8Options | None:
    """Validated options from the CLI flags (None when ``--int8`` is off); bad values raise UserError."""
    if not enabled:
        given = [flag for flag, v in (("--calibration-images", calibration_images), ("--max-int8-drop", max_drop_pp))
                 if v is not None]
        if given:
            verb, it = ("apply", "them") if len(given) > 1 else ("applies", "it")
            raise UserError(f"{' and '.join(given)} only {verb} with --int8 (quantised export); add --int8 or "
                            f"drop {it}")
        return None
    n = DEFAULT_CALIBRATION_IMAGES if calibration_images is None else calibration_images
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--calibration-images {n!r}: must be an integer >= 1 (training images used to calibrate "
                        f"the INT8 model; default {DEFAULT_CALIBRATION_IMAGES})")
    drop = DEFAULT_MAX_DROP_PP if max_drop_pp is None else float(max_drop_pp)
    if not (np.isfinite(drop) and drop >= 0):
        raise UserError(f"--max-int8-drop {max_drop_pp!r}: must be a number >= 0 (accuracy points the INT8 model may "
                        f"lose before a warning; default {DEFAULT_MAX_DROP_PP:g})")
    return Int8Options(calibration_images=n, max_drop_pp=drop)


# ---------------------------------------------------------------------------------------------------------
# Calibration images


def study_views(study: optuna.Study) -> TrainViews:
    """The training views of a study's students (its space's ``views``), as :class:`autokd.data.TrainViews`."""
    from autokd.data import TrainViews

    space = study.user_attrs.get("space") or {}
    return TrainViews(num_views=int(space.get("views", 0) or 0), seed=0)  # as autokd.search.run_search builds them


def calibration_images(data: DataSplits, views: TrainViews, n: int, seed: int = 0) -> np.ndarray:
    """``n`` training images (float32 NCHW) preprocessed as in training: a seeded random choice of the training
    split, image k shown in view k mod the number of views (view 0 is the image itself)."""
    import torch

    n = min(int(n), len(data.y_train))
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[:n]
    x_train = data.x_train.detach().to("cpu", torch.float32)
    rows = x_train[order].clone()
    for view in range(1, views.count):
        at = torch.arange(view, n, views.count)
        rows[at] = views.apply(x_train[order[at]], order[at], view)
    return rows.contiguous().numpy()


# ---------------------------------------------------------------------------------------------------------
# Quantising


@contextlib.contextmanager
def _quiet_quantiser() -> Iterator[None]:
    # The quantiser logs through the root logger (e.g. per-channel axis notes on LayerNorm scales) and ORT's
    # sessions warn about initializers they drop; the outcome is checked on real images instead.
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)  # ONNX Runtime's default (warnings)


class _Batches(CalibrationDataReader):
    """CalibrationDataReader over an image array (a fresh one per quantiser call: readers are single-pass)."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = CALIBRATION_BATCH) -> None:
        self._it = iter([{input_name: images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _input_name(model: onnx.ModelProto) -> str:
    initializers = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


def quantize_onnx(onnx_bytes: bytes, calibration: np.ndarray) -> bytes:
    """INT8 (QDQ) ONNX bytes of a float ONNX model, calibrated on ``calibration`` (float32 NCHW images).

    The recipe: the quantiser's pre-processing (``quant_pre_process``: symbolic shape inference and graph
    optimisation), then ``quantize_static`` in QDQ format (QuantizeLinear/DequantizeLinear pairs that ONNX
    Runtime fuses into integer kernels), per-channel int8 weights, uint8 activations (what ONNX Runtime's
    documentation recommends for x86 CPUs), MinMax calibration. The result is loaded and run once by ONNX
    Runtime before it is returned. Any failure raises :class:`QuantizationError` naming the operator ONNX
    Runtime cannot quantise, isolated by quantising again without each operator type (when it can be).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration images must be a non-empty NCHW array, got shape {calibration.shape}")
    with tempfile.TemporaryDirectory(prefix="autokd-int8-") as tmp, _quiet_quantiser():
        src, pre, dst = (Path(tmp) / n for n in ("model.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(onnx_bytes)
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as exc:  # noqa: BLE001 - any failure of the quantiser is reported with its operator
            raise _failure("pre-processing (quant_pre_process)", exc, onnx.load(str(src))) from exc
        model = onnx.load(str(pre))
        name = _input_name(model)

        def attempt(images: np.ndarray, **kwargs: Any) -> None:
            quantize_static(str(pre), str(dst), _Batches(images, name), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            reduce_range=False, calibrate_method=CalibrationMethod.MinMax, **kwargs)
            _run_once(dst, name, images[:2])

        try:
            attempt(calibration)
        except Exception as exc:  # noqa: BLE001
            # The retries only need to know whether the quantiser fails: a few images calibrate them. (A
            # calibration cache cannot be shared: excluding an operator changes the tensors that need ranges.)
            raise _isolate(exc, model, lambda **kw: attempt(calibration[:CALIBRATION_BATCH], **kw)) from exc
        return dst.read_bytes()


LATENCY_PRECISIONS = ("fp32", "int8")


def validate_latency_precision(value: str | None) -> str:
    """``--latency-precision`` value (default fp32), lower-cased; anything else is a UserError."""
    if value is None:
        return LATENCY_PRECISIONS[0]
    name = str(value).strip().lower()
    if name not in LATENCY_PRECISIONS:
        raise UserError(f"--latency-precision {value!r}: unknown precision{did_you_mean(name, LATENCY_PRECISIONS)}; valid: "
                        f"{', '.join(LATENCY_PRECISIONS)} (int8: a student's latency is that of its INT8 ONNX model)")
    return name


def quantize_for_latency(onnx_bytes: bytes, input_shape: Sequence[int], images: int = LATENCY_CALIBRATION_IMAGES,
                         seed: int = 0) -> bytes:
    """INT8 bytes of ``onnx_bytes`` for timing only: calibrated on a few random images of ``input_shape``
    ((C, H, W) or (N, C, H, W), N ignored). The calibration sets the scales, not the graph, so the speed is that
    of a model calibrated on real images; its accuracy is not."""
    shape = tuple(int(s) for s in input_shape)[-3:]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")
    # Standard normal: the students take normalised inputs ((x - mean) / std), so this is their scale.
    x = np.random.default_rng(seed).standard_normal((max(1, images), *shape), dtype=np.float32)
    return quantize_onnx(onnx_bytes, x)


def _run_once(path: Path, input_name: str, x: np.ndarray) -> None:
    sess = make_session(path, threads=1)
    sess.run(None, {input_name: x})


def _failure(stage: str, exc: BaseException, model: onnx.ModelProto, operator: str | None = None,
             nodes: Sequence[str] = ()) -> QuantizationError:
    text = (str(exc).strip().splitlines() or [""])[0][:400]
    if operator is None:  # ONNX Runtime's own errors name the node: "... node with name 'X'"
        by_name = {n.name: n.op_type for n in model.graph.node if n.name}
        named = [n for n in by_name if f"'{n}'" in str(exc) or f" {n} " in f" {exc} "]
        if named:
            operator, nodes = by_name[named[0]], named[:3]
    where = f" at operator {operator}" + (f" (node {', '.join(nodes)})" if nodes else "") if operator else ""
    why = f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
    hint = ("; ONNX Runtime quantises the rest of the model without it" if operator else
            "; the failing operator could not be isolated")
    return QuantizationError(f"ONNX Runtime could not quantise the model{where} during {stage}: {why}{hint}",
                             operator=operator, nodes=nodes)


def _isolate(exc: BaseException, model: onnx.ModelProto, attempt: Callable[..., object], max_node_tries: int = 16) -> QuantizationError:
    """Name the operator behind ``exc``: the op type whose exclusion lets the rest quantise (then its node)."""
    op_types: list[str] = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            op_types.append(node.op_type)
    culprit = None
    for op in op_types:
        try:
            attempt(op_types_to_quantize=[t for t in op_types if t != op])
        except Exception:  # noqa: BLE001 - still failing: not this operator
            continue
        culprit = op
        break
    if culprit is None:
        return _failure(QUANTISE_STAGE, exc, model)
    names = [n.name for n in model.graph.node if n.op_type == culprit]
    nodes = names
    if 1 < len(names) <= max_node_tries:
        failing = []
        for name in names:
            try:
                attempt(nodes_to_exclude=[name])
            except Exception:  # noqa: BLE001
                continue
            failing.append(name)
        nodes = failing or names
    shown = nodes[:3] + ([f"... ({len(nodes)} in all)"] if len(nodes) > 3 else [])
    return _failure(QUANTISE_STAGE, exc, model, operator=culprit, nodes=shown)


def quantized_op_counts(onnx_bytes: bytes) -> dict[str, int]:
    """How many quantised operators a model holds, by type (QuantizeLinear, DequantizeLinear, QLinear*, ...)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load_from_string(onnx_bytes).graph.node:
        if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear") or node.op_type.endswith("Integer"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------------
# Running


def predict(session: Any, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Logits of ``session`` for the images ``x`` (float32 NCHW), in batches."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


class OrtStudent:
    """An exported student run by ONNX Runtime (CPU), called like :func:`autokd.load_student`'s model.

    ``model(x)`` takes a float batch ``[B, C, H, W]`` (preprocessed as ``config.json`` says) and returns the
    logits: a torch tensor for a torch tensor (on the input's device), a numpy array for anything else.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any] | None = None,
                 threads: int | None = None) -> None:
        self.path = Path(path)
        self.config = dict(config or {})
        self.session = make_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        size = self.config.get("input_size")
        self.input_size = tuple(int(v) for v in size) if size else None

    def __call__(self, x: Any) -> Any:
        is_torch = type(x).__module__.startswith("torch")
        if is_torch:
            import torch

            arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        else:
            arr = np.ascontiguousarray(x, dtype=np.float32)
        if arr.ndim != 4 or (self.input_size is not None and tuple(arr.shape[1:]) != self.input_size):
            want = f"[B, {', '.join(map(str, self.input_size))}]" if self.input_size else "[B, C, H, W]"
            raise ValueError(f"{self.path.name} takes a float batch {want}, got shape {tuple(arr.shape)}")
        out = self.session.run([self.output_name], {self.input_name: arr})[0]
        if is_torch:
            import torch

            return torch.from_numpy(out).to(x.device)
        return out

    def eval(self) -> OrtStudent:
        """No-op (the ONNX model is inference-only); returns self, as ``nn.Module.eval`` does."""
        return self

    def __repr__(self) -> str:
        return f"OrtStudent({str(self.path)!r}, architecture={self.config.get('architecture')!r})"


def load_int8_student(path: str | os.PathLike, threads: int | None = None) -> OrtStudent:
    """The INT8 model of an export directory (``model.int8.onnx`` + ``config.json``) as an :class:`OrtStudent`."""
    import json

    folder = Path(path)
    onnx_path, cfg_path = folder / INT8_FILE, folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"load_student({str(path)!r}, int8=True): not a directory; expected a folder written by "
                        f"`autokd export --int8`")
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} is missing: load_student(..., int8=True) needs a folder written by "
                        f"`autokd export ... --int8` (it holds {INT8_FILE} beside model.onnx)")
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise UserError(f"{cfg_path} is not a valid config ({exc})") from exc
    try:
        return OrtStudent(onnx_path, cfg if isinstance(cfg, dict) else {}, threads)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a damaged file
        raise UserError(f"{onnx_path} cannot be loaded by ONNX Runtime ({exc.__class__.__name__}: "
                        f"{(str(exc).splitlines() or [''])[0][:300]})") from exc


# ---------------------------------------------------------------------------------------------------------
# Timing


LATENCY_PROTOCOL = ("ONNX Runtime (CPU execution provider), batch 1, 1 thread, the search's protocol "
                    "(autokd.ort_timing): both models interleaved in shuffled rounds, minimum per round, median "
                    "over rounds, order-statistic interval")


def _ort_latency(models: Sequence[str | os.PathLike | bytes], threads: int = 1,
                 batch: int = 1) -> list[Any]:
    """ort_timing.Timing of each ONNX model, all timed together in one process (a noisy host's slow phases then
    hit every model alike), with the protocol a search times its students with."""
    from autokd import ort_timing

    sessions = {str(i): ort_timing.make_session(m, threads) for i, m in enumerate(models)}
    timings = ort_timing.time_sessions(sessions, batch=batch)
    return [timings[str(i)] for i in range(len(models))]


# ---------------------------------------------------------------------------------------------------------
# The export step


def export_int8(folder: Path, fp32_file: str, data: DataSplits, views: TrainViews, options: Int8Options) -> dict[str, Any]:
    """Quantise ``folder/fp32_file`` into ``folder/model.int8.onnx`` and measure both: the ``config.json`` entry.

    Calibrated on ``options.calibration_images`` training images, preprocessed exactly as in training (the
    training views the students saw, :class:`autokd.data.TrainViews`). Measured: accuracy of both files under
    ONNX Runtime on the full test split and their agreement, latency of both (same runtime, batch 1, 1 thread,
    interleaved rounds), file sizes.

    Raises :class:`QuantizationError` (nothing written) when ONNX Runtime cannot quantise the model.
    """
    import onnxruntime as ort

    from autokd.atomic import atomic_write_bytes

    t0 = time.perf_counter()
    fp32_path, int8_path = Path(folder) / fp32_file, Path(folder) / INT8_FILE
    calib = calibration_images(data, views, options.calibration_images)
    blob = quantize_onnx(fp32_path.read_bytes(), calib)
    quant_seconds = time.perf_counter() - t0
    atomic_write_bytes(int8_path, blob)

    acc = test_accuracies(fp32_path, int8_path, data)
    acc32, acc8, drop_pp = acc["fp32_test_acc"], acc["test_acc"], acc["drop_pp"]
    t32, t8 = _ort_latency([fp32_path, int8_path])
    lat32, lat8 = t32.median_ms, t8.median_ms
    entry: dict[str, Any] = {
        "file": INT8_FILE,
        **acc,
        "max_drop_pp": options.max_drop_pp,
        "latency_ms": lat8,
        "latency_interval_ms": [t8.low_ms, t8.high_ms],
        "fp32_latency_ms": lat32,
        "fp32_latency_interval_ms": [t32.low_ms, t32.high_ms],
        "latency_ratio": lat8 / lat32 if lat32 > 0 else None,
        "latency_protocol": LATENCY_PROTOCOL,
        "size_bytes": len(blob),
        "fp32_size_bytes": fp32_path.stat().st_size,
        "quantized_ops": quantized_op_counts(blob),
        "calibration": {"images": int(len(calib)), "requested": options.calibration_images, "split": "train",
                        "views": int(views.count), "seed": 0,
                        "preprocessing": "as in training: normalised training images, image k in training view "
                                         "k mod views (view 0 = the image itself)"},
        "quantization": {**QUANT_SETTINGS, "preprocess": "onnxruntime.quantization.shape_inference.quant_pre_process",
                         "onnxruntime": ort.__version__, "seconds": round(quant_seconds, 2)},
        "warning": None,
    }
    if drop_pp > options.max_drop_pp:
        entry["warning"] = (f"INT8 test accuracy {acc8:.2%} is {drop_pp:.2f} points below the fp32 model's "
                            f"{acc32:.2%} (ONNX Runtime, {acc['test_images']} test images): more than --max-int8-drop "
                            f"{options.max_drop_pp:g}; {INT8_FILE} was written anyway")
    if len(calib) < options.calibration_images:
        entry["note"] = (f"the training split has {len(calib)} images: calibrated on all of them "
                         f"(--calibration-images {options.calibration_images})")
    return entry


def test_accuracies(fp32_model: str | os.PathLike | bytes, int8_model: str | os.PathLike | bytes,
                    data: Any) -> dict[str, Any]:
    """Test accuracy of both models under ONNX Runtime on the full test split, the drop in points, and the share
    of test images where both predict the same class."""
    import onnxruntime as ort

    x_test = data.x_test.detach().cpu().float().numpy()
    y_test = data.y_test.detach().cpu().numpy()
    if len(y_test) == 0:
        raise UserError("the study's test split is empty: no images to measure the INT8 model's accuracy on")
    pred32 = predict(make_session(fp32_model, threads=None), x_test).argmax(1)
    pred8 = predict(make_session(int8_model, threads=None), x_test).argmax(1)
    acc32, acc8 = float((pred32 == y_test).mean()), float((pred8 == y_test).mean())
    return {"test_acc": acc8, "fp32_test_acc": acc32, "drop_pp": round((acc32 - acc8) * 100, 4),
            "agreement": float((pred32 == pred8).mean()), "test_images": int(len(y_test)),
            "accuracy_runtime": f"onnxruntime {ort.__version__} (CPU), full test split"}


INT8_ACC_FILE = "int8_test_acc.json"


def trial_int8_accuracy(study: optuna.Study, number: int, root: Path, data: DataSplits,
                        calibration_count: int = DEFAULT_CALIBRATION_IMAGES) -> dict[str, Any]:
    """fp32 and int8 test accuracy (ONNX Runtime) of a COMPLETE trial's student, as ``--int8`` exports it, computed
    once and cached beside its checkpoint (``trials/<n>/int8_test_acc.json``, keyed by data, views, calibration
    and ONNX Runtime version). For the report of a ``--latency-precision int8`` study: the front only, whose
    checkpoints the report has fetched first. Raises :class:`QuantizationError` if ONNX Runtime cannot quantise
    the student."""
    import json

    import onnxruntime as ort

    from autokd.atomic import atomic_write_json
    from autokd.checkpoint import load_trial_student
    from autokd.onnx_export import example_batch, export_onnx
    from autokd.study import study_dir

    views = study_views(study)
    key = {"data_fingerprint": data.fingerprint, "views": views.fingerprint, "calibration_images": calibration_count,
           "onnxruntime": ort.__version__}
    trial_dir = study_dir(Path(root), study.study_name) / "trials" / str(number)
    cache = trial_dir / INT8_ACC_FILE
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return dict(stored["result"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable: computed again
    model = load_trial_student(trial_dir, f"study {study.study_name!r} trial {number}", study=study.study_name,
                               trial=number)[0]
    fp32 = export_onnx(model, example_batch(data.x_val).detach().to("cpu").float())[0]  # as export_trial makes it
    int8 = quantize_onnx(fp32, calibration_images(data, views, calibration_count))
    result = test_accuracies(fp32, int8, data)
    atomic_write_json(cache, {"key": key, "result": result})
    return result


def summary_lines(entry: dict[str, Any]) -> list[str]:
    """What the export's printed summary says about the INT8 model."""
    ratio = entry.get("latency_ratio")
    speed = (f"x{1 / ratio:.2f} faster" if ratio and ratio < 1 else f"x{ratio:.2f} slower" if ratio else "")
    lines = [f"int8: test acc {entry['test_acc']:.2%} vs fp32 {entry['fp32_test_acc']:.2%} "
             f"(ONNX Runtime, {entry['test_images']} test images; drop {entry['drop_pp']:.2f} points, "
             f"--max-int8-drop {entry['max_drop_pp']:g}; same prediction on {entry['agreement']:.1%})",
             f"      latency {entry['latency_ms']:.4g} ms vs fp32 {entry['fp32_latency_ms']:.4g} ms ({speed}; batch 1, "
             f"1 thread, ONNX Runtime), size {entry['size_bytes'] / 1024:.1f} kB vs "
             f"{entry['fp32_size_bytes'] / 1024:.1f} kB",
             f"      calibrated on {entry['calibration']['images']} training images "
             f"({entry['calibration']['views']} training view(s)); QDQ, per-channel int8 weights, uint8 activations"]
    if entry.get("note"):
        lines.append(f"note: {entry['note']}")
    if entry.get("warning"):
        lines.append(f"warning: {entry['warning']}")
    return lines
