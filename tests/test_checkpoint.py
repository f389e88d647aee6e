"""autokd.checkpoint: reading and writing model files, and the one readable error for a bad one."""
from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch

from autokd.errors import UserError
from autokd.model import checkpoint
from autokd.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_trial_student,
    load_weights,
    read_checkpoint,
    read_weights,
    write_checkpoint,
)
from autokd.model.students import StudentSpec, build_from_spec, resolve_student

INPUT_SIZE = 16


def _spec(width: float = 0.25) -> StudentSpec:
    return resolve_student("resnet", width, 0.25, 10, 1, INPUT_SIZE)


def _write(out: Path, width: float = 0.25, weights_width: float | None = None) -> torch.nn.Module:
    """A trial checkpoint whose config describes a resnet of ``width``; its weights are of ``weights_width``."""
    torch.manual_seed(0)
    model = build_from_spec(_spec(width if weights_width is None else weights_width)).eval()
    write_checkpoint(model, {"student": _spec(width).to_dict(), "study": "s", "trial": 0}, out)
    return model


def test_round_trip(tmp_path: Path) -> None:
    model = _write(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files
    state, config = read_checkpoint(tmp_path / "ckpt")
    assert config == {"student": _spec().to_dict(), "study": "s", "trial": 0}
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    loaded, cfg = load_trial_student(tmp_path / "ckpt", "trial 0", study="s", trial=0)
    assert cfg == config and not loaded.training
    x = torch.randn(2, 1, INPUT_SIZE, INPUT_SIZE)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_truncated_weights(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    name = re.escape(str(weights))
    with pytest.raises(UserError, match=rf"^trial 3: {name} is truncated or corrupt \(.*\)\. .*again"):
        read_checkpoint(tmp_path / "ckpt", what="trial 3")
    with pytest.raises(UserError, match=rf"^{name} is truncated or corrupt"):
        read_weights(weights)


def test_missing_files(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt")
    (tmp_path / "ckpt" / CONFIG_FILE).unlink()
    with pytest.raises(UserError, match=rf"^trial 3: {re.escape(str(tmp_path / 'ckpt' / CONFIG_FILE))} is missing$"):
        read_checkpoint(tmp_path / "ckpt", what="trial 3")
    (tmp_path / "ckpt" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match=f"{CONFIG_FILE} is not valid JSON"):
        read_checkpoint(tmp_path / "ckpt")
    nope = re.escape(str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match=rf"teacher checkpoint: {nope} does not exist"):
        read_weights(tmp_path / "nope.pt", "teacher checkpoint")


def test_mismatched_state_dict_is_one_readable_error(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt", width=0.25, weights_width=0.5)  # config: resnet 0.25; weights: a wider resnet
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    with pytest.raises(UserError) as info:
        load_trial_student(tmp_path / "ckpt", "study 's' trial 0")
    text = str(info.value)
    assert text.startswith(f"study 's' trial 0: the weights in {weights} do not fit the architecture ")
    assert f"described in {tmp_path / 'ckpt' / CONFIG_FILE}" in text
    assert "shape mismatch (" in text and " in the file vs " in text and "+" in text  # counted, a few shown
    assert text.endswith("The file belongs to a different model.")

    model = build_from_spec(_spec())
    state = dict(model.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["fc.weight"]
    with pytest.raises(UserError) as info:
        load_weights(model, state, Path("/x/w.safetensors"), "does not fit", fix="Do this.")
    text = str(info.value)
    assert text == ("/x/w.safetensors: does not fit: missing keys (1): fc.weight; unexpected keys (1): extra.weight. "
                    "Do this.")


def test_load_weights_tolerates_only_a_missing_batch_counter(tmp_path: Path) -> None:
    src, dst = build_from_spec(_spec()), build_from_spec(_spec())
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_weights(dst, state, tmp_path / "w.pt", "x")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in state.items())


def test_leftover_checkpoint_of_another_trial_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "ckpt")  # trial 0 of study "s"
    with pytest.raises(UserError, match="belongs to study 's' trial 0"):
        load_trial_student(tmp_path / "ckpt", "study 's' trial 4", study="s", trial=4)
    load_trial_student(tmp_path / "ckpt", "study 's' trial 4")  # without the check: loads


def test_torch_state_dicts_are_unwrapped(tmp_path: Path) -> None:
    model = build_from_spec(_spec())
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, wrapped)
    state = read_weights(wrapped)
    assert state.keys() == model.state_dict().keys()
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2], not_weights)
    with pytest.raises(UserError, match=re.escape(f"{not_weights} is not a state dict of tensors (got list)")):
        read_weights(not_weights)


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _write(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / WEIGHTS_FILE).read_bytes()

    def dies_halfway(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(build_from_spec(_spec()), {"student": _spec().to_dict()}, tmp_path / "ckpt")
    # the old checkpoint is intact and complete: no half-written weights, no temporary file, the old config
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert (tmp_path / "ckpt" / WEIGHTS_FILE).read_bytes() == before
    assert json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["trial"] == 0
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(tmp_path / "ckpt")[0]["fc.weight"], old.state_dict()["fc.weight"])


def test_report_test_accuracy_names_a_mismatched_checkpoint(tmp_path: Path) -> None:
    from autokd.model.data import load_dataset
    from autokd.report.evaluation import test_accuracy
    from autokd.study.store import study_dir

    trial_dir = study_dir(tmp_path, "s") / "trials" / "0"
    _write(trial_dir, width=0.25, weights_width=0.5)
    data = load_dataset("digits", input_size=INPUT_SIZE, seed=0, train_limit=64)
    study = types.SimpleNamespace(study_name="s")  # test_accuracy reads only the name
    expect = re.escape(f"study 's' trial 0: the weights in {trial_dir / WEIGHTS_FILE} do not fit")
    with pytest.raises(UserError, match=f"^{expect}"):
        test_accuracy(study, 0, tmp_path, data)  # type: ignore[arg-type]
    assert not (trial_dir / "test_acc.json").exists()


def test_module_exports() -> None:
    assert {"read_weights", "load_weights", "load_trial_student"} <= set(checkpoint.__all__)
