"""Every op's relevance backward against an autograd reference (LRP-ε, "gradient × input").

Each case is a small ONNX graph built by hand (so attributes such as asymmetric pads,
auto_pad, transA or count_include_pad are exercised exactly) and the same computation
in torch. The reference applies LRP-ε step by step with torch's autograd as the VJP.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import lrpc
from support.autograd_ref import epsilon_lrp, one_hot
from support.cases import EPS, build, chain_reference, check_chain, flat, flatten, rand, run_compiled, t


# -- linear layers -------------------------------------------------------------------

W33, B33 = rand(4, 3, 3, 3), rand(4)

CONV_CASES = {
    "pad1": ({"pads": [1, 1, 1, 1]}, (2, 3, 6, 6), lambda x: F.conv2d(x, t(W33), t(B33), padding=1)),
    "asymmetric_pads": (
        {"pads": [0, 1, 1, 0]}, (2, 3, 6, 6),
        lambda x: F.conv2d(F.pad(x, (1, 0, 0, 1)), t(W33), t(B33)),
    ),
    "stride2_output_padding": ({"strides": [2, 2]}, (2, 3, 8, 8), lambda x: F.conv2d(x, t(W33), t(B33), stride=2)),
    "auto_pad_same_upper": (
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (2, 3, 8, 8),
        lambda x: F.conv2d(F.pad(x, (0, 1, 0, 1)), t(W33), t(B33), stride=2),
    ),
    "auto_pad_same_lower": (
        {"strides": [2, 2], "auto_pad": "SAME_LOWER"}, (2, 3, 8, 8),
        lambda x: F.conv2d(F.pad(x, (1, 0, 1, 0)), t(W33), t(B33), stride=2),
    ),
    "auto_pad_valid": ({"auto_pad": "VALID"}, (2, 3, 6, 6), lambda x: F.conv2d(x, t(W33), t(B33))),
    "dilation2": (
        {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, (2, 3, 7, 7),
        lambda x: F.conv2d(x, t(W33), t(B33), padding=2, dilation=2),
    ),
}


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv(name):
    attrs, shape, fn = CONV_CASES[name]
    model = build(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], **attrs), flatten()],
        {"w": W33, "b": B33}, shape,
    )
    check_chain(model, rand(*shape), [(fn, "eps"), (flat, "eps")])


@pytest.mark.parametrize("groups", [2, 4])
def test_conv_groups_and_depthwise(groups):
    w = rand(8, 4 // groups, 3, 3)
    model = build([helper.make_node("Conv", ["x", "w"], ["y"], group=groups, pads=[1, 1, 1, 1]), flatten()],
                  {"w": w}, (2, 4, 5, 5))
    fn = lambda x: F.conv2d(x, t(w), padding=1, groups=groups)  # noqa: E731
    check_chain(model, rand(2, 4, 5, 5), [(fn, "eps"), (flat, "eps")])


@pytest.mark.parametrize("trans_b,alpha,beta", [(1, 1.0, 1.0), (0, 0.5, 2.0)])
def test_gemm(trans_b, alpha, beta):
    w = rand(4, 6) if trans_b else rand(6, 4)
    c = rand(4)
    model = build([helper.make_node("Gemm", ["x", "w", "c"], ["logits"], transB=trans_b, alpha=alpha, beta=beta)],
                  {"w": w, "c": c}, (3, 6))
    wt = t(w).T if trans_b else t(w)
    check_chain(model, rand(3, 6), [(lambda x: alpha * x @ wt + beta * t(c), "eps")])


def test_gemm_trans_a():
    w = rand(6, 4)
    model = build([helper.make_node("Gemm", ["x", "w"], ["logits"], transA=1)], {"w": w}, (6, 3), dynamic_batch=False)
    check_chain(model, rand(6, 3), [(lambda x: x.T @ t(w), "eps")])


def test_matmul_constant_right_and_left():
    w = rand(6, 4)
    model = build([helper.make_node("MatMul", ["x", "w"], ["logits"])], {"w": w}, (3, 6))
    check_chain(model, rand(3, 6), [(lambda x: x @ t(w), "eps")])
    a = rand(5, 6)
    model = build([helper.make_node("MatMul", ["a", "x"], ["logits"])], {"a": a}, (6, 3), dynamic_batch=False)
    check_chain(model, rand(6, 3), [(lambda x: t(a) @ x, "eps")])


W64 = rand(6, 4)

# -- elementwise with constants --------------------------------------------------------

C311 = rand(3, 1, 1, positive=True)


@pytest.mark.parametrize(
    "op,fn",
    [
        ("Add", lambda x: x + t(C311)),
        ("Sub", lambda x: x - t(C311)),
        ("Mul", lambda x: x * t(C311)),
        ("Div", lambda x: x / t(C311)),
    ],
)
def test_elementwise_with_constant(op, fn):
    model = build([helper.make_node(op, ["x", "c"], ["y"]), flatten()], {"c": C311}, (2, 3, 4, 4))
    check_chain(model, rand(2, 3, 4, 4), [(fn, "eps"), (flat, "eps")])


def test_add_of_activations_with_broadcast_and_fan_out():
    """y = x + mean(x over H, W): x feeds two consumers; the Add broadcasts [N,C,1,1]."""
    model = build(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["g"]),
            helper.make_node("Add", ["x", "g"], ["y"]),
            flatten(),
        ],
        {}, (2, 3, 4, 4),
    )
    x = rand(2, 3, 4, 4)
    target = np.array([5, 17])
    _, R = run_compiled(model, x, target=target)
    g = t(x).mean((2, 3), keepdim=True).numpy()
    R_y = one_hot(target, 48).reshape(2, 3, 4, 4)
    R_y = epsilon_lrp(lambda a: a.reshape(2, -1), [x + g], R_y.reshape(2, -1))[0]  # the Flatten
    R_x_direct, R_g = epsilon_lrp(lambda a, b: a + b, [x, g], R_y)
    R_x_pool = epsilon_lrp(lambda a: a.mean((2, 3), keepdim=True), [x], R_g)[0]
    ref = R_x_direct + R_x_pool
    assert np.abs(R - ref).max() / np.abs(ref).max() < 1e-4


def test_sub_and_sum_of_activations():
    """Sum of three relevance inputs and Sub of two (the second gets the negated share)."""
    c = rand(3, 1, 1)
    model = build(
        [
            helper.make_node("Mul", ["x", "c"], ["xc"]),
            helper.make_node("Relu", ["x"], ["xr"]),
            helper.make_node("Sum", ["x", "xc", "xr"], ["s"]),
            helper.make_node("Sub", ["s", "xc"], ["y"]),
            flatten(),
        ],
        {"c": c}, (2, 3, 2, 2),
    )
    x = rand(2, 3, 2, 2)
    target = np.array([1, 4])
    _, R = run_compiled(model, x, target=target)
    xc, xr = x * c, np.maximum(x, 0)
    s = x + xc + xr
    R_y = one_hot(target, 12).reshape(2, 3, 2, 2)
    R_y = epsilon_lrp(lambda a: a.reshape(2, -1), [s - xc], R_y.reshape(2, -1))[0]
    R_s, R_xc1 = epsilon_lrp(lambda a, b: a - b, [s, xc], R_y)
    R_x1, R_xc2, R_xr = epsilon_lrp(lambda a, b, d: a + b + d, [x, xc, xr], R_s)
    R_x2 = epsilon_lrp(lambda a: a * t(c), [x], R_xc1 + R_xc2)[0]
    ref = R_x1 + R_x2 + R_xr  # Relu passes relevance through
    assert np.abs(R - ref).max() / np.abs(ref).max() < 1e-4


# -- pooling -------------------------------------------------------------------------


POOL_CASES = {
    "maxpool_overlapping": (
        helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        lambda x: F.max_pool2d(x, 3, 2, padding=1),
    ),
    "maxpool_2x2": (
        helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
        lambda x: F.max_pool2d(x, 2, 2),
    ),
    "avgpool_exclude_pad": (
        helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        lambda x: F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False),
    ),
    "avgpool_include_pad": (
        helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         count_include_pad=1),
        lambda x: F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=True),
    ),
    "avgpool_ceil_mode": (
        helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        lambda x: F.avg_pool2d(x, 2, 2, ceil_mode=True),
    ),
    "global_average_pool": (
        helper.make_node("GlobalAveragePool", ["x"], ["y"]),
        lambda x: x.mean((2, 3), keepdim=True),
    ),
    "reduce_mean_spatial": (
        helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0),
        lambda x: x.mean((2, 3)),
    ),
}


@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_pooling(name):
    node, fn = POOL_CASES[name]
    model = build([node, flatten()], {}, (2, 3, 7, 7))
    check_chain(model, rand(2, 3, 7, 7), [(fn, "eps"), (flat, "eps")])


MAXPOOL_GEOMETRIES = {
    # (spatial input, ONNX attributes, torch's max_pool with the same geometry)
    "2x2_tiles_odd_size": ((7, 7), dict(kernel_shape=[2, 2], strides=[2, 2]), lambda x: F.max_pool2d(x, 2, 2)),
    "3x3_stride2_pad1": ((9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                         lambda x: F.max_pool2d(x, 3, 2, padding=1)),
    "3x3_stride1": ((6, 6), dict(kernel_shape=[3, 3], strides=[1, 1]), lambda x: F.max_pool2d(x, 3, 1)),
    "ceil_mode": ((7, 7), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
                  lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True)),
    "dilated": ((9, 9), dict(kernel_shape=[2, 3], strides=[2, 1], dilations=[2, 2], pads=[1, 0, 1, 0]),
                lambda x: F.max_pool2d(x, (2, 3), (2, 1), padding=(1, 0), dilation=2)),
    "1d_stride3": ((11,), dict(kernel_shape=[4], strides=[3], pads=[1, 2]),
                   lambda x: F.max_pool1d(F.pad(x, (1, 2), value=-np.inf), 4, 3)),
    "3d": ((4, 5, 4), dict(kernel_shape=[2, 2, 2], strides=[2, 2, 2]), lambda x: F.max_pool3d(x, 2, 2)),
}


@pytest.mark.parametrize("name", sorted(MAXPOOL_GEOMETRIES))
def test_maxpool_routes_to_the_first_maximum_like_torch(name):
    """Ties everywhere (values on a coarse grid, zeros as after a ReLU): the whole window's
    relevance goes to its first maximum in scan order, as torch's max-pool gradient routes it."""
    spatial, attrs, fn = MAXPOOL_GEOMETRIES[name]
    shape = (2, 3, *spatial)
    x = np.maximum(np.round(rand(*shape) * 2), 0).astype(np.float32)  # mostly 0, 1, 2, 3: many ties
    model = build([helper.make_node("MaxPool", ["x"], ["y"], **attrs), flatten()], {}, shape)
    nodes = [n.op_type for n in lrpc.compile(model).graph.node]
    assert "ScatterElements" not in nodes and "ConvTranspose" not in nodes  # the portable route
    check_chain(model, x, [(fn, "eps"), (flat, "eps")])


