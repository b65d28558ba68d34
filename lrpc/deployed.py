"""Models as deployed: quantized (QDQ, QOperator, dynamic int8, int4 ``MatMulNBits``) and
half-precision (float16, bfloat16) graphs, explained as they compute.

The compiled file of such a model holds two copies of its forward pass:

- the **deployed** one, the input model's own nodes and weights, untouched: it produces the
  model's outputs, bit-identical to the deployed file's (onnxruntime still fuses its
  ``DequantizeLinear → Conv → QuantizeLinear`` groups into integer kernels, because nothing
  else reads their tensors);
- the **analysis twin**, which the relevance pass reads: the same network with every
  quantized op written as its float equivalent between ``DequantizeLinear`` and
  ``QuantizeLinear`` (``QLinearConv`` → DQ → ``Conv`` → Q, ``MatMulInteger`` → ``MatMul`` of
  DQ'ed operands, ``MatMulNBits`` → ``MatMul`` with the dequantized weight), quantized
  constants folded (weights, biases, embedding tables), in one float precision (float32
  unless ``relevance_dtype`` says otherwise). Its weights are the dequantized values, which
  rules modify (W⁺, W², ...); each ``QuantizeLinear → DequantizeLinear`` pair is a rounding,
  through which relevance passes as through an activation. In the written file the
  roundings of a QOperator twin read the deployed run's integers
  (:func:`deployed_roundings`), those of QDQ and dynamic twins are the float arithmetic the
  ops define (:func:`defined_roundings`): reading a QDQ group's tensors would stop
  onnxruntime fusing it. onnxruntime's fused ops (``Attention``, ``SkipLayerNormalization``,
  ``FusedConv``, ...) are written out in the standard ops they stand for
  (:mod:`lrpc.contrib`).

The whole pipeline (canonize, check, rules, emit) runs on the twin as on any float model;
:func:`stitch` then renames the twin's tensors apart (``lrp/twin/...``: runtimes would
otherwise merge equal nodes of the two copies and the deployed kernels would lose their
fusion) and puts the deployed forward in front, whose outputs the file returns. The price
is one extra float forward pass and the twin's float weights in the file.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import contrib
from .errors import LrpcError
from .files import all_graphs, default_opset, node_reads, runtime_default_domain_ops, toposorted

TWIN_PREFIX = "lrp/twin/"
MS_DOMAIN = "com.microsoft"

#: relevance precisions lrpc computes in (the twin's float type)
RELEVANCE_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
HALF = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
FLOATS = HALF | {TensorProto.FLOAT}

#: ops of quantized graphs whose integer outputs still carry relevance (the analysis sees
#: through them); anything else with integer outputs stops relevance
QUANTIZERS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def is_quantized_op(op: str) -> bool:
    """An op of a quantized graph (for the check's message on the ones without a rule)."""
    return (op in QUANTIZERS or op.startswith("QLinear") or op in ("QGemm", "QAttention", "QEmbedLayerNormalization")
            or op.endswith("Integer") or "NBits" in op or "Quantize" in op or "BlockQuantized" in op)


# -- what form a model is in ------------------------------------------------------------


def deployed_form(model: onnx.ModelProto, runtime_ops: set[str] | None = None) -> dict:
    """``{"quantized": bool, "half": bool, "fused": bool}``: what makes ``model`` a deployed
    form (``fused``: onnxruntime's contrib ops or opset 23's attention ops, which the
    analysis writes out: :mod:`lrpc.contrib`). ``runtime_ops``: the model's
    :func:`~lrpc.files.runtime_default_domain_ops`, where the caller has them."""
    quantized = half = False
    runtime_ops = runtime_default_domain_ops(model) if runtime_ops is None else runtime_ops
    fused = bool(runtime_ops)
    for graph in all_graphs(model.graph):
        fused = fused or any(contrib.writes_out(n, runtime_ops) or (contrib.is_fused_op(n.domain)
                                                                    and not is_quantized_op(n.op_type))
                             for n in graph.node)
        quantized = quantized or any(is_quantized_op(n.op_type) for n in graph.node)
        half = half or any(t.data_type in HALF for t in graph.initializer) or any(
            vi.type.tensor_type.elem_type in HALF for vi in [*graph.input, *graph.output, *graph.value_info]) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i in HALF for a in n.attribute) for n in graph.node)
    return {"quantized": quantized, "half": half, "fused": fused}


def needs_twin(model: onnx.ModelProto, relevance_dtype: str | None) -> bool:
    form = deployed_form(model)
    return form["quantized"] or form["half"] or form["fused"] or relevance_dtype not in (None, "float32")


def relevance_type(relevance_dtype: str | None) -> int:
    if relevance_dtype is None:
        return TensorProto.FLOAT
    if relevance_dtype not in RELEVANCE_DTYPES:
        raise LrpcError(f"relevance_dtype must be one of {', '.join(RELEVANCE_DTYPES)}, got {relevance_dtype!r}")
    return RELEVANCE_DTYPES[relevance_dtype]


# -- the analysis twin ------------------------------------------------------------------


