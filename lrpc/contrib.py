"""onnxruntime's fused ops written out in standard ops, for the analysis twin.

onnxruntime's transformer optimizer, its graph optimizer (files saved at the ``extended``
level) and onnxruntime-genai's builder fuse subgraphs into contrib ops of the
``com.microsoft`` domain (``Attention``, ``SkipLayerNormalization``, ``FusedConv``, ...) and
a few it registers in the default domain (``SimplifiedLayerNormalization``). Each is a
composition of standard ops with documented math (onnxruntime's ``ContribOperators.md``).
For relevance the composition is what counts: the softmax inside ``Attention`` is where
AttnLRP and CP-LRP act, the LayerNorm inside ``SkipLayerNormalization`` is a LayerNorm.

So each fused node of the deployed file becomes, in the analysis twin
(:mod:`lrpc.deployed`), the standard ops it stands for, spelled as exporters spell them:
LayerNorm as ``LayerNormalization`` (its primitives below opset 17), RMSNorm, GELU and
SiLU as their primitive ops (which :mod:`lrpc.passes.fusion` fuses back into one
activation or normalization), attention as MatMul → scale → mask → Softmax → MatMul over
heads, a fused QKV weight as three weights. Every rule then applies as to the exporter's
file. The compiled file runs the deployed forward, fused kernels included, for the
model's outputs; only the relevance pass reads the written-out twin.

A variant not written out here (``Attention`` with ``do_rotary``, a 2B mask index, ...)
stays fused in the twin, and the check names it: ``com.microsoft.Attention: fused op
without a rule (...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"

#: onnxruntime's default value added to masked attention scores (``mask_filter_value``)
MASK_FILTER_VALUE = -10000.0


class Unsupported(Exception):
    """A variant of a fused op that is not written out (the reason names it)."""


class _Writer:
    """Nodes and constants of one decomposition, with fresh names under the node's own."""

    def __init__(self, node: onnx.NodeProto, graph: onnx.GraphProto, inits: dict, opset: int, shapes: dict,
                 types: dict):
        self.graph, self.inits, self.opset = graph, inits, opset
        self.shapes, self.types = shapes, types
        self.base = (node.name or node.output[0]) + "/lrp_parts"
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def fresh(self, what: str) -> str:
        self.count += 1
        return f"{self.base}/{what}_{self.count}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self.fresh(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        """``Split`` of ``x`` into parts of ``sizes`` along ``axis``: the parts' names."""
        outs = [self.fresh("part") for _ in sizes]
        self.nodes.append(helper.make_node("Split", [x, self.ints(*sizes)], outs, name=outs[0], axis=axis))
        return outs

    def const(self, value, dtype=np.float32) -> str:
        return self._initializer("c", np.asarray(value, dtype))

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of ``name`` when it is an initializer."""
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def weight(self, value: np.ndarray) -> str:
        """A part of a constant, in its own dtype (a slice of a fused QKV weight)."""
        return self._initializer("weight", np.ascontiguousarray(value))

    def _initializer(self, what: str, value: np.ndarray) -> str:
        name = self.fresh(what)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    # -- spellings exporters use (what the fusion passes and the specs know) -------------

    def reduce_mean(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.ints(*axes), keepdims=1)
        return self.op("ReduceMean", x, axes=axes, keepdims=1)

    def layer_norm(self, x: str, gamma: str, beta: str | None, epsilon: float, axis: int = -1,
                   out: str | None = None) -> str:
        if self.opset >= 17:
            return self.op("LayerNormalization", *([x, gamma, beta] if beta else [x, gamma]), out=out, axis=axis,
                           epsilon=epsilon)
        if axis != -1:
            raise Unsupported(f"axis {axis} below opset 17")
        centred = self.op("Sub", x, self.reduce_mean(x, [-1]))
        variance = self.reduce_mean(self.op("Pow", centred, self.const(2.0)), [-1])
        normed = self.op("Div", centred, self.op("Sqrt", self.op("Add", variance, self.const(epsilon))))
        if beta is None:
            return self.op("Mul", normed, gamma, out=out)
        return self.op("Add", self.op("Mul", normed, gamma), beta, out=out)

    def rms_norm(self, x: str, gamma: str, epsilon: float, axis: int = -1, out: str | None = None) -> str:
        """``x · 1/√(mean(x²) + ε) · γ`` over the axes from ``axis`` on (onnxruntime's
        SimplifiedLayerNormalization; the spelling of Hugging Face's RMSNorm)."""
        if axis != -1:
            rank = self.rank(x)
            axes = list(range(axis % rank, rank))
        else:
            axes = [-1]
        mean_square = self.reduce_mean(self.op("Pow", x, self.const(2.0)), axes)
        inverse = self.op("Reciprocal", self.op("Sqrt", self.op("Add", mean_square, self.const(epsilon))))
        return self.op("Mul", self.op("Mul", x, inverse), gamma, out=out)

    def gelu(self, x: str, out: str | None = None) -> str:
        """``x · ½ · (1 + erf(x/√2))``."""
        erf = self.op("Erf", self.op("Div", x, self.const(math.sqrt(2.0))))
        return self.op("Mul", self.op("Mul", x, self.op("Add", erf, self.const(1.0))), self.const(0.5), out=out)

    def tanh_gelu(self, x: str, out: str | None = None) -> str:
        """``½ · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))``."""
        cube = self.op("Mul", self.op("Pow", x, self.const(3.0)), self.const(0.044715))
        inner = self.op("Mul", self.op("Add", x, cube), self.const(math.sqrt(2.0 / math.pi)))
        one_plus = self.op("Add", self.op("Tanh", inner), self.const(1.0))
        return self.op("Mul", self.op("Mul", self.const(0.5), x), one_plus, out=out)

    def add(self, x: str, *terms: str | None, out: str | None = None) -> str:
        """``x`` plus the present ``terms``, left to right (``out`` names the last sum)."""
        present = [t for t in terms if t]
        if not present:
            return self.op("Identity", x, out=out) if out else x
        for i, t in enumerate(present):
            x = self.op("Add", x, t, out=out if i == len(present) - 1 else None)
        return x

    def last_slice(self, x: str, start: int, end: int) -> str:
        return self.op("Slice", x, self.ints(start), self.ints(end), self.ints(-1))

    def shape(self, name: str) -> list:
        """``name``'s dims (ints, symbolic names, or None) from the deployed file's shapes."""
        if name in self.inits:
            return list(self.inits[name].dims)
        if name not in self.shapes:
            raise Unsupported(f"the rank of {name!r} is unknown")
        return self.shapes[name]

    def dtype(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        return self.types.get(name)

    def rank(self, name: str) -> int:
        return len(self.shape(name))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _arg(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _out(node: onnx.NodeProto, i: int) -> str | None:
    return node.output[i] if len(node.output) > i and node.output[i] else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- normalizations ---------------------------------------------------------------------


def _skip_layer_norm(simplified: bool):
    """``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``: the norm of
    ``input + bias + skip`` (the bias is the MatMul's before it: added first, it joins that
    layer); outputs 1 and 2 (mean, 1/σ) are not written out, output 3 is the sum."""

    def write(w: _Writer, node: onnx.NodeProto) -> None:
        if _out(node, 1) or _out(node, 2):
            raise Unsupported("its mean and inverse-σ outputs are read")
        a = _attrs(node)
        gamma = node.input[2]
        beta, bias = (None, _arg(node, 3)) if simplified else (_arg(node, 3), _arg(node, 4))
        total = w.add(node.input[0], bias, node.input[1], out=_out(node, 3))
        eps = float(a.get("epsilon", 1e-12 if not simplified else 1e-6))
        if simplified:
            w.rms_norm(total, gamma, eps, out=node.output[0])
        else:
            w.layer_norm(total, gamma, beta, eps, out=node.output[0])

    return write


def _simplified_layer_norm(w: _Writer, node: onnx.NodeProto) -> None:
    if _out(node, 1):
        raise Unsupported("its inverse-rms output is read")
    a = _attrs(node)
    w.rms_norm(node.input[0], node.input[1], float(a.get("epsilon", 1e-5)), int(a.get("axis", -1)),
               out=node.output[0])


def _contrib_layer_norm(w: _Writer, node: onnx.NodeProto) -> None:
    """onnxruntime's default-domain ``LayerNormalization`` of opsets before 17."""
    if _out(node, 1) or _out(node, 2):
        raise Unsupported("its mean and inverse-σ outputs are read")
    a = _attrs(node)
    w.layer_norm(node.input[0], node.input[1], _arg(node, 2), float(a.get("epsilon", 1e-5)),
                 int(a.get("axis", -1)), out=node.output[0])


def _embed_layer_norm(w: _Writer, node: onnx.NodeProto) -> None:
    """``LayerNorm(word[ids] + position[position_ids or 0..S-1] + segment[segment_ids])``;
    the mask index is the mask's row sums (int32), the embedding sum output 2."""
    a = _attrs(node)
    ids, segments, words, positions, segment_table = (_arg(node, i) for i in range(5))
    gamma, beta, mask, position_ids = node.input[5], node.input[6], _arg(node, 7), _arg(node, 8)
    word = w.op("Gather", words, ids)
    if position_ids is None:
        length = w.op("Gather", w.op("Shape", ids), w.const(1, np.int64), axis=0)
        position_ids = w.op("Range", w.const(0, np.int64), length, w.const(1, np.int64))
    terms = [w.op("Gather", positions, position_ids)]
    if segments and segment_table:
        terms.append(w.op("Gather", segment_table, segments))
    total = w.add(word, *terms, out=_out(node, 2))
    w.layer_norm(total, gamma, beta, float(a.get("epsilon", 1e-12)), out=node.output[0])
    if _out(node, 1):
        if mask is not None:
            rows = w.op("ReduceSum", w.op("Cast", mask, to=TensorProto.INT32), w.ints(1), keepdims=0)
            w.op("Identity", rows, out=node.output[1])
        else:  # the kernel's mask index without a mask: zeros
            batch = w.op("Slice", w.op("Shape", ids), w.ints(0), w.ints(1))
            w.op("ConstantOfShape", batch, out=node.output[1],
                 value=numpy_helper.from_array(np.zeros(1, np.int32)))


# -- activations ------------------------------------------------------------------------


def _bias_gelu(tanh: bool):
    def write(w: _Writer, node: onnx.NodeProto) -> None:
        x = w.add(node.input[0], _arg(node, 1))
        (w.tanh_gelu if tanh else w.gelu)(x, out=node.output[0])

    return write


def _quick_gelu(w: _Writer, node: onnx.NodeProto) -> None:
    """``x · sigmoid(α·x)`` (α = 1: SiLU)."""
    alpha = float(_attrs(node).get("alpha", 1.702))
    x = node.input[0]
    scaled = x if alpha == 1.0 else w.op("Mul", x, w.const(alpha))
    w.op("Mul", x, w.op("Sigmoid", scaled), out=node.output[0])


def _bias_add(w: _Writer, node: onnx.NodeProto) -> None:
    w.add(node.input[0], node.input[1], node.input[2], out=node.output[0])


def _bias_split_gelu(w: _Writer, node: onnx.NodeProto) -> None:
    """``(x + bias)`` split in halves on the last axis: ``left · gelu(right)``."""
    bias = w.value(node.input[1])
    if bias is None:
        raise Unsupported("its bias is not a constant")
    half = bias.shape[-1] // 2
    total = w.add(node.input[0], node.input[1])
    left, right = w.last_slice(total, 0, half), w.last_slice(total, half, 2 * half)
    w.op("Mul", left, w.gelu(right), out=node.output[0])


#: FusedConv / FusedGemm's ``activation`` names: op and attributes from its parameters
def _activation(w: _Writer, x: str, name: str, params: list[float], out: str) -> str:
    if name in ("Relu", "Tanh", "Sigmoid"):
        return w.op(name, x, out=out)
    if name == "LeakyRelu":
        return w.op("LeakyRelu", x, out=out, alpha=params[0] if params else 0.01)
    if name == "HardSigmoid":
        alpha, beta = (params + [0.2, 0.5][len(params):])[:2]
        return w.op("HardSigmoid", x, out=out, alpha=alpha, beta=beta)
    if name == "Clip":
        low, high = (params + [-np.inf, np.inf][len(params):])[:2]
        return w.op("Clip", x, w.const(low), w.const(high), out=out)
    raise Unsupported(f"activation {name!r}")


_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
_GEMM_ATTRS = ("alpha", "beta", "transA", "transB")


def _fused_conv(w: _Writer, node: onnx.NodeProto) -> None:
    """``activation(Conv(X, W, B) + Z)``."""
    a = _attrs(node)
    name = _text(a.get("activation", ""))
    inputs = [x or "" for x in node.input[:3]]
    while inputs and not inputs[-1]:
        inputs.pop()
    y = w.op("Conv", *inputs, **{k: a[k] for k in _CONV_ATTRS if k in a})
    y = w.add(y, _arg(node, 3))
    if name:
        _activation(w, y, name, list(a.get("activation_params", [])), node.output[0])
    else:
        w.op("Identity", y, out=node.output[0])


def _fused_gemm(w: _Writer, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    name = _text(a.get("activation", ""))
    y = w.op("Gemm", *[x for x in node.input], **{k: a[k] for k in _GEMM_ATTRS if k in a})
    params = [a[k] for k in ("activation_alpha", "activation_beta") if k in a]
    if name:
        _activation(w, y, name, params, node.output[0])
    else:
        w.op("Identity", y, out=node.output[0])


def _fused_matmul(w: _Writer, node: onnx.NodeProto) -> None:
    """``alpha · op(A) · op(B)`` with op a transpose of the last two axes."""
    a = _attrs(node)
    if a.get("transBatchA", 0) or a.get("transBatchB", 0):
        raise Unsupported("transBatchA / transBatchB")
    operands = []
    for x, flag in ((node.input[0], a.get("transA", 0)), (node.input[1], a.get("transB", 0))):
        if flag:
            value = w.value(x)
            if value is not None:
                x = w.weight(np.swapaxes(value, -1, -2))
            else:
                rank = w.rank(x)
                x = w.op("Transpose", x, perm=[*range(rank - 2), rank - 1, rank - 2])
        operands.append(x)
    alpha = float(a.get("alpha", 1.0))
    if alpha == 1.0:
        w.op("MatMul", *operands, out=node.output[0])
    else:
        w.op("Mul", w.op("MatMul", *operands), w.const(alpha), out=node.output[0])


# -- attention --------------------------------------------------------------------------


def _heads(w: _Writer, x: str, heads: int) -> str:
    """``[B, S, heads·h]`` → ``[B, heads, S, h]``."""
    return w.op("Transpose", w.op("Reshape", x, w.ints(0, 0, heads, -1)), perm=[0, 2, 1, 3])


def _repeat_heads(w: _Writer, kv: str, groups: int) -> str:
    """Grouped-query attention: each key/value head serves ``groups`` query heads
    (``[B, Nk, T, h]`` → ``[B, Nk·groups, T, h]``, as Hugging Face's ``repeat_kv``)."""
    if groups == 1:
        return kv
    shape = w.op("Shape", kv)
    batch_heads, length_size = w.op("Slice", shape, w.ints(0), w.ints(2)), w.op("Slice", shape, w.ints(2), w.ints(4))
    expanded = w.op("Expand", w.op("Unsqueeze", kv, w.ints(2)),
                    w.op("Concat", batch_heads, w.ints(groups), length_size, axis=0))
    return w.op("Reshape", expanded,
                w.op("Concat", w.op("Slice", shape, w.ints(0), w.ints(1)), w.ints(-1), length_size, axis=0))


def _attend(w: _Writer, q: str, k: str, v: str, *, scale: float, bias: str | None, out: str,
            softcap: float = 0.0, merge_heads: bool = True) -> str:
    """``softmax(q·kᵀ·scale (+ bias)) · v`` on ``[B, N, S, h]`` heads, back to ``[B, S, N·h]``
    (or left ``[B, N, S, h]`` without ``merge_heads``)."""
    scores = w.op("Mul", w.op("MatMul", q, w.op("Transpose", k, perm=[0, 1, 3, 2])), w.const(scale))
    if softcap:
        scores = w.op("Mul", w.op("Tanh", w.op("Div", scores, w.const(softcap))), w.const(softcap))
    scores = w.add(scores, bias)
    context = w.op("MatMul", w.op("Softmax", scores, axis=-1), v, out=None if merge_heads else out)
    if not merge_heads:
        return context
    return w.op("Reshape", w.op("Transpose", context, perm=[0, 2, 1, 3]), w.ints(0, 0, -1), out=out)


def _where_kept(w: _Writer, keep: str, filter_value: float) -> str:
    """The additive score bias of a boolean keep mask: 0 where kept, ``filter_value`` not."""
    return w.op("Where", keep, w.const(0.0), w.const(filter_value))


def _score_bias(w: _Writer, filter_value: float, keep: str | None = None, causal: str | None = None,
                additive: str | None = None) -> str | None:
    """What attention adds to its scores: ``filter_value`` where the mask's ``keep`` or the
    ``causal`` booleans are false, plus an ``additive`` bias; None when there is nothing."""
    keeps = [t for t in (keep, causal) if t]
    biases = [_where_kept(w, keeps[0] if len(keeps) == 1 else w.op("And", *keeps), filter_value)] if keeps else []
    biases += [additive] if additive else []
    return w.add(*biases) if biases else None


def _after_past(w: _Writer, node: onnx.NodeProto, k: str, v: str, past_k: str | None, past_v: str | None):
    """Keys and values after the past ones; they are the present outputs (slots 1 and 2)."""
    if past_k and past_v:
        k, v = w.op("Concat", past_k, k, axis=2), w.op("Concat", past_v, v, axis=2)
    for i, t in ((1, k), (2, v)):
        if _out(node, i):
            w.op("Identity", t, out=node.output[i])
    return k, v


def _causal_keep(w: _Writer, queries: str, keys: str) -> str:
    """``[S, T]`` booleans: key ``t`` is visible from query ``s`` when ``t ≤ s + T − S``."""
    s = w.op("Range", w.const(0, np.int64), queries, w.const(1, np.int64))
    t = w.op("Range", w.const(0, np.int64), keys, w.const(1, np.int64))
    shifted = w.op("Add", w.op("Unsqueeze", s, w.ints(1)), w.op("Sub", keys, queries))
    return w.op("LessOrEqual", w.op("Unsqueeze", t, w.ints(0)), shifted)


def _length(w: _Writer, x: str, axis: int) -> str:
    return w.op("Gather", w.op("Shape", x), w.const(axis, np.int64), axis=0)


def _mask_keep(w: _Writer, mask: str, keys: str, what: str, x: str) -> str:
    """Booleans broadcasting to ``[B, N, S, T]`` from a mask index: ``[B]`` end positions,
    ``[B, T]`` or ``[B, S, T]`` raw 0/1 masks."""
    rank = w.rank(mask)
    if rank == 1:
        batch = w.shape(mask)[0]
        if batch is None or batch != w.shape(x)[0]:  # [2·batch]: end and start positions
            raise Unsupported(f"a {what} that is not [batch] end positions")
        t = w.op("Range", w.const(0, np.int64), keys, w.const(1, np.int64))
        ends = w.op("Cast", mask, to=TensorProto.INT64)
        keep = w.op("Less", w.op("Unsqueeze", t, w.ints(0)), w.op("Unsqueeze", ends, w.ints(1)))
        return w.op("Unsqueeze", keep, w.ints(1, 2))
    if rank in (2, 3):
        keep = w.op("Greater", w.op("Cast", mask, to=TensorProto.FLOAT), w.const(0.0))
        return w.op("Unsqueeze", keep, w.ints(1, 2) if rank == 2 else w.ints(1))
    raise Unsupported(f"a rank-{rank} {what}")


def _attention(w: _Writer, node: onnx.NodeProto) -> None:
    """``com.microsoft.Attention``: one QKV projection, multi-head attention, an optional
    mask index (end positions or raw 0/1 masks), causal with ``unidirectional``."""
    a = _attrs(node)
    if a.get("do_rotary", 0) or a.get("past_present_share_buffer", 0):
        raise Unsupported("do_rotary / past_present_share_buffer")
    if _arg(node, 4) or _out(node, 1) or _arg(node, 6):
        raise Unsupported("a past state")
    heads = int(a["num_heads"])
    x, weights, bias = node.input[0], node.input[1], _arg(node, 2)
    w_value, b_value = w.value(weights), w.value(bias) if bias else None
    if w_value is None or (bias and b_value is None):
        raise Unsupported("its QKV weight is not a constant")
    sizes = list(a.get("qkv_hidden_sizes", [])) or [w_value.shape[-1] // 3] * 3
    # one projection per Q, K, V, as exporters write them (each a layer of its own)
    projections, start = [], 0
    for size in sizes:
        y = w.op("MatMul", x, w.weight(w_value[:, start:start + size]))
        if b_value is not None:
            y = w.op("Add", y, w.weight(b_value[start:start + size]))
        projections.append(y)
        start += size
    q, k, v = (_heads(w, p, heads) for p in projections)
    scale = float(a.get("scale", 0.0)) or 1.0 / math.sqrt(sizes[0] // heads)
    keys = _length(w, x, 1)
    mask = _arg(node, 3)
    bias_sum = _score_bias(w, float(a.get("mask_filter_value", MASK_FILTER_VALUE)),
                           keep=_mask_keep(w, mask, keys, "mask index", x) if mask else None,
                           causal=_causal_keep(w, keys, keys) if a.get("unidirectional", 0) else None,
                           additive=_arg(node, 5))
    _attend(w, q, k, v, scale=scale, bias=bias_sum, out=node.output[0])


def _multi_head_attention(w: _Writer, node: onnx.NodeProto) -> None:
    """``com.microsoft.MultiHeadAttention`` with separate ``[B, S, D]`` query, key and value
    (optional packed bias, key padding mask, attention bias, past key/value)."""
    a = _attrs(node)
    query, key, value = node.input[0], _arg(node, 1), _arg(node, 2)
    if key is None or value is None or w.rank(key) != 3 or w.rank(query) != 3:
        raise Unsupported("packed or per-head key/value inputs")
    if _arg(node, 8) or _arg(node, 9):
        raise Unsupported("past_sequence_length / cache_indirection")
    heads = int(a["num_heads"])
    bias = _arg(node, 3)
    if bias:
        b_value = w.value(bias)
        if b_value is None:
            raise Unsupported("its bias is not a constant")
        d = b_value.shape[0] // 3
        query, key, value = (w.op("Add", t, w.weight(b_value[i * d:(i + 1) * d]))
                             for i, t in enumerate((query, key, value)))
    q, k, v = _heads(w, query, heads), _heads(w, key, heads), _heads(w, value, heads)
    k, v = _after_past(w, node, k, v, _arg(node, 6), _arg(node, 7))
    queries, keys = _length(w, node.input[0], 1), _length(w, k, 2)
    bias_sum = _score_bias(
        w, float(a.get("mask_filter_value", MASK_FILTER_VALUE)),
        keep=_mask_keep(w, node.input[4], keys, "key padding mask", node.input[0]) if _arg(node, 4) else None,
        causal=_causal_keep(w, queries, keys) if a.get("unidirectional", 0) else None, additive=_arg(node, 5))
    scale = float(a.get("scale", 0.0))
    if not scale:
        width = w.shape(node.input[0])[-1]
        if not isinstance(width, int):
            raise Unsupported("its hidden size is not static")
        scale = 1.0 / math.sqrt(width // heads)
    _attend(w, q, k, v, scale=scale, bias=bias_sum, out=node.output[0])


#: the score bias of masked positions where the standard op says −inf (a finite value keeps
#: a row whose every key is masked finite; exp of it is 0 in every float precision)
MASKED = -1e9


def _standard_attention(w: _Writer, node: onnx.NodeProto) -> None:
    """Opset 23's ``Attention``: Q, K, V as ``[B, N, S, h]`` or ``[B, S, N·h]`` (with
    ``q_num_heads`` / ``kv_num_heads``), grouped key/value heads, a boolean or additive
    mask, ``is_causal`` (aligned to the last query, after the past), softcap, past key and
    value (the present outputs are the concatenations)."""
    a = _attrs(node)
    if _out(node, 3) or _arg(node, 6) or a.get("left_window_size", -1) >= 0 or a.get("right_window_size", -1) >= 0:
        raise Unsupported("qk_matmul_output, nonpad_kv_seqlen or a sliding window")
    q, k, v = node.input[:3]
    three_d = w.rank(q) == 3
    if three_d:
        heads, kv_heads = int(a["q_num_heads"]), int(a["kv_num_heads"])
        q, k, v = _heads(w, q, heads), _heads(w, k, kv_heads), _heads(w, v, kv_heads)
        head_size = w.shape(node.input[0])[-1]
        head_size = head_size // heads if isinstance(head_size, int) else None
    else:
        heads, kv_heads = w.shape(q)[1], w.shape(k)[1]
        head_size = w.shape(q)[-1]
    k, v = _after_past(w, node, k, v, _arg(node, 4), _arg(node, 5))
    if kv_heads != heads:
        if not (isinstance(heads, int) and isinstance(kv_heads, int)):
            raise Unsupported("head counts that are not static")
        k, v = _repeat_heads(w, k, heads // kv_heads), _repeat_heads(w, v, heads // kv_heads)
    scale = float(a["scale"]) if "scale" in a else None
    if scale is None:
        if not isinstance(head_size, int):
            raise Unsupported("a head size that is not static")
        scale = 1.0 / math.sqrt(head_size)
    mask = _arg(node, 3)
    boolean = mask is not None and w.dtype(mask) == TensorProto.BOOL
    bias_sum = _score_bias(w, MASKED, keep=mask if boolean else None,
                           causal=_causal_keep(w, _length(w, q, 2), _length(w, k, 2)) if a.get("is_causal", 0) else None,
                           additive=None if boolean else mask)
    _attend(w, q, k, v, scale=scale, bias=bias_sum, out=node.output[0],
            softcap=float(a.get("softcap", 0.0)), merge_heads=three_d)


def _rotary(w: _Writer, x: str, cos: str, sin: str, position_ids: str | None, a: dict,
            out: str | None = None, rank: int | None = None) -> str:
    """``x₁·cos − x₂·sin, x₁·sin + x₂·cos`` on the first ``rotary_embedding_dim`` features
    of each head (halves, or even/odd features when ``interleaved``), the rest as it is; ``x``
    is ``[B, N, S, h]`` or ``[B, S, N·h]``. Linear in ``x``: relevance follows each term."""
    cos_cache = cos
    if position_ids is not None:
        cos, sin = w.op("Gather", cos, position_ids), w.op("Gather", sin, position_ids)
    three_d = (rank or w.rank(x)) == 3
    if three_d:
        x = w.op("Reshape", x, w.ints(0, 0, int(a["num_heads"]), -1))  # [B, S, N, h]
    cos, sin = (w.op("Unsqueeze", t, w.ints(2 if three_d else 1)) for t in (cos, sin))
    rotated_dim = int(a.get("rotary_embedding_dim", 0))
    if not rotated_dim:  # the caches hold cos and sin of half the rotated features
        cache = w.shape(cos_cache)[-1]
        if not isinstance(cache, int):
            raise Unsupported("a rotary dimension that is not static")
        rotated_dim = 2 * cache
    part = w.last_slice(x, 0, rotated_dim)
    if a.get("interleaved", 0):
        x1 = w.op("Slice", part, w.ints(0), w.ints(rotated_dim), w.ints(-1), w.ints(2))
        x2 = w.op("Slice", part, w.ints(1), w.ints(rotated_dim), w.ints(-1), w.ints(2))
    else:
        x1, x2 = w.last_slice(part, 0, rotated_dim // 2), w.last_slice(part, rotated_dim // 2, rotated_dim)
    real = w.op("Add", w.op("Mul", x1, cos), w.op("Mul", w.op("Neg", x2), sin))
    imag = w.op("Add", w.op("Mul", x1, sin), w.op("Mul", x2, cos))
    if a.get("interleaved", 0):
        pairs = w.op("Concat", w.op("Unsqueeze", real, w.ints(-1)), w.op("Unsqueeze", imag, w.ints(-1)), axis=-1)
        rotated = w.op("Reshape", pairs, w.op("Shape", part))
    else:
        rotated = w.op("Concat", real, imag, axis=-1)
    rest = w.op("Slice", x, w.ints(rotated_dim), w.ints(2 ** 62), w.ints(-1))
    y = w.op("Concat", rotated, rest, axis=-1, out=None if three_d else out)
    return w.op("Reshape", y, w.ints(0, 0, -1), out=out) if three_d else y


def _standard_rotary(w: _Writer, node: onnx.NodeProto) -> None:
    """Opset 23's ``RotaryEmbedding(X, cos_cache, sin_cache, position_ids)``."""
    _rotary(w, node.input[0], node.input[1], node.input[2], _arg(node, 3), _attrs(node), out=node.output[0])


def _contrib_rotary(w: _Writer, node: onnx.NodeProto) -> None:
    """``com.microsoft.RotaryEmbedding(input, position_ids, cos_cache, sin_cache)``."""
    a = _attrs(node)
    if a.get("is_packed_batching", 0) or a.get("scale", 1.0) != 1.0:
        raise Unsupported("packed batching or a scale")
    positions = w.shape(node.input[1])
    if len(positions) != 2:
        raise Unsupported("a position offset instead of position ids")
    if w.rank(node.input[0]) == 3 and not a.get("num_heads"):
        raise Unsupported("a [B, S, N·h] input without num_heads")
    _rotary(w, node.input[0], node.input[2], node.input[3], node.input[1], a, out=node.output[0])



def _group_query_attention(w: _Writer, node: onnx.NodeProto) -> None:
    """``com.microsoft.GroupQueryAttention``, onnxruntime-genai's decoder attention: query,
    key and value as ``[B, S, N·h]`` (or packed in the query), ``kv_num_heads`` key/value
    heads, rotary embedding inside (``do_rotary``), a past key/value cache (``[B, Nk, P, h]``,
    the present is the past followed by the new keys), causal with an optional local window,
    softcap and an additive bias. ``seqlens_k[b] + 1`` is the row's total length ``T_b``: its
    queries sit at positions ``max(T_b − S, 0) + s`` (a prompt starts at 0, a step after the
    past) and see the keys at those positions or before, the last ``local_window_size`` of them
    with a window. The present is the concatenation: a past as long as the cache's rows, as
    onnxruntime-genai feeds on CPU (a buffer shared with the present, or rows of unequal
    lengths in a batch, are not what it computes)."""
    a = _attrs(node)
    if a.get("kv_cache_bit_width", 0) or a.get("smooth_softmax", 0) or a.get("sliding_window_cache", 0) \
            or _out(node, 3) or any(_arg(node, i) for i in (11, 12, 13, 14, 15, 16)) \
            or any(_text(a.get(t, b"NONE")) != "NONE" for t in ("k_quant_type", "v_quant_type")):
        raise Unsupported("a quantized or shared-window cache, head sinks, smooth softmax, Q/K norms, "
                          "query_seqlens or output_qk")
    heads, kv_heads = int(a["num_heads"]), int(a["kv_num_heads"])
    query, key, value = node.input[0], _arg(node, 1), _arg(node, 2)
    width = w.shape(query)[-1]
    if not isinstance(width, int):
        raise Unsupported("a hidden size that is not static")
    if key is None:  # packed: [Q | K | V] along the features
        head_size = width // (heads + 2 * kv_heads)
        q_end, k_end = heads * head_size, (heads + kv_heads) * head_size
        query, key, value = (w.last_slice(query, 0, q_end), w.last_slice(query, q_end, k_end),
                             w.last_slice(query, k_end, width))
    else:
        head_size = width // heads
    q, k, v = _heads(w, query, heads), _heads(w, key, kv_heads), _heads(w, value, kv_heads)
    queries = _length(w, node.input[0], 1)
    totals = w.op("Add", w.op("Cast", node.input[5], to=TensorProto.INT64), w.const(1, np.int64))  # [B]
    offsets = w.op("Max", w.op("Sub", totals, queries), w.const(0, np.int64))
    s = w.op("Range", w.const(0, np.int64), queries, w.const(1, np.int64))
    positions = w.op("Add", w.op("Unsqueeze", offsets, w.ints(1)), w.op("Unsqueeze", s, w.ints(0)))  # [B, S]
    if a.get("do_rotary", 0):
        rotary = {"interleaved": a.get("rotary_interleaved", 0)}
        ids = _arg(node, 9) or positions
        q, k = (_rotary(w, t, node.input[7], node.input[8], ids, rotary, rank=4) for t in (q, k))
    k, v = _after_past(w, node, k, v, _arg(node, 3), _arg(node, 4))
    t = w.op("Range", w.const(0, np.int64), _length(w, k, 2), w.const(1, np.int64))
    key_at, query_at = w.op("Unsqueeze", t, w.ints(0, 1)), w.op("Unsqueeze", positions, w.ints(2))  # [1,1,T], [B,S,1]
    if a.get("causal", 1):
        keep = w.op("LessOrEqual", key_at, query_at)
        window = int(a.get("local_window_size", -1))
        if window > 0:  # the query and the window − 1 keys before it
            keep = w.op("And", keep, w.op("Greater", key_at, w.op("Sub", query_at, w.const(window, np.int64))))
    else:
        keep = w.op("Less", key_at, w.op("Unsqueeze", totals, w.ints(1, 2)))
    bias = _score_bias(w, MASKED, keep=w.op("Unsqueeze", keep, w.ints(1)), additive=_arg(node, 10))
    groups = heads // kv_heads
    k, v = _repeat_heads(w, k, groups), _repeat_heads(w, v, groups)
    scale = float(a.get("scale", 0.0)) or 1.0 / math.sqrt(head_size)
    _attend(w, q, k, v, scale=scale, bias=bias, out=node.output[0], softcap=float(a.get("softcap", 0.0)))

# -- the table --------------------------------------------------------------------------


Decomposition = Callable[[_Writer, onnx.NodeProto], None]

#: (domain, op) → how it is written out; ``""`` entries are onnxruntime's default-domain
#: registrations (the standard ops of the same name are left alone)
DECOMPOSITIONS: dict[tuple[str, str], Decomposition] = {
    (MS_DOMAIN, "SkipLayerNormalization"): _skip_layer_norm(simplified=False),
    (MS_DOMAIN, "SkipSimplifiedLayerNormalization"): _skip_layer_norm(simplified=True),
    ("", "SimplifiedLayerNormalization"): _simplified_layer_norm,
    (MS_DOMAIN, "SimplifiedLayerNormalization"): _simplified_layer_norm,
    ("", "LayerNormalization"): _contrib_layer_norm,
    (MS_DOMAIN, "EmbedLayerNormalization"): _embed_layer_norm,
    (MS_DOMAIN, "BiasGelu"): _bias_gelu(tanh=False),
    (MS_DOMAIN, "Gelu"): _bias_gelu(tanh=False),
    (MS_DOMAIN, "FastGelu"): _bias_gelu(tanh=True),
    (MS_DOMAIN, "QuickGelu"): _quick_gelu,
    (MS_DOMAIN, "BiasAdd"): _bias_add,
    (MS_DOMAIN, "BiasSplitGelu"): _bias_split_gelu,
    (MS_DOMAIN, "FusedConv"): _fused_conv,
    (MS_DOMAIN, "FusedGemm"): _fused_gemm,
    (MS_DOMAIN, "FusedMatMul"): _fused_matmul,
    (MS_DOMAIN, "Attention"): _attention,
    (MS_DOMAIN, "MultiHeadAttention"): _multi_head_attention,
    (MS_DOMAIN, "GroupQueryAttention"): _group_query_attention,
    (MS_DOMAIN, "RotaryEmbedding"): _contrib_rotary,
}

#: opset 23's attention ops, written out like the fused ones (no exporter spells them out)
STANDARD_DECOMPOSITIONS: dict[str, Decomposition] = {
    "Attention": _standard_attention,
    "RotaryEmbedding": _standard_rotary,
}


#: the attribute a fused node left in the twin carries: why it was not written out
WHY_FUSED = "lrpc_stays_fused"


def is_fused_op(domain: str) -> bool:
    """An onnxruntime contrib domain (for the check's message on ops without a rule)."""
    return domain == MS_DOMAIN or domain.startswith(MS_DOMAIN + ".")


def write_out(node: onnx.NodeProto, graph: onnx.GraphProto, inits: dict, opset: int, shapes: tuple[dict, dict],
              runtime_ops: set[str]) -> list[onnx.NodeProto] | None:
    """The standard ops ``node`` stands for when it is one of onnxruntime's fused ops (or
    opset 23's attention ops); a variant not written out stays with its reason
    (:data:`WHY_FUSED`), which the check reports. None for any other node. ``shapes``:
    :func:`declared_shapes`."""
    fn = _decomposition(node, runtime_ops)
    if fn is None:
        return None
    writer = _Writer(node, graph, inits, opset, *shapes)
    try:
        fn(writer, node)
    except Unsupported as reason:
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        kept.attribute.append(helper.make_attribute(WHY_FUSED, str(reason)))
        return [kept]
    return writer.nodes


def _decomposition(node: onnx.NodeProto, runtime_ops: set[str]) -> Decomposition | None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if domain == "" and node.op_type not in runtime_ops:
        return STANDARD_DECOMPOSITIONS.get(node.op_type)  # None: any other standard op
    return DECOMPOSITIONS.get((domain, node.op_type))


def writes_out(node: onnx.NodeProto, runtime_ops: set[str]) -> bool:
    """Whether the analysis writes ``node`` out in standard ops (when its variant allows)."""
    return _decomposition(node, runtime_ops) is not None


def declared_shapes(model: onnx.ModelProto) -> tuple[dict[str, list], dict[str, int]]:
    """Dims (int, symbolic name or None) and element types of the tensors whose shapes the
    file declares, completed by onnx's shape inference and then onnxruntime's symbolic one
    (which knows its contrib ops) where the written-out nodes' inputs lack them."""
    graph = model.graph
    wanted = {x for n in graph.node if is_fused_op(n.domain) or n.op_type in STANDARD_DECOMPOSITIONS
              for x in n.input if x} - {t.name for t in graph.initializer}

    def declared(m):
        return {vi.name: vi for vi in [*m.graph.input, *m.graph.output, *m.graph.value_info]
                if vi.type.tensor_type.HasField("shape")}

    def onnx_inference():
        return onnx.shape_inference.infer_shapes(model)

    def runtime_inference():
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)

    # onnxruntime's inference first where its contrib ops are: onnx's stops at them, giving
    # the dims after them names of their own (a mask index's batch no longer the batch)
    inferences = (runtime_inference, onnx_inference) if any(is_fused_op(n.domain) for n in graph.node) else (
        onnx_inference, runtime_inference)
    found = declared(model)
    for infer in inferences:
        if not wanted - set(found):
            break
        try:
            found = {**declared(infer()), **found}
        except Exception:  # noqa: BLE001 - failures are asserts and key errors: what is declared stays
            pass
    shapes = {name: [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                     for d in vi.type.tensor_type.shape.dim] for name, vi in found.items()}
    return shapes, {name: vi.type.tensor_type.elem_type for name, vi in found.items()}


# recurrent layers are written out in their time steps (lrpc.recurrent, which uses the writer above)
from .recurrent import RECURRENT_DECOMPOSITIONS  # noqa: E402

STANDARD_DECOMPOSITIONS.update(RECURRENT_DECOMPOSITIONS)