def test_maxpool_sends_relevance_to_the_winner_only():
    model = build([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]), flatten()],
                  {}, (1, 1, 4, 4))
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4) + 1.0
    _, R = run_compiled(model, x, lrpc.Composite(lrpc.GlobalMap(lrpc.ZeroRule())), target=[3])
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[3, 3] = 1.0  # window (1, 1) holds 11, 12, 15, 16; 16 wins
    np.testing.assert_allclose(R[0, 0], expected, atol=1e-6)


# -- merge and reshaping ---------------------------------------------------------------


def test_concat_with_constant_part():
    c = rand(1, 2, 3, 3)
    model = build(
        [helper.make_node("Expand", ["c", "shape"], ["cb"]), helper.make_node("Concat", ["x", "cb"], ["y"], axis=1),
         flatten()],
        {"c": c, "shape": np.array([2, 2, 3, 3], dtype=np.int64)}, (2, 3, 3, 3), dynamic_batch=False,
    )
    cb = np.broadcast_to(c, (2, 2, 3, 3))
    check_chain(model, rand(2, 3, 3, 3), [(lambda x: torch.cat([x, t(cb)], 1), "eps"), (flat, "eps")])


def test_concat_of_two_activations():
    model = build(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["r", "x"], ["y"], axis=1), flatten()],
        {}, (2, 2, 3, 3),
    )
    x = rand(2, 2, 3, 3)
    target = np.array([3, 30])
    _, R = run_compiled(model, x, target=target)
    r = np.maximum(x, 0)
    R_y = one_hot(target, 36).reshape(2, 4, 3, 3)
    R_y = epsilon_lrp(lambda a: a.reshape(2, -1), [np.concatenate([r, x], 1)], R_y.reshape(2, -1))[0]
    R_r, R_x = epsilon_lrp(lambda a, b: torch.cat([a, b], 1), [r, x], R_y)
    ref = R_r + R_x
    assert np.abs(R - ref).max() / np.abs(ref).max() < 1e-4


