"""Every model file autokd reads or writes: weights (safetensors, or a torch state dict for teacher checkpoints),
trial checkpoints (``model.safetensors`` + ``config.json``), and loading weights into a model.

Writes are atomic (see :mod:`autokd.utils.atomic`). A missing, truncated or mismatching file is one
:class:`~autokd.errors.UserError` that names the file, says what is wrong and what to do.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from autokd.errors import UserError
from autokd.model.files import CONFIG_FILE, WEIGHTS_FILE
from autokd.utils.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_save_tensors", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "load_trial_student",
           "load_weights", "read_checkpoint", "read_weights", "write_checkpoint"]

# Wrappers other training code saves a state dict in, and key prefixes of DDP / torch.compile modules.
STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict")
KEY_PREFIXES = ("module.", "_orig_mod.")
READ_FIX = ("Expected a complete safetensors file (*.safetensors) or a torch state dict "
            "(torch.save(model.state_dict())); the file may have been cut short: replace it with a complete copy.")
FIT_FIX = "The file belongs to a different model."


def _lead(what: str) -> str:
    return f"{what}: " if what else ""


def atomic_save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a safetensors file atomically."""
    # clone() breaks any storage sharing (tied weights), which safetensors refuses to write.
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_weights(path: Path, what: str = "", fix: str = READ_FIX) -> dict[str, Tensor]:
    """The tensors of a weights file: safetensors by its suffix, otherwise a torch state dict (``torch.load`` with
    ``weights_only=True``), unwrapped from ``{"state_dict": ...}``-style wrappers and DDP/compile key prefixes.

    A missing, unreadable (truncated, corrupt) file or one that holds no tensors is a UserError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{_lead(what)}{path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            obj: object = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt, wrong format, a pickled module...
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"{_lead(what)}{path} is truncated or corrupt ({exc.__class__.__name__}: {first}). "
                        f"{fix}") from exc
    if isinstance(obj, dict):
        for wrapper in STATE_DICT_WRAPPERS:
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{_lead(what)}{path} is not a state dict of tensors (got {type(obj).__name__}); save it "
                        "with torch.save(model.state_dict(), path).")
    state: dict[str, Tensor] = obj
    for prefix in KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _some(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_weights(model: nn.Module, state: Mapping[str, Tensor], path: Path, what: str, fix: str = FIT_FIX) -> None:
    """Load ``state`` (read from ``path``) into ``model``: every tensor, every shape, or ONE UserError.

    The error is ``what`` (what did not fit what; the file is named in front of it when ``what`` does not name
    it), the missing and unexpected keys and the shape mismatches (a few of each, with counts), then ``fix``.
    A missing ``num_batches_tracked`` counter is tolerated (state dicts from elsewhere may lack it).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {list(state[k].shape)} in the file vs {list(v.shape)} in the model"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(items)}): {_some(items)}" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)) if items]
        head = what if str(path) in what else f"{path}: {what}"
        raise UserError(f"{head}: {'; '.join(parts)}. {fix}")
    model.load_state_dict(dict(state), strict=False)  # strict in effect: only num_batches_tracked may be absent


def write_checkpoint(model: nn.Module, config: dict[str, Any], out_dir: Path) -> None:
    """Write a student checkpoint: weights first, then the config that marks the checkpoint complete."""
    atomic_save_tensors(Path(out_dir) / WEIGHTS_FILE, model.state_dict())
    atomic_write_json(Path(out_dir) / CONFIG_FILE, config)


def read_checkpoint(ckpt_dir: Path, what: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Any]]:
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
    state = read_weights(weights_path, what, fix="Run the trial again, or restore the file from a complete copy.")
    return state, config


def load_trial_student(trial_dir: Path, what: str, study: str | None = None,
                       trial: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The student of a trial checkpoint, rebuilt from its ``config.json`` and loaded: (model in eval mode, config).

    With ``study``/``trial``, a checkpoint whose config names another study or trial is refused (a leftover of an
    older study of the same name). Every problem is a UserError starting with ``what`` and naming the file.
    """
    from autokd.model.students import StudentSpec, build_from_spec

    state_dict, cfg = read_checkpoint(trial_dir, what=what)
    cfg_path, weights_path = Path(trial_dir) / CONFIG_FILE, Path(trial_dir) / WEIGHTS_FILE
    if study is not None and (cfg.get("study", study) != study or cfg.get("trial", trial) != trial):
        raise UserError(f"{what}: {cfg_path} belongs to study {cfg.get('study')!r} trial {cfg.get('trial')} "
                        "(a leftover of an older study with the same name?); refusing to load it")
    try:
        spec = StudentSpec.from_dict(cfg["student"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{what}: {cfg_path} has no usable 'student' entry ({exc})") from exc
    try:
        model = build_from_spec(spec)
    except Exception as exc:  # noqa: BLE001 - timm raises many kinds for a bad architecture
        raise UserError(f"{what}: cannot rebuild {spec.model_name} from {cfg_path}: "
                        f"{exc.__class__.__name__}: {exc}") from exc
    load_weights(model, state_dict, weights_path,
                 f"{what}: the weights in {weights_path} do not fit the architecture {spec.model_name} ({spec.key}) "
                 f"described in {cfg_path}")
    model.eval()
    return model, cfg
