"""A student as ONNX bytes: the one export function that both ``autokd export`` ships and a search times.

torch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``) with a dynamic batch axis, opset
:data:`ONNX_OPSET`; if it fails on some model, the ``torch.export``-based one (``dynamo=True``) is tried, and the
one used is returned. The TorchScript-based one comes first because a search pays for an export on every trial
and it is much the faster of the two (docs/latency.md, "Exporter").
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

ONNX_OPSET = 18
EXAMPLE_BATCH = 2  # the export's example input: batch 1 would be specialised
INPUT_NAME, OUTPUT_NAME = "input", "logits"

__all__ = ["EXAMPLE_BATCH", "INPUT_NAME", "ONNX_OPSET", "OUTPUT_NAME", "example_batch", "export_onnx",
           "quiet_exporter"]


def example_batch(x: torch.Tensor) -> torch.Tensor:
    """The export's example input from real images ``x``: its first :data:`EXAMPLE_BATCH`, the first one repeated
    when there are fewer. Its values do not enter the graph; its batch size must not be 1."""
    return x[:EXAMPLE_BATCH] if len(x) >= EXAMPLE_BATCH else x[:1].repeat(EXAMPLE_BATCH, 1, 1, 1)


def export_onnx(model: nn.Module, example: torch.Tensor) -> tuple[bytes, str, list[str]]:
    """ONNX bytes of ``model`` (dynamic batch axis): (bytes, exporter used, notes about failed attempts)."""
    notes: list[str] = []
    attempts: list[tuple[str, Callable[[], bytes]]] = [("legacy", lambda: _onnx_legacy(model, example)),
                                                       ("dynamo", lambda: _onnx_dynamo(model, example))]
    for name, attempt in attempts:
        try:
            with quiet_exporter():
                return attempt(), name, notes
        except Exception as exc:  # noqa: BLE001 - any exporter failure: try the next one, report all if none works
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            notes.append(f"{name} exporter failed: {exc.__class__.__name__}: {first_line}")
    raise RuntimeError("ONNX export failed with every exporter: " + " | ".join(notes))


def _onnx_dynamo(model: nn.Module, example: torch.Tensor) -> bytes:
    program = torch.onnx.export(model, (example,), None, dynamo=True, external_data=False,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    return program.model_proto.SerializeToString()


def _onnx_legacy(model: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(model, (example,), buf, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      opset_version=ONNX_OPSET, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return buf.getvalue()


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence an exporter's progress prints and deprecation/tracer warnings (parity is checked on real inputs)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
