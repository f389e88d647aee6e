"""INT8 students: ONNX Runtime static quantisation of an exported ONNX student, checked on real images.

``export_int8`` is ``autokd export --int8`` (quantise the verified ``model.onnx``, calibrated on training
views, never the validation or test split; then measure both files); ``quantize_for_latency`` is the search's
``--latency-precision int8`` and imports no torch.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from autokd.errors import UserError
from autokd.export.layout import INT8_FILE
from autokd.latency.protocol import make_session
from autokd.latency.quantize import QUANT_SETTINGS, quantize_onnx, quantized_op_counts
from autokd.report.evaluation import DEFAULT_CALIBRATION_IMAGES, calibration_images, test_accuracies

if TYPE_CHECKING:

    from autokd.model.data import DataSplits, TrainViews


DEFAULT_MAX_DROP_PP = 1.0


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


# ---------------------------------------------------------------------------------------------------------
# Quantising


# ---------------------------------------------------------------------------------------------------------
# Running


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
                    "(autokd.latency.protocol): both models interleaved in shuffled rounds, minimum per round, median "
                    "over rounds, order-statistic interval")


def _ort_latency(models: Sequence[str | os.PathLike | bytes], threads: int = 1,
                 batch: int = 1) -> list[Any]:
    """protocol.Timing of each ONNX model, all timed together in one process (a noisy host's slow phases then
    hit every model alike), with the protocol a search times its students with."""
    from autokd.latency import protocol

    sessions = {str(i): protocol.make_session(m, threads) for i, m in enumerate(models)}
    timings = protocol.time_sessions(sessions, batch=batch)
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

    from autokd.utils.atomic import atomic_write_bytes

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
             f"({entry['calibration']['views']} training view(s)); QDQ, per-channel int8 weights "
             f"({'7-bit range' if entry.get('quantization', {}).get('reduce_range') else '8-bit'}), uint8 activations"]
    if entry.get("note"):
        lines.append(f"note: {entry['note']}")
    if entry.get("warning"):
        lines.append(f"warning: {entry['warning']}")
    return lines
