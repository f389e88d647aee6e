"""Hostile and damaged ONNX uploads, built with onnx.helper and raw protobuf bytes: shared by the upload guard's
tests (tests/test_onnx_guard.py) and the latency server's end-to-end tests (tests/test_latency_server.py)."""
from __future__ import annotations

import random

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def model_of(graph: onnx.GraphProto, **fields: object) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], **fields)


def conv_net() -> onnx.ModelProto:
    """A tiny image classifier (Conv, Relu, GlobalAveragePool, Flatten, Gemm) with a dynamic batch."""
    rng = np.random.default_rng(1)
    tensors = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("conv_w", (4, 3, 3, 3)), ("conv_b", (4,)), ("fc_w", (4, 2)), ("fc_b", (2,)))]
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"])]
    graph = helper.make_graph(nodes, "convnet",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], tensors)
    model = model_of(graph)
    onnx.checker.check_model(model, full_check=True)
    return model


# --- the protobuf wire format, by hand ----------------------------------------------------------------------------

def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, wire: int, payload: bytes, tag_bits: int = 0) -> bytes:
    """One field; ``tag_bits`` are ORed into the tag (bit 32: a 5-byte tag that C++ protobuf truncates)."""
    head = varint((number << 3 | wire) | tag_bits)
    return head + (varint(len(payload)) + payload if wire == 2 else payload)


BIT_32 = 1 << 32


def with_initializer(model: onnx.ModelProto, tensor_bytes: bytes) -> bytes:
    """``model`` serialised with one more graph initializer given as raw bytes (protobuf merges the two graphs)."""
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    return head.SerializeToString() + field(7, 2, model.graph.SerializeToString() + field(5, 2, tensor_bytes))


def hidden_external_int64(name: str, location: str, count: int, hide: tuple[int, ...] = (13, 14),
                          tag_bits: int = BIT_32) -> bytes:
    """An int64 tensor of ``count`` values whose ``external_data`` (field 13) and/or ``data_location = EXTERNAL``
    (field 14) are written with 5-byte tags that have bit 32 set: ONNX Runtime keeps the low 32 bits and sees
    the fields; a parser reading whole tags sees field numbers over 2**29. ``tag_bits=0``: plain tags."""
    tensor = TensorProto(name=name, data_type=TensorProto.INT64, dims=[count])
    raw = tensor.SerializeToString()
    if 13 in hide:
        raw += field(13, 2, field(1, 2, b"location") + field(2, 2, location.encode()), tag_bits=tag_bits)
    if 14 in hide:
        raw += field(14, 0, varint(TensorProto.EXTERNAL), tag_bits=tag_bits)
    return raw


SECRET = b"SECRET-KEY:12345"  # two int64 values when read as a tensor


def secret_texts() -> list[str]:
    """How the secret can show in an error: as text, or as the int64 values of a shape ONNX Runtime prints."""
    values = np.frombuffer(SECRET, dtype="<i8")
    return [SECRET.decode(), SECRET[:8].decode(), *(str(int(v)) for v in values)]


def reshape_by_hidden_shape(hide: tuple[int, ...] = (13, 14), location: str = "secret.txt",
                            tag_bits: int = BIT_32) -> bytes:
    """Reshape whose shape is an int64 initializer hiding external data (``location``, behind tags with
    ``tag_bits``): ONNX Runtime reads the file as the shape and prints it in its error. The shape is also a graph
    input, so it is not folded before the run."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "leak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return with_initializer(model_of(graph), hidden_external_int64("shape", location, 2, hide, tag_bits))


# --- random damage ------------------------------------------------------------------------------------------------

def mutate(body: bytes, rng: random.Random) -> bytes:
    """``body`` with one to four random edits: a byte replaced or bit-flipped, bytes inserted or deleted, an
    over-long tag for external data (field 13 or 14) inserted."""
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        kind = rng.randrange(5)
        if kind == 0:
            data[at] = rng.randrange(256)
        elif kind == 1:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 2:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        elif kind == 3:
            del data[at:at + rng.randint(1, 16)]
        else:
            data[at:at] = varint((rng.choice([13, 14]) << 3 | rng.choice([0, 2])) | BIT_32) + b"\x01"
    return bytes(data)


def flip(body: bytes, rng: random.Random) -> bytes:
    """``body`` with one to four bytes replaced or bit-flipped in place (its length, and so most of its protobuf
    framing, kept: the damage often parses and reaches ONNX Runtime)."""
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        data[at] = rng.randrange(256) if rng.random() < 0.5 else data[at] ^ 1 << rng.randrange(8)
    return bytes(data)


def truncate(body: bytes, rng: random.Random) -> bytes:
    """``body`` cut short at a random point (at least one byte kept)."""
    return body[:rng.randrange(1, len(body))]


def splice(body: bytes, donor: bytes, rng: random.Random) -> bytes:
    """The start of ``body`` followed by the end of ``donor``, each cut at a random point."""
    return body[:rng.randrange(len(body) + 1)] + donor[rng.randrange(len(donor)):]
