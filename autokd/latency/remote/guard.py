"""Check an uploaded ONNX model before ONNX Runtime loads it, and hand back the bytes it may load.

`autokd latency-server` loads models chosen by whoever holds the token. Two things in such a file reach past the
model itself: a tensor whose bytes live in an external file (``data_location = EXTERNAL`` or an ``external_data``
entry: ONNX Runtime opens that path, relative to its working directory, and a file's bytes read as an int64 shape
come back in its error text), and declared input shapes the server would allocate before running anything.

How the check cannot be fooled by the wire format: the upload is parsed with the ``onnx`` package's protobuf
classes (a real protobuf parser, torch-free), unknown fields are discarded, every TensorProto anywhere in the
message tree is inspected, and the model is serialised again. The server gives ONNX Runtime those canonical
bytes, never the upload, so whatever ONNX Runtime parses is exactly what was checked: a field hidden from one
parser (an over-long tag varint that C++ protobuf truncates to 32 bits, say) either makes the parse fail here
or is dropped with the unknown fields. Refusals carry a category and a fixed sentence, never text from the upload.
How it is tested: docs/latency.md, "Latency on a target device".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import Message as _ProtoMessage

#: The declared inputs of one upload, at the requested batch, may take at most this many bytes together
#: (random inputs are built before ONNX Runtime runs, so a declared 2 GB input would be allocated first).
DEFAULT_MAX_INPUT_BYTES = 64 * 1024 * 1024
#: numpy builds arrays of at most 32 dimensions (numpy 1.x; 2.x allows 64).
MAX_INPUT_RANK = 32
#: Levels of nested protobuf messages walked (a graph inside a node attribute inside a graph is three); the
#: parser refuses about as deep already, this bounds the walk on its own.
MAX_NESTING = 100

MALFORMED = "malformed"
EXTERNAL_DATA = "external-data"
INPUT_TOO_LARGE = "input-too-large"
UNSUPPORTED_INPUT = "unsupported-input"
CATEGORIES = (MALFORMED, EXTERNAL_DATA, INPUT_TOO_LARGE, UNSUPPORTED_INPUT)

# ONNX Runtime reads bytes with this identifier at offset 4 as an ORT-format flatbuffer, not as ONNX.
_ORT_FORMAT_MARK = b"ORTM"

# Element types an input may have: those numpy builds natively (no strings, bfloat16, float8, 4-bit, complex).
_INPUT_DTYPES: dict[int, np.dtype] = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.DOUBLE: np.dtype(np.float64),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16), onnx.TensorProto.BOOL: np.dtype(np.bool_),
    onnx.TensorProto.INT8: np.dtype(np.int8), onnx.TensorProto.INT16: np.dtype(np.int16),
    onnx.TensorProto.INT32: np.dtype(np.int32), onnx.TensorProto.INT64: np.dtype(np.int64),
    onnx.TensorProto.UINT8: np.dtype(np.uint8), onnx.TensorProto.UINT16: np.dtype(np.uint16),
    onnx.TensorProto.UINT32: np.dtype(np.uint32), onnx.TensorProto.UINT64: np.dtype(np.uint64),
}

_NOT_ONNX = "the body is not an ONNX model: it does not parse as an onnx.ModelProto"
_TOO_DEEP = f"the model nests messages (subgraphs) more than {MAX_NESTING} levels deep"
_ORT_FORMAT = ("the model's serialised bytes carry ONNX Runtime's ORT-format marker at offset 4 and would not be "
               "read as ONNX; change the model's leading strings (producer name)")
_EXTERNAL = ("a tensor references an external data file (a path on the server); upload a model with all its "
             "weights inside the .onnx file (torch.onnx.export, or onnx.save without save_as_external_data)")


class RefusedModel(ValueError):
    """An upload the server must not load: ``category`` is one of :data:`CATEGORIES`, ``reason`` a fixed
    sentence for the client (it never quotes the upload)."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


@dataclass(frozen=True)
class InputSpec:
    """One input ONNX Runtime will need: its name, its shape at the requested batch, its numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes an array of this shape and dtype takes."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class CheckedModel:
    """An upload that passed: ``canonical`` is the bytes to give ONNX Runtime (the upload parsed, stripped of
    unknown fields and serialised again), ``inputs`` the graph inputs to feed, in the graph's order."""

    canonical: bytes
    inputs: list[InputSpec]


