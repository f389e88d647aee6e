"""The trial checkpoint format (model.safetensors + config.json), written atomically (see autokd.atomic)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from autokd.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from autokd.errors import UserError

__all__ = ["atomic_save_tensors", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_checkpoint",
           "write_checkpoint"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a safetensors file atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_checkpoint(model: torch.nn.Module, config: dict[str, Any], out_dir: Path) -> None:
    """Write a student checkpoint: weights first, then the config that marks the checkpoint complete."""
    atomic_save_tensors(Path(out_dir) / WEIGHTS_FILE, model.state_dict())
    atomic_write_json(Path(out_dir) / CONFIG_FILE, config)


def read_checkpoint(ckpt_dir: Path, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (state_dict, config) from a checkpoint directory; a missing or corrupt file is a UserError naming it."""
    ckpt_dir = Path(ckpt_dir)
    cfg_path, weights_path = ckpt_dir / CONFIG_FILE, ckpt_dir / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise UserError(f"{what}: {path} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: {cfg_path} is not valid JSON ({exc})") from exc
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
        raise UserError(f"{what}: {weights_path} is truncated or corrupt ({exc.__class__.__name__}: {exc})") from exc
    return state, config
