"""Refuse ONNX models that reference external data files, without importing onnx or torch.

An ONNX tensor can keep its bytes in a file named by the model (``data_location = EXTERNAL`` with a
``location`` entry); loading such a model makes ONNX Runtime open that path. A server that loads uploaded
models must never open a path chosen by the uploader, so `autokd latency-server` checks every tensor first.
This walks the protobuf wire format over the few message types that can hold tensors (field numbers from
onnx.proto), so it runs where only onnxruntime and numpy are installed.
"""
from __future__ import annotations

# message type -> {field number: child message type}, only the paths that can lead to a TensorProto
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training_info", 25: "function"},
    "training_info": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
    "tensor": {},
}
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_EXTERNAL = 1
_MAX_DEPTH = 64


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _check(buf: memoryview, kind: str, depth: int) -> str | None:
    if depth > _MAX_DEPTH:
        raise _Malformed("nested too deeply")
    children = _SCHEMA[kind]
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            if kind == "tensor" and field == _TENSOR_DATA_LOCATION and value == _EXTERNAL:
                return "a tensor is stored in an external data file"
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            end = pos + length
            if end > len(buf):
                raise _Malformed("field runs past the end of the file")
            if kind == "tensor" and field == _TENSOR_EXTERNAL_DATA:
                return "a tensor references an external data file"
            child = children.get(field)
            if child is not None:
                found = _check(buf[pos:end], child, depth + 1)
                if found:
                    return found
            pos = end
        else:
            raise _Malformed(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise _Malformed("field runs past the end of the file")
    return None


def external_data_reason(model: bytes) -> str | None:
    """Why ``model`` (a serialised ONNX ModelProto) must not be loaded, or None if it holds all its data.

    Bytes that are not a well-formed protobuf message are reported too (ONNX Runtime would refuse them anyway).
    """
    try:
        found = _check(memoryview(model), "model", 0)
    except _Malformed as exc:
        return f"not an ONNX file ({exc})"
    if found:
        return (f"refused: {found}; upload a model with all its weights inside the .onnx file "
                "(torch.onnx.export / onnx.save without save_as_external_data)")
    return None


__all__ = ["external_data_reason"]
