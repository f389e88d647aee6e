"""Typed settings for a search, where outputs live, and safe YAML loading with file/key-path errors.

This module must not import torch: it is imported by the CLI before any heavy work starts, so bad input is
reported in a fraction of a second.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autokd.errors import UserError

#: Environment variable that moves the outputs root (default: ./studies).
STUDIES_ENV = "AUTOKD_STUDIES"
#: The optimizers autokd.train builds (defined here, torch-free, so space validation can name them too).
OPTIMIZERS = ("adamw", "sgd")


def studies_root() -> Path:
    """Directory under which every study, the teacher cache and the shared stores live."""
    return Path(os.environ.get(STUDIES_ENV, "studies"))


@dataclass
class SearchSettings:
    """Everything `autokd search` needs, as parsed from the command line."""

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