RESHAPE_CASES = {
    "reshape": (
        [helper.make_node("Reshape", ["x", "shape"], ["logits"])],
        {"shape": np.array([0, -1], dtype=np.int64)}, (2, 3, 2, 2), lambda x: x.reshape(2, -1),
    ),
    "transpose": (
        [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1]), flatten()], {}, (2, 3, 2, 2),
        lambda x: x.permute(0, 2, 3, 1).reshape(2, -1),
    ),
    "squeeze": (
        [helper.make_node("Squeeze", ["x", "axes"], ["y"]), flatten()],
        {"axes": np.array([2], dtype=np.int64)}, (2, 3, 1, 4), lambda x: x.squeeze(2).reshape(2, -1),
    ),
    "unsqueeze": (
        [helper.make_node("Unsqueeze", ["x", "axes"], ["y"]), flatten()],
        {"axes": np.array([1], dtype=np.int64)}, (2, 12), lambda x: x.unsqueeze(1).reshape(2, -1),
    ),
}


@pytest.mark.parametrize("name", sorted(RESHAPE_CASES))
@pytest.mark.parametrize("rule", ["eps", "pass"])
def test_reshaping(name, rule):
    nodes, inits, shape, fn = RESHAPE_CASES[name]
    model = build(nodes, inits, shape)
    composite = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(EPS) if rule == "eps" else lrpc.PassRule()))
    x = rand(*shape)
    target = np.array([1, 5])
    _, R = run_compiled(model, x, composite, target)
    R_out = one_hot(target, int(np.prod(shape[1:])))
    # PassRule: the inverse map, relevance lands where each value came from (the VJP)
    ref = epsilon_lrp(fn, [x], R_out)[0] if rule == "eps" else _inverse(fn, x, R_out)
    np.testing.assert_allclose(R, ref, rtol=1e-4, atol=1e-6)


def _inverse(fn, x, R_out):
    xt = t(x).requires_grad_(True)
    (g,) = torch.autograd.grad((fn(xt) * t(R_out)).sum(), xt)
    return g.numpy()


# -- activations and normalization -------------------------------------------------