def analysis_twin(model: onnx.ModelProto, relevance_dtype: str | None = None) -> onnx.ModelProto:
    """The float network the relevance pass reads (see the module docstring)."""
    twin = copy.deepcopy(model)
    graph = twin.graph
    _constants_as_initializers(graph)
    inits = {t.name: t for t in graph.initializer}
    state = _Rewriting(graph.node)
    opset = default_opset(model)
    runtime_ops = runtime_default_domain_ops(model)
    shapes = contrib.declared_shapes(model) if deployed_form(model, runtime_ops)["fused"] else ({}, {})
    rewritten = []
    for node in graph.node:
        written_out = contrib.write_out(node, graph, inits, opset, shapes, runtime_ops)
        if written_out is not None:
            rewritten.extend(written_out)
            continue
        rewrite = _REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx", MS_DOMAIN) else None
        rewritten.extend(rewrite(node, inits, graph, state) if rewrite else [node])
    rewritten = [n for n in rewritten
                 if not (n.output and n.output[0] in state.dropped and n.op_type in ("Cast", "Mul"))]
    rewritten = _shared_dequantizations(_dequantize_integer_ops(toposorted(rewritten)),
                                        {o.name for o in graph.output})
    rewritten = _float_tables(rewritten, inits, graph)
    del graph.node[:]
    graph.node.extend(rewritten)
    to_float(graph, relevance_type(relevance_dtype))
    del graph.value_info[:]  # types changed: shape inference redoes them
    if not any(n.domain == MS_DOMAIN for g in all_graphs(graph) for n in g.node):
        del twin.opset_import[:]
        twin.opset_import.extend([o for o in model.opset_import if o.domain != MS_DOMAIN])
    return twin


#: ops QOperator graphs run on quantized integers as they are (they commute with
#: dequantization: a max, a copy or a reordering of the same scale's values)
_ON_INTEGERS = {"MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice",
                "Identity", "Resize", "DepthToSpace", "SpaceToDepth", "Pad"}


