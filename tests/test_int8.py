"""INT8 export on a tiny real study: real digits, real (briefly trained) timm students, real ONNX Runtime quantiser.

The study is built as in test_export.py (ask/tell with the attributes the search sets); its space has 3 training
views, so the calibration images go through the same views as the students' training batches.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import optuna
import pytest
import torch
from test_export import _params
from torch import nn

import autokd
from autokd.cli import main
from autokd.errors import UserError
from autokd.export import student as export
from autokd.latency import quantize
from autokd.model.checkpoint import write_checkpoint
from autokd.model.data import TrainViews
from autokd.model.students import build_from_spec, resolve_student
from autokd.report import evaluation
from autokd.study.store import make_storage, study_dir

STUDY = "q"
INPUT_SIZE = 16
TRAIN_LIMIT = 300
VIEWS = 3
# a convnet and a transformer: (family, width, AdamW learning rate, steps of 32 images)
STUDENTS = {0: ("resnet", 0.25, 1e-2, 60), 1: ("vit", 0.5, 3e-3, 150)}


def _train(model: nn.Module, data: Any, lr: float, steps: int) -> nn.Module:
    """Real training, short: enough for the convnet to reach ~85 % and the ViT ~50 % validation accuracy."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data.y_train), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> Any:
    from autokd.model.data import load_dataset

    return load_dataset("digits", input_size=INPUT_SIZE, seed=0, train_limit=TRAIN_LIMIT)


@pytest.fixture(scope="module")
def study_root(tmp_path_factory: pytest.TempPathFactory, digits: Any) -> Path:
    root = tmp_path_factory.mktemp("studies")
    study = optuna.create_study(study_name=STUDY, storage=make_storage(None, root), directions=["maximize", "minimize"])
    for key, value in {"dataset": digits.name, "data_fingerprint": digits.fingerprint, "input_size": INPUT_SIZE,
                       "train_limit": TRAIN_LIMIT, "teacher": "resnet18@abc", "space": {"views": VIEWS}}.items():
        study.set_user_attr(key, value)
    for number, (family, width, lr, steps) in STUDENTS.items():
        trial = study.ask()
        assert trial.number == number
        params = _params(family, width)
        spec = resolve_student(family, width, 0.25, digits.num_classes, digits.in_chans, INPUT_SIZE)
        trial.set_user_attr("params", params.flat())
        trial.set_user_attr("arch_key", spec.key)
        trial.set_user_attr("latency", {"median_ms": 0.1 * (number + 1), "iqr_ms": 0.01, "runs": 10,
                                        "batch_size": 1, "threads": 1, "device": "cpu:test"})
        trial.set_user_attr("curve", [0.5, 0.9])
        torch.manual_seed(100 + number)  # fixed initial weights, whatever earlier tests drew
        model = _train(build_from_spec(spec), digits, lr, steps)
        write_checkpoint(model, {"student": spec.to_dict(), "params": params.flat(), "study": STUDY, "trial": number,
                                 "val_acc": 0.9, "latency_ms": 0.1 * (number + 1), "dataset": digits.name,
                                 "data_fingerprint": digits.fingerprint},
                         study_dir(root, STUDY) / "trials" / str(number))
        trial.set_user_attr("autokd_state", "COMPLETE")
        study.tell(trial, [0.9 - 0.01 * number, 0.1 * (number + 1)])
    return root


def _cli(root: Path, *args: str) -> int:
    return main(["--root", str(root), "export", "--study", STUDY, *args])


