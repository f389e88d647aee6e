"""The upload guard of the latency server (autokd.latency.remote.guard): ONNX models that name external data files
are refused wherever their tensors sit, and bytes that are not ONNX are reported, on real ONNX files."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import repo_pythonpath
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data, uses_external_data

from autokd.latency import protocol
from autokd.latency.remote.guard import external_data_reason


def weight(name: str = "W", size: int = 4) -> TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).random((size, size), dtype=np.float32), name)


def external(name: str = "W", location: str | None = "../../etc/passwd") -> TensorProto:
    """A tensor whose bytes ONNX Runtime would read from ``location`` (None: no location entry, only the flag)."""
    tensor = weight(name)
    if location is not None:
        set_external_data(tensor, location=location)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    assert uses_external_data(tensor)  # external by ONNX's own definition
    return tensor


def matmul_graph(initializers: list[TensorProto] | None = None, nodes: list[onnx.NodeProto] | None = None,
                 name: str = "g") -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), *(nodes or [])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [weight()] if initializers is None else initializers)


def model_of(graph: onnx.GraphProto, **fields: object) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], **fields)


def test_a_model_that_holds_its_weights_passes_and_onnx_runtime_runs_it() -> None:
    body = model_of(matmul_graph()).SerializeToString()
    assert external_data_reason(body) is None
    session = protocol.make_session(body)
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ numpy_helper.to_array(weight()), rtol=1e-6)


def test_what_it_refuses_onnx_runtime_would_read_from_a_file_the_model_names(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(model_of(matmul_graph()), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    # Loaded by path, ONNX Runtime opens weights.bin beside it: on a server, a path the uploader chose.
    x = np.ones((1, 4), dtype=np.float32)
    got = protocol.make_session(path).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ numpy_helper.to_array(weight()), rtol=1e-6)
    reason = external_data_reason(path.read_bytes())
    assert reason is not None and reason.startswith("refused: a tensor references an external data file")
    assert "save_as_external_data" in reason  # how to make an acceptable file


def _in_node_attribute() -> onnx.ModelProto:
    return model_of(matmul_graph(nodes=[helper.make_node("Constant", [], ["c"], value=external("c"))]))


def _in_tensor_list_attribute() -> onnx.ModelProto:
    node = helper.make_node("Custom", [], ["c"], domain="test", tensors=[weight("a"), external("b")])
    return model_of(matmul_graph(nodes=[node]))


def _in_subgraph_of_if() -> onnx.ModelProto:
    branch = helper.make_graph([helper.make_node("Identity", ["E"], ["o"])], "then", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4, 4])], [external("E")])
    node = helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch)
    return model_of(matmul_graph(nodes=[node]))


def _in_graph_list_attribute() -> onnx.ModelProto:
    inner = helper.make_graph([], "inner", [], [], [external("E")])
    node = helper.make_node("Custom", [], ["c"], domain="test", branches=[matmul_graph(name="plain"), inner])
    return model_of(matmul_graph(nodes=[node]))


def _in_sparse_initializer() -> onnx.ModelProto:
    values = external("values")
    indices = numpy_helper.from_array(np.array([0, 5], dtype=np.int64), "indices")
    graph = matmul_graph()
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 4]))
    return model_of(graph)


def _in_sparse_indices() -> onnx.ModelProto:
    values = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "values")
    graph = matmul_graph()
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, external("indices"), [4, 4]))
    return model_of(graph)


def _in_sparse_tensor_attribute() -> onnx.ModelProto:
    indices = numpy_helper.from_array(np.array([0, 5], dtype=np.int64), "indices")
    node = helper.make_node("Constant", [], ["c"],
                            sparse_value=helper.make_sparse_tensor(external("values"), indices, [4, 4]))
    return model_of(matmul_graph(nodes=[node]))


def _in_sparse_tensor_list_attribute() -> onnx.ModelProto:
    indices = numpy_helper.from_array(np.array([0, 5], dtype=np.int64), "indices")
    node = helper.make_node("Custom", [], ["c"], domain="test",
                            sparse=[helper.make_sparse_tensor(external("values"), indices, [4, 4])])
    return model_of(matmul_graph(nodes=[node]))


def _in_function() -> onnx.ModelProto:
    function = helper.make_function("local", "F", [], ["c"],
                                    [helper.make_node("Constant", [], ["c"], value=external("c"))],
                                    [helper.make_opsetid("", 17)])
    return model_of(matmul_graph(), functions=[function])


def _in_training_initialization() -> onnx.ModelProto:
    model = model_of(matmul_graph())
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph([], "init", [], [], [external("W0")]))
    return model


def _in_training_algorithm() -> onnx.ModelProto:
    model = model_of(matmul_graph())
    info = model.training_info.add()
    info.algorithm.CopyFrom(helper.make_graph([], "step", [], [], [external("W0")]))
    return model


def _flag_without_location() -> onnx.ModelProto:
    return model_of(matmul_graph([external("W", location=None)]))


@pytest.mark.parametrize(("build", "what"), [
    (_in_node_attribute, "references"), (_in_tensor_list_attribute, "references"),
    (_in_subgraph_of_if, "references"), (_in_graph_list_attribute, "references"),
    (_in_sparse_initializer, "references"), (_in_sparse_indices, "references"),
    (_in_sparse_tensor_attribute, "references"),
    (_in_sparse_tensor_list_attribute, "references"), (_in_function, "references"),
    (_in_training_initialization, "references"), (_in_training_algorithm, "references"),
    (_flag_without_location, "is stored in"),
], ids=lambda v: getattr(v, "__name__", v))
def test_an_external_tensor_is_found_wherever_a_model_can_hold_one(build: Callable[[], onnx.ModelProto],
                                                                   what: str) -> None:
    reason = external_data_reason(build().SerializeToString())
    assert reason == (f"refused: a tensor {what} an external data file; upload a model with all its weights "
                      "inside the .onnx file (torch.onnx.export / onnx.save without save_as_external_data)")


def test_bytes_inside_strings_are_not_read_as_tensors() -> None:
    # 0x70 0x01 is a tensor's "data_location = EXTERNAL" on the wire; inside a string it is just text.
    marker = "p\x01"
    graph = matmul_graph([weight()])
    graph.doc_string = marker
    graph.initializer[0].name = "W"
    graph.initializer[0].doc_string = marker
    graph.node[0].doc_string = marker
    model = model_of(graph, doc_string=marker, producer_name=marker)
    assert marker.encode() in model.SerializeToString()
    assert external_data_reason(model.SerializeToString()) is None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    head = _varint(number << 3 | wire)
    return head + (_varint(len(payload)) + payload if wire == 2 else payload)


def test_fixed_width_and_unknown_fields_are_skipped_exactly() -> None:
    # Fields a newer ONNX may add (unknown numbers, fixed32/fixed64 values) come before the graph: the walk must
    # step over them by their exact width to find the external tensor after them.
    unsafe = model_of(matmul_graph([external()])).SerializeToString()
    safe = model_of(matmul_graph()).SerializeToString()
    prefix = _field(90, 1, b"\x01" * 8) + _field(91, 5, b"\x02" * 4) + _field(92, 0, _varint(2 ** 40))
    attr = helper.make_attribute("alpha", 1.5)  # a float attribute is a fixed32 on the wire
    attr.t.CopyFrom(external("t"))
    odd_node = helper.make_node("Custom", [], ["c"], domain="test")
    odd_node.attribute.append(attr)
    assert onnx.ModelProto.FromString(prefix + safe).graph.name == "g"  # protobuf itself accepts the prefix
    assert external_data_reason(prefix + safe) is None
    assert "external data file" in (external_data_reason(prefix + unsafe) or "")
    assert "external data file" in (external_data_reason(model_of(matmul_graph(nodes=[odd_node]))
                                                         .SerializeToString()) or "")


def _nested(levels: int, innermost: list[TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph([], "leaf", [], [], innermost)
    for i in range(levels):
        graph = helper.make_graph([helper.make_node("Custom", [], [f"o{i}"], domain="test", body=graph)],
                                  f"level{i}", [], [])
    return model_of(graph)


def test_deep_subgraphs_are_walked_to_the_end_and_absurd_depth_is_refused() -> None:
    # model > graph > (node > attribute > graph) * levels > tensor: 20 levels stay within the walk's limit.
    assert "external data file" in (external_data_reason(_nested(20, [external()]).SerializeToString()) or "")
    assert external_data_reason(_nested(20, [weight()]).SerializeToString()) is None
    assert external_data_reason(_nested(30, [weight()]).SerializeToString()) == "not an ONNX file (nested too deeply)"


@pytest.mark.parametrize(("body", "why"), [
    (b"this is not an onnx model" * 10, "unsupported protobuf wire type"),
    (b"\x80\x80", "truncated varint"),
    (_field(7, 2, b"")[:-1] + _varint(500) + b"\x00" * 10, "field runs past the end of the file"),
])
def test_bytes_that_are_not_onnx_are_reported(body: bytes, why: str) -> None:
    reason = external_data_reason(body)
    assert reason is not None and reason.startswith("not an ONNX file (") and why in reason


def test_a_truncated_upload_is_not_onnx() -> None:
    body = model_of(matmul_graph()).SerializeToString()
    reason = external_data_reason(body[: len(body) // 2])
    assert reason == "not an ONNX file (field runs past the end of the file)"


def test_the_guard_imports_neither_onnx_nor_torch() -> None:
    # It runs in `autokd latency-server` on a target device where only onnxruntime and numpy are installed.
    code = ("import sys, autokd.latency.remote.guard; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'torch', 'timm')); "
            "print(*bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
