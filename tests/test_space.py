from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import REPO_ROOT

from autokd.errors import UserError
from autokd.model.space import TrialParams, load_space, parse_param, sample

MINIMAL = """
name: tiny
epochs: 3
students:
  families: [resnet]
losses:
  ce: {}
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["default.yaml", "cifar_gpu.yaml", "fashion.yaml"])
def test_shipped_spaces_are_valid(name: str) -> None:
    space = load_space(REPO_ROOT / "search_spaces" / name)
    assert space.students and space.losses
    assert space.fingerprint == load_space(REPO_ROOT / "search_spaces" / name).fingerprint


def test_minimal_space_defaults(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, MINIMAL))
    assert space.name == "tiny" and space.epochs == 3
    assert list(space.students) == ["resnet"]
    assert space.students["resnet"]["width"].kind == "const"
    assert space.optimizer["name"].value == "adamw"
    assert not space.uses_teacher()


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    a = load_space(write(tmp_path, MINIMAL, "a.yaml"))
    b = load_space(write(tmp_path, MINIMAL.replace("epochs: 3", "epochs: 4"), "b.yaml"))
    c = load_space(write(tmp_path, MINIMAL, "c.yaml"))  # same content, other file: same fingerprint
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == c.fingerprint


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("students: [", ["invalid YAML", ":1:"]),
        (MINIMAL + "bogus: 1\n", ["bogus", "unknown key", "valid keys"]),
        (MINIMAL + "batch_size: {low: 64, high: 32}\n", ["batch_size", "low (64) must be smaller than high (32)"]),
        (MINIMAL + "optimizer: {lr: {low: 0, high: 0.1, log: true}}\n", ["optimizer.lr", "log scale needs low > 0"]),
        (MINIMAL + "batch_size: {choices: []}\n", ["batch_size.choices", "non-empty list"]),
        (MINIMAL.replace("[resnet]", "[resnt]"), ["students.families.resnt", "unknown student family",
                                                 "did you mean 'resnet'", "valid families"]),
        (MINIMAL.replace("ce: {}", "kd: {alpha: {low: 0.5, high: 1.5}}"), ["losses.kd.alpha", "1.5"]),
        (MINIMAL.replace("ce: {}", "kd: {temprature: 4}"), ["losses.kd.temprature"]),
        (MINIMAL.replace("ce: {}", "kdd: {}"), ["losses.kdd", "unknown loss", "valid losses"]),
        (MINIMAL + "epochs: 2\n", ["duplicate key 'epochs'"]),
        ("!!python/object/apply:os.system ['true']\n", ["invalid YAML", "Python object tags are not allowed"]),
        (MINIMAL + "optimizer: {name: lbfgs}\n", ["optimizer.name", "lbfgs", "adamw, sgd"]),
        (MINIMAL + "batch_size: {low: 1, high: 8, stepp: 1}\n", ["batch_size", "stepp", "did you mean 'step'"]),
        ("name: x\nstudents: {families: [resnet]}\n", ["missing required key 'losses'"]),
        (MINIMAL.replace("families: [resnet]", "families: [resnet]\n  width: {low: 0.5, high: 9}"),
         ["students.families.resnet.width"]),
    ],
)
def test_invalid_spaces_name_file_and_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_space(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file() -> None:
    with pytest.raises(UserError, match="file not found"):
        load_space("no/such/space.yaml")


def test_parse_param_forms() -> None:
    assert parse_param(4, "x").kind == "const"
    assert parse_param({"choices": [1, 2]}, "x").kind == "categorical"
    assert parse_param({"low": 1, "high": 4, "type": "int"}, "x").kind == "int"
    spec = parse_param({"low": 1e-4, "high": 1e-1, "log": True}, "x")
    assert spec.kind == "float" and spec.log


def test_sample_conditional_names_and_bounds() -> None:
    space = load_space(REPO_ROOT / "search_spaces" / "default.yaml")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen_losses = set()
    for _ in range(30):
        trial = study.ask()
        params = sample(space, trial)
        fam = space.students[params.family]
        assert fam["width"].low <= params.width <= fam["width"].high
        assert f"{params.family}.width" in trial.params
        assert set(params.loss_params) == set(space.losses[params.loss])
        assert all(k.startswith(f"{params.loss}.") for k in trial.params if "." in k and not k.startswith(params.family))
        assert params.epochs == space.epochs
        seen_losses.add(params.loss)
        study.tell(trial, [0.5, 1.0])
        assert TrialParams.from_flat(params.flat()) == params
    assert seen_losses == set(space.losses)


def test_sample_max_epochs_override() -> None:
    space = load_space(REPO_ROOT / "search_spaces" / "default.yaml")
    trial = optuna.create_study(directions=["maximize", "minimize"]).ask()
    assert sample(space, trial, max_epochs=2).epochs == 2