@pytest.fixture(scope="module")
def exported(study_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """`autokd export --int8` (CLI, default calibration) of both students: kind -> (folder, printed summary)."""
    import contextlib
    import io

    base = tmp_path_factory.mktemp("exports")
    out: dict[str, tuple[Path, str]] = {}
    for number, (family, *_) in STUDENTS.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = _cli(study_root, "--trial", str(number), "--format", "onnx", "--int8", "--out", str(base / family))
        assert rc == 0, buf.getvalue()
        out[family] = (base / family, buf.getvalue())
    return out


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_int8_file_quantised_loads_plainly_and_agrees(exported: dict, digits: Any, kind: str) -> None:
    import onnxruntime as ort

    folder, text = exported[kind]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.int8.onnx", "model.onnx",
                                                        "model.safetensors"]
    ops = {n.op_type for n in onnx.load(str(folder / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in onnx.load(str(folder / "model.onnx"))
                                                         .graph.node}
    # plain onnxruntime, as a user would run it
    sess = ort.InferenceSession(str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    x = digits.x_val.numpy()
    int8_pred = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)
    with torch.inference_mode():
        fp32_pred = export.load_student(folder)(digits.x_val).argmax(1).numpy()
    agreement = float((int8_pred == fp32_pred).mean())
    assert len(x) >= 300 and agreement >= 0.95, agreement
    # a real classifier, not one stuck on a class (where agreeing would be trivial)
    assert float((fp32_pred == digits.y_val.numpy()).mean()) > 0.4 and len(set(fp32_pred.tolist())) >= 8

    cfg = json.loads((folder / "config.json").read_text())
    q = cfg["int8"]
    assert cfg["files"]["int8"] == "model.int8.onnx" and q["file"] == "model.int8.onnx"
    assert q["test_images"] == len(digits.y_test) and 0.4 < q["fp32_test_acc"] <= 1 and 0 < q["test_acc"] <= 1
    assert q["drop_pp"] == pytest.approx((q["fp32_test_acc"] - q["test_acc"]) * 100, abs=1e-3)
    assert q["agreement"] >= 0.95 and q["max_drop_pp"] == 1.0
    assert q["size_bytes"] == (folder / "model.int8.onnx").stat().st_size
    assert q["fp32_size_bytes"] == (folder / "model.onnx").stat().st_size
    assert q["size_bytes"] < q["fp32_size_bytes"]
    assert q["latency_ms"] > 0 and q["fp32_latency_ms"] > 0
    assert q["latency_ratio"] == pytest.approx(q["latency_ms"] / q["fp32_latency_ms"])
    assert q["calibration"]["images"] == 256 and q["calibration"]["split"] == "train"
    assert q["calibration"]["views"] == VIEWS
    assert q["quantization"]["format"] == "QDQ" and q["quantization"]["per_channel"] is True
    assert q["quantized_ops"]["QuantizeLinear"] > 0
    # the printed summary has both accuracies, both latencies and how to load it
    assert f"int8: test acc {q['test_acc']:.2%} vs fp32 {q['fp32_test_acc']:.2%}" in text
    assert "model.int8.onnx" in text and "latency" in text and "load_student(" in text and "int8=True" in text
    assert ("warning:" in text) == (q["drop_pp"] > 1.0)


def test_load_student_int8_call_convention(exported: dict, digits: Any) -> None:
    import onnxruntime as ort

    folder, _ = exported["resnet"]
    model = autokd.load_student(folder, int8=True)
    assert model.eval() is model
    x = digits.x_val[:7]
    out_t = model(x)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (7, 10) and out_t.dtype == torch.float32
    out_np = model(x.numpy())
    assert isinstance(out_np, np.ndarray) and np.array_equal(out_np, out_t.numpy())
    assert np.array_equal(model(x.double().numpy()), out_np)  # float64 in: cast, as a model user expects
    plain = ort.InferenceSession(str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(plain.run(None, {"input": x.numpy()})[0], out_np, atol=1e-6)
    with pytest.raises(ValueError, match=r"takes a float batch \[B, 1, 16, 16\], got shape \(1, 16, 16\)"):
        model(x[0])
    with pytest.raises(UserError, match="model.int8.onnx is missing.*--int8"):
        autokd.load_student(_fp32_only(folder), int8=True)


def _fp32_only(folder: Path) -> Path:
    import shutil

    other = folder.parent / "fp32-only"
    if not other.exists():
        shutil.copytree(folder, other)
        (other / "model.int8.onnx").unlink()
    return other


def test_max_int8_drop_warning(study_root: Path, digits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    """A real accuracy drop: calibration images scaled down 100x give activation ranges far too narrow, so the
    INT8 model saturates. The file is still written, exit 0, and the warning names both accuracies."""
    import autokd.report.build as study_report

    dim = dataclasses.replace(digits, x_train=digits.x_train * 0.01)
    monkeypatch.setattr(study_report, "study_data", lambda study, data_dir=None: dim)
    out = tmp_path / "dim"
    rc = _cli(study_root, "--trial", "0", "--format", "onnx", "--int8", "--calibration-images", "64",
              "--max-int8-drop", "0.5", "--out", str(out))
    text = capsys.readouterr().out
    assert rc == 0
    q = json.loads((out / "config.json").read_text())["int8"]
    assert q["drop_pp"] > 0.5 and q["calibration"]["images"] == 64 and q["max_drop_pp"] == 0.5
    expected = (f"warning: INT8 test accuracy {q['test_acc']:.2%} is {q['drop_pp']:.2f} points below the fp32 "
                f"model's {q['fp32_test_acc']:.2%}")
    assert expected in text and "more than --max-int8-drop 0.5" in text
    assert q["warning"].startswith(expected[len("warning: "):])
    assert (out / "model.int8.onnx").is_file()


class _GroupedConvTranspose(nn.Module):
    """The student plus a branch ONNX Runtime cannot quantise (a grouped ConvTranspose: per-channel scales do not
    fit its weight layout), weighted 0 so the fp32 export still matches the student exactly."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.up = nn.ConvTranspose2d(4, 4, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.up(x.repeat(1, 4, 1, 1)).mean(dim=(1, 2, 3))
        return self.student(x) + 0.0 * side[:, None]


def test_quantisation_failure_leaves_fp32_export(study_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # An earlier export's INT8 file, listed by its config.json: the new export (with --force) removes it, as it
    # belongs to another model; an INT8 file no autokd config lists would be kept (tests/test_export.py).
    (out / "model.int8.onnx").write_bytes(b"stale int8 file of an older export")
    (out / "config.json").write_text(json.dumps({"format": export.EXPORT_FORMAT, "files": {
        "safetensors": "model.safetensors", "onnx": "model.onnx", "int8": "model.int8.onnx"}}))
    real = export.export_onnx
    # The wrapper takes the student's mode: the exporter restores the wrapper's mode on all of it afterwards, and
    # a fresh wrapper (training) would leave the student the parity check then runs in training mode.
    monkeypatch.setattr(export, "export_onnx", lambda model, example: real(
        _GroupedConvTranspose(model).train(model.training), example))
    rc = _cli(study_root, "--trial", "0", "--format", "onnx", "--int8", "--out", str(out), "--force")
    err = capsys.readouterr().err
    assert rc == 1
    assert "could not quantise the model at operator ConvTranspose" in err
    assert "fp32 export (model.safetensors, model.onnx) was written and verified; no model.int8.onnx" in err
    # the fp32 export is complete and consistent; nothing INT8, stale or staged, is left
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert "int8" not in cfg and "int8" not in cfg["files"] and cfg["parity"]["max_abs_logit_diff"]["onnx"] <= 1e-4
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "ConvTranspose" in ops  # the failure was provoked by the real operator in the real file


def test_quantize_onnx_names_the_operator(digits: Any) -> None:
    model = _GroupedConvTranspose(build_from_spec(resolve_student("resnet", 0.25, 0.25, 10, 1, INPUT_SIZE))).eval()
    blob = export.export_onnx(model, digits.x_val[:2])[0]
    with pytest.raises(quantize.QuantizationError) as info:
        quantize.quantize_onnx(blob, digits.x_train[:16].numpy())
    assert info.value.operator == "ConvTranspose" and len(info.value.nodes) == 1
    assert "ValueError: operands could not be broadcast" in str(info.value)


def test_quantize_for_latency_needs_no_data(digits: Any) -> None:
    import onnxruntime as ort

    model = build_from_spec(resolve_student("mobilenetv3", 0.25, 0.25, 10, 1, INPUT_SIZE)).eval()
    blob = export.export_onnx(model, digits.x_val[:2])[0]
    q = quantize.quantize_for_latency(blob, (1, INPUT_SIZE, INPUT_SIZE))
    counts = quantize.quantized_op_counts(q)
    assert counts.get("QuantizeLinear", 0) > 0 and counts.get("DequantizeLinear", 0) > 0
    assert quantize.quantized_op_counts(blob) == {}
    sess = ort.InferenceSession(q, providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": digits.x_val[:3].numpy()})[0].shape == (3, 10)
    assert q == quantize.quantize_for_latency(blob, (1, 1, INPUT_SIZE, INPUT_SIZE))  # seeded: the same file
    # random calibration images change the scales, not the graph that is timed
    real = quantize.quantize_onnx(blob, digits.x_train[:64].numpy())

    def graph(b: bytes) -> list[tuple[str, int, int]]:
        return [(n.op_type, len(n.input), len(n.output)) for n in onnx.load_from_string(b).graph.node]

    assert graph(q) == graph(real) and q != real
    with pytest.raises(ValueError, match="input_shape"):
        quantize.quantize_for_latency(blob, (INPUT_SIZE, INPUT_SIZE))


def test_latency_precision_values() -> None:
    assert quantize.validate_latency_precision("INT8") == "int8" and quantize.validate_latency_precision(None) == "fp32"
    with pytest.raises(UserError, match=r"--latency-precision 'int9'.*did you mean 'int8'.*valid: fp32, int8"):
        quantize.validate_latency_precision("int9")


def test_calibration_images_are_training_views(digits: Any) -> None:
    views = TrainViews(num_views=VIEWS, seed=0)
    x = evaluation.calibration_images(digits, views, 10)
    assert x.shape == (10, 1, INPUT_SIZE, INPUT_SIZE) and x.dtype == np.float32
    order = torch.randperm(len(digits.y_train), generator=torch.Generator().manual_seed(0))[:10]
    for k in range(10):
        idx = order[k:k + 1]
        expected = views.apply(digits.x_train[idx], idx, k % VIEWS)
        assert np.array_equal(x[k:k + 1], expected.numpy())
    assert not np.array_equal(x[1], digits.x_train[order[1]].numpy())  # view 1 moved the image
    assert len(evaluation.calibration_images(digits, views, 10_000)) == len(digits.y_train)  # capped at the split


@pytest.mark.parametrize("args,expect", [
    (["--calibration-images", "8"], "--calibration-images only applies with --int8"),
    (["--max-int8-drop", "2"], "--max-int8-drop only applies with --int8"),
    (["--int8", "--max-int8-drop", "-1"], "--max-int8-drop -1.0: must be a number >= 0"),
    (["--int8", "--format", "torchscript"], "--int8 quantises model.onnx: add onnx to --format"),
])
def test_bad_int8_flags_exit_2(study_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                               expect: str) -> None:
    rc = _cli(study_root, "--trial", "0", *args, "--out", str(tmp_path / "o"))
    assert rc == 2
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_trial_int8_accuracy_for_the_report(study_root: Path, exported: dict, digits: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What a --latency-precision int8 report will show per front member: the same figures as `export --int8`,
    computed once and cached beside the trial's checkpoint."""
    study = optuna.load_study(study_name=STUDY, storage=make_storage(None, study_root))
    result = evaluation.trial_int8_accuracy(study, 0, study_root, digits)
    q = json.loads((exported["resnet"][0] / "config.json").read_text())["int8"]
    assert result["fp32_test_acc"] == q["fp32_test_acc"] and result["test_acc"] == q["test_acc"]
    assert result["agreement"] == q["agreement"] and result["test_images"] == len(digits.y_test)
    assert (study_dir(study_root, STUDY) / "trials" / "0" / evaluation.INT8_ACC_FILE).is_file()

    def no_quantising(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("quantised again instead of reading the cache")

    monkeypatch.setattr(evaluation, "quantize_onnx", no_quantising)
    assert evaluation.trial_int8_accuracy(study, 0, study_root, digits) == result
