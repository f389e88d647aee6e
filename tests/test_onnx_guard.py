"""The upload guard of the latency server (autokd.latency.remote.guard), on real ONNX files and real ONNX Runtime:
external data is refused wherever a tensor sits, including behind wire-format tricks that fooled a hand-written
walk; the bytes it hands back load in ONNX Runtime exactly as the original; declared inputs are bounded before
anything is allocated; random damage to a model is refused or harmless."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import repo_pythonpath
from google.protobuf.message import Message
from hostile_onnx import (
    SECRET,
    conv_net,
    field,
    hidden_external_int64,
    model_of,
    mutate,
    reshape_by_hidden_shape,
    secret_texts,
    varint,
    with_initializer,
)
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data, uses_external_data

from autokd.latency import protocol
from autokd.latency.remote import guard
from autokd.latency.remote.guard import (
    CATEGORIES,
    DEFAULT_MAX_INPUT_BYTES,
    CheckedModel,
    InputSpec,
    RefusedModel,
    external_data_reason,
    inspect_upload,
)

# --- models (the shared builders are in tests/hostile_onnx.py) -------------------------------------------------

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


def external_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the tensors anywhere in ``model`` that use external data (the test's own walk)."""
    found: list[str] = []

    def visit(message: Message) -> None:
        if isinstance(message, TensorProto):
            if uses_external_data(message) or len(message.external_data):
                found.append(message.name)
            return
        for descriptor, value in message.ListFields():
            if descriptor.message_type is not None:
                for child in ([value] if isinstance(value, Message) else value):
                    visit(child)

    visit(model)
    return found


def ort_error_texts(model: bytes) -> list[str]:
    """Every exception text ONNX Runtime gives loading ``model`` and running it on a (2, 3) input."""
    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((2, 3), dtype=np.float32)})
    except Exception as exc:  # noqa: BLE001 - whatever ONNX Runtime raises, its text is what is checked
        return [f"{type(exc).__name__}: {exc}"]
    return []


# --- what passes --------------------------------------------------------------------------------------------------

def test_a_model_that_holds_its_weights_passes_and_its_canonical_bytes_run_as_the_original() -> None:
    model = conv_net()
    original = model.SerializeToString()
    checked = inspect_upload(original, batch=3)
    assert isinstance(checked, CheckedModel)
    assert checked.inputs == [InputSpec("x", (3, 3, 8, 8), np.dtype(np.float32))]
    assert onnx.ModelProto.FromString(checked.canonical) == model
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    want = protocol.make_session(original).run(None, {"x": x})[0]
    got = protocol.make_session(checked.canonical).run(None, {"x": x})[0]
    assert want.shape == (3, 2)
    np.testing.assert_array_equal(got, want)
    assert inspect_upload(checked.canonical, batch=3).canonical == checked.canonical  # a fixed point


def test_inputs_come_back_in_their_own_dtypes_and_inputs_with_an_initializer_are_left_out() -> None:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT), helper.make_node("Add", ["f", "x"], ["s"]),
         helper.make_node("Mul", ["s", "scale"], ["y"])], "mixed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 5]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 5]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(np.array([2.0], dtype=np.float32), "scale")])
    checked = inspect_upload(model_of(graph).SerializeToString(), batch=4)
    # The first dimension is the batch whether it is symbolic or fixed, as in a local measurement.
    assert checked.inputs == [InputSpec("ids", (4, 5), np.dtype(np.int64)),
                              InputSpec("x", (4, 5), np.dtype(np.float16))]
    assert [spec.nbytes for spec in checked.inputs] == [4 * 5 * 8, 4 * 5 * 2]


def test_bytes_inside_strings_are_not_read_as_tensors() -> None:
    # 0x70 0x01 is a tensor's "data_location = EXTERNAL" on the wire; inside a string it is just text.
    marker = "p\x01"
    graph = matmul_graph([weight()])
    graph.doc_string = marker
    graph.initializer[0].doc_string = marker
    graph.node[0].doc_string = marker
    model = model_of(graph, doc_string=marker, producer_name=marker)
    assert marker.encode() in model.SerializeToString()
    assert inspect_upload(model.SerializeToString(), batch=1).canonical == model.SerializeToString()


def test_unknown_fields_are_dropped_from_the_canonical_bytes() -> None:
    # Fields a newer ONNX may add (unknown numbers, fixed32/fixed64/varint values) are accepted and never passed on.
    safe = model_of(matmul_graph()).SerializeToString()
    prefix = field(90, 1, b"\x01" * 8) + field(91, 5, b"\x02" * 4) + field(92, 0, varint(2 ** 40))
    assert onnx.ModelProto.FromString(prefix + safe).graph.name == "g"  # protobuf itself accepts the prefix
    assert inspect_upload(prefix + safe, batch=1).canonical == safe
    unsafe = model_of(matmul_graph([external()])).SerializeToString()
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(prefix + unsafe, batch=1)
    assert refused.value.category == "external-data"


