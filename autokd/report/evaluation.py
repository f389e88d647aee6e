"""Front members evaluated once on the held-out test split, cached beside their checkpoints: the PyTorch
student (``test_accuracy``) and, for ``--latency-precision int8`` studies and ``autokd export --int8``, the
fp32 and INT8 ONNX models under ONNX Runtime on calibration images of the training views."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autokd.errors import UserError
from autokd.latency.protocol import make_session
from autokd.latency.quantize import quantize_onnx
from autokd.model.checkpoint import load_trial_student
from autokd.study.store import study_dir
from autokd.utils.atomic import atomic_write_json

if TYPE_CHECKING:
    import optuna

    from autokd.model.data import DataSplits, TrainViews


DEFAULT_CALIBRATION_IMAGES = 256


EVAL_BATCH = 256


def study_views(study: optuna.Study) -> TrainViews:
    """The training views of a study's students (its space's ``views``), as :class:`autokd.data.TrainViews`."""
    from autokd.model.data import TrainViews
    from autokd.study.record import SPACE_ATTR

    space = study.user_attrs.get(SPACE_ATTR) or {}
    return TrainViews(num_views=int(space.get("views", 0) or 0), seed=0)  # as autokd.search.run builds them


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


def predict(session: Any, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Logits of ``session`` for the images ``x`` (float32 NCHW), in batches."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


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

    from autokd.latency.onnx_export import example_batch, export_onnx
    from autokd.model.checkpoint import load_trial_student
    from autokd.study.store import study_dir
    from autokd.utils.atomic import atomic_write_json

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


def test_accuracy(study: optuna.Study, number: int, root: Path, data: DataSplits) -> float:
    """Test accuracy of a completed trial's checkpoint, evaluated once and cached next to it.

    A missing, corrupt or mismatching checkpoint is a UserError naming the file."""
    from autokd.model.train import evaluate

    trial_dir = study_dir(root, study.study_name) / "trials" / str(number)
    cache = trial_dir / "test_acc.json"
    if cache.is_file():
        return float(json.loads(cache.read_text())["test_acc"])
    model = load_trial_student(trial_dir, f"study {study.study_name!r} trial {number}")[0]
    # evaluate() runs on the data's device (the GPU in a CUDA search): the model must be there too.
    acc = float(evaluate(model.to(data.x_test.device), data.x_test, data.y_test))
    atomic_write_json(cache, {"test_acc": acc, "data_fingerprint": data.fingerprint})
    return acc