def _dequantize_integer_ops(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """A standard op applied to a quantized tensor (``MaxPool`` of a ``QLinearConv``'s
    uint8 output) becomes DQ → op → Q with that tensor's scale and zero point: the same
    integers, and a float op in between that relevance (and MaxPool's winner) reads."""
    params: dict[str, tuple] = {}
    out = []
    for node in nodes:
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx"):
            params[node.output[0]] = (node.input[1], _arg(node, 2), _attrs(node).get("axis"))
        x = node.input[0] if node.input else ""
        if node.op_type not in _ON_INTEGERS or node.domain not in ("", "ai.onnx") or x not in params:
            out.append(node)
            continue
        scale, zero, axis = params[x]
        if axis is not None and node.op_type != "MaxPool":
            out.append(node)  # a per-axis scale moves with the axes: leave the op on integers
            continue
        names = _Names(node)
        dq, value = _dq(names, x, scale, zero, axis)
        y = names(node.op_type)
        op = helper.make_node(node.op_type, [value, *node.input[1:]], [y], name=node.name, **_attrs(node))
        if node.op_type == "Pad" and len(node.input) > 2 and node.input[2]:
            op.input[2] = ""  # a pad value in integers: the zero point, which dequantizes to 0
        out.extend([dq, op, _q(names, y, scale, zero, node.output[0])])
        if axis is not None:
            out[-1].attribute.extend([helper.make_attribute("axis", axis)])
        params[node.output[0]] = (scale, zero, axis)
    return out


def _shared_dequantizations(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """One ``DequantizeLinear`` per quantized tensor: QOperator graphs (and the rewrites
    above) dequantize a tensor once per float reader, and patterns (a GELU reading ``x``
    twice) match on tensor identity."""
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    out = []
    for node in nodes:
        for i, x in enumerate(node.input):
            if x in alias:
                node.input[i] = alias[x]
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            key = (tuple(node.input), tuple(sorted(_attrs(node).items())))
            if key in first:
                alias[node.output[0]] = first[key]
                continue
            first[key] = node.output[0]
        out.append(node)
    return out


def _float_tables(nodes: list[onnx.NodeProto], inits: dict, graph) -> list[onnx.NodeProto]:
    """``DequantizeLinear(Gather(int8 table, ids))`` (dynamic and QOperator quantization of
    embeddings) is ``Gather(float table, ids)`` with a per-tensor scale: the lookup of an
    embedding table, where token relevance is reported."""
    readers: dict[str, list] = {}
    for node in nodes:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    replaced: dict[int, onnx.NodeProto | None] = {}
    for node in nodes:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[0] not in inits:
            continue
        after = readers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "DequantizeLinear" or after[0].input[0] != node.output[0]:
            continue
        dq = after[0]
        values = _constant(inits, node.input[0], dq.input[1], _arg(dq, 2))
        if values is None or values[1].size != 1 or not np.issubdtype(values[0].dtype, np.integer):
            continue
        table = _Names(node)("table")
        graph.initializer.append(numpy_helper.from_array(dequantize(*values), table))
        replaced[id(node)] = helper.make_node("Gather", [table, node.input[1]], list(dq.output), name=node.name,
                                              **_attrs(node))
        replaced[id(dq)] = None
    return [replaced.get(id(n), n) for n in nodes if replaced.get(id(n), n) is not None]


class _Rewriting:
    """What the rewrites share: who makes and who reads each tensor of the input graph
    (indexed once), and the first outputs of nodes a rewrite took over (an integer
    product's scaling), which are dropped afterwards."""

    def __init__(self, nodes):
        self.producers = {o: n for n in nodes for o in n.output}
        self.readers: dict[str, list] = {}
        for n in nodes:
            for x in n.input:
                self.readers.setdefault(x, []).append(n)
        self.dropped: set[str] = set()

    def only_reader(self, name: str):
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 else None


class _Names:
    """Fresh tensor names for the nodes a rewrite adds."""

    def __init__(self, node: onnx.NodeProto):
        self.base = (node.name or node.output[0]) + "/lrp_float"
        self.count = 0

    def __call__(self, what: str) -> str:
        self.count += 1
        return f"{self.base}/{what}_{self.count}"


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int | None = None,
               block_size: int = 0) -> np.ndarray:
    """``DequantizeLinear`` in numpy (float32 result, float64 arithmetic): ``(q - zero) · scale``
    with a per-tensor, per-axis (``scale`` 1-D along ``axis``, default 1) or blocked scale
    (opset 21: ``scale`` of ``q``'s rank, ``block_size`` elements of ``axis`` per scale)."""
    q = q.astype(np.float64)
    s = scale.astype(np.float64)
    z = zero.astype(np.float64) if zero is not None else np.zeros_like(s)
    if block_size and s.size > 1:
        axis = (1 if axis is None else axis) % q.ndim
        s, z = (np.repeat(v, block_size, axis=axis).take(range(q.shape[axis]), axis=axis) for v in (s, z))
    else:
        s, z = _along(s, axis, q.ndim), _along(z, axis, q.ndim)
    return ((q - z) * s).astype(np.float32)


def _along(value: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """A per-axis scale or zero point (1-D, along ``axis``, default 1) shaped to broadcast
    against a rank-``ndim`` tensor; a per-tensor one as it is."""
    if value.size <= 1:
        return value
    shape = [1] * ndim
    shape[(1 if axis is None else axis) % ndim] = -1
    return value.reshape(shape)


def _constant(inits: dict, *names: str | None) -> list | None:
    """The values of ``names`` (None for an absent optional input), or None unless all are
    initializers."""
    if any(n is not None and n not in inits for n in names):
        return None
    return [numpy_helper.to_array(inits[n]) if n is not None else None for n in names]


def _weight(names: _Names, graph, inits: dict, x: str, scale: str, zero: str | None,
            axis: int | None) -> tuple[list, str]:
    """``DequantizeLinear`` of a weight (or any constant operand): its float value as an
    initializer when the integers, scale and zero point are all initializers (rules read
    constant weights), else the node."""
    values = _constant(inits, x, scale, zero)
    if values is not None:
        out = names("weight")
        graph.initializer.append(numpy_helper.from_array(dequantize(*values, axis=axis), out))
        return [], out
    node, out = _dq(names, x, scale, zero, axis)
    return [node], out


def _dequantized_constant(node: onnx.NodeProto, inits: dict, graph, state) -> list[onnx.NodeProto]:
    """``DequantizeLinear`` of initializers (a QDQ model's weights, biases, constants and
    embedding tables) is a float initializer: rules read it as a weight, constant folding
    and pattern matching see its value, a ``Gather`` from it is an embedding lookup."""
    attrs = _attrs(node)
    values = _constant(inits, node.input[0], node.input[1], _arg(node, 2))
    if values is None:
        return [node]
    value = dequantize(*values, axis=attrs.get("axis", 1), block_size=attrs.get("block_size", 0))
    graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    inits[node.output[0]] = graph.initializer[-1]
    return []


def _quantized_constant(node: onnx.NodeProto, inits: dict, graph, state) -> list[onnx.NodeProto]:
    """``QuantizeLinear`` of an initializer (QDQ models quantize constant operands too, the
    ``0.5`` of a GELU): its integers as an initializer, so the ``DequantizeLinear`` after it
    folds into the constant's float value (round half to even and saturation, as the op)."""
    attrs = _attrs(node)
    values = _constant(inits, node.input[0], node.input[1], _arg(node, 2))
    if values is None or attrs.get("block_size") or attrs.get("saturate", 1) != 1:
        return [node]
    x, scale, zero = values
    if zero is None:
        zero = np.zeros(scale.shape, np.uint8)
    if zero.dtype not in (np.uint8, np.int8, np.uint16, np.int16):
        return [node]
    info = np.iinfo(zero.dtype)
    scale, zero = _along(scale, attrs.get("axis", 1), x.ndim), _along(zero, attrs.get("axis", 1), x.ndim)
    q = np.clip(np.rint(x.astype(np.float64) / scale) + zero, info.min, info.max).astype(zero.dtype)
    graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
    inits[node.output[0]] = graph.initializer[-1]
    return []


def _constants_as_initializers(graph: onnx.GraphProto) -> None:
    """``Constant`` nodes holding a tensor become initializers (the twin folds quantization of
    constants, wherever the exporter put them)."""
    kept = []
    for node in graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _gather_block_quantized(node: onnx.NodeProto, inits: dict, graph, state) -> list[onnx.NodeProto]:
    """``GatherBlockQuantized(data, indices, scales, zero_points)`` (onnxruntime's contrib op,
    an int4/uint4/uint8 embedding table quantized in blocks along ``quantize_axis``): a
    ``Gather`` from the table dequantized at compile time, an embedding lookup."""
    attrs = _attrs(node)
    values = _constant(inits, node.input[0], node.input[2], _arg(node, 3))
    if values is None:
        raise LrpcError(f"{node.name or 'GatherBlockQuantized'}: its table, scales and zero points must be "
                        "initializers")
    data, scales, zeros = values
    if data.dtype == np.uint8 and int(attrs.get("bits", 4)) == 4:  # two 4-bit values per byte, low first
        data = np.stack([data & 0xF, data >> 4], axis=-1).reshape(*data.shape[:-1], -1)
        zeros = None if zeros is None else np.stack([zeros & 0xF, zeros >> 4], axis=-1).reshape(*zeros.shape[:-1], -1)
    if zeros is None and data.dtype == np.uint8:
        zeros = np.full(scales.shape, 8 if int(attrs.get("bits", 4)) == 4 else 128, np.float64)
    quantize_axis = int(attrs.get("quantize_axis", 1))
    blocks = scales.shape[quantize_axis]
    if zeros is not None:
        zeros = zeros.take(range(blocks), axis=quantize_axis)
    table = dequantize(data, scales, zeros, quantize_axis, int(attrs.get("block_size", 128)))
    names = _Names(node)
    name = names("table")
    graph.initializer.append(numpy_helper.from_array(table, name))
    return [helper.make_node("Gather", [name, node.input[1]], list(node.output), name=node.name,
                             axis=int(attrs.get("gather_axis", 0)))]


def _dq(names: _Names, x: str, scale: str, zero: str | None, axis: int | None = None) -> tuple[onnx.NodeProto, str]:
    out = names("dq")
    attrs = {} if axis is None else {"axis": axis}
    return helper.make_node("DequantizeLinear", [x, scale] + ([zero] if zero else []), [out], **attrs), out


def _q(names: _Names, y: str, scale: str, zero: str | None, out: str) -> onnx.NodeProto:
    return helper.make_node("QuantizeLinear", [y, scale] + ([zero] if zero else []), [out])


def _arg(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if i < len(node.input) and node.input[i] else None


def _attrs(node: onnx.NodeProto, drop=()) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in drop}


def _per_axis(inits: dict, scale: str) -> bool:
    t = inits.get(scale)
    return t is not None and int(np.prod(t.dims)) > 1


def _qlinear(float_op: str, *, inputs: int = 1, weight_axis: dict | None = None, bias: int | None = None,
             output: int | None = None, variadic: bool = False, drop=("channels_last",)):
    """A QOperator op seen as DQ(each input) → ``float_op`` → Q: its inputs come as
    (tensor, scale, zero point) triples from slot 0, the output's scale and zero point
    follow them (``output``: the slot of the output scale), ``bias`` the slot of an int32
    bias quantized with the product of the first two inputs' scales."""

    def rewrite(node: onnx.NodeProto, inits: dict, graph, state) -> list[onnx.NodeProto]:
        names = _Names(node)
        attrs = _attrs(node, drop)
        if _attrs(node).get("channels_last", 0):
            raise LrpcError(f"{node.name or node.op_type} ({node.op_type}): channels-last quantized ops are not "
                            "supported")
        nodes, floats = [], []
        if variadic:  # QLinearConcat: Y_scale, Y_zero_point, then (X, scale, zero) triples
            out_scale, out_zero = node.input[0], _arg(node, 1)
            triples = [(node.input[i], node.input[i + 1], _arg(node, i + 2)) for i in range(2, len(node.input), 3)]
        else:
            triples = [(node.input[3 * k], node.input[3 * k + 1], _arg(node, 3 * k + 2)) for k in range(inputs)]
            at = 3 * inputs if output is None else output
            out_scale, out_zero = _arg(node, at), _arg(node, at + 1)
        for k, (x, scale, zero) in enumerate(triples):
            axis = (weight_axis or {}).get(k) if _per_axis(inits, scale) else None
            axis = axis(node) if callable(axis) else axis
            dq, out = _weight(names, graph, inits, x, scale, zero, axis)  # weights and constants fold
            nodes.extend(dq)
            floats.append(out)
        if bias is not None and _arg(node, bias):
            product = names("bias_scale")
            nodes.append(helper.make_node("Mul", [triples[0][1], triples[1][1]], [product]))
            if "alpha" in attrs and float(attrs["alpha"]) != 1.0:  # QGemm: alpha·A·B + C
                alpha = names("alpha")
                graph.initializer.append(numpy_helper.from_array(np.array(float(attrs["alpha"]), np.float32), alpha))
                scaled = names("bias_scale")
                nodes.append(helper.make_node("Mul", [product, alpha], [scaled]))
                product = scaled
            dq, out = _dq(names, node.input[bias], product, None, 0 if _per_axis(inits, triples[1][1]) else None)
            nodes.append(dq)
            floats.append(out)
        if out_scale is None:  # QGemm without y_scale: a float output
            nodes.append(helper.make_node(float_op, floats, list(node.output), name=node.name, **attrs))
            return nodes
        y = names(float_op)
        nodes.append(helper.make_node(float_op, floats, [y], name=node.name, **attrs))
        nodes.append(_q(names, y, out_scale, out_zero, node.output[0]))
        return nodes

    return rewrite


def _integer(float_op: str, weight_axis: int):
    """``MatMulInteger(A, B, a_zero, b_zero)`` / ``ConvInteger``. onnxruntime's dynamic
    quantization writes ``Mul(Cast(XInteger(DynamicQuantizeLinear(x), W)), x_scale · w_scale)``:
    that is the float op of ``DequantizeLinear(A, x_scale)`` and ``DequantizeLinear(W, w_scale)``,
    one layer with the dequantized weight, as the float model has it (a bias ``Add`` after
    it then folds into it). Elsewhere the int32 product of zero-point-shifted operands is the
    float op of ``DequantizeLinear(x, 1, zero)`` operands (exact: the shifted integers are small
    enough for float32), and the scales multiplied afterwards are constants for relevance."""

    def rewrite(node: onnx.NodeProto, inits: dict, graph, state) -> list[onnx.NodeProto]:
        scaled = _dynamic_scaling(node, inits, state)
        if scaled is not None:
            (x_scale, w_scale), taken = scaled
            names = _Names(node)
            a, out_a = _dq(names, node.input[0], x_scale, _arg(node, 2))
            w_axis = weight_axis if _per_axis(inits, w_scale) else None
            w, out_w = _weight(names, graph, inits, node.input[1], w_scale, _arg(node, 3), w_axis)
            state.dropped.update(n.output[0] for n in taken)
            return [a, *w, helper.make_node(float_op, [out_a, out_w], [taken[-1].output[0]], name=node.name,
                                           **_attrs(node))]
        names = _Names(node)
        one = names("one")
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
        nodes, floats = [], []
        for k in range(2):
            zero = _arg(node, 2 + k)
            axis = weight_axis if k == 1 and zero and _per_axis(inits, zero) else None
            if zero is None:
                out = names("float")
                nodes.append(helper.make_node("Cast", [node.input[k]], [out], to=TensorProto.FLOAT))
            else:
                dq, out = _dq(names, node.input[k], one, zero, axis)
                nodes.append(dq)
            floats.append(out)
        nodes.append(helper.make_node(float_op, floats, list(node.output), name=node.name, **_attrs(node)))
        return nodes

    return rewrite


def _dynamic_scaling(node: onnx.NodeProto, inits: dict, state: _Rewriting):
    """``((x_scale, w_scale), [Cast, Mul])`` when ``node``'s int32 output is only cast to
    float and multiplied by ``Mul(x_scale, w_scale)``, x_scale from the DynamicQuantizeLinear
    that quantized its input and w_scale an initializer; else None."""
    producers = state.producers
    quantizer = producers.get(node.input[0])
    cast = state.only_reader(node.output[0])
    mul = state.only_reader(cast.output[0]) if cast is not None and cast.op_type == "Cast" else None
    if quantizer is None or quantizer.op_type != "DynamicQuantizeLinear" or mul is None or mul.op_type != "Mul":
        return None
    product = producers.get(next((x for x in mul.input if x != cast.output[0]), ""))
    if product is None or product.op_type != "Mul" or quantizer.output[1] not in product.input:
        return None
    w_scale = next((x for x in product.input if x != quantizer.output[1]), None)
    if w_scale not in inits:
        return None
    return (quantizer.output[1], w_scale), [cast, mul]


def _matmul_nbits(node: onnx.NodeProto, inits: dict, graph, state) -> list[onnx.NodeProto]:
    """``MatMulNBits(A, B, scales, zero_points, g_idx, bias)``: ``A · Wᵀ (+ bias)`` with the
    blocked n-bit weight ``W [N, K]`` dequantized at compile time."""
    attrs = _attrs(node)
    k, n, bits, block = int(attrs["K"]), int(attrs["N"]), int(attrs.get("bits", 4)), int(attrs["block_size"])
    if _arg(node, 4):
        raise LrpcError(f"{node.name or 'MatMulNBits'}: MatMulNBits with g_idx (act-order) is not supported")
    missing = [node.input[i] for i in (1, 2, 3) if _arg(node, i) and node.input[i] not in inits]
    if missing:
        raise LrpcError(f"{node.name or 'MatMulNBits'}: its weight, scales and zero points must be initializers")
    weight = dequantize_nbits(
        numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[2]]),
        numpy_helper.to_array(inits[node.input[3]]) if _arg(node, 3) else None, k, n, bits, block)
    names = _Names(node)
    w = names("weight")
    graph.initializer.append(numpy_helper.from_array(weight.T.copy(), w))  # [K, N]
    if not _arg(node, 5):
        return [helper.make_node("MatMul", [node.input[0], w], list(node.output), name=node.name)]
    y = names("matmul")
    return [helper.make_node("MatMul", [node.input[0], w], [y], name=node.name),
            helper.make_node("Add", [y, node.input[5]], list(node.output))]