# --- external data ------------------------------------------------------------------------------------------------

def test_what_it_refuses_onnx_runtime_would_read_from_a_file_the_model_names(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(model_of(matmul_graph()), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    # Loaded by path, ONNX Runtime opens weights.bin beside it: on a server, a path the uploader chose.
    x = np.ones((1, 4), dtype=np.float32)
    got = protocol.make_session(path).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ numpy_helper.to_array(weight()), rtol=1e-6)
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(path.read_bytes(), batch=1)
    assert refused.value.category == "external-data"
    assert "save_as_external_data" in refused.value.reason  # how to make an acceptable file
    assert "weights.bin" not in refused.value.reason  # nothing of the upload is quoted
    assert external_data_reason(path.read_bytes()) == refused.value.reason


def _in_initializer() -> onnx.ModelProto:
    return model_of(matmul_graph([external()]))


def _in_node_attribute() -> onnx.ModelProto:
    return model_of(matmul_graph(nodes=[helper.make_node("Constant", [], ["c"], value=external("c"))]))


def _in_tensor_list_attribute() -> onnx.ModelProto:
    node = helper.make_node("Custom", [], ["c"], domain="test", tensors=[weight("a"), external("b")])
    return model_of(matmul_graph(nodes=[node]))


def _in_if_branch() -> onnx.ModelProto:
    out = [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4, 4])]
    then = helper.make_graph([helper.make_node("Identity", ["E"], ["o"])], "then", [], out, [external("E")])
    orelse = helper.make_graph([helper.make_node("Identity", ["P"], ["o"])], "else", [], out, [weight("P")])
    node = helper.make_node("If", ["cond"], ["z"], then_branch=orelse, else_branch=then)
    return model_of(matmul_graph(nodes=[node]))


def _in_loop_body() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "E"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4, 4])], [external("E")])
    node = helper.make_node("Loop", ["trips", "", "W"], ["acc"], body=body)
    return model_of(matmul_graph(nodes=[node]))


def _in_graph_list_attribute() -> onnx.ModelProto:
    inner = helper.make_graph([], "inner", [], [], [external("E")])
    node = helper.make_node("Custom", [], ["c"], domain="test", branches=[matmul_graph(name="plain"), inner])
    return model_of(matmul_graph(nodes=[node]))


def _in_sparse_initializer() -> onnx.ModelProto:
    indices = numpy_helper.from_array(np.array([0, 5], dtype=np.int64), "indices")
    graph = matmul_graph()
    graph.sparse_initializer.append(helper.make_sparse_tensor(external("values"), indices, [4, 4]))
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


def _in_function_attribute_default() -> onnx.ModelProto:
    default = helper.make_attribute("value", external("d"))
    function = helper.make_function("local", "F", [], ["c"], [], [helper.make_opsetid("", 17)],
                                    attribute_protos=[default])
    return model_of(matmul_graph(), functions=[function])


def _in_training_initialization() -> onnx.ModelProto:
    model = model_of(matmul_graph())
    model.training_info.add().initialization.CopyFrom(helper.make_graph([], "init", [], [], [external("W0")]))
    return model


def _in_training_algorithm() -> onnx.ModelProto:
    model = model_of(matmul_graph())
    model.training_info.add().algorithm.CopyFrom(helper.make_graph([], "step", [], [], [external("W0")]))
    return model


def _flag_without_location() -> onnx.ModelProto:
    return model_of(matmul_graph([external("W", location=None)]))


def _location_without_flag() -> onnx.ModelProto:
    tensor = weight()
    set_external_data(tensor, location="weights.bin")
    return model_of(matmul_graph([tensor]))


@pytest.mark.parametrize("build", [
    _in_initializer, _in_node_attribute, _in_tensor_list_attribute, _in_if_branch, _in_loop_body,
    _in_graph_list_attribute, _in_sparse_initializer, _in_sparse_indices, _in_sparse_tensor_attribute,
    _in_sparse_tensor_list_attribute, _in_function, _in_function_attribute_default, _in_training_initialization,
    _in_training_algorithm, _flag_without_location, _location_without_flag,
], ids=lambda build: build.__name__.lstrip("_"))
def test_an_external_tensor_is_found_wherever_a_model_can_hold_one(build: Callable[[], onnx.ModelProto]) -> None:
    model = build()
    assert external_tensors(model)  # the test's own walk agrees the model is unsafe
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(model.SerializeToString(), batch=1)
    assert refused.value.category == "external-data"
    assert refused.value.reason == guard._EXTERNAL
    assert "passwd" not in str(refused.value) and "weights.bin" not in str(refused.value)