@pytest.mark.parametrize(
    "node",
    [
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("LeakyRelu", ["h"], ["a"], alpha=0.1),
        helper.make_node("Clip", ["h", "lo", "hi"], ["a"]),
    ],
    ids=["Relu", "LeakyRelu", "Clip"],
)
def test_activations_pass_relevance_through(node):
    w1, w2 = rand(6, 5), rand(5, 3)
    inits = {"w1": w1, "w2": w2, "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    if node.op_type != "Clip":
        inits = {"w1": w1, "w2": w2}
    model = build([helper.make_node("MatMul", ["x", "w1"], ["h"]), node, helper.make_node("MatMul", ["a", "w2"], ["logits"])],
                  inits, (4, 6))
    act = {
        "Relu": torch.relu,
        "LeakyRelu": lambda h: F.leaky_relu(h, 0.1),
        "Clip": lambda h: h.clamp(0.0, 6.0),
    }[node.op_type]
    check_chain(model, rand(4, 6), [(lambda x: x @ t(w1), "eps"), (act, "pass"), (lambda a: a @ t(w2), "eps")])


def test_standalone_batchnorm_epsilon_and_pass():
    scale, bias, mean, var = rand(3), rand(3), rand(3), rand(3, positive=True)
    model = build(
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-5), flatten()],
        {"s": scale, "b": bias, "m": mean, "v": var}, (2, 3, 2, 2),
    )
    w = scale / np.sqrt(var + 1e-5)
    shift = bias - mean * w

    def bn(x):
        return x * t(w).reshape(1, 3, 1, 1) + t(shift).reshape(1, 3, 1, 1)

    check_chain(model, rand(2, 3, 2, 2), [(bn, "eps"), (flat, "eps")])
    composite = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(EPS)), lrpc.GlobalTypeMap({lrpc.NormalizationLayer: lrpc.PassRule()}))
    check_chain(model, rand(2, 3, 2, 2), [(bn, "pass"), (flat, "eps")], composite)


# -- ops for real-world graphs -----------------------------------------------------------


def test_conv_transpose():
    w, b = rand(3, 4, 3, 3), rand(4)  # [C_in, C_out, k, k]
    model = build(
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1],
                          output_padding=[1, 1]), flatten()],
        {"w": w, "b": b}, (2, 3, 4, 4),
    )
    fn = lambda x: F.conv_transpose2d(x, t(w), t(b), stride=2, padding=1, output_padding=1)  # noqa: E731
    check_chain(model, rand(2, 3, 4, 4), [(fn, "eps"), (flat, "eps")])


@pytest.mark.parametrize("attrs, shape, crop", [
    # 9 × 8 from 5 × 4 (11 × 9 unpadded): total padding (2, 1), the odd one at the start
    ({"output_shape": [9, 8]}, (2, 3, 5, 4), (slice(1, 10), slice(1, 9))),
    # output = input · stride = 10 from 5 (11 unpadded): SAME_UPPER crops the end, SAME_LOWER the start
    ({"auto_pad": "SAME_UPPER"}, (2, 3, 5, 5), (slice(0, 10), slice(0, 10))),
    ({"output_shape": [10, 10], "auto_pad": "SAME_LOWER"}, (2, 3, 5, 5), (slice(1, 11), slice(1, 11))),
], ids=["output-shape", "same-upper", "output-shape-same-lower"])
def test_conv_transpose_with_output_shape_or_auto_pad(attrs, shape, crop):
    """The pads ONNX derives from ``output_shape`` / ``auto_pad``: torch's unpadded
    transposed convolution, cropped."""
    w, b = rand(3, 4, 3, 3), rand(4)
    model = build([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], **attrs), flatten()],
                  {"w": w, "b": b}, shape)
    fn = lambda x: F.conv_transpose2d(x, t(w), t(b), stride=2)[..., crop[0], crop[1]]  # noqa: E731
    check_chain(model, rand(*shape), [(fn, "eps"), (flat, "eps")])


def test_split_routes_each_part_and_zeros_the_unused_one():
    model = build(
        [
            helper.make_node("Split", ["x", "sizes"], ["p0", "p1", "p2"], axis=1),
            helper.make_node("Concat", ["p2", "p0"], ["y"], axis=1),
            flatten(),
        ],
        {"sizes": np.array([1, 2, 1], dtype=np.int64)}, (2, 4, 3, 3),
    )
    x = rand(2, 4, 3, 3)
    fn = lambda x: torch.cat([x[:, 3:4], x[:, 0:1]], 1)  # noqa: E731
    check_chain(model, x, [(fn, "eps"), (flat, "eps")])
    _, R = run_compiled(model, x, target=[0, 10])
    assert np.all(R[:, 1:3] == 0)  # the middle part is never used


@pytest.mark.parametrize(
    "starts,ends,axes,steps",
    [([1, 0], [3, 4], [2, 3], [1, 2]), ([-1], [-4], [3], [-1]), ([0], [100], [1], [1])],
    ids=["steps", "negative", "clamped"],
)
def test_slice(starts, ends, axes, steps):
    inits = {k: np.array(v, dtype=np.int64) for k, v in dict(s=starts, e=ends, a=axes, st=steps).items()}
    model = build([helper.make_node("Slice", ["x", "s", "e", "a", "st"], ["y"]), flatten()], inits, (2, 3, 4, 4))

    def fn(x):
        index = [slice(None)] * 4
        for s, e, a, st in zip(starts, ends, axes, steps):
            index[a] = slice(s, e, st) if st > 0 else slice(s, None if e < -4 else e, st)
        return x[tuple(index)] if all(st > 0 for st in steps) else torch.flip(x, [axes[0]])[..., :3]

    check_chain(model, rand(2, 3, 4, 4), [(fn, "eps"), (flat, "eps")])


