"""Search-space schema: load and validate a YAML space (``load_space``), then ``sample(trial)`` one trial's
parameters. Every validation error names the file and the key path; the module does no training.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autokd.config import OPTIMIZERS, load_yaml
from autokd.errors import UserError, as_user_error, did_you_mean

TOP_LEVEL_KEYS = ("name", "description", "epochs", "input_size", "views", "students", "losses", "optimizer",
                  "batch_size", "pruning")
PARAM_KEYS = ("low", "high", "log", "step", "type", "choices")
OPTIMIZER_KEYS = ("name", "lr", "weight_decay")
PRUNING_KEYS = ("eta", "min_epoch", "min_peers")

_DEFAULT_OPTIMIZER = {"name": "adamw", "lr": 0.01, "weight_decay": 5e-4}


@dataclass(frozen=True)
class ParamSpec:
    """One searchable (or constant) parameter."""

    kind: str  # "float" | "int" | "categorical" | "const"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw this parameter from an Optuna trial (constants are returned as they are)."""
        if self.kind == "const":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """The values that bound this parameter: used to validate it against what the model/loss accepts."""
        if self.kind == "const":
            return [self.value]
        if self.kind == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        """Canonical form, used for the space fingerprint."""
        out = {k: v for k, v in asdict(self).items() if v not in (None, (), False)}
        if "choices" in out:
            out["choices"] = list(out["choices"])
        return out