@pytest.mark.parametrize("hide", [(13, 14), (13,), (14,)], ids=["both", "external_data", "data_location"])
def test_external_data_behind_over_long_tags_is_refused(hide: tuple[int, ...]) -> None:
    body = with_initializer(model_of(matmul_graph()), hidden_external_int64("H", "secret.txt", 2, hide))
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(body, batch=1)
    # protobuf's parser (upb) refuses a tag over 32 bits outright; had it kept the field, the walk would see it.
    assert refused.value.category in ("malformed", "external-data")
    assert "secret" not in refused.value.reason


def test_over_long_tags_make_onnx_runtime_leak_a_file_and_the_guard_stops_them() -> None:
    """The attack on a real ONNX Runtime, in a working directory that holds a secret: the raw upload makes it
    read the file into a shape and print it; the guard refuses the upload, and nothing it says quotes the file."""
    Path("secret.txt").write_bytes(SECRET)
    body = reshape_by_hidden_shape()
    leaked = ort_error_texts(body)
    # ONNX Runtime's protobuf keeps the low 32 bits of a tag: it reads secret.txt and prints it as a shape.
    assert leaked and any(text in leaked[0] for text in secret_texts()[2:]), leaked
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(body, batch=1)
    assert not any(text in str(refused.value) for text in secret_texts())