def test_constant_pad():
    model = build(
        [helper.make_node("Pad", ["x", "pads", "value"], ["y"], mode="constant"), flatten()],
        {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64), "value": np.array(0.5, np.float32)},
        (2, 3, 3, 3),
    )
    fn = lambda x: F.pad(x, (2, 1, 1, 2), value=0.5)  # noqa: E731
    # targets inside the input (a padded position's relevance goes to the pad value)
    check_chain(model, rand(2, 3, 3, 3), [(fn, "eps"), (flat, "eps")], target=[14, 50])


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
def test_pad_that_copies_input_values_into_the_border(mode):
    """silero's STFT front end pads by reflection: a border element is a copy of an input
    element, and its relevance goes back to that element."""
    model = build(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode), flatten()],
        {"pads": np.array([0, 0, 2, 1, 0, 0, 1, 2], dtype=np.int64)}, (2, 3, 4, 5), opset=19 if mode == "wrap" else 17,
    )
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    fn = lambda x: F.pad(x, (1, 2, 2, 1), mode=torch_mode)  # noqa: E731
    check_chain(model, rand(2, 3, 4, 5), [(fn, "eps"), (flat, "eps")], target=[3, 70])


def test_div_by_a_divisor_computed_from_shapes():
    """DeBERTa's score scale, √(3·d) with d read from the activation's Shape at run time:
    an elementwise scaling (the divisor is a constant for relevance)."""
    model = build(
        [
            helper.make_node("Shape", ["x"], ["shape"], start=-1),
            helper.make_node("Cast", ["shape"], ["size"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["size", "three"], ["scaled"]),
            helper.make_node("Sqrt", ["scaled"], ["scale"]),
            helper.make_node("Div", ["x", "scale"], ["y"]),
            helper.make_node("MatMul", ["y", "w"], ["logits"]),
        ],
        {"three": np.array([3.0], np.float32), "w": W64}, (3, 6),
    )
    check_chain(model, rand(3, 6), [(lambda x: x / np.sqrt(18.0), "eps"), (lambda y: y @ t(W64), "eps")])


def test_reciprocal_of_the_input_is_refused_by_name():
    model = build([helper.make_node("Div", ["one", "x"], ["y"]), helper.make_node("MatMul", ["y", "w"], ["logits"])],
                  {"one": np.array(1.0, np.float32), "w": W64}, (3, 6))
    with pytest.raises(lrpc.UnsupportedModelError, match="divisor of a constant"):
        lrpc.compile(model)


# -- normalizations written out: the statistic is held constant (as LayerNormRule holds σ) --


def test_l2_normalize_holds_the_norm_constant():
    """``x / max(‖x‖, 1e-12)`` (torch's F.normalize, CLIP-style embeddings)."""
    model = build(
        [
            helper.make_node("ReduceL2", ["x", "axis"], ["norm"], keepdims=1),
            helper.make_node("Clip", ["norm", "tiny"], ["clipped"]),
            helper.make_node("Div", ["x", "clipped"], ["y"]),
            helper.make_node("MatMul", ["y", "w"], ["logits"]),
        ],
        {"axis": np.array([1], np.int64), "tiny": np.array(1e-12, np.float32), "w": W64}, (3, 6), opset=18,
    )
    normalize = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12).detach()  # noqa: E731
    check_chain(model, rand(3, 6), [(normalize, "eps"), (lambda y: y @ t(W64), "eps")])


def test_global_response_normalization_holds_its_factor_constant():
    """ConvNeXt-V2's GRN: ``γ · (x · N(x)) + β + x`` with ``N = ‖x‖ / mean_c ‖x‖``."""
    gamma, beta = rand(1, 3, 1, 1), rand(1, 3, 1, 1)
    model = build(
        [
            helper.make_node("ReduceL2", ["x", "spatial"], ["g"], keepdims=1),
            helper.make_node("ReduceMean", ["g", "channel"], ["m"], keepdims=1),
            helper.make_node("Add", ["m", "eps"], ["me"]),
            helper.make_node("Div", ["g", "me"], ["n"]),
            helper.make_node("Mul", ["x", "n"], ["xn"]),
            helper.make_node("Mul", ["xn", "gamma"], ["scaled"]),
            helper.make_node("Add", ["scaled", "beta"], ["shifted"]),
            helper.make_node("Add", ["shifted", "x"], ["y"]),
            flatten(),
        ],
        {"spatial": np.array([2, 3], np.int64), "channel": np.array([1], np.int64),
         "eps": np.array(1e-6, np.float32), "gamma": gamma, "beta": beta}, (2, 3, 4, 4), opset=18,
    )

    def grn(x):
        g = x.norm(dim=(2, 3), keepdim=True)
        n = (g / (g.mean(dim=1, keepdim=True) + 1e-6)).detach()
        return t(gamma) * (x * n) + t(beta) + x

    check_chain(model, rand(2, 3, 4, 4), [(grn, "eps"), (flat, "eps")], target=[5, 40])


