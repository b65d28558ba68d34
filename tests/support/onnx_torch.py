"""ONNX graphs evaluated in torch, op by op from the ONNX definitions (no lrpc code), for the
Gradient × Input references (``attnlrp_ref.gradient_relevance``: AttnLRP, CP-LRP, and LRP-ε
as ε → 0) of graphs no torch module describes: statically quantized transformers and CNNs,
in QDQ and QOperator form.

Floats run in float64, or in float32 (``dtype``): a QDQ file's roundings are decided by
float32 arithmetic in the twin lrpc compiles and in onnxruntime's reference kernels, and
quantized networks have ties finer than float32 (a GELU's ``erf + 1`` at a 2/255 scale
sits 8e-6 steps from one on every element), which float64 decides otherwise. Given the
deployed run's integers (``integers``: a QOperator file's tensors, observable as outputs
without changing its kernels), the roundings take those instead. The rules come from ``attnlrp_ref``'s ``TorchFunctionMode``
(``torch.matmul`` / ``torch.mul`` of two activations: halves; ``F.layer_norm``: σ
detached) and, here:

- an activation rounding (``QuantizeLinear``; the ``QLinear*`` ops' requantization of their
  output) is a fake quantization with the identity rule: the value is the rounded one,
  relevance passes unchanged (``(clip(round(x / s) + z) − z) · s``, round half to even);
  the ``DequantizeLinear`` after it is then the identity, while one of an initializer is
  the dequantized constant;
- pooling and the other linear ops are their plain functions (Gradient × Input: LRP-ε
  as ε → 0; ``MaxPool``'s gradient routes to the window's first maximum);
- ``Erf`` is held constant: GELU's ``0.5 · x · (1 + erf(x / √2))`` then has one path, the
  linear one in ``x``, whose Gradient × Input is the GELU's output: the identity rule;
  ``Tanh`` has the identity rule.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from .attnlrp_ref import gradient_relevance, identity
from .quantized_ref import INTEGER_RANGES

_TORCH_TYPES = {onnx.TensorProto.FLOAT: torch.float64, onnx.TensorProto.DOUBLE: torch.float64,
                onnx.TensorProto.FLOAT16: torch.float64, onnx.TensorProto.INT64: torch.int64,
                onnx.TensorProto.INT32: torch.int64, onnx.TensorProto.BOOL: torch.bool}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class Graph:
    """``Graph(model).run(feeds, inject)``: every value of the graph, ``inject`` replacing
    tensors by name (the explained embedding output)."""

    def __init__(self, model: onnx.ModelProto, dtype=torch.float64, integers: dict | None = None):
        self.model = model
        self.dtype = dtype
        self.integers = integers or {}
        self.consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        # lookups in int8 tables (quantized embeddings): their rows, dequantized with the
        # scale and zero point their first reader gives them
        self.tables: dict[str, tuple] = {}
        for node in model.graph.node:
            if node.op_type == "Gather" and node.input[0] in self.consts and self.consts[node.input[0]].dtype.kind in "iu":
                for reader in model.graph.node:
                    slots = [0] if reader.op_type == "DequantizeLinear" else [0, 3] if reader.op_type in (
                        "QLinearAdd", "QLinearMul", "QLinearMatMul") else []
                    for k in slots:
                        if reader.input[k] == node.output[0] and node.output[0] not in self.tables:
                            self.tables[node.output[0]] = (reader.input[k + 1], reader.input[k + 2])

    def _tensor(self, value: np.ndarray) -> torch.Tensor:
        if value.dtype.kind == "f":
            return torch.from_numpy(value.astype(np.float64)).to(self.dtype)
        if value.dtype == np.bool_:
            return torch.from_numpy(value.copy())
        return torch.from_numpy(value.astype(np.int64))

    def run(self, feeds: dict, inject: dict | None = None) -> dict:
        env = {k: (v if isinstance(v, torch.Tensor) else self._tensor(np.asarray(v))) for k, v in feeds.items()}
        rounded: set[str] = set()  # activations a rounding produced (already dequantized values)
        inject = inject or {}

        def value(name):
            if not name:
                return None
            return env[name] if name in env else self._tensor(self.consts[name])

        value.dtype = self.dtype  # the float type, for Cast

        for node in self.model.graph.node:
            if node.op_type == "Constant":
                continue
            outputs = _evaluate(self, node, value, rounded)
            for name, out in zip(node.output, outputs):
                if name in self.tables:
                    out = _dequantized(self, out, *self.tables[name], 1)
                    rounded.add(name)
                env[name] = inject.get(name, out)
        return env


def _quantize(x, scale, zero, dtype, given=None) -> torch.Tensor:
    """The rounding of ``x`` (identity rule); ``given``: the integers it rounds to."""
    lo, hi = INTEGER_RANGES[np.dtype(dtype)]
    s, z = scale.to(x.dtype), torch.as_tensor(zero).to(x.dtype)
    if given is not None:
        q = torch.from_numpy(given.astype(np.float64)).to(x.dtype)
        return identity(lambda v: (q - z) * s, x)
    return identity(lambda v: (torch.clamp(torch.round(v / s) + z, lo, hi) - z) * s, x)


def _evaluate(graph: Graph, node, value, rounded) -> list:
    op, ins, a = node.op_type, list(node.input), _attrs(node)
    x = value(ins[0]) if ins else None

    def const_dtype(name):
        return graph.consts[name].dtype if name in graph.consts else np.dtype(np.uint8)

    def fq(y, scale_name, zero_name):
        rounded.add(node.output[0])
        return _quantize(y, value(scale_name), value(zero_name) if zero_name else 0, const_dtype(zero_name),
                         graph.integers.get(node.output[0]))

    def dq(i):  # input triple (tensor, scale, zero) of a QLinear op starting at slot i
        name = ins[i]
        if name in rounded:
            return value(name)
        return _dequantized(graph, value(name), ins[i + 1], ins[i + 2] if i + 2 < len(ins) else "", a.get("axis", 1))

    if op == "QuantizeLinear":
        return [fq(x, ins[1], ins[2] if len(ins) > 2 else "")]
    if op == "DequantizeLinear":
        if ins[0] in rounded:
            return [x]
        return [_dequantized(graph, x, ins[1], ins[2] if len(ins) > 2 else "", a.get("axis", 1))]
    if op in ("QLinearMatMul", "QLinearAdd", "QLinearMul"):
        f = {"QLinearMatMul": torch.matmul, "QLinearAdd": torch.add, "QLinearMul": torch.mul}[op]
        return [fq(f(dq(0), dq(3)), ins[6], ins[7])]
    if op == "QLinearConv":
        y = F.conv2d(dq(0), dq(3), None if len(ins) < 9 else _bias(graph, value, ins), a.get("strides", [1, 1]),
                     a.get("pads", [0, 0, 0, 0])[:2], a.get("dilations", [1, 1]), a.get("group", 1))
        return [fq(y, ins[6], ins[7])]
    if op == "QGemm":
        A, B = dq(0), dq(3)
        A = A.transpose(-1, -2) if a.get("transA", 0) else A
        B = B.transpose(-1, -2) if a.get("transB", 0) else B
        y = a.get("alpha", 1.0) * (A @ B)
        if len(ins) > 6 and ins[6]:
            y = y + _bias(graph, value, ins, bias=6)
        return [fq(y, ins[7], ins[8])] if len(ins) > 7 and ins[7] else [y]
    if op == "QLinearGlobalAveragePool":
        return [fq(dq(0).mean(dim=(2, 3), keepdim=True), ins[3], ins[4])]
    if op == "QLinearAveragePool":
        y = F.avg_pool2d(dq(0), a["kernel_shape"], a.get("strides", 1), a.get("pads", [0, 0, 0, 0])[:2])
        return [fq(y, ins[3], ins[4])]
    if op == "QLinearSoftmax":
        return [fq(torch.softmax(dq(0), dim=a.get("axis", -1)), ins[3], ins[4])]
    if op == "QLinearConcat":
        parts = [dq(i) for i in range(2, len(ins), 3)]
        return [fq(torch.cat(parts, dim=a["axis"]), ins[0], ins[1])]
    if op in ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Slice", "Gather", "Concat", "Expand",
              "MaxPool") and ins and ins[0] in rounded:
        rounded.add(node.output[0])  # moves quantized values around: they stay rounded
    return [_standard(op, ins, a, value, x)]


def _dequantized(graph: Graph, q: torch.Tensor, scale, zero, axis) -> torch.Tensor:
    """``(q - zero) · scale`` of integers: a constant, or looked up from one (an embedding
    table's rows)."""
    q = q.numpy().astype(np.float64)
    s = graph.consts[scale].astype(np.float64)
    z = graph.consts[zero].astype(np.float64) if zero else np.zeros_like(s)
    if s.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return torch.from_numpy(np.asarray((q - z) * s)).to(graph.dtype)


def _bias(graph: Graph, value, ins, bias=8) -> torch.Tensor:
    """An int32 bias quantized with the product of the first two inputs' scales."""
    scale = graph.consts[ins[1]].astype(np.float64) * graph.consts[ins[4]].astype(np.float64)
    return torch.from_numpy(np.asarray(graph.consts[ins[bias]].astype(np.float64) * scale)).to(graph.dtype)


def _axes(ins, a, value):
    if len(ins) > 1 and ins[1]:
        return [int(v) for v in value(ins[1]).reshape(-1)]
    return list(a.get("axes", []))


def _standard(op, ins, a, value, x):
    if op == "MatMul":
        return torch.matmul(x, value(ins[1]))
    if op == "Gemm":
        A = x.transpose(-1, -2) if a.get("transA", 0) else x
        B = value(ins[1])
        B = B.transpose(-1, -2) if a.get("transB", 0) else B
        y = a.get("alpha", 1.0) * (A @ B)
        return y + a.get("beta", 1.0) * value(ins[2]) if len(ins) > 2 and ins[2] else y
    if op == "Conv":
        return F.conv2d(x, value(ins[1]), value(ins[2]) if len(ins) > 2 else None, a.get("strides", [1, 1]),
                        a.get("pads", [0, 0, 0, 0])[:2], a.get("dilations", [1, 1]), a.get("group", 1))
    if op in ("Add", "Sub", "Mul", "Div", "Equal", "And", "Or", "GreaterOrEqual", "Less", "Greater"):
        f = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Equal": torch.eq,
             "And": torch.logical_and, "Or": torch.logical_or, "GreaterOrEqual": torch.ge, "Less": torch.lt,
             "Greater": torch.gt}[op]
        y = f(x, value(ins[1]))
        return y.to(torch.int64) if op == "Div" and not x.is_floating_point() else y
    if op == "MaxPool":
        return F.max_pool2d(x, a["kernel_shape"], a.get("strides", 1), a.get("pads", [0, 0, 0, 0])[:2])
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if op == "AveragePool":
        return F.avg_pool2d(x, a["kernel_shape"], a.get("strides", 1), a.get("pads", [0, 0, 0, 0])[:2])
    if op == "Erf":
        return torch.erf(x).detach()
    if op == "Tanh":
        return identity(torch.tanh, x)
    if op == "Relu":
        return identity(torch.relu, x)
    if op == "Softmax":
        return torch.softmax(x, dim=a.get("axis", -1))
    if op == "LayerNormalization":
        axis = a.get("axis", -1) % x.dim()
        return F.layer_norm(x, x.shape[axis:], value(ins[1]), value(ins[2]) if len(ins) > 2 else None,
                            a.get("epsilon", 1e-5))
    if op == "Where":
        return torch.where(x.bool(), value(ins[1]), value(ins[2]))
    if op == "Cast":
        to = _TORCH_TYPES[a["to"]]
        return x.to(value.dtype if to == torch.float64 else to)
    if op == "Shape":
        return torch.tensor(list(x.shape), dtype=torch.int64)
    if op == "Gather":
        axis = a.get("axis", 0) % x.dim()
        index = value(ins[1])
        index = torch.where(index < 0, index + x.shape[axis], index)
        shape = [*x.shape[:axis], *index.shape, *x.shape[axis + 1:]]
        return torch.index_select(x, axis, index.reshape(-1)).reshape(shape)
    if op == "GatherElements":
        return torch.gather(x, a.get("axis", 0), value(ins[1]))
    if op == "Unsqueeze":
        y = x
        for axis in sorted(d % (x.dim() + len(_axes(ins, a, value))) for d in _axes(ins, a, value)):
            y = y.unsqueeze(axis)
        return y
    if op == "Squeeze":
        axes = _axes(ins, a, value)
        return x.squeeze() if not axes else x.squeeze(tuple(axes))
    if op == "Concat":
        return torch.cat([value(n) for n in ins], dim=a["axis"])
    if op == "Reshape":
        shape = [int(v) for v in value(ins[1])]
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op == "Transpose":
        return x.permute(a.get("perm", list(range(x.dim()))[::-1]))
    if op == "Flatten":  # always 2-D: [prod(shape[:axis]), prod(shape[axis:])]
        axis = a.get("axis", 1) % (x.dim() + 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Slice":
        starts, ends = value(ins[1]), value(ins[2])
        axes = value(ins[3]) if len(ins) > 3 and ins[3] else torch.arange(len(starts))
        steps = value(ins[4]) if len(ins) > 4 and ins[4] else torch.ones(len(starts), dtype=torch.int64)
        index = [slice(None)] * x.dim()
        for s, e, ax, st in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
            n = x.shape[ax]
            s, e = max(min(s + n if s < 0 else s, n), 0), max(min(e + n if e < 0 else e, n), 0)
            index[ax] = slice(s, e, st)
        return x[tuple(index)]
    if op == "Expand":
        shape = [int(v) for v in value(ins[1])]
        return x.expand(*torch.broadcast_shapes(tuple(x.shape), tuple(shape)))
    if op == "ConstantOfShape":
        fill = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        return torch.full([int(v) for v in x], float(fill.ravel()[0]) if fill.dtype.kind == "f" else int(fill.ravel()[0]),
                          dtype=torch.float64 if fill.dtype.kind == "f" else torch.int64)
    if op == "Range":
        return torch.arange(int(x), int(value(ins[1])), int(value(ins[2])), dtype=torch.int64)
    raise NotImplementedError(f"reference: {op}")


def embedding_output(model: onnx.ModelProto, ids_input: str = "input") -> str | None:
    """The tensor lrpc reports token relevance at: the output of the lookup of ``ids_input``
    in a table (``Gather(table, ids)``)."""
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1] == ids_input:
            return node.output[0]
    return None


