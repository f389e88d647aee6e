"""Devices: checking a device name, and the GPUs of one machine (which ones `autokd search` uses, and the
environment of each worker).

`--devices all|0,1,3` picks among the CUDA devices this process sees (numbered 0.. as torch numbers them, so
after any `CUDA_VISIBLE_DEVICES` the user set) and `--jobs-per-device K` runs K workers on each. Every
spawned worker gets `CUDA_VISIBLE_DEVICES=<its device>`, so it sees exactly one GPU and its `cuda` is that
GPU. Worker 0 is the process the user started: CUDA is already initialised there, so it cannot be pinned the
same way and trains on `cuda:<index>` of its device instead.

`plan_workers` is pure (visible devices x slots -> worker slots); `visible_devices` asks torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from autokd.errors import UserError

if TYPE_CHECKING:
    import torch

CUDA_ENV = "CUDA_VISIBLE_DEVICES"


def resolve_device(device: str) -> str:
    """``--device``: `auto` → cuda when available else cpu; `cpu`, `cuda` and `cuda:N` are checked and kept."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device, flag="--device")
    return device


def torch_device(device: str | torch.device) -> torch.device:
    """The checked torch device ``device`` names, a plain ``cuda`` as the current CUDA device."""
    import torch

    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_device(device: str | torch.device, flag: str | None = None) -> torch.device:
    """``device`` as a torch device, or a UserError for a name torch does not know or CUDA where there is none.

    With ``flag`` (the option that gave it, e.g. ``--device``) only `cpu` and `cuda[:N]` are accepted and the
    messages name the option; without it any torch device type is. CUDA is not initialised here.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        if flag is not None:
            raise UserError(f"{flag} {device!r}: not a device; valid: auto, cpu, cuda, cuda:N") from None
        raise UserError(f"invalid device {device!r}: {e}; use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if flag is not None and device != "cpu" and dev.type != "cuda":
        raise UserError(f"{flag} {device!r}: not a device; valid: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        if flag is not None:
            raise UserError(f"{flag} {device}: no CUDA device is available on this machine; use {flag} cpu or auto")
        raise UserError(f"device {str(device)!r} was requested but CUDA is not available here; use 'cpu'")
    return dev


@dataclass(frozen=True)
class WorkerSlot:
    """One worker process of a search on this machine."""

    index: int  # worker index: 0 is the process the user started, the others are spawned
    device_index: int | None = None  # index among this process's visible CUDA devices; None on the CPU
    env: dict[str, str] = field(default_factory=dict)  # added to a spawned worker's environment

    @property
    def device(self) -> str:
        """The torch device this worker trains on, as seen from inside the worker."""
        if self.device_index is None:
            return "cpu"
        return f"cuda:{self.device_index}" if self.index == 0 else "cuda"


def visible_ids(count: int, cuda_visible: str | None) -> list[str]:
    """How each of the ``count`` visible devices is named in ``CUDA_VISIBLE_DEVICES`` terms.

    Unset: ``0..count-1``. Set (e.g. ``"2,5"`` or GPU UUIDs): its first ``count`` entries, since CUDA numbers
    the visible devices in that order (and ignores the list from an entry it cannot use).
    """
    if cuda_visible is None:
        return [str(i) for i in range(count)]
    entries = [e.strip() for e in cuda_visible.split(",") if e.strip()]
    return entries[:count] if len(entries) >= count else [str(i) for i in range(count)]


def parse_devices(text: str, visible: list[str], names: list[str] | None = None) -> list[int]:
    """``--devices`` (``all`` or comma-separated indices) -> indices among the visible devices.

    Raises UserError naming the bad entry and the visible devices.
    """
    shown = ", ".join(f"{i} ({names[i]})" if names and i < len(names) else str(i) for i in range(len(visible)))
    where = f" (numbered after {CUDA_ENV}={os.environ[CUDA_ENV]})" if CUDA_ENV in os.environ else ""
    if not visible:
        raise UserError(f"--devices {text}: no CUDA device is visible here; use --device cpu (with --jobs N)")
    if text.strip().lower() == "all":
        return list(range(len(visible)))
    chosen: list[int] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry.isdigit():
            raise UserError(f"--devices {text!r}: {entry!r} is not a device number; give 'all' or numbers such "
                            f"as 0,1,3 among the visible devices: {shown}{where}")
        index = int(entry)
        if index >= len(visible):
            raise UserError(f"--devices {text}: device {index} is not there; visible CUDA devices: {shown}{where}")
        if index in chosen:
            raise UserError(f"--devices {text}: device {index} is listed twice; to run several workers on one "
                            "device use --jobs-per-device K")
        chosen.append(index)
    return chosen


def plan_workers(visible: list[str], chosen: list[int], jobs_per_device: int) -> list[WorkerSlot]:
    """One worker slot per (chosen device, slot), worker 0 on the first device.

    Devices are filled in turn (every device's slot 0, then every slot 1, ...), so the first workers to start
    spread over all devices. A spawned worker's ``env`` pins it to its device.
    """
    if jobs_per_device < 1:
        raise UserError(f"--jobs-per-device {jobs_per_device}: must be at least 1")
    if not chosen:
        raise UserError("--devices: no device chosen")
    slots: list[WorkerSlot] = []
    for _ in range(jobs_per_device):
        for index in chosen:
            worker = len(slots)
            env = {} if worker == 0 else {CUDA_ENV: visible[index]}
            slots.append(WorkerSlot(index=worker, device_index=index, env=env))
    return slots


def cpu_workers(jobs: int) -> list[WorkerSlot]:
    """``--jobs N`` on the CPU: N workers, no device."""
    return [WorkerSlot(index=i) for i in range(jobs)]


def visible_devices() -> tuple[list[str], list[str]]:
    """(CUDA_VISIBLE_DEVICES-style ids, names) of the CUDA devices this process sees."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return visible_ids(count, os.environ.get(CUDA_ENV)), [torch.cuda.get_device_name(i) for i in range(count)]


def physical_id(device: str) -> str:
    """The CUDA_VISIBLE_DEVICES-style id of a ``cuda``/``cuda:N`` device of this process (its own when pinned)."""
    import torch

    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    ids = visible_ids(torch.cuda.device_count(), os.environ.get(CUDA_ENV))
    return ids[index] if index < len(ids) else str(index)
