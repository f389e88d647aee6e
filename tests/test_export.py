"""autokd.export on a tiny real study: real digits data, real (briefly trained) timm students, real checkpoints.

The study is built directly (ask/tell with the user attributes the search sets) so no search has to run.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from conftest import Logged
from optuna.trial import TrialState

from autokd.cli import main
from autokd.errors import UserError
from autokd.export import student as export
from autokd.latency import onnx_export
from autokd.model.checkpoint import write_checkpoint
from autokd.model.space import TrialParams
from autokd.model.students import build_from_spec, resolve_student
from autokd.study.store import make_storage, study_dir

STUDY = "exp"
INPUT_SIZE = 16
TRAIN_LIMIT = 200

# trial number -> (state, student (family, width), val_acc, latency_ms, checkpoint damage)
#   front: 0 (0.80, 0.3 ms), 1 (0.90, 0.6), 10 (0.945, 1.9), 2 (0.95, 2.0)
#   knee = 1 (the ViT); best = 2; fastest within 1 pp = 10; under 1 ms = 1; under 0.5 ms = 0
PLAN: dict[int, tuple[str, tuple[str, float] | None, float | None, float | None, str | None]] = {
    0: ("COMPLETE", ("resnet", 0.25), 0.80, 0.3, None),
    1: ("COMPLETE", ("vit", 0.5), 0.90, 0.6, None),
    2: ("COMPLETE", ("resnet", 0.5), 0.95, 2.0, None),
    3: ("PRUNED", ("resnet", 0.25), None, 0.4, None),
    4: ("FAIL", ("resnet", 0.25), None, 0.4, None),
    5: ("INFEASIBLE", ("resnet", 1.0), None, 9.0, None),
    6: ("COMPLETE", ("resnet", 0.25), 0.50, 5.0, "no-weights"),
    7: ("COMPLETE", ("resnet", 0.25), 0.50, 5.0, "truncated"),
    8: ("COMPLETE", ("resnet", 0.25), 0.50, 5.0, "wrong-arch"),
    9: ("RUNNING", ("resnet", 0.25), None, 0.4, None),
    10: ("COMPLETE", ("resnet", 0.25), 0.945, 1.9, "no-dir"),
}


def _params(family: str, width: float) -> TrialParams:
    return TrialParams(family=family, width=width, depth=0.25, loss="kd",
                       loss_params={"temperature": 4.0, "alpha": 0.7}, optimizer="adamw", lr=0.01, weight_decay=5e-4,
                       batch_size=64, epochs=3)


def _train_briefly(model: torch.nn.Module, data: Any, steps: int = 12) -> torch.nn.Module:
    """A few real optimizer steps (weights and BatchNorm statistics move off their init), then the classifier is
    scaled so logits reach ~5: a fresh or barely trained tiny model gives logits of ~0.1, which would make the
    1e-4 parity check lax."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(data.y_train)
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        scale = 5.0 / model(data.x_val[:64]).abs().max().item()
        model.get_classifier().weight.mul_(scale)
        model.get_classifier().bias.mul_(scale)
    return model


@pytest.fixture(scope="module")
def digits() -> Any:
    from autokd.model.data import load_dataset

    return load_dataset("digits", input_size=INPUT_SIZE, seed=0, train_limit=TRAIN_LIMIT)


