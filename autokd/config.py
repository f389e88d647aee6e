"""Typed settings for a search, where outputs live, and safe YAML loading with file/key-path errors.

This module must not import torch: it is imported by the CLI before any heavy work starts, so bad input is
reported in a fraction of a second.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from autokd.errors import UserError

#: Environment variable that moves the outputs root (default: ./studies).
STUDIES_ENV = "AUTOKD_STUDIES"
#: The optimizers autokd.model.train builds (defined here, torch-free, so space validation can name them too).
OPTIMIZERS = ("adamw", "sgd")


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """argparse type of an option that takes an integer >= 1 (shared by the CLI and the latency server's own
    entry point, which must not import the CLI's dependencies)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of an option that takes an integer >= 0 (a trial number)."""
    return _int_at_least(text, 0)


MAX_PORT = 65535


def port_number(text: str) -> int:
    """argparse type of a TCP port to listen on: an integer 0-65535, 0 letting the system pick a free one."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: valid 0-{MAX_PORT} (0: any free port, "
                                         "printed once listening)")
    return value


def studies_root() -> Path:
    """Directory under which every study, the teacher cache and the shared stores live."""
    return Path(os.environ.get(STUDIES_ENV, "studies"))


@dataclass(frozen=True)
class DataSettings:
    """Which images a command trains and evaluates on (the data options `autokd search` and `autokd distill`
    share)."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    input_size: int | None = None  # None: the space's, else the dataset's
    train_limit: int | None = None  # only the first N training images (search only, for tests and benchmarks)


@dataclass(frozen=True)
class LatencySettings:
    """How and where a search times its students: `SearchSettings`' ``latency_*`` fields and
    ``allow_mixed_latency``, without the prefix."""

    threads: int
    batch: int
    device: str | None
    runtime: str | None
    precision: str
    target: str | None
    token: str | None
    target_retry_s: float
    allow_mixed: bool


@dataclass(frozen=True)
class WorkerSettings:
    """How many worker processes a search runs on this machine, and on which GPUs (`SearchSettings`' fields of
    these names)."""

    jobs: int
    devices: str | None
    jobs_per_device: int


@dataclass(frozen=True)
class TrackingSettings:
    """Where a search logs its runs (`SearchSettings.tracking_uri` and ``mlflow``)."""

    uri: str | None
    mlflow: bool


@dataclass
class SearchSettings:
    """Everything `autokd search` needs, as parsed from the command line.

    The fields are flat: they are what a caller sets by name (``SearchSettings(budget=8, dataset="digits")``,
    ``dataclasses.replace``), what the command line's options are named after, and what a spawned worker receives
    as JSON. The parts of a search take the groups they need: `data`, `latency`, `workers`, `tracking`.
    """

    budget: int = 50
    space: Path = field(default_factory=lambda: _builtin_default_space())
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    input_size: int | None = None
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_pretrained: bool = False
    study: str | None = None
    storage: str | None = None
    device: str = "auto"
    sampler: str = "tpe"
    seed: int = 0
    max_latency_ms: float | None = None
    epochs: int | None = None
    prune: bool = True
    jobs: int = 1
    tracking_uri: str | None = None
    mlflow: bool = True
    latency_threads: int = 1
    latency_batch: int = 1
    latency_device: str | None = None
    latency_runtime: str | None = None  # None: onnxruntime on a CPU, torch on CUDA
    latency_precision: str = "fp32"  # int8: a student's latency is that of its INT8 ONNX model
    latency_target: str | None = None  # http://HOST:PORT of an `autokd latency-server` on the target device
    latency_token: str | None = None
    latency_target_retry_s: float = 30.0  # how long an unreachable target is retried before a trial fails
    allow_mixed_latency: bool = False
    compile: bool | str = False  # True, or a torch.compile mode (--compile-mode)
    devices: str | None = None  # --devices: 'all' or '0,1,3' (None: all visible GPUs on cuda)
    jobs_per_device: int = 1
    train_limit: int | None = None
    root: Path = field(default_factory=studies_root)

    @property
    def data(self) -> DataSettings:
        """The data options."""
        return settings_from(DataSettings, vars(self))

    @property
    def latency(self) -> LatencySettings:
        """The latency options."""
        return LatencySettings(
            threads=self.latency_threads, batch=self.latency_batch, device=self.latency_device,
            runtime=self.latency_runtime, precision=self.latency_precision, target=self.latency_target,
            token=self.latency_token, target_retry_s=self.latency_target_retry_s, allow_mixed=self.allow_mixed_latency)

    @property
    def workers(self) -> WorkerSettings:
        """The options that plan this machine's workers."""
        return settings_from(WorkerSettings, vars(self))

    @property
    def tracking(self) -> TrackingSettings:
        """The MLflow options."""
        return TrackingSettings(uri=self.tracking_uri, mlflow=self.mlflow)


@dataclass
class DistillSettings:
    """Everything `autokd distill` needs: one student, its loss and training, and the data and teacher options it
    shares with `autokd search`."""

    family: str = "resnet"
    width: float = 0.5
    depth: float = 0.5
    loss: str = "kd"
    loss_params: dict[str, float] = field(default_factory=dict)  # --temperature, --alpha, --beta, --warmup given
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 5e-4
    optimizer: str = OPTIMIZERS[0]
    data: DataSettings = field(default_factory=DataSettings)
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_pretrained: bool = False
    device: str = "auto"
    seed: int = 0
    views: int = 0  # replayable augmented views per training image (a search space's `views`)
    from_trial: str | None = None  # "<study>#<trial>" when the settings are a trial's (autokd distill --from-trial)
    out: Path | None = None  # None: <root>/distill/<student>-<loss>-s<seed>
    root: Path = field(default_factory=studies_root)


_Settings = TypeVar("_Settings")


def settings_from(cls: type[_Settings], values: Mapping[str, Any], **derived: Any) -> _Settings:
    """A settings dataclass from named values, e.g. parsed options (``vars(args)``): each field from ``derived``,
    else from the value of its name (option ``--data-dir`` is ``data_dir``), else its default. A field that is
    itself a settings dataclass (`DistillSettings.data`) is built the same way from the same values."""
    unknown = set(derived) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    hints = get_type_hints(cls)
    chosen: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in derived:
            chosen[f.name] = derived[f.name]
        elif f.name in values:
            chosen[f.name] = values[f.name]
        elif is_dataclass(hints[f.name]):
            chosen[f.name] = settings_from(hints[f.name], values)
    return cls(**chosen)


SAMPLERS = ("tpe", "nsga2", "random")


def _builtin_default_space() -> Path:
    from autokd.spaces import resolve_space

    return resolve_space(None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain safe_load silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> Any:
    """Load a YAML file safely (no Python object tags, no duplicate keys); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (give an existing YAML file, e.g. search_spaces/default.yaml, or a built-in space name such as default)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the file: {exc}") from exc
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        if "python/" in str(exc):
            problem += " (Python object tags are not allowed: search spaces are plain YAML data)"
        raise UserError(f"{where}: invalid YAML: {problem}") from exc
