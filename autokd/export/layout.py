"""The files of an export folder and the checks on ``--out``, without torch: `autokd export` refuses a wrong
``--out`` before it imports torch or opens the study.

What an export writes: ``model.safetensors`` and ``config.json`` always, the ``--format`` files, and
``model.int8.onnx`` with ``--int8``. A folder that holds anything is refused unless ``force``; a format file an
export does not write is removed only when the folder's ``config.json`` is an autokd export's that lists it
(:func:`earlier_export_files`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from autokd.errors import UserError, did_you_mean
from autokd.model.files import CONFIG_FILE, WEIGHTS_FILE

FORMATS = ("safetensors", "onnx", "torchscript")
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
INT8_FILE = "model.int8.onnx"
FORMAT_FILES = {"safetensors": WEIGHTS_FILE, "onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
EXPORT_FORMAT = "autokd-student/1"  # config.json's "format": tells an autokd export's config from any other


def parse_formats(formats: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """`--format` comma list -> ordered list of formats; safetensors is always included."""
    if formats is None:
        return list(FORMATS)
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = {"safetensors"}
    for raw in items:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name not in FORMATS:
            raise UserError(f"--format {raw!r}: unknown export format{did_you_mean(name, FORMATS)}; valid: "
                            f"{', '.join(FORMATS)} (safetensors + config.json are always written)")
        chosen.add(name)
    return [f for f in FORMATS if f in chosen]


def earlier_export_files(out: Path) -> set[str]:
    """The file names autokd writes that ``out/config.json`` lists, when that config is an autokd export's."""
    try:
        cfg = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(cfg, dict) or cfg.get("format") != EXPORT_FORMAT or not isinstance(cfg.get("files"), dict):
        return set()
    # Only autokd's own names: a config.json naming other paths never makes export delete them.
    return {name for name in cfg["files"].values() if isinstance(name, str)} & {*FORMAT_FILES.values(), INT8_FILE}


def export_files(formats: list[str], int8: bool) -> list[str]:
    """The names of the files an export of ``formats`` (and ``int8``) writes, config.json included."""
    return [FORMAT_FILES[f] for f in formats] + [CONFIG_FILE] + ([INT8_FILE] if int8 else [])


def check_out_dir(out: Path, force: bool, files: list[str]) -> None:
    """Refuse an ``--out`` an export cannot or should not write to, before anything is loaded (UserError).

    ``out`` may be missing (its first existing parent must be a writable folder) or an empty folder; a folder
    that holds anything only with ``force``, where the export replaces ``files`` and nothing else.
    """
    out = Path(out)
    if os.path.lexists(out):
        if not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a folder; an export writes a folder "
                            f"({', '.join(files)}): give a new or empty folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"--out {out}: the folder is not writable by this user")
        entries = sorted(out.iterdir(), key=lambda p: p.name)
        if entries and not force:
            shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:5])
            count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
            raise UserError(f"--out {out}: the folder is not empty, it holds {count} ({shown}"
                            f"{', ...' if len(entries) > 5 else ''}); an export writes {', '.join(files)} there. Give "
                            "a new or empty folder, or pass --force to replace those files (nothing else in the "
                            "folder is changed).")
        return
    parent = out.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: cannot create the folder: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot create the folder: {parent} is not writable by this user")