def test_linear_attention_holds_its_denominator_constant():
    """EfficientViT's ReLU linear attention as exported: ``v`` padded with a row of ones,
    ``vk = v_pad · kᵀ``, ``o = vk · q``, the last row (``Σ k · q``) divides the rest. The
    denominator is held constant; each product shares its relevance equally between its
    factors, so the reference is Gradient × Input of each path with the other factors
    detached: ½ through ``q``, ¼ through ``k``, ¼ through ``v`` (bias-free, so the ε-rule is
    Gradient × Input divided by the logit)."""
    wq, wk, wv, head = rand(4, 6), rand(4, 6), rand(4, 6), rand(24, 3)
    ints = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    model = build(
        [
            helper.make_node("Conv", ["x", "wq"], ["q0"]), helper.make_node("Relu", ["q0"], ["q"]),
            helper.make_node("Conv", ["x", "wk"], ["k0"]), helper.make_node("Relu", ["k0"], ["k"]),
            helper.make_node("Conv", ["x", "wv"], ["v"]),
            helper.make_node("Squeeze", ["q", "last"], ["q2"]), helper.make_node("Squeeze", ["k", "last"], ["k2"]),
            helper.make_node("Squeeze", ["v", "last"], ["v2"]),
            helper.make_node("Pad", ["v2", "pads", "one"], ["vp"], mode="constant"),
            helper.make_node("Transpose", ["k2"], ["kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["vp", "kt"], ["vk"]),
            helper.make_node("MatMul", ["vk", "q2"], ["o"]),
            helper.make_node("Slice", ["o", "start0", "end_num", "axis1"], ["num"]),
            helper.make_node("Slice", ["o", "end_num", "end_all", "axis1"], ["den"]),
            helper.make_node("Add", ["den", "eps"], ["den_e"]),
            helper.make_node("Div", ["num", "den_e"], ["y"]),
            helper.make_node("Flatten", ["y"], ["f"], axis=1),
            helper.make_node("MatMul", ["f", "head"], ["logits"]),
        ],
        {"wq": wq[..., None, None], "wk": wk[..., None, None], "wv": wv[..., None, None], "last": ints(3),
         "pads": ints(0, 0, 0, 0, 1, 0), "one": np.array(1.0, np.float32), "start0": ints(0), "end_num": ints(4),
         "end_all": ints(5), "axis1": ints(1), "eps": np.array(1e-3, np.float32), "head": head},
        (2, 6, 6, 1),
    )
    x = np.abs(rand(2, 6, 6, 1))
    target = np.array([0, 2])

    def logits(x, live):
        def branch(w, relu, name):
            z = F.conv2d(x, t(w)[..., None, None])[..., 0]
            z = torch.relu(z) if relu else z
            return z if name in live else z.detach()

        q, k, v = branch(wq, True, "q"), branch(wk, True, "k"), branch(wv, False, "v")
        vp = F.pad(v, (0, 0, 0, 1), value=1.0)
        o = vp @ k.transpose(1, 2) @ q
        y = o[:, :4] / (o[:, 4:] + 1e-3).detach()
        return y.reshape(2, -1) @ t(head)

    want = np.zeros_like(x)
    chosen = logits(t(x), "qkv").detach().numpy()[np.arange(2), target]
    for share, live in ((0.5, "q"), (0.25, "k"), (0.25, "v")):
        xt = t(x).requires_grad_()
        logits(xt, live)[torch.arange(2), target].sum().backward()
        want += share * (xt.grad * xt).detach().numpy()
    want /= chosen.reshape(2, 1, 1, 1)  # the explained logit's relevance is 1 (normalized)
    got_logits, got = run_compiled(model, x, lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(EPS))), target=target)
    np.testing.assert_allclose(got_logits, logits(t(x), "qkv").detach().numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_gather_elements_routes_relevance_back_to_the_picked_elements():
    """DeBERTa's disentangled attention picks each score by a relative-position index
    (repeated and skipped elements included)."""
    index = np.array([[0, 0, 5, 2, 1, 3]] * 3, dtype=np.int64)
    model = build([helper.make_node("GatherElements", ["x", "index"], ["y"], axis=1),
                   helper.make_node("MatMul", ["y", "w"], ["logits"])], {"index": index, "w": W64}, (3, 6))
    pick = lambda x: torch.gather(x, 1, torch.from_numpy(index))  # noqa: E731
    check_chain(model, rand(3, 6), [(pick, "eps"), (lambda y: y @ t(W64), "eps")])


def test_pad_with_amounts_computed_at_run_time_and_a_crop():
    """Swin's window padding as exporters write it: pads from Shape arithmetic (up to the
    next multiple of 3 on dynamic H and W), then a negative pad (a crop) given with axes."""
    ints = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    model = build(
        [
            helper.make_node("Shape", ["x"], ["shape"], start=2),
            helper.make_node("Mod", ["shape", "three"], ["rest"]),
            helper.make_node("Sub", ["three", "rest"], ["short"]),
            helper.make_node("Mod", ["short", "three"], ["ends"]),
            helper.make_node("Concat", ["zeros", "ends"], ["pads"], axis=0),
            helper.make_node("Pad", ["x", "pads", "value"], ["padded"], mode="constant"),
            helper.make_node("Pad", ["padded", "crop", "", "axes"], ["y"], mode="constant"),
            helper.make_node("GlobalAveragePool", ["y"], ["pooled"]),
            flatten("pooled"),
        ],
        {"three": ints(3, 3), "zeros": ints(0, 0, 0, 0, 0, 0), "value": np.array(0.5, np.float32),
         "crop": ints(-1, 0), "axes": ints(3)},
        (2, 3, 5, 4), opset=18,
    )
    for d, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        d.dim_param = name

    def fn(x):
        short_h, short_w = (3 - x.shape[2] % 3) % 3, (3 - x.shape[3] % 3) % 3
        return F.pad(x, (0, short_w, 0, short_h), value=0.5)[..., 1:]

    pool = lambda y: y.mean((2, 3))  # noqa: E731
    for shape in ((2, 3, 5, 4), (2, 3, 6, 7)):
        check_chain(model, rand(*shape), [(fn, "eps"), (pool, "eps")])


@pytest.mark.parametrize("mode", ["asymmetric", "half_pixel"])
def test_resize_nearest_integer_scale(mode):
    nearest = "floor" if mode == "asymmetric" else "round_prefer_floor"
    model = build(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", coordinate_transformation_mode=mode,
                          nearest_mode=nearest), flatten()],
        {"scales": np.array([1, 1, 2, 3], dtype=np.float32)}, (2, 3, 3, 2),
    )
    fn = lambda x: x.repeat_interleave(2, 2).repeat_interleave(3, 3)  # noqa: E731
    check_chain(model, rand(2, 3, 3, 2), [(fn, "eps"), (flat, "eps")])