def test_where_a_parser_drops_the_over_long_tags_the_canonical_bytes_never_read_the_file(tmp_path: Path) -> None:
    """Protobuf's pure-Python parser keeps a tag over 32 bits as an unknown field instead of refusing it: the
    guard then passes the model, and what it hands ONNX Runtime no longer names the file."""
    upload, canonical_path = tmp_path / "upload.onnx", tmp_path / "canonical.onnx"
    upload.write_bytes(reshape_by_hidden_shape())
    code = ("import sys; from pathlib import Path; from autokd.latency.remote.guard import inspect_upload; "
            "from google.protobuf.internal import api_implementation; assert api_implementation.Type() == 'python'; "
            "Path(sys.argv[2]).write_bytes(inspect_upload(Path(sys.argv[1]).read_bytes(), batch=2).canonical)")
    env = dict(os.environ, PYTHONPATH=repo_pythonpath(), PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    proc = subprocess.run([sys.executable, "-c", code, str(upload), str(canonical_path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    canonical = canonical_path.read_bytes()
    assert not external_tensors(onnx.ModelProto.FromString(canonical))
    assert inspect_upload(canonical, batch=2).canonical == canonical
    Path("secret.txt").write_bytes(SECRET)  # in the working directory, where ONNX Runtime would look
    errors = ort_error_texts(canonical)
    assert errors  # the shape tensor has lost its data: ONNX Runtime refuses it instead of reading the file
    assert not any(text in errors[0] for text in secret_texts()), errors


def test_bytes_onnx_runtime_would_read_as_an_ort_format_model_are_refused() -> None:
    # ONNX Runtime reads in-memory bytes with "ORTM" at offset 4 as a flatbuffer: another parser, unchecked.
    body = model_of(matmul_graph(), producer_name="ORTM").SerializeToString()
    assert body[4:8] == b"ORTM"
    assert "ORT model" in ort_error_texts(body)[0]  # ONNX Runtime took the ORT-format path
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(body, batch=1)
    assert refused.value.category == "malformed"


# --- malformed ----------------------------------------------------------------------------------------------------

def nested_raw(levels: int, innermost: TensorProto) -> bytes:
    """``levels`` graphs nested in node attributes, written on the wire (onnx.helper refuses the deepest)."""
    graph = field(5, 2, innermost.SerializeToString())
    for _ in range(levels):
        attribute = field(1, 2, b"body") + field(6, 2, graph) + field(20, 0, varint(onnx.AttributeProto.GRAPH))
        graph = field(1, 2, field(5, 2, attribute))
    return field(1, 0, varint(8)) + field(7, 2, graph)


def test_deep_subgraphs_are_walked_to_the_end_and_absurd_depth_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # model > graph > (node > attribute > graph) * levels > tensor
    with pytest.raises(RefusedModel, match="external data") as refused:
        inspect_upload(nested_raw(20, external()), batch=1)
    assert refused.value.category == "external-data"
    assert inspect_upload(nested_raw(20, weight()), batch=1).inputs == []
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(nested_raw(40, weight()), batch=1)
    assert refused.value.category == "malformed"
    # The walk has its own bound, whatever the parser accepts.
    monkeypatch.setattr(guard, "MAX_NESTING", 30)
    with pytest.raises(RefusedModel, match="levels deep") as refused:
        inspect_upload(nested_raw(20, weight()), batch=1)
    assert refused.value.category == "malformed"


@pytest.mark.parametrize("body", [
    b"this is not an onnx model" * 10, b"\x80\x80", bytes(range(256)) * 4,
    field(7, 2, b"")[:-1] + varint(500) + b"\x00" * 10,
], ids=["text", "truncated_varint", "all_bytes", "field_past_the_end"])
def test_bytes_that_are_not_onnx_are_malformed(body: bytes) -> None:
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(body, batch=1)
    assert (refused.value.category, refused.value.reason) == ("malformed", guard._NOT_ONNX)
    assert external_data_reason(body) == guard._NOT_ONNX


def test_a_truncated_upload_is_malformed() -> None:
    body = conv_net().SerializeToString()
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(body[: len(body) // 2], batch=1)
    assert refused.value.category == "malformed"


# --- declared inputs ----------------------------------------------------------------------------------------------

def one_input_model(dims: list[int | str], elem_type: int = TensorProto.FLOAT) -> bytes:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", elem_type, dims)],
                              [helper.make_tensor_value_info("y", elem_type, dims)])
    return model_of(graph).SerializeToString()


def test_a_declared_2_gb_input_is_refused_before_anything_is_allocated() -> None:
    body = one_input_model(["batch", 512, 1024, 1024])  # 2 GiB of float32 per sample
    with pytest.raises(RefusedModel) as refused:
        inspect_upload(body, batch=1)
    assert refused.value.category == "input-too-large"
    assert str(DEFAULT_MAX_INPUT_BYTES) in refused.value.reason
    # The limit is on all inputs together at the requested batch.
    small = one_input_model(["batch", 1024])
    assert inspect_upload(small, batch=16, max_input_bytes=16 * 1024 * 4).inputs[0].shape == (16, 1024)
    with pytest.raises(RefusedModel, match="batch 17") as refused:
        inspect_upload(small, batch=17, max_input_bytes=16 * 1024 * 4)
    assert refused.value.category == "input-too-large"


@pytest.mark.parametrize(("dims", "elem_type", "why"), [
    (["batch", "height", 8], TensorProto.FLOAT, "symbolic or non-positive dimension at axis 1"),
    (["batch", 3, 0], TensorProto.FLOAT, "symbolic or non-positive dimension at axis 2"),
    (["batch", -1], TensorProto.FLOAT, "symbolic or non-positive dimension at axis 1"),
    (["batch", None], TensorProto.FLOAT, "symbolic or non-positive dimension at axis 1"),
    (["batch", *[1] * 40], TensorProto.FLOAT, "more than 32 dimensions"),
    (["batch", 4], TensorProto.STRING, "element type"),
    (["batch", 4], TensorProto.BFLOAT16, "element type"),
    (None, TensorProto.FLOAT, "declares no shape"),
], ids=["symbolic", "zero", "negative", "unknown", "rank", "string", "bfloat16", "no_shape"])
def test_inputs_the_server_cannot_build_are_refused(dims: list[int | str] | None, elem_type: int, why: str) -> None:
    with pytest.raises(RefusedModel, match=why) as refused:
        inspect_upload(one_input_model(dims, elem_type), batch=1)
    assert refused.value.category == "unsupported-input"
    assert "height" not in refused.value.reason  # the upload's dimension names are not quoted


def test_a_sequence_input_is_refused() -> None:
    graph = helper.make_graph([helper.make_node("SequenceLength", ["s"], ["n"])], "seq",
                              [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("n", TensorProto.INT64, [])])
    with pytest.raises(RefusedModel, match="not a tensor") as refused:
        inspect_upload(model_of(graph).SerializeToString(), batch=1)
    assert refused.value.category == "unsupported-input"


def test_a_bad_batch_or_limit_is_the_callers_error() -> None:
    with pytest.raises(ValueError, match="batch"):
        inspect_upload(conv_net().SerializeToString(), batch=0)


# --- fuzz ---------------------------------------------------------------------------------------------------------

def test_random_damage_is_refused_or_yields_a_model_without_external_data() -> None:
    rng = random.Random(20261203)
    body = conv_net().SerializeToString()
    outcomes = {"refused": 0, "passed": 0}
    for _ in range(300):
        damaged = mutate(body, rng)
        try:
            checked = inspect_upload(damaged, batch=2)
        except RefusedModel as refused:
            assert refused.category in CATEGORIES
            outcomes["refused"] += 1
            continue
        outcomes["passed"] += 1
        assert not external_tensors(onnx.ModelProto.FromString(checked.canonical))
        assert inspect_upload(checked.canonical, batch=2).canonical == checked.canonical
    assert outcomes["refused"] and outcomes["passed"], outcomes  # both paths were exercised


# --- where it runs ------------------------------------------------------------------------------------------------

def test_the_guard_imports_neither_torch_nor_timm() -> None:
    # It runs in `autokd latency-server` on a target device where onnxruntime, onnx and numpy are installed.
    code = ("import sys, autokd.latency.remote.guard; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')); "
            "print(*bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=repo_pythonpath()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
