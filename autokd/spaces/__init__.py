"""The search spaces shipped inside the package (``autokd/spaces/*.yaml``) and ``--space NAME|FILE``.

The YAML files are package data, read through ``importlib.resources``, so an installed wheel has them and
``autokd search`` works from any directory. The repository's ``search_spaces/`` is a link to the same folder:
the documented examples and the built-ins are one set of files.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from autokd.errors import UserError, did_you_mean

DEFAULT_SPACE = "default"


def builtin_spaces() -> dict[str, Path]:
    """Built-in space name -> path of its YAML file inside the installed package."""
    folder = resources.files("autokd") / "spaces"
    # A wheel or editable install unpacks package data as files, so the Traversable is a real path.
    return {Path(str(entry)).stem: Path(str(entry)) for entry in folder.iterdir()
            if entry.name.endswith(".yaml") and entry.is_file()}


def _looks_like_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml"))


def resolve_space(value: str | Path | None) -> Path:
    """The YAML file for ``--space``: an existing file, else a built-in name (``default``, ``cifar_gpu``).

    None means the built-in default. A name that is neither raises UserError listing the built-ins with the
    closest match; a path that does not exist is left to ``load_space``'s file-not-found error.
    """
    spaces = builtin_spaces()
    if value is None:
        return spaces[DEFAULT_SPACE]
    text = str(value)
    if Path(text).is_file() or not _looks_like_name(text):
        return Path(text)
    if text in spaces:
        return spaces[text]
    raise UserError(f"--space {text!r}: no such file and not a built-in space{did_you_mean(text, spaces)}; built-in spaces: "
                    f"{', '.join(sorted(spaces))} (or give the path of a YAML file)")