RESIZE_CASES = {
    # name: (ONNX attributes, scales or None, sizes or None, opset, the torch resampling)
    "bilinear": ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, [1, 1, 2, 2], None, 17,
                 lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)),
    "bilinear-align-corners": ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None,
                               [2, 3, 9, 7], 17,
                               lambda x: F.interpolate(x, size=(9, 7), mode="bilinear", align_corners=True)),
    "bicubic": ({"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "cubic_coeff_a": -0.75},
                [1, 1, 2, 3], None, 17,
                lambda x: F.interpolate(x, scale_factor=(2, 3), mode="bicubic", align_corners=False)),
    "nearest-fractional": ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
                           None, [2, 3, 7, 6], 17, lambda x: F.interpolate(x, size=(7, 6), mode="nearest")),
    # torch's antialias filter is not ONNX's: the reference is onnx's own evaluator
    "bilinear-antialiased-down": ({"mode": "linear", "coordinate_transformation_mode": "half_pixel", "antialias": 1},
                                  None, [2, 3, 3, 2], 18, "onnx-reference"),
    "cubic-antialiased-down": ({"mode": "cubic", "antialias": 1, "exclude_outside": 1}, [1, 1, 0.6, 0.5], None, 18,
                               "onnx-reference"),
}


def _onnx_reference_resize(attrs, scales, sizes, shape):
    """The op as a torch linear map of each sample's spatial plane, read off onnx's
    reference evaluator applied to every basis plane (no separability assumed)."""
    from onnx.reference import ReferenceEvaluator

    h, w = shape[2:]
    inputs = ["x", "", "scales"] if scales is not None else ["x", "", "", "sizes"]
    value = np.array(scales, np.float32) if scales is not None else np.array([h * w, 1, *sizes[2:]], np.int64)
    graph = helper.make_graph([helper.make_node("Resize", inputs, ["y"], **attrs)], "r",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(value, inputs[-1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    planes = ReferenceEvaluator(model).run(None, {"x": np.eye(h * w, dtype=np.float32).reshape(h * w, 1, h, w)})[0]
    out_hw = planes.shape[2:]
    matrix = t(planes.reshape(h * w, -1).T.copy())  # [out plane, in plane]

    def fn(x):
        n, c = x.shape[:2]
        return (x.reshape(n, c, h * w) @ matrix.T).reshape(n, c, *out_hw)

    return fn


@pytest.mark.parametrize("name", sorted(RESIZE_CASES))
def test_resize_interpolation_is_linear_with_its_transpose_as_vjp(name):
    """Bilinear upsampling (segmentation and detection necks), bicubic, fractional nearest,
    antialiased downsampling: each axis an interpolation matrix, computed from onnxruntime's
    own Resize, its transpose the VJP."""
    attrs, scales, sizes, opset, fn = RESIZE_CASES[name]
    if fn == "onnx-reference":
        fn = _onnx_reference_resize(attrs, scales, sizes, (2, 3, 5, 4))
    inputs = ["x", "", "scales"] if scales is not None else ["x", "", "", "sizes"]
    inits = {"scales": np.array(scales, np.float32)} if scales is not None else {"sizes": np.array(sizes, np.int64)}
    model = build([helper.make_node("Resize", inputs, ["y"], **attrs), flatten()], inits, (2, 3, 5, 4), opset=opset,
                  dynamic_batch=sizes is None)
    check_chain(model, rand(2, 3, 5, 4), [(fn, "eps"), (flat, "eps")])


def test_resize_asking_for_a_huge_interpolation_matrix_is_refused_before_it_is_made():
    model = build([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear"),
                   helper.make_node("ReduceMean", ["y"], ["m"], keepdims=0), helper.make_node("Unsqueeze", ["m", "ax"],
                                                                                         ["logits"])],
                  {"scales": np.array([1, 1, 1, 20000], dtype=np.float32), "ax": np.array([0, 1], np.int64)},
                  (1, 1, 1, 4000), dynamic_batch=False)
    with pytest.raises(lrpc.UnsupportedModelError, match="interpolation matrix of"):
        lrpc.compile(model)


def test_resize_of_dynamic_sizes_by_a_fraction_is_refused_with_its_reason():
    model = build(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear"), flatten()],
        {"scales": np.array([1, 1, 2, 2], dtype=np.float32)}, (2, 3, 3, 3),
    )
    for d, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("H", "W")):
        d.dim_param = name
    with pytest.raises(lrpc.UnsupportedModelError, match="spatial sizes are dynamic"):
        lrpc.compile(model)


@pytest.mark.parametrize("op", ["LRN", "InstanceNormalization"])
def test_data_dependent_normalizations_pass_relevance(op):
    if op == "LRN":
        node = helper.make_node("LRN", ["x"], ["y"], size=3)
        inits = {}
    else:
        node = helper.make_node("InstanceNormalization", ["x", "sc", "bi"], ["y"])
        inits = {"sc": rand(3), "bi": rand(3)}
    model = build([node, flatten()], inits, (2, 3, 4, 4))
    x = rand(2, 3, 4, 4)
    for rule in (lrpc.PassRule(), lrpc.EpsilonRule(1e-9)):
        composite = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(1e-9)), lrpc.GlobalTypeMap({op: rule}))
        _, R = run_compiled(model, x, composite, target=[3, 7])
        expected = np.zeros((2, 48))
        expected[0, 3] = expected[1, 7] = 1.0
        np.testing.assert_allclose(R.reshape(2, -1), expected, atol=1e-4)