def dequantize_nbits(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, k: int, n: int, bits: int,
                     block: int) -> np.ndarray:
    """``W [N, K]`` (float32) from MatMulNBits' blocks (onnxruntime's contrib op spec):
    ``packed [N, blocks, block·bits/8]`` uint8, low bits first; ``scales [N·blocks]``;
    ``zeros`` packed like the weight (uint8, default ``2^(bits-1)``) or float."""
    if 8 % bits:
        raise LrpcError(f"MatMulNBits with {bits} bits is not supported (2, 4 or 8)")
    blocks = (k + block - 1) // block
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    raw = packed.reshape(n, -1).astype(np.uint8)
    values = np.stack([(raw >> (bits * i)) & mask for i in range(per_byte)], axis=-1).reshape(n, -1)
    values = values[:, : blocks * block].reshape(n, blocks, block).astype(np.float32)
    scale = scales.astype(np.float32).reshape(n, blocks, 1)
    if zeros is None:
        zero = np.full((n, blocks, 1), float(1 << (bits - 1)), np.float32)
    elif zeros.dtype == np.uint8:
        unpacked = np.stack([(zeros.reshape(n, -1) >> (bits * i)) & mask for i in range(per_byte)], axis=-1)
        zero = unpacked.reshape(n, -1)[:, :blocks].astype(np.float32).reshape(n, blocks, 1)
    else:
        zero = zeros.astype(np.float32).reshape(n, blocks, 1)
    return ((values - zero) * scale).reshape(n, blocks * block)[:, :k]