def quantized_integers(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """The integers a QOperator file's run computes: every 8-bit tensor made by a node, read
    by running the file with them as outputs (its kernels stay as they are)."""
    import onnxruntime as ort

    typed = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in typed.graph.value_info}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # contrib QLinear ops: the type of their output zero point (last input);
        zero = inits.get(node.input[-1]) if node.op_type.startswith("QLinear") or node.op_type == "QGemm" else None
        if zero is not None and node.output[0] not in types:
            types[node.output[0]] = zero.data_type
        elif node.op_type in ("Flatten", "Reshape", "MaxPool", "Transpose", "Squeeze", "Unsqueeze") \
                and node.output[0] not in types and node.input[0] in types:  # after them, ops that keep the type
            types[node.output[0]] = types[node.input[0]]
    wanted = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output
              if types.get(o) in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(o, types[o], None) for o in wanted)
    values = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(wanted, feeds)
    return dict(zip(wanted, values))


def attnlrp_relevance(model: onnx.ModelProto, feeds: dict, explained: str, target=None, dtype=torch.float64,
                      integers: dict | None = None, cp: bool = False) -> np.ndarray:
    """AttnLRP relevance (ε → 0, output relevance the logit; ``cp``: CP-LRP's) of ``model`` at
    tensor ``explained`` (a graph input, or a tensor such as the embedding output) for the
    batch ``feeds``."""
    graph = Graph(model, dtype, integers)
    output = model.graph.output[0].name
    with torch.no_grad():
        x = graph.run(feeds)[explained].numpy()

    def logits(xt):
        if explained in feeds:
            return graph.run({**feeds, explained: xt})[output]
        return graph.run(feeds, inject={explained: xt})[output]

    return gradient_relevance(logits, x, target, cp=cp, dtype=np.float32 if dtype == torch.float32 else np.float64)
