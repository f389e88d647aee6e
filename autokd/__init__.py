"""autokd: joint search over timm student architectures and knowledge-distillation hyperparameters."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_student"]


def load_student(path):  # noqa: ANN001, ANN201 - thin lazy re-export, documented in autokd.export
    """Load an exported student directory (model.safetensors + config.json) as a ready nn.Module."""
    from autokd.export import load_student as _load_student

    return _load_student(path)
