"""The canonizing passes, one at a time, on tiny hand-built ONNX graphs.

Each test builds a model with ``onnx.helper``, runs one pass (or ``canonize``) and checks
what the pass promises: the graph's structure afterwards (op types, which inputs are
``gs.Constant``, tensor names and shapes) and, through onnxruntime, that the model still
computes the same outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lrpc import LrpcError
from lrpc.graph import Program, static_shape
from lrpc.passes import (
    canonize,
    constant_arithmetic_to_affine,
    fold_constants,
    fuse_batchnorm,
    infer_shapes,
    remove_identity,
    select_input,
    strip_softmax,
    upgrade_opset,
)

FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws the same numbers, whichever tests run before it."""
    global RNG
    RNG = np.random.default_rng(0)


# -- helpers ----------------------------------------------------------------------------


def rand(*shape, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def value_info(name, spec):
    """``spec`` is a shape (float32) or ``(elem_type, shape)``."""
    elem_type, shape = spec if isinstance(spec, tuple) else (FLOAT, spec)
    return helper.make_tensor_value_info(name, elem_type, shape)


def make_model(nodes, inputs, outputs, inits=None, opset=17, ir_version=8, inits_as_inputs=False):
    """A model from nodes, ``{name: spec}`` inputs/outputs and ``{name: array}`` initializers.

    ``inits_as_inputs`` lists the initializers in ``graph.input`` too, ahead of the real
    inputs, as IR-3 files had to.
    """
    inits = inits or {}
    graph_inputs = [value_info(k, v) for k, v in inputs.items()]
    if inits_as_inputs:
        weights = [value_info(k, (helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)) for k, v in inits.items()]
        graph_inputs = weights + graph_inputs
    graph = helper.make_graph(
        nodes,
        "case",
        graph_inputs,
        [value_info(k, v) for k, v in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def program(model) -> Program:
    return Program.from_model(model)


def run(model_or_program, feeds) -> dict[str, np.ndarray]:
    model = model_or_program.to_model() if isinstance(model_or_program, Program) else model_or_program
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def assert_unchanged(model, after: Program, feeds, rtol=1e-6, atol=1e-6):
    """``after`` computes the same named outputs as ``model``."""
    before, now = run(model, feeds), run(after, feeds)
    assert list(now) == list(before)
    for name in before:
        np.testing.assert_allclose(now[name], before[name], rtol=rtol, atol=atol, err_msg=name)


def ops(p: Program) -> list[str]:
    return [n.op for n in p.graph.nodes]


def only(p: Program, op: str) -> gs.Node:
    nodes = [n for n in p.graph.nodes if n.op == op]
    assert len(nodes) == 1, f"expected one {op}, got {ops(p)}"
    return nodes[0]


def const(tensor) -> np.ndarray:
    assert isinstance(tensor, gs.Constant), f"{tensor.name} is not a constant"
    return np.asarray(tensor.values)


def output_names(p: Program) -> list[str]:
    return [t.name for t in p.graph.outputs]


def bn_params(prefix, channels):
    return {
        f"{prefix}_gamma": rand(channels),
        f"{prefix}_beta": rand(channels),
        f"{prefix}_mean": rand(channels),
        f"{prefix}_var": rand(channels, positive=True),
    }


def bn_node(x, y, prefix, **kw):
    names = [f"{prefix}_{k}" for k in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], **kw)


# -- upgrade_opset ----------------------------------------------------------------------


def test_upgrade_opset_11_to_17_keeps_outputs():
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("Softmax", ["f"], ["y"], axis=1),
    ]
    inits = {"W": rand(4, 3, 3, 3), "B": rand(4), "shape": np.array([0, -1], np.int64)}
    model = make_model(nodes, {"x": ["N", 3, 5, 5]}, {"y": ["N", 100]}, inits, opset=11, ir_version=6)

    p = upgrade_opset(program(model))

    assert p.opset == 17
    upgraded = p.to_model()
    onnx.checker.check_model(upgraded)
    assert [(o.domain, o.version) for o in upgraded.opset_import] == [("", 17)]
    assert upgraded.ir_version >= 8
    assert ops(p) == ["Conv", "Relu", "Reshape", "Softmax"]
    assert p.notes == ["opset 11 upgraded to 17"]
    assert_unchanged(model, p, {"x": rand(2, 3, 5, 5)})


def test_upgrade_opset_10_clip_attributes_become_inputs():
    model = make_model(
        [helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.25)],
        {"x": [2, 6]},
        {"y": [2, 6]},
        opset=10,
        ir_version=5,
    )

    p = upgrade_opset(program(model))

    clip = only(p, "Clip")
    assert p.opset == 17
    assert len(clip.inputs) == 3 and not clip.attrs
    x = np.array([[-2, -0.5, -0.1, 0.1, 0.25, 3]] * 2, np.float32)
    assert_unchanged(model, p, {"x": x})
    np.testing.assert_array_equal(run(p, {"x": x})["y"][0], np.array([-0.5, -0.5, -0.1, 0.1, 0.25, 0.25], np.float32))