def test_gating_product_sends_all_relevance_to_the_signal():
    """Squeeze-and-excitation: y = x * Sigmoid(conv(mean(x))); the gate branch gets none."""
    w = rand(3, 3, 1, 1)
    model = build(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["m"]),
            helper.make_node("Conv", ["m", "w"], ["g0"]),
            helper.make_node("Sigmoid", ["g0"], ["g"]),
            helper.make_node("Mul", ["x", "g"], ["y"]),
            flatten(),
        ],
        {"w": w}, (2, 3, 4, 4),
    )
    x = rand(2, 3, 4, 4)
    _, R = run_compiled(model, x, lrpc.Composite(lrpc.GlobalMap(lrpc.ZeroRule())), target=[5, 40])
    expected = np.zeros((2, 48))
    expected[0, 5] = expected[1, 40] = 1.0
    np.testing.assert_allclose(R.reshape(2, -1), expected, atol=1e-5)
    layers = [layer.op_type for layer, _ in lrpc.lrp_rules(model, lrpc.Composite())]
    assert layers == ["Mul", "Flatten"]  # the gate branch carries no relevance


def test_dynamic_spatial_size():
    """[N, 3, H, W] with H, W unknown: one compiled file explains 6x6 and 9x7 inputs."""
    w = rand(4, 3, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["p"], ["q"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("GlobalAveragePool", ["q"], ["g"]),
        flatten("g"),
    ]
    graph = helper.make_graph(
        nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    steps = [
        (lambda x: torch.relu(F.conv2d(x, t(w), stride=2, padding=1)), "eps"),
        (lambda r: F.avg_pool2d(r, 2, 2, padding=1, count_include_pad=False), "eps"),
        (lambda p: F.max_pool2d(p, 2, 1), "eps"),
        (lambda q: q.mean((2, 3)), "eps"),
    ]
    for shape in [(2, 3, 6, 6), (2, 3, 9, 7)]:
        check_chain(model, rand(*shape), steps)


def test_output_shaped_n_k_1_1():
    w = rand(5, 3, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["g"]), helper.make_node("Conv", ["g", "w"], ["logits"])],
        "nk11", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5, 1, 1])], [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rand(2, 3, 4, 4)
    steps = [(lambda x: x.mean((2, 3), keepdim=True), "eps"), (lambda g: F.conv2d(g, t(w)).reshape(2, 5), "eps")]
    logits, R = run_compiled(model, x, target=[1, 4])
    assert logits.shape == (2, 5, 1, 1)
    _, ref = chain_reference(steps, x, np.array([1, 4]))
    assert np.abs(R - ref).max() <= 1e-4 * np.abs(ref).max()


# -- control flow --------------------------------------------------------------------------


def _if_model(condition_is_constant: bool):
    """``y = If(cond, x · 2, x · −3)``, then a MatMul (silero-vad branches on its sampling rate)."""
    def branch(name, scale):
        return helper.make_graph([helper.make_node("Mul", ["x", f"s_{name}"], [f"out_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"out_{name}", TensorProto.FLOAT, None)],
                                 [numpy_helper.from_array(np.array(scale, np.float32), f"s_{name}")])

    model = build([helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 2.0),
                                    else_branch=branch("else", -3.0)),
                   helper.make_node("MatMul", ["y", "w"], ["logits"])],
                  {"w": W64, **({"cond": np.array(True)} if condition_is_constant else {})}, (3, 6))
    if not condition_is_constant:
        model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    return model


def test_if_with_a_constant_condition_is_the_branch_it_takes():
    check_chain(_if_model(True), rand(3, 6), [(lambda x: x * 2.0, "eps"), (lambda y: y @ t(W64), "eps")])


def test_if_with_a_condition_computed_at_run_time_is_named_in_the_check():
    """Not "the output does not depend on this input": the branches read ``x`` from the
    graph around them, so the If is on the relevance path, and refused by name."""
    with pytest.raises(lrpc.UnsupportedModelError, match="control flow"):
        lrpc.compile(_if_model(False))