def parse_param(raw: Any, where: str) -> ParamSpec:
    """Parse one <param> at key path `where` ("file: key.path") into a ParamSpec."""
    if isinstance(raw, bool) or isinstance(raw, (int, float, str)):
        return ParamSpec(kind="const", value=raw)
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a constant, {{low, high}} or {{choices: [...]}}, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in PARAM_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], PARAM_KEYS)}; "
                        f"valid keys: {', '.join(PARAM_KEYS)}")
    if "choices" in raw:
        extra = [k for k in raw if k != "choices"]
        if extra:
            raise UserError(f"{where}: 'choices' cannot be combined with {extra}")
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}.choices: must be a non-empty list, got {choices!r}")
        for choice in choices:
            if not isinstance(choice, (int, float, str, bool)) or choice is None:
                raise UserError(f"{where}.choices: {choice!r} is not a plain number/string/bool")
        if len(set(map(repr, choices))) != len(choices):
            raise UserError(f"{where}.choices: duplicate values in {choices!r}")
        return ParamSpec(kind="categorical", choices=tuple(choices))
    if "low" not in raw or "high" not in raw:
        raise UserError(f"{where}: a range needs both 'low' and 'high' (or use 'choices', or a constant)")
    low, high = raw["low"], raw["high"]
    for key, val in (("low", low), ("high", high)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise UserError(f"{where}.{key}: must be a finite number, got {val!r}")
    if low >= high:
        raise UserError(f"{where}: low ({low}) must be smaller than high ({high})")
    kind = raw.get("type", "float")
    if kind not in ("float", "int"):
        raise UserError(f"{where}.type: {kind!r} is not valid; valid types: float, int")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: must be true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: a log scale needs low > 0, got low={low}")
    step = raw.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise UserError(f"{where}.step: must be a positive number, got {step!r}")
        if log:
            raise UserError(f"{where}: 'step' and 'log: true' cannot be combined")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise UserError(f"{where}: type int needs integer low/high, got {low}, {high}")
    return ParamSpec(kind=kind, low=float(low) if kind == "float" else int(low),
                     high=float(high) if kind == "float" else int(high), log=log,
                     step=None if step is None else (float(step) if kind == "float" else int(step)))


@dataclass(frozen=True)
class PruningSettings:
    """Successive-halving rungs: eta, first rung epoch, and how many peers a rung needs before it prunes."""

    eta: int = 3
    min_epoch: int = 1
    min_peers: int = 3


@dataclass
class SearchSpace:
    """A validated search space."""

    path: str
    name: str
    students: dict[str, dict[str, ParamSpec]]
    losses: dict[str, dict[str, ParamSpec]]
    optimizer: dict[str, ParamSpec]
    batch_size: ParamSpec
    epochs: int
    input_size: int | None = None
    views: int = 0
    pruning: PruningSettings = field(default_factory=PruningSettings)
    description: str = ""

    def canonical(self) -> dict[str, Any]:
        """The space as plain data (no file path): what the fingerprint and the study record."""
        return {
            "name": self.name,
            "epochs": self.epochs,
            "input_size": self.input_size,
            "views": self.views,
            "students": {f: {k: p.to_dict() for k, p in ps.items()} for f, ps in self.students.items()},
            "losses": {name: {k: p.to_dict() for k, p in ps.items()} for name, ps in self.losses.items()},
            "optimizer": {k: p.to_dict() for k, p in self.optimizer.items()},
            "batch_size": self.batch_size.to_dict(),
            "pruning": asdict(self.pruning),
        }

    @property
    def fingerprint(self) -> str:
        """Stable hash of the canonical space: a study refuses to resume with a different one."""
        blob = json.dumps(self.canonical(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def uses_teacher(self) -> bool:
        """Whether any loss in the space needs teacher outputs."""
        from autokd.model.losses import build_loss

        return any(build_loss(name).uses_teacher for name in self.losses)

    def uses_features(self) -> bool:
        """Whether any loss in the space needs intermediate features."""
        from autokd.model.losses import build_loss

        return any(build_loss(name).uses_features for name in self.losses)


@dataclass
class TrialParams:
    """The resolved parameters of one trial."""

    family: str
    width: float
    depth: float
    loss: str
    loss_params: dict[str, Any]
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int

    def flat(self) -> dict[str, Any]:
        """One flat dict (loss hyperparameters prefixed by the loss name), for logs and reports."""
        out = {k: v for k, v in asdict(self).items() if k != "loss_params"}
        out.update({f"{self.loss}.{k}": v for k, v in self.loss_params.items()})
        return out

    @staticmethod
    def from_flat(flat: dict[str, Any]) -> TrialParams:
        """Inverse of `flat()`."""
        loss = flat["loss"]
        prefix = f"{loss}."
        return TrialParams(
            family=flat["family"], width=float(flat["width"]), depth=float(flat["depth"]), loss=loss,
            loss_params={k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)},
            optimizer=flat["optimizer"], lr=float(flat["lr"]), weight_decay=float(flat["weight_decay"]),
            batch_size=int(flat["batch_size"]), epochs=int(flat["epochs"]),
        )


def _require_mapping(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__ if raw is not None else 'nothing'}")
    return raw


def _positive_int(raw: Any, where: str, minimum: int = 1) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise UserError(f"{where}: must be an integer >= {minimum}, got {raw!r}")
    return raw


def _parse_students(raw: Any, src: str) -> dict[str, dict[str, ParamSpec]]:
    from autokd.model.students import available_families, resolve_student

    raw = _require_mapping(raw, f"{src}: students")
    unknown = [k for k in raw if k not in ("width", "depth", "families")]
    if unknown:
        raise UserError(f"{src}: students.{unknown[0]}: unknown key; valid keys: width, depth, families")
    default = {k: parse_param(raw.get(k, 1.0), f"{src}: students.{k}") for k in ("width", "depth")}
    families = raw.get("families")
    if isinstance(families, list):
        families = {name: {} for name in families}
    families = _require_mapping(families, f"{src}: students.families")
    if not families:
        raise UserError(f"{src}: students.families: must list at least one family; valid: "
                        f"{', '.join(available_families())}")
    valid = available_families()
    out: dict[str, dict[str, ParamSpec]] = {}
    for family, overrides in families.items():
        where = f"{src}: students.families.{family}"
        if family not in valid:
            raise UserError(f"{where}: unknown student family {family!r}{did_you_mean(family, valid)}; "
                            f"valid families: {', '.join(valid)}")
        overrides = _require_mapping(overrides if overrides is not None else {}, where)
        bad = [k for k in overrides if k not in ("width", "depth")]
        if bad:
            raise UserError(f"{where}.{bad[0]}: unknown key; valid keys: width, depth")
        params = dict(default)
        params.update({k: parse_param(v, f"{where}.{k}") for k, v in overrides.items()})
        for key, spec in params.items():
            for value in spec.extremes():
                kwargs = {"width": 1.0, "depth": 1.0, key: value}
                with as_user_error(f"{where}.{key}: "):
                    resolve_student(family, kwargs["width"], kwargs["depth"], num_classes=10, in_chans=1,
                                    input_size=32)
        out[family] = params
    return out


def _parse_losses(raw: Any, src: str) -> dict[str, dict[str, ParamSpec]]:
    from autokd.model.losses import available_losses, build_loss

    raw = _require_mapping(raw, f"{src}: losses")
    if not raw:
        raise UserError(f"{src}: losses: must list at least one loss; valid: {', '.join(available_losses())}")
    valid = available_losses()
    out: dict[str, dict[str, ParamSpec]] = {}
    for name, hparams in raw.items():
        where = f"{src}: losses.{name}"
        if name not in valid:
            raise UserError(f"{where}: unknown loss {name!r}{did_you_mean(name, valid)}; valid losses: "
                            f"{', '.join(valid)}")
        hparams = _require_mapping(hparams if hparams is not None else {}, where)
        specs = {k: parse_param(v, f"{where}.{k}") for k, v in hparams.items()}
        # Build the loss at each bound of each hyperparameter: the loss registry owns the valid ranges.
        for key, spec in specs.items():
            for value in spec.extremes():
                with as_user_error(f"{where}.{key}: "):
                    build_loss(name, **{key: value})
        out[name] = specs
    return out


def _parse_optimizer(raw: Any, src: str) -> dict[str, ParamSpec]:
    raw = _require_mapping(raw if raw is not None else {}, f"{src}: optimizer")
    unknown = [k for k in raw if k not in OPTIMIZER_KEYS]
    if unknown:
        raise UserError(f"{src}: optimizer.{unknown[0]}: unknown key{did_you_mean(unknown[0], OPTIMIZER_KEYS)}; "
                        f"valid keys: {', '.join(OPTIMIZER_KEYS)}")
    merged = dict(_DEFAULT_OPTIMIZER)
    merged.update(raw)
    out = {k: parse_param(v, f"{src}: optimizer.{k}") for k, v in merged.items()}
    for name in out["name"].extremes():
        if name not in OPTIMIZERS:
            raise UserError(f"{src}: optimizer.name: {name!r} is not valid; valid optimizers: {', '.join(OPTIMIZERS)}")
    for key in ("lr", "weight_decay"):
        spec = out[key]
        for value in spec.extremes():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (key == "lr" and value == 0):
                raise UserError(f"{src}: optimizer.{key}: {value!r} is not valid; must be a number "
                                f"{'> 0' if key == 'lr' else '>= 0'}")
    return out


def load_space(path: str | Path) -> SearchSpace:
    """Load and fully validate a search-space YAML file; every error names the file and the key path.

    Schema (every key is optional except `students` and `losses`; see search_spaces/default.yaml for a commented
    example)::

        name: default                     # used in the default study name
        description: free text
        epochs: 6                         # max epochs per trial (--epochs overrides)
        input_size: 16                    # image side the data is resized to (default: the dataset's own)
        views: 0                          # replayable augmented views per image (0 = no augmentation)
        students:
          width: <param>                  # defaults for every family below
          depth: <param>
          families:                       # a list of timm families, or a mapping family -> {width, depth} overrides
            resnet: {}
            mobilenetv3: {width: <param>}
        losses:                           # loss name -> its hyperparameters (each a <param>)
          ce: {}
          kd: {temperature: <param>, alpha: <param>}
        optimizer: {name: <param>, lr: <param>, weight_decay: <param>}
        batch_size: <param>
        pruning: {eta: 3, min_epoch: 1, min_peers: 3}

    A <param> is a constant (`4`, `adamw`), a range `{low: 1, high: 8}` (float; add `log: true` for a log scale,
    `step: 0.5` for a grid, `type: int` for integers) or a categorical `{choices: [32, 64]}`.
    """
    src = str(path)
    raw = _require_mapping(load_yaml(path), src)
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise UserError(f"{src}: {unknown[0]}: unknown key{did_you_mean(unknown[0], TOP_LEVEL_KEYS)}; "
                        f"valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    for required in ("students", "losses"):
        if required not in raw:
            raise UserError(f"{src}: missing required key {required!r}")
    name = raw.get("name", Path(src).stem)
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"{src}: name: must be letters, digits, '-' or '_', got {name!r}")
    epochs = _positive_int(raw.get("epochs", 6), f"{src}: epochs")
    input_size = raw.get("input_size")
    if input_size is not None:
        input_size = _positive_int(input_size, f"{src}: input_size", minimum=8)
    views = _positive_int(raw.get("views", 0), f"{src}: views", minimum=0)
    pruning_raw = _require_mapping(raw.get("pruning", {}) or {}, f"{src}: pruning")
    bad = [k for k in pruning_raw if k not in PRUNING_KEYS]
    if bad:
        raise UserError(f"{src}: pruning.{bad[0]}: unknown key; valid keys: {', '.join(PRUNING_KEYS)}")
    pruning = PruningSettings(
        eta=_positive_int(pruning_raw.get("eta", 3), f"{src}: pruning.eta", minimum=2),
        min_epoch=_positive_int(pruning_raw.get("min_epoch", 1), f"{src}: pruning.min_epoch"),
        min_peers=_positive_int(pruning_raw.get("min_peers", 3), f"{src}: pruning.min_peers"),
    )
    batch_size = parse_param(raw.get("batch_size", 64), f"{src}: batch_size")
    for value in batch_size.extremes():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{src}: batch_size: {value!r} is not valid; must be a positive integer")
    description = raw.get("description", "")
    return SearchSpace(
        path=src, name=name, students=_parse_students(raw["students"], src), losses=_parse_losses(raw["losses"], src),
        optimizer=_parse_optimizer(raw.get("optimizer"), src), batch_size=batch_size, epochs=epochs,
        input_size=input_size, views=views, pruning=pruning, description=str(description),
    )


def sample(space: SearchSpace, trial: Any, max_epochs: int | None = None) -> TrialParams:
    """Sample one trial's parameters (conditional on the family and the loss) from an Optuna trial.

    Parameters are named in the Optuna study as `family`, `<family>.width`, `<family>.depth`, `loss`,
    `<loss>.<hyperparameter>`, `optimizer`, `lr`, `weight_decay`, `batch_size`: conditional parameters get their own
    names so each family / loss keeps its own range and the samplers model them separately.
    """
    family = trial.suggest_categorical("family", list(space.students))
    fam = space.students[family]
    width = float(fam["width"].suggest(trial, f"{family}.width"))
    depth = float(fam["depth"].suggest(trial, f"{family}.depth"))
    loss = trial.suggest_categorical("loss", list(space.losses))
    loss_params = {k: spec.suggest(trial, f"{loss}.{k}") for k, spec in space.losses[loss].items()}
    return TrialParams(
        family=family, width=width, depth=depth, loss=loss, loss_params=loss_params,
        optimizer=str(space.optimizer["name"].suggest(trial, "optimizer")),
        lr=float(space.optimizer["lr"].suggest(trial, "lr")),
        weight_decay=float(space.optimizer["weight_decay"].suggest(trial, "weight_decay")),
        batch_size=int(space.batch_size.suggest(trial, "batch_size")),
        epochs=max_epochs or space.epochs,
    )