_REWRITES = {
    "QuantizeLinear": _quantized_constant,
    "DequantizeLinear": _dequantized_constant,
    "GatherBlockQuantized": _gather_block_quantized,
    "QLinearConv": _qlinear("Conv", inputs=2, weight_axis={1: 0}, bias=8),
    "QLinearMatMul": _qlinear("MatMul", inputs=2, weight_axis={1: 1}),
    "QGemm": _qlinear("Gemm", inputs=2, weight_axis={1: lambda node: 0 if _attrs(node).get("transB", 0) else 1},
                      bias=6, output=7),
    "QLinearAdd": _qlinear("Add", inputs=2),
    "QLinearMul": _qlinear("Mul", inputs=2),
    "QLinearAveragePool": _qlinear("AveragePool"),
    "QLinearGlobalAveragePool": _qlinear("GlobalAveragePool"),
    "QLinearConcat": _qlinear("Concat", variadic=True),
    "QLinearSigmoid": _qlinear("Sigmoid"),
    "QLinearLeakyRelu": _qlinear("LeakyRelu"),
    "QLinearSoftmax": _qlinear("Softmax", drop=("channels_last", "opset")),
    "MatMulInteger": _integer("MatMul", weight_axis=1),
    "ConvInteger": _integer("Conv", weight_axis=0),
    "MatMulNBits": _matmul_nbits,
}

