"""The exported ONNX graphs against TensorRT's ONNX parser rules, statically (no TensorRT, no GPU).

Rules from onnx-tensorrt's docs/operators.md for TensorRT 10: opsets 9..20; UINT8 only as a network input
or output, and a uint8 input may only feed a Cast; each operator accepts the listed tensor types; Conv
weights must be initializers. `safeclip build-engine` parses the FP16 graph (strongly typed) and the
onnxruntime TensorRT EP the FP32 one, so both are checked.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto as T

from safeclip.runtime import contract

TRT_OPSETS = range(9, 21)
FLOATS = {T.FLOAT, T.FLOAT16, T.BFLOAT16}
INTS = {T.INT32, T.INT64}
ANY = FLOATS | INTS | {T.BOOL, T.INT8}
# Operator -> element types TensorRT 10 accepts for its first (data) input. Only operators safeclip's
# graphs may contain are listed: a new one fails the test until someone checks it against the docs.
TRT_OPS = {
    "Add": FLOATS | INTS,
    "Sub": FLOATS | INTS,
    "Mul": FLOATS | INTS,
    "Div": FLOATS | INTS,
    "Pow": FLOATS,
    "Sqrt": FLOATS,
    "Sigmoid": FLOATS,
    "Softmax": FLOATS,
    "Erf": FLOATS,
    "Tanh": FLOATS,
    "MatMul": FLOATS,
    "Gemm": FLOATS,
    "Conv": FLOATS,
    "LayerNormalization": FLOATS,
    "ReduceL2": FLOATS,
    "ReduceMean": FLOATS,
    "ReduceSum": FLOATS | INTS,
    "Cast": ANY | {T.UINT8},
    "Identity": ANY,
    "Shape": ANY,
    "Reshape": ANY,
    "Transpose": ANY,
    "Concat": ANY,
    "Gather": ANY,
    "Expand": ANY,
    "Slice": ANY,
    "Squeeze": ANY,
    "Unsqueeze": ANY,
    "Constant": ANY,
    "Where": FLOATS | INTS | {T.BOOL},
}
NEEDS_INITIALIZER = {"Conv": 1}  # op -> input index that must be an initializer (the weights)


def trt_violations(model: onnx.ModelProto) -> list[str]:
    """Every way the graph breaks TensorRT's ONNX parser rules; empty when it parses."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in TRT_OPSETS:
        problems.append(f"opset {opset} outside TensorRT 10's {TRT_OPSETS.start}..{TRT_OPSETS.stop - 1}")
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    # Types are inferred afresh: strict inference refuses the FP16 converter's value_info as it stands.
    del fresh.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(fresh, strict_mode=True)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    boundary = {v.name for v in [*graph.input, *graph.output]}
    initializers = {t.name for t in graph.initializer}
    uint8_inputs = {v.name for v in graph.input if types.get(v.name) == T.UINT8}

    for name, elem in types.items():
        if elem == T.UINT8 and name not in boundary:
            problems.append(f"{name}: UINT8 inside the network (TensorRT allows it only as an input or output)")
    for node in graph.node:
        where = f"{node.op_type} {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r} needs a TensorRT plugin")
            continue
        allowed = TRT_OPS.get(node.op_type)
        if allowed is None:
            problems.append(f"{where}: operator not in the checked TensorRT table")
            continue
        for name in node.input:
            if name in uint8_inputs and node.op_type != "Cast":
                problems.append(
                    f"{where}: reads the uint8 input {name!r}; TensorRT takes a uint8 input only into a Cast"
                )
        data = node.input[0] if node.input else None
        if data and types.get(data) not in allowed:
            problems.append(
                f"{where}: input {data!r} has type {onnx.TensorProto.DataType.Name(types.get(data, 0))}, "
                "which TensorRT does not take here"
            )
        index = NEEDS_INITIALIZER.get(node.op_type)
        if index is not None and node.input[index] not in initializers:
            problems.append(f"{where}: input {index} must be an initializer")
    return problems


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def exported(request, tiny_engine):
    manifest = contract.read_manifest(tiny_engine)
    return onnx.load(str(tiny_engine / manifest.artifact(request.param).path))


def test_every_consumer_of_the_uint8_image_is_its_cast(exported):
    image = contract.INPUT_IMAGE
    consumers = [n for n in exported.graph.node if image in n.input]
    assert [n.op_type for n in consumers] == ["Cast"], [(n.op_type, n.name) for n in consumers]


def test_graph_follows_tensorrt_parser_rules(exported):
    assert trt_violations(exported) == []


def test_the_rules_catch_what_tensorrt_refuses(exported):
    """The checker itself: a Shape on the raw uint8 input and an unknown op are both reported."""
    broken = onnx.ModelProto()
    broken.CopyFrom(exported)
    shape = onnx.helper.make_node("Shape", [contract.INPUT_IMAGE], ["raw_shape"], name="raw_shape")
    broken.graph.node.insert(0, shape)
    broken.graph.output.append(onnx.helper.make_tensor_value_info("raw_shape", T.INT64, [4]))
    problems = trt_violations(broken)
    assert any("reads the uint8 input 'image'" in p for p in problems), problems
    del broken.opset_import[:]
    broken.opset_import.append(onnx.helper.make_opsetid("", 21))
    assert any("opset 21 outside" in p for p in trt_violations(broken))
