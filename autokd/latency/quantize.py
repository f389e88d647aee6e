"""ONNX Runtime static quantisation of a float ONNX model to INT8 (QDQ), shared by the search's
``--latency-precision int8`` (``quantize_for_latency``) and ``autokd export --int8``. Imports no torch."""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from autokd.errors import UserError, did_you_mean
from autokd.latency.protocol import make_session

if TYPE_CHECKING:
    import onnx


LATENCY_CALIBRATION_IMAGES = 8


CALIBRATION_BATCH = 32


# The quantiser's settings, recorded in config.json as they are passed (see _quantize). reduce_range (7-bit
# weights): on x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 products saturate, and a file quantised with
# 8-bit weights lost up to a third of its agreement with the fp32 model there (docs/int8.md); 7 bits are safe on
# every CPU, so one file behaves alike wherever it is exported or run.
QUANT_SETTINGS: dict[str, Any] = {"format": "QDQ", "per_channel": True, "weight_type": "QInt8",
                                  "activation_type": "QUInt8", "reduce_range": True, "calibrate_method": "MinMax"}


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear")  # plus any QLinear* / *Integer operator


QUANTISE_STAGE = "quantisation (quantize_static, then a first run of its result)"


class QuantizationError(RuntimeError):
    """ONNX Runtime could not quantise the model (``operator``: the op type it fails on, when isolated)."""

    def __init__(self, message: str, operator: str | None = None, nodes: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.operator = operator
        self.nodes = list(nodes)


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
    Runtime fuses into integer kernels), per-channel int8 weights in the reduced (7-bit) range, uint8
    activations (what ONNX Runtime's documentation recommends for x86 CPUs), MinMax calibration. The result is
    loaded and run once by ONNX Runtime before it is returned. Any failure raises :class:`QuantizationError`
    naming the operator ONNX Runtime cannot quantise, isolated by quantising again without each operator type
    (when it can be).
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
                            reduce_range=QUANT_SETTINGS["reduce_range"],
                            calibrate_method=CalibrationMethod.MinMax, **kwargs)
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