def _parse(data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # noqa: BLE001 - DecodeError, or another type from protobuf's pure-Python parser
        raise RefusedModel(MALFORMED, _NOT_ONNX) from None
    model.DiscardUnknownFields()  # recursive: fields this parser did not understand never reach ONNX Runtime
    return model


def _refuse_external_tensors(model: onnx.ModelProto) -> None:
    """Walk every message of the tree (graphs, nodes, attributes, subgraphs, functions, training info, sparse
    tensors, and whatever a newer onnx.proto adds) and refuse any TensorProto that names external data."""
    stack: list[tuple[_ProtoMessage, int]] = [(model, 0)]
    while stack:
        message, depth = stack.pop()
        if depth > MAX_NESTING:
            raise RefusedModel(MALFORMED, _TOO_DEEP)
        if isinstance(message, onnx.TensorProto):
            # A tensor holds no tensors, so its fields (raw_data among them) are never listed.
            if message.data_location == onnx.TensorProto.EXTERNAL or len(message.external_data):
                raise RefusedModel(EXTERNAL_DATA, _EXTERNAL)
            continue
        for field, value in message.ListFields():
            if field.message_type is None:
                continue
            if isinstance(value, _ProtoMessage):
                stack.append((value, depth + 1))
            else:  # a repeated field of messages
                stack.extend((child, depth + 1) for child in value)


def _canonical(data: bytes) -> tuple[onnx.ModelProto, bytes]:
    model = _parse(data)
    _refuse_external_tensors(model)
    canonical = model.SerializeToString(deterministic=True)
    if canonical[4:8] == _ORT_FORMAT_MARK:
        raise RefusedModel(MALFORMED, _ORT_FORMAT)
    return model, canonical


def _input_specs(graph: onnx.GraphProto, batch: int, max_input_bytes: int) -> list[InputSpec]:
    # Inputs that have an initializer are optional overrides: ONNX Runtime does not ask for them.
    initialised = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    specs: list[InputSpec] = []
    total = 0
    for position, value_info in enumerate(graph.input, start=1):
        if value_info.name in initialised:
            continue
        where = f"input {position} of the graph"
        if value_info.type.WhichOneof("value") != "tensor_type":
            raise RefusedModel(UNSUPPORTED_INPUT, f"{where} is not a tensor (sequence, map or optional inputs are "
                                                  "not timed)")
        tensor_type = value_info.type.tensor_type
        dtype = _INPUT_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise RefusedModel(UNSUPPORTED_INPUT, f"{where} has an element type this server does not build inputs "
                                                  "of (supported: float16/32/64, int8-64, uint8-64, bool)")
        if not tensor_type.HasField("shape"):
            raise RefusedModel(UNSUPPORTED_INPUT, f"{where} declares no shape")
        dims = tensor_type.shape.dim
        if len(dims) > MAX_INPUT_RANK:
            raise RefusedModel(UNSUPPORTED_INPUT, f"{where} has more than {MAX_INPUT_RANK} dimensions")
        shape = []
        for axis, dim in enumerate(dims):
            if axis == 0:
                shape.append(batch)  # the first dimension is the batch, as in a local measurement
            elif dim.WhichOneof("value") == "dim_value" and dim.dim_value > 0:
                shape.append(int(dim.dim_value))
            else:
                raise RefusedModel(UNSUPPORTED_INPUT, f"unsupported input shape: {where} has a symbolic or "
                                                      f"non-positive dimension at axis {axis} (only the first "
                                                      "dimension, the batch, may be dynamic)")
        spec = InputSpec(value_info.name, tuple(shape), dtype)
        total += spec.nbytes
        if total > max_input_bytes:
            raise RefusedModel(INPUT_TOO_LARGE, f"the model's inputs at batch {batch} take more than this "
                                                f"server's limit of {max_input_bytes} bytes")
        specs.append(spec)
    return specs


def inspect_upload(data: bytes, *, batch: int, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> CheckedModel:
    """Check an uploaded ONNX model for a measurement at ``batch``: the canonical bytes to load and the inputs
    to build, or :class:`RefusedModel` (malformed, external data, inputs over ``max_input_bytes`` together, an
    input shape other than a dynamic first dimension)."""
    if batch < 1 or max_input_bytes < 1:
        raise ValueError(f"batch and max_input_bytes must be >= 1, got {batch} and {max_input_bytes}")
    model, canonical = _canonical(data)
    return CheckedModel(canonical, _input_specs(model.graph, batch, max_input_bytes))


def external_data_reason(model: bytes) -> str | None:
    """Why ``model`` must not be loaded at all (not ONNX, or external data), or None: the first half of
    :func:`inspect_upload`, without the input checks."""
    try:
        _canonical(model)
    except RefusedModel as refused:
        return refused.reason
    return None


__all__ = ["CATEGORIES", "DEFAULT_MAX_INPUT_BYTES", "EXTERNAL_DATA", "INPUT_TOO_LARGE", "MALFORMED", "MAX_INPUT_RANK",
           "MAX_NESTING", "UNSUPPORTED_INPUT", "CheckedModel", "InputSpec", "RefusedModel", "external_data_reason",
           "inspect_upload"]