def to_float(graph: onnx.GraphProto, float_type: int) -> None:
    """Every floating-point tensor of the graph (and its subgraphs) in ``float_type``:
    initializers, Constant values, declared types, Cast targets."""
    for g in all_graphs(graph):
        for i, t in enumerate(g.initializer):
            if t.data_type in FLOATS and t.data_type != float_type:
                g.initializer[i].CopyFrom(_converted(t, float_type))
        for vi in [*g.input, *g.output, *g.value_info]:
            tt = vi.type.tensor_type
            if tt.elem_type in FLOATS:
                tt.elem_type = float_type
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in FLOATS:
                    attr.t.CopyFrom(_converted(attr.t, float_type))
                elif node.op_type == "Cast" and attr.name == "to" and attr.i in FLOATS:
                    attr.i = float_type


def _converted(t: onnx.TensorProto, float_type: int) -> onnx.TensorProto:
    values = numpy_helper.to_array(t).astype(np.float32)
    if float_type == TensorProto.FLOAT16:
        values = values.astype(np.float16)
    return numpy_helper.from_array(values, t.name)


# -- the compiled file: the deployed forward in front of the twin -------------------------


def deployed_roundings(twin: onnx.GraphProto, deployed: onnx.GraphProto) -> set[str]:
    """In a QOperator file the twin's activation roundings read the deployed integers: each
    ``QuantizeLinear`` of the twin whose output the deployed graph computes too (the same
    name: a ``QLinear*`` op's output, or its input quantizer's) is dropped, and its
    ``DequantizeLinear`` readers dequantize the deployed tensor. The relevance pass then sees
    the activations of the run that produced the outputs, whatever its kernels: a float32
    evaluation of the ONNX definition can round otherwise (a ViT's GELU ``erf + 1`` at a
    2/255 output scale sits 8e-6 steps from a tie on every element, below float32's
    resolution; 13% of them rounded the other way). QDQ files keep the twin's own roundings
    (:func:`defined_roundings`): a new reader of any tensor inside their
    ``DequantizeLinear -> op -> QuantizeLinear`` groups stops onnxruntime fusing the groups
    into its integer kernels, and the deployed outputs would change. Returns the names read."""
    if not any(n.op_type.startswith("QLinear") or n.op_type == "QGemm" for n in deployed.node):
        return set()
    made = {o for n in deployed.node for o in n.output}
    inits = {t.name: t for t in twin.initializer}
    readers: dict[str, list] = {}
    for node in twin.node:
        for x in node.input:
            readers.setdefault(x, []).append(node)
    read = set()
    for node in twin.node:
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or node.output[0] not in made:
            continue
        scale = inits.get(node.input[1])
        if scale is None or scale.data_type != TensorProto.FLOAT:  # float16 scales need opset 19
            continue
        if all(r.op_type == "DequantizeLinear" for r in readers.get(node.output[0], [])):
            read.add(node.output[0])
    kept = [n for n in twin.node if not (n.op_type == "QuantizeLinear" and n.output[0] in read)]
    del twin.node[:]
    twin.node.extend(kept)
    return read