@pytest.mark.parametrize("opset", [17, 18])
def test_upgrade_opset_leaves_new_models_alone(opset):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [1, 2]}, {"y": [1, 2]}, opset=opset)
    p = program(model)
    graph = p.graph

    assert upgrade_opset(p) is p
    assert p.graph is graph and p.opset == opset and p.notes == []


# -- infer_shapes -----------------------------------------------------------------------


def test_infer_shapes_gives_intermediate_tensors_static_shapes():
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "Wfc"], ["logits"], transB=1),
    ]
    model = make_model(
        nodes, {"x": ["N", 3, 8, 8]}, {"logits": ["N", 10]}, {"W": rand(4, 3, 3, 3), "Wfc": rand(10, 64)}
    )
    p = program(model)
    p.input_name, p.start_name, p.notes = "x", "logits", ["kept"]
    assert p.tensors()["c"].shape is None

    p = infer_shapes(p)

    tensors = p.tensors()
    assert tensors["c"].shape == ["N", 4, 4, 4]
    assert tensors["c"].dtype == np.float32
    assert tensors["f"].shape == ["N", 64]
    assert tensors["logits"].shape == ["N", 10]
    assert static_shape(tensors["c"]) == (None, 4, 4, 4)
    assert (p.input_name, p.start_name, p.notes, p.opset) == ("x", "logits", ["kept"], 17)


# -- fold_constants ---------------------------------------------------------------------


def _fold_constant_node():
    w = rand(4, 3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    return make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}), {"x": rand(2, 4)}, "MatMul", 1, w


def _fold_constant_of_shape():
    nodes = [
        helper.make_node("ConstantOfShape", ["bias_shape"], ["bias"], value=helper.make_tensor("v", FLOAT, [1], [0.5])),
        helper.make_node("Add", ["x", "bias"], ["y"]),
    ]
    model = make_model(nodes, {"x": [2, 4]}, {"y": [2, 4]}, {"bias_shape": np.array([1, 4], np.int64)})
    return model, {"x": rand(2, 4)}, "Add", 1, np.full((1, 4), 0.5, np.float32)


def _fold_transposed_weight():
    w_t = rand(3, 4)
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    return make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, {"w_t": w_t}), {"x": rand(2, 4)}, "MatMul", 1, w_t.T


