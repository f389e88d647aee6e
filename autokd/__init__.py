"""autokd: joint search over timm student architectures and knowledge-distillation hyperparameters."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_student"]


def load_student(path, int8=False):  # noqa: ANN001, ANN201 - thin lazy re-export, documented in autokd.export
    """Load an exported student directory (model.safetensors + config.json) as a ready nn.Module.

    ``int8=True``: its ``model.int8.onnx`` (``autokd export --int8``) instead, as an ONNX Runtime session wrapper
    called the same way (``model(x)`` -> logits; torch in, torch out; numpy in, numpy out).
    """
    if int8:
        from autokd.int8 import load_int8_student

        return load_int8_student(path)
    from autokd.export import load_student as _load_student

    return _load_student(path)