_INTEGER_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
                   TensorProto.INT16: (-32768, 32767)}


def defined_roundings(graph: onnx.GraphProto) -> None:
    """Each activation rounding of the twin, ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)``
    with a per-tensor scale, written as the float arithmetic the two ops define:
    ``(clip(round(x / s) + z, lo, hi) - z) · s = clip(round(x / s), lo - z, hi - z) · s``
    (round half to even, as ``Round``; ``x / s`` a true division, as the op's).

    Written as Q/DQ, the twin's float layers between roundings are what onnxruntime's
    optimizer looks for: it re-quantizes their (dequantized) float weights with scales of its
    own and fuses the groups into integer kernels, so the twin would compute another network
    than the deployed file's and differently per runtime. As float arithmetic the twin is
    the quantized network exactly as the ONNX operators define it, in every runtime."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    out = []
    for node in graph.node:
        quantizer = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if quantizer is not None and quantizer.op_type == "DynamicQuantizeLinear" \
                and list(node.input) == list(quantizer.output):
            out += _dynamic_rounding(quantizer.input[0], node, graph)
            continue
        if quantizer is None or quantizer.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") \
                or list(quantizer.input[1:]) != list(node.input[1:]) or _per_axis(inits, node.input[1]):
            out.append(node)
            continue
        zero = _arg(node, 2)
        zero_type = inits[zero].data_type if zero in inits else TensorProto.UINT8
        if zero is not None and zero not in inits or zero_type not in _INTEGER_RANGES:
            out.append(node)
            continue
        names = _Names(node)
        x, scale = quantizer.input[0], node.input[1]
        dtype = numpy_helper.to_array(inits[scale]).dtype if scale in inits else np.float32  # the twin's float
        z = float(numpy_helper.to_array(inits[zero])) if zero else 0.0
        lo, hi = _INTEGER_RANGES[zero_type]
        # clip(round(x / s) + z, lo, hi) - z = clip(round(x / s), lo - z, hi - z): z is an integer
        constants = {}
        for what, value in (("lo", lo - z), ("hi", hi - z)):
            constants[what] = names(what)
            graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype).reshape(()), constants[what]))
        steps = [names("scaled"), names("rounded"), names("clipped")]
        out += [helper.make_node("Div", [x, scale], [steps[0]]),
                helper.make_node("Round", [steps[0]], [steps[1]]),
                helper.make_node("Clip", [steps[1], constants["lo"], constants["hi"]], [steps[2]]),
                helper.make_node("Mul", [steps[2], scale], list(node.output), name=node.name)]
    del graph.node[:]
    graph.node.extend(out)


def _dynamic_rounding(x: str, node: onnx.NodeProto, graph) -> list[onnx.NodeProto]:
    """``DequantizeLinear(DynamicQuantizeLinear(x))`` as the float arithmetic the op defines
    (uint8: the range of ``x`` and 0 over 255 steps); a zero range rounds to 0 (where the op
    writes scale 0, a division would give NaN). Also keeps runtimes from merging the twin's
    quantizer of a shared input with the deployed one (its integer kernels would lose their
    fusion)."""
    names = _Names(node)
    dtype = _float_dtype(graph)
    constants = {}
    for what, value in (("zero", 0.0), ("steps", 255.0), ("tiny", np.finfo(dtype).tiny)):
        constants[what] = names(what)
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), constants[what]))
    t = {k: names(k) for k in ("min", "max", "lo", "hi", "range", "scale", "safe", "neg", "zq", "zr", "zp",
                               "xs", "xr", "below", "above", "c")}
    z, steps = constants["zero"], constants["steps"]
    return [
        helper.make_node("ReduceMin", [x], [t["min"]], keepdims=0),
        helper.make_node("ReduceMax", [x], [t["max"]], keepdims=0),
        helper.make_node("Min", [t["min"], z], [t["lo"]]),
        helper.make_node("Max", [t["max"], z], [t["hi"]]),
        helper.make_node("Sub", [t["hi"], t["lo"]], [t["range"]]),
        helper.make_node("Div", [t["range"], steps], [t["scale"]]),
        helper.make_node("Max", [t["scale"], constants["tiny"]], [t["safe"]]),
        helper.make_node("Neg", [t["lo"]], [t["neg"]]),
        helper.make_node("Div", [t["neg"], t["safe"]], [t["zq"]]),
        helper.make_node("Round", [t["zq"]], [t["zr"]]),
        helper.make_node("Clip", [t["zr"], z, steps], [t["zp"]]),
        helper.make_node("Div", [x, t["safe"]], [t["xs"]]),
        helper.make_node("Round", [t["xs"]], [t["xr"]]),
        helper.make_node("Neg", [t["zp"]], [t["below"]]),  # clip(q + zp, 0, 255) - zp, on scalars
        helper.make_node("Sub", [steps, t["zp"]], [t["above"]]),
        helper.make_node("Clip", [t["xr"], t["below"], t["above"]], [t["c"]]),
        helper.make_node("Mul", [t["c"], t["scale"]], list(node.output), name=node.name),
    ]


def _float_dtype(graph: onnx.GraphProto):
    """The numpy float type of the twin (:func:`to_float` gave all its floats one type)."""
    return np.float16 if any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer) else np.float32


def stitch(deployed: onnx.ModelProto, compiled: onnx.ModelProto, relevance: str | None,
           relevance_type_out: int | None) -> onnx.ModelProto:
    """The file that runs ``deployed``'s own forward for its outputs and the compiled twin
    for everything lrpc adds (``relevance``, ...). The twin's tensors and nodes are renamed
    under ``lrp/twin/``; an input whose type the twin changed (a float16 image) is cast on
    its way into the twin; ``relevance`` is cast to ``relevance_type_out`` if that differs."""
    out = copy.deepcopy(deployed)
    graph, twin = out.graph, compiled.graph
    read = deployed_roundings(twin, graph)
    defined_roundings(twin)
    deployed_inputs = {i.name: i for i in graph.input}
    deployed_outputs = {o.name for o in graph.output}
    added_inputs = [i for i in twin.input if i.name not in deployed_inputs]
    added_outputs = [o for o in twin.output if o.name not in deployed_outputs]
    keep = {i.name for i in added_inputs} | {o.name for o in added_outputs} | set(deployed_inputs) | read
    rename = {}
    for g in all_graphs(twin):
        for name in [t.name for t in g.initializer] + [o for n in g.node for o in n.output] + \
                    [vi.name for vi in g.value_info]:
            if name and name not in keep:
                rename[name] = TWIN_PREFIX + name
    casts = []
    for i in twin.input:  # the twin reads the deployed input in its own precision
        original = deployed_inputs.get(i.name)
        if original is not None and original.type.tensor_type.elem_type != i.type.tensor_type.elem_type:
            rename[i.name] = TWIN_PREFIX + i.name
            casts.append(helper.make_node("Cast", [i.name], [rename[i.name]], name=f"{TWIN_PREFIX}cast/{i.name}",
                                          to=i.type.tensor_type.elem_type))
    retype = relevance is not None and relevance_type_out is not None and any(
        o.name == relevance and o.type.tensor_type.elem_type != relevance_type_out for o in added_outputs)
    if retype:
        rename[relevance] = TWIN_PREFIX + relevance
    for g in all_graphs(twin):
        for node in g.node:
            node.input[:] = [rename.get(x, x) for x in node.input]
            node.output[:] = [rename.get(x, x) for x in node.output]
            if node.name:
                node.name = TWIN_PREFIX + node.name
        for t in [*g.initializer, *g.value_info]:
            t.name = rename.get(t.name, t.name)
        if g is not twin:  # an If/Loop body's own inputs and outputs follow its nodes
            for t in [*g.input, *g.output]:
                t.name = rename.get(t.name, t.name)
    if retype:
        casts.append(helper.make_node("Cast", [rename[relevance]], [relevance], name=f"{TWIN_PREFIX}cast/{relevance}",
                                      to=relevance_type_out))
        for o in added_outputs:
            if o.name == relevance:
                o.type.tensor_type.elem_type = relevance_type_out
    nodes = list(graph.node) + casts + list(twin.node)
    outputs = list(graph.output) + added_outputs
    used = _live(nodes, {o.name for o in outputs})
    nodes = [n for n in nodes if any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(toposorted(nodes))
    twin_inits = [t for t in twin.initializer if t.name in used or t.name in keep]
    graph.initializer.extend(twin_inits)
    inits = [t for t in graph.initializer if t.name in used or t.name in keep]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    graph.input.extend(added_inputs)
    graph.output.extend(added_outputs)
    _own_dims(graph)
    graph.value_info.extend(vi for vi in twin.value_info if vi.name in used)
    versions = {o.domain or "": o.version for o in out.opset_import}
    for o in compiled.opset_import:
        versions[o.domain or ""] = max(versions.get(o.domain or "", 0), o.version)
    del out.opset_import[:]
    out.opset_import.extend(helper.make_opsetid(d, v) for d, v in versions.items())
    out.ir_version = max(out.ir_version, compiled.ir_version)
    del out.metadata_props[:]
    out.metadata_props.extend(compiled.metadata_props)
    return out


def _own_dims(graph: onnx.GraphProto) -> None:
    """The deployed file's value_info keeps its shapes (onnxruntime's fusions, SkipLayerNorm
    among them, need them) under its own names for symbolic dims: quantizers and converters
    write ``unk__12`` where the twin's inference also writes ``unk__12`` for another size,
    and a runtime taking the two for one shares buffers between tensors of different shapes.
    The dims of the graph's inputs and outputs (``batch``) mean the same in both."""
    shared = {d.dim_param for vi in [*graph.input, *graph.output] for d in vi.type.tensor_type.shape.dim}
    for vi in graph.value_info:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param and d.dim_param not in shared:
                d.dim_param = "deployed/" + d.dim_param


def _live(nodes: list[onnx.NodeProto], wanted: set[str]) -> set[str]:
    """Tensor names the ``wanted`` outputs depend on."""
    producer = {o: n for n in nodes for o in n.output if o}
    live, stack = set(), list(wanted)
    while stack:
        name = stack.pop()
        if name in live:
            continue
        live.add(name)
        node = producer.get(name)
        if node is not None:
            stack.extend(node_reads(node) | set(node.output))
    return live