def _shape_subgraph(batch):
    """``x.reshape(x.shape[0], -1)`` as exporters write it."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus_one": np.array([-1], np.int64)}
    return make_model(nodes, {"x": [batch, 3, 4, 4]}, {"y": [batch, 48]}, inits)


def _fold_shape_subgraph():
    return _shape_subgraph(2), {"x": rand(2, 3, 4, 4)}, "Reshape", 1, np.array([2, -1], np.int64)


FOLD_CASES = {
    "Constant": _fold_constant_node,
    "ConstantOfShape": _fold_constant_of_shape,
    "Transpose": _fold_transposed_weight,
    "Shape-Gather-Concat": _fold_shape_subgraph,
}


@pytest.mark.parametrize("case", FOLD_CASES)
def test_fold_constants_turns_weight_subgraphs_into_constants(case):
    model, feeds, consumer, index, expected = FOLD_CASES[case]()

    p = fold_constants(program(model))

    assert ops(p) == [consumer]
    np.testing.assert_array_equal(const(only(p, consumer).inputs[index]), expected)
    assert_unchanged(model, p, feeds, rtol=0, atol=0)


def test_fold_constants_keeps_dynamic_batch_shape_subgraph():
    model = _shape_subgraph("N")

    p = fold_constants(program(model))

    assert "Shape" in ops(p)
    for batch in (1, 5):
        assert_unchanged(model, p, {"x": rand(batch, 3, 4, 4)}, rtol=0, atol=0)


# -- remove_identity --------------------------------------------------------------------


def test_remove_identity_drops_passthrough_nodes_and_rewires_consumers():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Dropout", ["b", "ratio"], ["c"]),
        helper.make_node("Add", ["c", "c"], ["d"]),
        helper.make_node("MatMul", ["d", "W"], ["e"]),
        helper.make_node("Identity", ["e"], ["y"]),
    ]
    inits = {"ratio": np.array(0.5, np.float32), "W": rand(4, 3)}
    model = make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, inits)

    p = remove_identity(program(model))

    assert ops(p) == ["Relu", "Add", "MatMul", "Identity"]
    relu, add, matmul, identity = p.graph.nodes
    assert relu.inputs[0] is p.graph.inputs[0]
    assert add.inputs[0] is relu.outputs[0] and add.inputs[1] is relu.outputs[0]
    assert matmul.inputs[0] is add.outputs[0]
    assert identity.inputs[0] is matmul.outputs[0]
    assert identity.outputs[0].name == "y" and output_names(p) == ["y"]
    assert_unchanged(model, p, {"x": rand(2, 4)}, rtol=0, atol=0)


# -- constant_arithmetic_to_affine ------------------------------------------------------


def test_sub_and_div_by_constant_become_add_and_mul():
    mean, std = rand(1, 3, 1, 1), rand(1, 3, 1, 1, positive=True)
    nodes = [helper.make_node("Sub", ["x", "mean"], ["a"]), helper.make_node("Div", ["a", "std"], ["y"])]
    model = make_model(nodes, {"x": [2, 3, 2, 2]}, {"y": [2, 3, 2, 2]}, {"mean": mean, "std": std})

    p = constant_arithmetic_to_affine(program(model))

    assert ops(p) == ["Add", "Mul"]
    add, mul = p.graph.nodes
    assert add.inputs[0] is p.graph.inputs[0] and mul.inputs[0] is add.outputs[0]
    bias, weight = const(add.inputs[1]), const(mul.inputs[1])
    assert bias.dtype == weight.dtype == np.float32
    np.testing.assert_array_equal(bias, -mean)
    np.testing.assert_allclose(weight, 1 / std, rtol=1e-7)
    assert_unchanged(model, p, {"x": rand(2, 3, 2, 2)})


def test_sub_and_div_of_two_activations_stay():
    nodes = [helper.make_node("Sub", ["x", "z"], ["a"]), helper.make_node("Div", ["a", "z"], ["y"])]
    model = make_model(nodes, {"x": [2, 3], "z": [2, 3]}, {"y": [2, 3]})

    p = constant_arithmetic_to_affine(program(model))

    assert ops(p) == ["Sub", "Div"]
    assert_unchanged(model, p, {"x": rand(2, 3), "z": rand(2, 3, positive=True)}, rtol=0, atol=0)


def test_div_by_constant_with_a_zero_stays():
    divisor = np.array([2.0, 0.0, 4.0], np.float32)
    model = make_model([helper.make_node("Div", ["x", "d"], ["y"])], {"x": [2, 3]}, {"y": [2, 3]}, {"d": divisor})

    p = constant_arithmetic_to_affine(program(model))

    assert ops(p) == ["Div"]
    np.testing.assert_array_equal(const(only(p, "Div").inputs[1]), divisor)
    assert_unchanged(model, p, {"x": rand(2, 3, positive=True)}, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["Sub", "Div"])
def test_constant_on_the_left_stays(op):
    c = rand(3, positive=True)
    model = make_model([helper.make_node(op, ["c", "x"], ["y"])], {"x": [2, 3]}, {"y": [2, 3]}, {"c": c})

    p = constant_arithmetic_to_affine(program(model))

    assert ops(p) == [op]
    np.testing.assert_array_equal(const(only(p, op).inputs[0]), c)


def test_integer_div_by_constant_stays_exact():
    # Shape arithmetic over a dynamic dimension (e.g. ``n // 2``) survives constant
    # folding as an int64 Div; ``x * (1/2)`` in int64 is ``x * 0``.
    model = make_model(
        [helper.make_node("Div", ["x", "two"], ["y"])],
        {"x": (TensorProto.INT64, [3])},
        {"y": (TensorProto.INT64, [3])},
        {"two": np.array(2, np.int64)},
    )

    p = constant_arithmetic_to_affine(program(model))

    assert_unchanged(model, p, {"x": np.array([4, 7, 10], np.int64)}, rtol=0, atol=0)


# -- fuse_batchnorm ---------------------------------------------------------------------

CONV_CASES = {"bias": (True, 1), "no-bias": (False, 1), "depthwise": (True, 3)}


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_batchnorm_fuses_into_one_conv(case):
    with_bias, group = CONV_CASES[case]
    inits = {"W": rand(3, 3 // group, 3, 3), **bn_params("bn", 3)}
    conv_inputs = ["x", "W"]
    if with_bias:
        inits["B"] = rand(3)
        conv_inputs.append("B")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
        bn_node("c", "bn_out", "bn", name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["bn_out"], ["y"], name="relu"),
    ]
    model = make_model(nodes, {"x": ["N", 3, 5, 5]}, {"y": ["N", 3, 5, 5]}, inits)

    p = fuse_batchnorm(program(model))

    assert ops(p) == ["Conv", "Relu"]
    conv, relu = p.graph.nodes
    assert conv.outputs[0].name == "bn_out" and relu.inputs[0] is conv.outputs[0]
    assert len(conv.inputs) == 3
    assert const(conv.inputs[1]).shape == inits["W"].shape and const(conv.inputs[2]).shape == (3,)
    assert_unchanged(model, p, {"x": rand(2, 3, 5, 5)}, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_batchnorm_fuses_into_one_gemm(trans_b, with_bias):
    inits = {"W": rand(3, 5) if trans_b else rand(5, 3), **bn_params("bn", 3)}
    gemm_inputs = ["x", "W"]
    if with_bias:
        inits["C"] = rand(3)
        gemm_inputs.append("C")
    nodes = [
        helper.make_node("Gemm", gemm_inputs, ["g"], name="fc", transB=trans_b, alpha=0.7, beta=1.3),
        bn_node("g", "y", "bn", name="bn"),
    ]
    model = make_model(nodes, {"x": ["N", 5]}, {"y": ["N", 3]}, inits)

    p = fuse_batchnorm(program(model))

    gemm = only(p, "Gemm")
    assert ops(p) == ["Gemm"]
    assert gemm.outputs[0].name == "y" and output_names(p) == ["y"]
    assert gemm.attrs["transB"] == trans_b
    assert gemm.attrs.get("alpha", 1.0) == 1.0 and gemm.attrs.get("beta", 1.0) == 1.0
    assert_unchanged(model, p, {"x": rand(4, 5)}, rtol=1e-5, atol=1e-5)


def test_gemm_with_row_vector_bias_fuses():
    # C of shape (1, N) is a valid Gemm bias (unidirectionally broadcast to (M, N)).
    inits = {"W": rand(5, 3), "C": rand(1, 3), **bn_params("bn", 3)}
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g"], name="fc"), bn_node("g", "y", "bn", name="bn")]
    model = make_model(nodes, {"x": ["N", 5]}, {"y": ["N", 3]}, inits)

    p = fuse_batchnorm(program(model))

    assert ops(p) == ["Gemm"]
    assert_unchanged(model, p, {"x": rand(4, 5)}, rtol=1e-5, atol=1e-5)


def test_unnamed_conv_batchnorm_pairs_keep_their_own_weights():
    # Node names are optional in ONNX; the fused constants must not collide.
    nodes, inits = [], {}
    for i in range(2):
        inits[f"W{i}"] = rand(2, 2, 1, 1)
        inits.update(bn_params(f"bn{i}", 2))
        nodes += [helper.make_node("Conv", [f"a{i}", f"W{i}"], [f"c{i}"]), bn_node(f"c{i}", f"a{i + 1}", f"bn{i}")]
    model = make_model(nodes, {"a0": [1, 2, 3, 3]}, {"a2": [1, 2, 3, 3]}, inits)

    p = fuse_batchnorm(program(model))

    assert ops(p) == ["Conv", "Conv"]
    assert_unchanged(model, p, {"a0": rand(1, 2, 3, 3)}, rtol=1e-5, atol=1e-5)
    initializer_names = [t.name for t in p.to_model().graph.initializer]
    assert len(initializer_names) == len(set(initializer_names)) == 4


@pytest.mark.parametrize("after", ["input", "Relu"])
def test_batchnorm_without_linear_producer_stays(after):
    nodes = [bn_node("x" if after == "input" else "r", "y", "bn")]
    if after == "Relu":
        nodes.insert(0, helper.make_node("Relu", ["x"], ["r"]))
    model = make_model(nodes, {"x": ["N", 3, 4, 4]}, {"y": ["N", 3, 4, 4]}, bn_params("bn", 3))

    p = fuse_batchnorm(program(model))

    assert ops(p) == [n.op_type for n in nodes]
    assert_unchanged(model, p, {"x": rand(2, 3, 4, 4)}, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["another node", "graph output"])
def test_conv_whose_output_is_also_used_elsewhere_is_not_fused(where):
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "b", "bn", name="bn")]
    outputs = {"y": ["N", 3, 4, 4]}
    if where == "another node":
        nodes.append(helper.make_node("Add", ["b", "c"], ["y"]))
    else:
        nodes.append(helper.make_node("Relu", ["b"], ["y"]))
        outputs["c"] = ["N", 3, 4, 4]
    model = make_model(nodes, {"x": ["N", 3, 4, 4]}, outputs, {"W": rand(3, 3, 1, 1), **bn_params("bn", 3)})

    p = fuse_batchnorm(program(model))

    assert ops(p) == [n.op_type for n in nodes]
    assert only(p, "Conv").outputs[0].name == "c"
    assert_unchanged(model, p, {"x": rand(2, 3, 4, 4)}, rtol=0, atol=0)


# -- select_input -----------------------------------------------------------------------


def _two_input_model():
    return make_model([helper.make_node("Add", ["a", "b"], ["y"])], {"a": [2, 3], "b": [2, 3]}, {"y": [2, 3]})


def test_select_input_picks_the_first_runtime_input():
    assert select_input(program(_two_input_model())).input_name == "a"


def test_select_input_honors_a_named_input():
    assert select_input(program(_two_input_model()), "b").input_name == "b"


def test_select_input_unknown_name_lists_the_inputs():
    with pytest.raises(LrpcError, match="'nope'") as error:
        select_input(program(_two_input_model()), "nope")
    assert "['a', 'b']" in str(error.value)


def test_select_input_without_inputs_raises():
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(rand(2))),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    model = make_model(nodes, {}, {"y": [2]})

    with pytest.raises(LrpcError, match="no inputs"):
        select_input(program(model))


def _old_ir_gemm():
    """IR 3 / opset 8: the weights are listed in ``graph.input`` ahead of ``x``."""
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"])]
    inits = {"W": rand(4, 3), "B": rand(3)}
    return make_model(nodes, {"x": [2, 4]}, {"y": [2, 3]}, inits, opset=8, ir_version=3, inits_as_inputs=True)


def test_select_input_skips_initializers_listed_as_inputs():
    model = _old_ir_gemm()
    assert [i.name for i in model.graph.input] == ["W", "B", "x"]
    p = program(model)

    assert [t.name for t in p.runtime_inputs()] == ["x"]
    assert select_input(p).input_name == "x"


# -- strip_softmax ----------------------------------------------------------------------


def _classifier(*head, extra_outputs=None):
    """``x -> Gemm -> logits`` followed by ``head`` (nodes); the graph output is the last tensor."""
    nodes = [helper.make_node("Gemm", ["x", "W"], ["logits"], name="fc"), *head]
    last = nodes[-1].output[0]
    outputs = {last: ["N", 3], **(extra_outputs or {})}
    return make_model(nodes, {"x": ["N", 4]}, outputs, {"W": rand(4, 3)})


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_strip_softmax_starts_at_the_logits(op):
    model = _classifier(helper.make_node(op, ["logits"], ["probs"], name="head", axis=1))

    p = strip_softmax(program(model))

    assert p.start_name == "logits"
    assert ops(p) == ["Gemm", op] and output_names(p) == ["probs"]
    assert p.notes == [f"relevance starts at 'logits', before {op} 'head'"]
    assert_unchanged(model, p, {"x": rand(2, 4)}, rtol=0, atol=0)


def test_strip_softmax_looks_through_a_trailing_identity():
    model = _classifier(
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1), helper.make_node("Identity", ["probs"], ["out"])
    )

    p = strip_softmax(program(model))

    assert p.start_name == "logits"
    assert ops(p) == ["Gemm", "Softmax", "Identity"] and output_names(p) == ["out"]


def test_strip_softmax_without_softmax_starts_at_the_output():
    p = strip_softmax(program(_classifier()))

    assert p.start_name == "logits" and p.notes == []


def test_strip_softmax_ignores_a_softmax_before_the_end():
    model = _classifier(
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1), helper.make_node("Relu", ["probs"], ["out"])
    )

    assert strip_softmax(program(model)).start_name == "out"


def test_strip_softmax_named_output():
    model = _classifier(
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("Relu", ["logits"], ["feat"]),
        extra_outputs={"probs": ["N", 3]},
    )
    assert output_names(program(model)) == ["feat", "probs"]

    assert strip_softmax(program(model)).start_name == "feat"
    assert strip_softmax(program(model), "probs").start_name == "logits"


def test_strip_softmax_unknown_output_lists_the_outputs():
    model = _classifier(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))

    with pytest.raises(LrpcError, match="'nope'") as error:
        strip_softmax(program(model), "nope")
    assert "['probs']" in str(error.value)


# -- canonize ---------------------------------------------------------------------------


def _small_cnn():
    """Normalize (Sub/Div) -> Conv (Constant-node weight) -> BN -> Relu -> Dropout -> Flatten -> Gemm -> Softmax."""
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["normalized"]),
        helper.make_node("Constant", [], ["conv_w"], value=numpy_helper.from_array(rand(4, 3, 3, 3), "conv_w_value")),
        helper.make_node("Conv", ["normalized", "conv_w", "conv_b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("conv", "bn", "bn", name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["relu"], name="relu"),
        helper.make_node("Dropout", ["relu"], ["dropped"], name="dropout"),
        helper.make_node("Flatten", ["dropped"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    inits = {
        "mean": rand(1, 3, 1, 1),
        "std": rand(1, 3, 1, 1, positive=True),
        "conv_b": rand(4),
        **bn_params("bn", 4),
        "fc_w": rand(5, 4 * 6 * 6),
        "fc_b": rand(5),
    }
    return make_model(nodes, {"x": ["N", 3, 6, 6]}, {"probs": ["N", 5], "logits": ["N", 5]}, inits)


def test_canonize_small_cnn():
    model = _small_cnn()

    p = canonize(program(model))

    assert ops(p) == ["Add", "Mul", "Conv", "Relu", "Flatten", "Gemm", "Softmax"]
    assert not {"BatchNormalization", "Identity", "Dropout", "Constant", "Sub", "Div"} & set(ops(p))
    conv = only(p, "Conv")
    assert all(isinstance(t, gs.Constant) for t in conv.inputs[1:])
    assert (p.input_name, p.start_name, p.opset) == ("x", "logits", 17)
    assert output_names(p) == ["probs", "logits"]
    assert static_shape(p.tensors()["flat"]) == (None, 144)
    assert_unchanged(model, p, {"x": rand(3, 3, 6, 6)}, rtol=1e-5, atol=1e-5)


def test_canonize_old_ir_model_with_weights_as_inputs():
    model = _old_ir_gemm()

    p = canonize(program(model))

    assert (p.input_name, p.start_name, p.opset) == ("x", "y", 17)
    assert_unchanged(model, p, {"x": rand(2, 4)})