@pytest.fixture(scope="module")
def study_root(tmp_path_factory: pytest.TempPathFactory, digits: Any) -> Path:
    root = tmp_path_factory.mktemp("studies")
    storage = make_storage(None, root)  # the default journal under root, as `autokd search` uses
    study = optuna.create_study(study_name=STUDY, storage=storage, directions=["maximize", "minimize"])
    for key, value in {"dataset": digits.name, "data_fingerprint": digits.fingerprint, "input_size": INPUT_SIZE,
                       "train_limit": TRAIN_LIMIT, "teacher": "resnet18@abc123", "teacher_val_acc": 0.97,
                       "device": "cpu"}.items():
        study.set_user_attr(key, value)
    trials_dir = study_dir(root, STUDY) / "trials"
    for number, (state, student, val_acc, latency, damage) in PLAN.items():
        trial = study.ask()
        assert trial.number == number
        family, width = student
        params = _params(family, width)
        spec = resolve_student(family, width, 0.25, digits.num_classes, digits.in_chans, INPUT_SIZE)
        trial.set_user_attr("params", params.flat())
        trial.set_user_attr("arch_key", spec.key)
        trial.set_user_attr("latency", {"median_ms": latency, "iqr_ms": 0.01, "runs": 50, "batch_size": 1,
                                        "threads": 1, "device": "cpu:test"})
        if state == "RUNNING":
            continue
        if state != "COMPLETE":
            trial.set_user_attr("curve", [0.3])
            trial.set_user_attr("autokd_state", state)
            if state == "INFEASIBLE":
                trial.set_user_attr("infeasible_reason", f"latency {latency} ms > --max-latency-ms 5")
            if state == "FAIL":
                trial.set_user_attr("fail_reason", "error: RuntimeError: boom")
            study.tell(trial, state=TrialState.FAIL if state == "FAIL" else TrialState.PRUNED)
            continue
        trial.set_user_attr("curve", [val_acc / 2, val_acc])
        out = trials_dir / str(number)
        if damage != "no-dir":
            torch.manual_seed(100 + number)  # fixed initial weights, whatever earlier tests drew
            model = build_from_spec(spec)
            if number in (0, 1):  # the two students the parity tests export
                _train_briefly(model, digits)
            config = {"student": spec.to_dict(), "params": params.flat(), "study": STUDY, "trial": number,
                      "val_acc": val_acc, "latency_ms": latency, "teacher": "resnet18", "dataset": digits.name,
                      "data_fingerprint": digits.fingerprint}
            if damage == "wrong-arch":  # config says resnet 0.25, weights are of a wider resnet
                model = build_from_spec(resolve_student("resnet", 0.5, 0.25, digits.num_classes, digits.in_chans,
                                                        INPUT_SIZE))
            write_checkpoint(model, config, out)
            if damage == "no-weights":
                (out / "model.safetensors").unlink()
            if damage == "truncated":
                blob = (out / "model.safetensors").read_bytes()
                (out / "model.safetensors").write_bytes(blob[: len(blob) // 2])
        trial.set_user_attr("autokd_state", "COMPLETE")
        study.tell(trial, [val_acc, latency])
    # a second study with nothing completed, for --pick
    empty = optuna.create_study(study_name="empty", storage=storage, directions=["maximize", "minimize"])
    t = empty.ask()
    t.set_user_attr("autokd_state", "PRUNED")
    empty.tell(t, state=TrialState.PRUNED)
    return root


def _export(root: Path, out: Path, **kw: Any) -> export.ExportResult:
    args = {"study_name": STUDY, "storage": None, "root": root, "trial": None, "pick": None, "max_latency_ms": None,
            "out": out, "formats": "safetensors,onnx,torchscript", "data_dir": None}
    args.update(kw)
    return export.export_command(**args)


def _trial_model(root: Path, number: int) -> torch.nn.Module:
    study = optuna.load_study(study_name=STUDY, storage=make_storage(None, root))
    return export.load_trial(study, number, root)[0]


@pytest.fixture(scope="module")
def exported(study_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, export.ExportResult]:
    """Full exports (all three formats) of the convnet (trial 0) and the ViT (trial 1)."""
    base = tmp_path_factory.mktemp("exports")
    return {"resnet": _export(study_root, base / "resnet", trial=0), "vit": _export(study_root, base / "vit", trial=1)}


@pytest.mark.parametrize("kind,number", [("resnet", 0), ("vit", 1)])
@pytest.mark.slow
def test_export_reload_onnx_torchscript_parity(exported: dict, study_root: Path, digits: Any, kind: str,
                                               number: int) -> None:
    import onnxruntime as ort
    import timm

    result = exported[kind]
    out = result.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "model.safetensors",
                                                     "model.torchscript.pt"]  # no staging leftovers
    assert set(result.parity) == {"safetensors", "onnx", "torchscript"}
    assert all(d <= 1e-4 for d in result.parity.values()), result.parity
    assert result.onnx_exporter in ("dynamo", "legacy")

    # independent re-check on other real images, at a batch size the export never saw
    x = digits.x_val[40:45]
    with torch.inference_mode():
        ref = _trial_model(study_root, number)(x)
        assert ref.abs().max() > 2.0  # logits of a realistic scale
        assert torch.equal(export.load_student(out)(x), ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the TorchScript loader
            scripted = torch.jit.load(str(out / "model.torchscript.pt"))
        assert (scripted(x) - ref).abs().max().item() <= 1e-4
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(onnx_out - ref.numpy()).max() <= 1e-4
    # the config is timm's hub format too
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.inference_mode():
        assert torch.equal(timm_model(x), ref)


@pytest.mark.slow
def test_config_contents(exported: dict, digits: Any) -> None:
    result = exported["resnet"]
    cfg = json.loads((result.out_dir / "config.json").read_text())
    assert cfg == result.config
    assert cfg["architecture"] == "resnet18"
    assert cfg["model_args"]["layers"] == [1, 1, 1, 1] and cfg["model_args"]["in_chans"] == 1
    assert cfg["num_classes"] == 10 and cfg["in_chans"] == 1 and cfg["input_size"] == [1, INPUT_SIZE, INPUT_SIZE]
    assert cfg["mean"] == pytest.approx(list(digits.mean)) and cfg["std"] == pytest.approx(list(digits.std))
    assert cfg["pretrained_cfg"]["mean"] == cfg["mean"]
    assert cfg["label_names"] == list(digits.class_names)
    m = cfg["metrics"]
    assert m["val_acc"] == 0.80 and m["latency_ms"] == 0.3 and 0.0 <= m["test_acc"] <= 1.0
    kd = cfg["distillation"]
    assert kd["loss"] == "kd" and kd["loss_params"] == {"temperature": 4.0, "alpha": 0.7}
    assert (kd["optimizer"], kd["lr"], kd["weight_decay"], kd["batch_size"], kd["epochs"]) == ("adamw", 0.01, 5e-4,
                                                                                            64, 3)
    assert kd["teacher"] == "resnet18" and kd["epochs_trained"] == 2
    assert cfg["source"]["study"] == STUDY and cfg["source"]["trial"] == 0
    import autokd

    assert cfg["autokd_version"] == autokd.__version__
    assert cfg["onnx"]["opset"] >= 17 and cfg["onnx"]["dynamic_batch"] is True
    assert cfg["parity"]["images"] > 1 and cfg["parity"]["tolerance"] == 1e-4
    assert cfg["files"] == {"safetensors": "model.safetensors", "onnx": "model.onnx",
                            "torchscript": "model.torchscript.pt"}


def test_summary_is_printed(study_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["--root", str(study_root), "export", "--study", STUDY, "--pick", "knee", "--format", "torchscript",
               "--out", str(tmp_path / "knee")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "trial 1 (knee of the Pareto front)" in text
    assert "model.torchscript.pt" in text and "max |logit diff|" in text
    assert "autokd.load_student(" in text and "logits = model(x)" in text
    assert not (tmp_path / "knee" / "model.onnx").exists()
    cfg = json.loads((tmp_path / "knee" / "config.json").read_text())
    assert cfg["source"]["trial"] == 1 and cfg["model_args"]["embed_dim"] > 0  # the ViT


def test_selection(study_root: Path) -> None:
    study = optuna.load_study(study_name=STUDY, storage=make_storage(None, study_root))
    assert export.select_trial(study, pick="knee")[0] == 1
    assert export.select_trial(study, pick="best")[0] == 2
    assert export.select_trial(study, pick="fastest")[0] == 10
    assert export.select_trial(study, max_latency_ms=1.0)[0] == 1
    assert export.select_trial(study, max_latency_ms=0.5)[0] == 0
    with pytest.raises(UserError, match=r"fastest available latency is 0\.3 ms \(trial 0"):
        export.select_trial(study, max_latency_ms=0.1)
    with pytest.raises(UserError, match="exactly one"):
        export.select_trial(study, trial=1, pick="knee")


def test_max_latency_export(study_root: Path, tmp_path: Path) -> None:
    result = _export(study_root, tmp_path / "fast", max_latency_ms=0.5, formats="safetensors")
    assert result.trial == 0 and set(result.files) == {"safetensors", "config"}
    assert result.parity["safetensors"] == 0.0
    assert "most accurate under 0.5 ms" in result.config["source"]["selected_by"]


def test_pick_on_study_without_completed_trial(study_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"'empty' has no completed trial.*1 PRUNED"):
        _export(study_root, tmp_path / "x", study_name="empty", pick="knee")


@pytest.mark.parametrize("number,expect", [
    (3, "is PRUNED"), (4, r"is FAIL \(error: RuntimeError: boom\)"), (5, "is INFEASIBLE"), (9, "still RUNNING"),
    (99, "does not exist"), (6, "model.safetensors is missing"), (10, "config.json is missing"),
    (7, "model.safetensors is truncated or corrupt"), (8, "do not fit the architecture"),
])
def test_bad_exports(study_root: Path, tmp_path: Path, number: int, expect: str) -> None:
    with pytest.raises(UserError, match=expect) as info:
        _export(study_root, tmp_path / "out", trial=number)
    assert f"study '{STUDY}' trial {number}" in str(info.value)
    assert not (tmp_path / "out" / "config.json").exists()


def test_missing_checkpoint_with_mlflow_server_down(study_root: Path, tmp_path: Path, logged: Logged) -> None:
    """A study that recorded an MLflow server which is now down: fetching the missing checkpoint fails within
    seconds (not MLflow's minutes of retries), with a warning naming the server, and export is the usual error."""
    import time

    from conftest import free_port

    study = optuna.load_study(study_name=STUDY, storage=make_storage(None, study_root))
    uri = f"http://127.0.0.1:{free_port()}"
    study.set_user_attr("mlflow_tracking_uri", uri)
    study.set_user_attr("mlflow_parent_run_id", "0" * 32)
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match=f"study '{STUDY}' trial 10.*config.json is missing"):
            _export(study_root, tmp_path / "out", trial=10)
        assert time.monotonic() - started < 90
        assert any(f"could not fetch checkpoints from MLflow {uri}" in m for m in logged())
    finally:
        study.set_user_attr("mlflow_tracking_uri", None)
        study.set_user_attr("mlflow_parent_run_id", None)


def test_unknown_study(study_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot export trial 0: --study 'exq': no such study.*did you mean 'exp'"):
        _export(study_root, tmp_path / "out", study_name="exq", trial=0)


def test_cli_bad_export_exits_2(study_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["--root", str(study_root), "export", "--study", STUDY, "--trial", "3", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "study 'exp' trial 3 is PRUNED" in err and "completed trials: 0, 1, 2" in err


def test_bad_format(study_root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="did you mean 'onnx'"):
        _export(study_root, tmp_path / "out", trial=0, formats="onx")


@pytest.mark.slow
def test_load_student_errors(exported: dict, tmp_path: Path) -> None:
    src = exported["resnet"].out_dir
    with pytest.raises(UserError, match="not a directory"):
        export.load_student(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    with pytest.raises(UserError, match=rf"{broken / 'model.safetensors'} is truncated or corrupt"):
        export.load_student(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing"):
        export.load_student(broken)
    wrong = tmp_path / "wrong"
    shutil.copytree(src, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["model_args"]["channels"] = [c * 2 for c in cfg["model_args"]["channels"]]
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"weights in .*wrong/model.safetensors do not fit .*wrong/config.json"):
        export.load_student(wrong)
    (wrong / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not a valid config"):
        export.load_student(wrong)


def test_parity_failure_is_an_error(study_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export.export_torchscript

    def skewed(model: torch.nn.Module, example: torch.Tensor) -> bytes:
        import copy

        other = copy.deepcopy(model)
        with torch.no_grad():
            other.get_classifier().bias.add_(1e-3)  # a small, real deviation of the exported file
        return real(other, example)

    monkeypatch.setattr(export, "export_torchscript", skewed)
    out = tmp_path / "out"
    with pytest.raises(export.ParityError, match=r"torchscript differ .* by torchscript 0\.001"):
        _export(study_root, out, trial=0, formats="torchscript")
    assert list(out.iterdir()) == []  # nothing half-verified is left behind


def test_trial_checkpoint_loads_too(study_root: Path, digits: Any) -> None:
    model = export.load_student(study_dir(study_root, STUDY) / "trials" / "0")
    with torch.inference_mode():
        assert torch.equal(model(digits.x_val[:3]), _trial_model(study_root, 0)(digits.x_val[:3]))


@pytest.mark.slow
def test_onnx_falls_back_to_dynamo_exporter(study_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The TorchScript-based exporter comes first (a search pays for an export on every trial, issue 13); the
    # torch.export-based one is the fallback.
    def broken(model: torch.nn.Module, example: torch.Tensor) -> bytes:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_export, "_onnx_legacy", broken)
    result = _export(study_root, tmp_path / "out", trial=0, formats="onnx")
    assert result.onnx_exporter == "dynamo" and result.parity["onnx"] <= 1e-4
    assert result.config["onnx"]["exporter"] == "torch.onnx.export(dynamo=True)"
    assert any("legacy exporter failed: RuntimeError: unsupported operator" in m for m in result.messages)


def test_exported_onnx_is_the_one_a_search_times(study_root: Path, tmp_path: Path) -> None:
    # What latency timed is what ships: the meter's export of the trial's student is byte-identical to the file
    # `autokd export` wrote (same function, same example batch; the example's values do not enter the graph).
    from autokd.latency.meter import LatencyMeter

    result = _export(study_root, tmp_path / "out", trial=0, formats="onnx")
    model = _trial_model(study_root, 0)
    shape = tuple(result.config["input_size"])
    timed = LatencyMeter("onnxruntime").export(model, shape)
    assert timed == (tmp_path / "out" / export.ONNX_FILE).read_bytes()


# ---------------------------------------------------------------------------------------------------------
# The output folder: refused when it holds files, --force replaces only export's own, permissions of the umask


def _user_files(out: Path) -> dict[str, bytes]:
    out.mkdir()
    files = {"model.onnx": b"the user's own model, not autokd's", "notes.txt": b"unrelated notes",
             "model.int8.onnx": b"an INT8 model autokd did not write"}
    for name, blob in files.items():
        (out / name).write_bytes(blob)
    return files


def test_export_into_a_folder_that_holds_files_is_refused_and_touches_nothing(
        study_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    files = _user_files(out)
    rc = main(["--root", str(study_root), "export", "--study", STUDY, "--trial", "0", "--format", "onnx",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"--out {out}: the folder is not empty, it holds 3 entries (model.int8.onnx, model.onnx, notes.txt)" in err
    assert "writes model.safetensors, model.onnx, config.json there" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # byte for byte, nothing added


def test_force_replaces_only_the_exports_files(study_root: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    import onnx

    out = tmp_path / "out"
    files = _user_files(out)
    argv = ["--root", str(study_root), "export", "--study", STUDY, "--trial", "0", "--out", str(out), "--force"]
    assert main([*argv, "--format", "onnx"]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.int8.onnx", "model.onnx",
                                                     "model.safetensors", "notes.txt"]
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))  # the user's model.onnx was replaced
    assert (out / "notes.txt").read_bytes() == files["notes.txt"]
    # An INT8 file no autokd export listed is not this student's, but it is not autokd's to delete either.
    assert (out / "model.int8.onnx").read_bytes() == files["model.int8.onnx"]
    assert f"warning: kept {out / 'model.int8.onnx'}: this export did not write it" in text

    # Exported again without ONNX: the model.onnx the first export wrote (its config.json lists it) goes, the
    # files autokd never wrote stay.
    assert main([*argv, "--format", "safetensors"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.int8.onnx", "model.safetensors",
                                                     "notes.txt"]
    assert (out / "model.int8.onnx").read_bytes() == files["model.int8.onnx"]
    assert (out / "notes.txt").read_bytes() == files["notes.txt"]


def test_a_config_json_naming_other_files_never_gets_them_deleted(study_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious.txt").write_text("keep me")
    (out / "config.json").write_text(json.dumps({"format": export.EXPORT_FORMAT,
                                                 "files": {"x": "../precious.txt", "onnx": "model.onnx"}}))
    (out / "model.onnx").write_bytes(b"listed by an autokd config: an earlier export's")
    _export(study_root, out, trial=0, formats="safetensors", force=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("umask, mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_exported_files_get_the_permissions_of_the_umask(study_root: Path, tmp_path: Path, umask: int, mode: int,
                                                         folder_mode: int) -> None:
    old = os.umask(umask)
    try:
        result = _export(study_root, tmp_path / "out", trial=0, formats="safetensors,onnx")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in result.out_dir.iterdir()}
    assert modes == {"config.json": mode, "model.onnx": mode, "model.safetensors": mode}
    assert result.out_dir.stat().st_mode & 0o777 == folder_mode


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_an_out_that_cannot_be_a_folder_exits_2_before_the_study_is_opened(
        tmp_path: Path, capsys: pytest.CaptureFixture, where: str) -> None:
    file = tmp_path / "model.onnx"
    file.write_bytes(b"the user's file")
    out = file if where == "file" else file / "student"
    root = tmp_path / "studies"
    # The study does not exist: the --out message coming first shows nothing was opened or loaded before it.
    rc = main(["--root", str(root), "export", "--study", "nosuch", "--pick", "knee", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    expected = (f"--out {out}: exists and is not a folder" if where == "file"
                else f"--out {out}: cannot create the folder: {file} is not a folder")
    assert expected in err and "nosuch" not in err
    assert file.read_bytes() == b"the user's file" and not root.exists()
