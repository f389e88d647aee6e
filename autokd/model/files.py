"""The names of the files of a model folder (a trial checkpoint, an export); no torch, so that `autokd export`
can check its output folder before it loads anything."""
from __future__ import annotations

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
