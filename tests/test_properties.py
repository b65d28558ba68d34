"""Property-based tests: random composite expressions, rules files and small ONNX graphs.

Whatever is thrown at ``check``/``compile``, the outcome is one of two: a compiled file
that onnxruntime loads and runs (relevance shaped like the input), or an
:class:`lrpc.LrpcError` (exit code 2 with one line on the command line). Never another
exception (exit code 70), never a hang: every example has a deadline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc.cli import main
from lrpc.compiler import analyze_model
from lrpc.expressions import load_rules_file, parse_composite

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits" / "digits_cnn.onnx"
SETTINGS = settings(max_examples=150, deadline=10_000, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LAYERS = analyze_model(str(DIGITS), skip_checks=True).table.layers

# -- composite expressions ---------------------------------------------------------------------

NAMES = ["EpsilonRule", "ZeroRule", "GammaRule", "ZPlusRule", "FlatRule", "WSquareRule", "PassRule", "AlphaBetaRule",
         "ZBoxRule", "LayerNormRule", "TaylorRule", "ConstantGateRule", "Composite", "GlobalMap", "LayerMap",
         "RangeMap", "FirstLayerMap", "LastLayerMap", "GlobalTypeMap", "RangeTypeMap", "FirstNTypeMap",
         "EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox", "AttnLRP", "CPLRP", "ConvLayer", "DenseLayer", "range",
         "eval", "__import__", "os", "open"]
ATOMS = st.one_of(
    st.sampled_from(NAMES),
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["'Conv'", "'Gemm'", "'NotAnOp'", "'/conv*'", "True", "None", "1e999", "-0.0", "[0, 1]"]),
)


def _expression(depth: int):
    if depth == 0:
        return ATOMS
    inner = st.deferred(lambda: _expression(depth - 1))
    call = st.tuples(st.sampled_from(NAMES), st.lists(inner, max_size=3),
                     st.lists(st.tuples(st.sampled_from(["epsilon", "gamma", "low", "high", "alpha", "beta", "n"]),
                                        inner), max_size=2))
    return st.one_of(
        ATOMS,
        call.map(lambda c: f"{c[0]}({', '.join([*c[1], *(f'{k}={v}' for k, v in c[2])])})"),
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.tuples(inner, inner).map(lambda kv: "{" + f"{kv[0]}: {kv[1]}" + "}"),
    )


EXPRESSIONS = st.one_of(_expression(3), st.text(max_size=60))


@SETTINGS
@given(EXPRESSIONS)
def test_random_composite_expressions(text):
    try:
        composite = parse_composite(text)
        composite.assign(LAYERS)
    except lrpc.LrpcError:
        pass


# -- rules files -------------------------------------------------------------------------------------

TOML_VALUES = st.one_of(st.integers(-5, 10**19).map(str), st.sampled_from(
    ['"FlatRule()"', '"EpsilonRule(epsilon=1e-9)"', '"Conv"', '"NotAnOp"', '"/conv*"', "true", "false", "1.5",
     "[0, 3]", "[3, 0]", "[0, 99]", "{a = 1}", '"EpsilonRule(epsilon=-1)"', '"PassRule()"', '"ZPlusRule()"']))
TOML_KEYS = st.sampled_from(["rule", "layers", "type", "range", "first", "last", "layer", "rules", "composite"])


@st.composite
def rules_files(draw):
    lines = []
    if draw(st.booleans()):
        lines.append("composite = " + draw(st.sampled_from(['"EpsilonPlus"', '"AttnLRP"', "5", '"Nope("'])))
    for _ in range(draw(st.integers(0, 3))):
        lines.append("[[rule]]")
        for key in draw(st.lists(TOML_KEYS, max_size=3, unique=True)):
            lines.append(f"{key} = {draw(TOML_VALUES)}")
    return "\n".join(lines) + "\n"


@SETTINGS
@given(rules_files())
def test_random_rules_files(body):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rules.toml"
        path.write_text(body)
        try:
            load_rules_file(path).assign(LAYERS)
        except lrpc.LrpcError:
            pass


# -- small ONNX graphs -------------------------------------------------------------------------------

SUPPORTED = ["Conv", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Add", "Mul", "Sigmoid", "Tanh",
             "Softmax", "Transpose", "Concat", "Slice", "Pad", "LayerNormalization", "Gelu"]
UNSUPPORTED = ["Erf", "CumSum", "Hardmax", "Sin", "LSTM"]


@st.composite
def graphs(draw):
    """x [N, C, H, W] -> a chain of random ops (shapes tracked so most graphs are valid) ->
    Flatten -> Gemm -> logits. Sometimes the wrong dtype, opset or an op lrpc refuses."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(2, 6))
    dtype = draw(st.sampled_from([TensorProto.FLOAT] * 6 + [TensorProto.DOUBLE, TensorProto.INT64]))
    opset = draw(st.sampled_from([17, 17, 17, 13, 18, 20]))
    nodes, inits, current, shape = [], [], "x", [c, h, w]

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    for i in range(draw(st.integers(0, 5))):
        op = draw(st.sampled_from(SUPPORTED + UNSUPPORTED))
        out = f"t{i}"
        cc, hh, ww = shape
        if op == "Conv":
            k, oc = draw(st.integers(1, 3)), draw(st.integers(1, 4))
            pad = draw(st.integers(0, 1))
            if hh + 2 * pad < k or ww + 2 * pad < k:
                continue
            nodes.append(helper.make_node("Conv", [current, const(f"w{i}", rng.standard_normal((oc, cc, k, k))
                                                                   .astype(np.float32))], [out], pads=[pad] * 4))
            shape = [oc, hh + 2 * pad - k + 1, ww + 2 * pad - k + 1]
        elif op in ("MaxPool", "AveragePool"):
            if hh < 2 or ww < 2:
                continue
            nodes.append(helper.make_node(op, [current], [out], kernel_shape=[2, 2]))
            shape = [cc, hh - 1, ww - 1]
        elif op == "GlobalAveragePool":
            nodes.append(helper.make_node(op, [current], [out]))
            shape = [cc, 1, 1]
        elif op in ("Add", "Mul"):
            other = current if draw(st.booleans()) else const(f"c{i}", rng.standard_normal((cc, 1, 1)).astype(np.float32))
            nodes.append(helper.make_node(op, [current, other], [out]))
        elif op == "Softmax":
            nodes.append(helper.make_node(op, [current], [out], axis=draw(st.integers(-1, 3))))
        elif op == "Transpose":
            nodes.append(helper.make_node(op, [current], [out], perm=[0, 1, 3, 2]))
            shape = [cc, ww, hh]
        elif op == "Concat":
            nodes.append(helper.make_node(op, [current, current], [out], axis=1))
            shape = [2 * cc, hh, ww]
        elif op == "Slice":
            nodes.append(helper.make_node(op, [current, const(f"s{i}", np.array([0], np.int64)),
                                               const(f"e{i}", np.array([1], np.int64)),
                                               const(f"a{i}", np.array([2], np.int64))], [out]))
            shape = [cc, 1, ww]
        elif op == "Pad":
            nodes.append(helper.make_node(op, [current, const(f"p{i}", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
                                          [out], mode=draw(st.sampled_from(["constant", "reflect"]))))
            shape = [cc, hh + 2, ww + 2]
        elif op == "LayerNormalization":
            nodes.append(helper.make_node(op, [current, const(f"g{i}", np.ones(ww, np.float32))], [out], axis=-1))
        elif op == "CumSum":
            nodes.append(helper.make_node(op, [current, const(f"ax{i}", np.array(1, np.int64))], [out]))
        elif op == "LSTM":
            continue
        else:
            nodes.append(helper.make_node(op, [current], [out]))
        current = out
    features = int(np.prod(shape))
    nodes.append(helper.make_node("Flatten", [current], ["f"], axis=1))
    nodes.append(helper.make_node("Gemm", ["f", const("head", rng.standard_normal((features, 3)).astype(np.float32))],
                                  ["logits"]))
    g = helper.make_graph(nodes, "random", [helper.make_tensor_value_info("x", dtype, ["N", c, h, w])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, (c, h, w)


COMPOSITES = st.sampled_from([None, "EpsilonPlus", "AttnLRP", "CPLRP", "Composite(GlobalMap(EpsilonRule()))",
                              "EpsilonGammaBox(low=-1, high=1)", "EpsilonAlpha2Beta1"])


@SETTINGS
@given(graphs(), COMPOSITES)
def test_random_graphs_compile_and_run_or_are_refused(case, composite):
    model, (c, h, w) = case
    try:
        compiled = lrpc.compile(model, composite, verbose=False)
    except lrpc.LrpcError:
        return
    session = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32)
    logits, relevance = session.run(["logits", "relevance"], {"x": x})
    assert relevance.shape == x.shape and logits.shape == (2, 3)


@settings(max_examples=15, deadline=20_000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), COMPOSITES)
def test_random_graphs_through_the_command_line(case, composite):
    """The same through ``lrpc compile``: exit 0 with a file onnxruntime loads, or exit 2
    with one line on stderr; never 70."""
    import contextlib
    import io

    model, _ = case
    with tempfile.TemporaryDirectory() as folder:
        src, dst = Path(folder) / "m.onnx", Path(folder) / "m.lrp.onnx"
        onnx.save(model, src)
        err = io.StringIO()
        args = ["compile", str(src), "-o", str(dst), "-q"] + (["--composite", composite] if composite else [])
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
        if code == 0:
            ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        else:
            lines = [line for line in err.getvalue().splitlines() if line.strip() and "│" not in line
                     and not set(line) <= set("┏┳┓┃━┡╇┩└┴┘ ")]
            assert code == 2 and lines and lines[-1].startswith("lrpc: error: "), err.getvalue()
