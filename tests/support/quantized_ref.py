"""Reference for quantized models: the network a quantized ONNX file computes, rebuilt in
torch from the ONNX operator definitions (not from lrpc), for Zennit to explain.

- ``DequantizeLinear`` of an initializer is a weight: its value ``(q - zero) · scale``
  (per tensor or per axis) becomes the ``nn.Conv2d`` / ``nn.Linear`` weight or bias;
- ``QuantizeLinear`` of an activation is a straight-through fake quantization,
  ``x + (fq(x) − x).detach()`` with ``fq(x) = (clip(round(x / s) + z) − z) · s`` (round half
  to even, as onnxruntime), so the activations are the quantized model's and gradients
  (Zennit's relevance) pass it unchanged; the ``DequantizeLinear`` after it is then the
  identity;
- ``DynamicQuantizeLinear`` computes its scale and zero point from the batch (uint8, the
  ONNX definition) and fake-quantizes the same way; ``ConvInteger`` / ``MatMulInteger`` and
  the ``Cast`` and ``Mul`` by ``x_scale · w_scale`` after them are one float layer whose
  weight is ``(w − w_zero) · w_scale``;
- a residual ``Add`` of two activations is ``zennit.layer.Sum`` (Zennit's Norm rule);
- a squeeze-and-excitation gate ``x * sigmoid(s)`` passes the relevance of its output to ``x``
  unchanged, as lrpc's gate rule does (``x + (x·g − x).detach()``: Zennit's gradients are
  relevances, and a plain product would scale them by the gate); ``Clip(0, 6)`` is an
  ``nn.ReLU6`` module (Zennit's activation rule).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .zennit_ref import import_zennit

INTEGER_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    q = q.astype(np.float64)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float64)
    if scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def _fake_quant(x: torch.Tensor, scale, zero, bounds, margins: list | None = None) -> torch.Tensor:
    lo, hi = bounds
    steps = x.detach() / scale
    if margins is not None:  # how far (in steps) the closest value is from a rounding boundary
        margins.append(float((steps - torch.floor(steps) - 0.5).abs().min()))
    q = torch.clamp(torch.round(steps) + zero, lo, hi)
    return x + ((q - zero) * scale - x).detach()


def _loaded(module: nn.Module, weight: np.ndarray, bias: np.ndarray | None) -> nn.Module:
    """``module`` with ``weight`` (and ``bias``) copied in."""
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        if bias is not None:
            module.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    return module


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class QuantizedNet(nn.Module):
    """``forward(x)`` evaluates the quantized graph as described in the module docstring."""

    def __init__(self, model: onnx.ModelProto, integers: dict | None = None):
        super().__init__()
        self.graph = model.graph
        self.integers = integers or {}  # float tensor name -> the integers a deployed run rounded it to
        self.consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
        self.consumers: dict[str, list] = {}
        for node in model.graph.node:
            for x in node.input:
                self.consumers.setdefault(x, []).append(node)
        self.layers = nn.ModuleDict()
        self.sums = nn.ModuleDict()
        self.margins: list[float] = []  # per rounding, see :func:`rounding_margin`
        self._fold_weights()

    def _fold_weights(self):
        """Weights: DequantizeLinear of initializers, evaluated once."""
        for node in self.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in self.consts:
                zero = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                self.consts[node.output[0]] = _dequantize(self.consts[node.input[0]], self.consts[node.input[1]], zero,
                                                          _attrs(node).get("axis", 1))

    def _key(self, node) -> str:
        return (node.name or node.output[0]).replace(".", "_").replace("/", "_") or "node"

    def _conv(self, node, weight, bias):
        a = _attrs(node)
        pads = a.get("pads", [0, 0, 0, 0])
        assert pads[:2] == pads[2:], "symmetric padding only"
        conv = nn.Conv2d(weight.shape[1] * a.get("group", 1), weight.shape[0], weight.shape[2:],
                         stride=a.get("strides", 1), padding=tuple(pads[:2]), dilation=a.get("dilations", 1),
                         groups=a.get("group", 1), bias=bias is not None)
        return _loaded(conv, weight, bias)

    def _linear(self, weight_out_in, bias):
        linear = nn.Linear(weight_out_in.shape[1], weight_out_in.shape[0], bias=bias is not None)
        return _loaded(linear, weight_out_in, bias)

    def _module(self, node, build):
        key = self._key(node)
        if key not in self.layers:
            self.layers[key] = build()
        return self.layers[key]

    def _integer_scale(self, node):
        """The ``w_scale`` of ``Mul(Cast(XInteger(...)), Mul(x_scale, w_scale))`` after ``node``."""
        cast = self.consumers[node.output[0]][0]
        mul = self.consumers[cast.output[0]][0]
        other = [x for x in mul.input if x != cast.output[0]][0]
        producer = next(n for n in self.graph.node if other in n.output)
        w_scale = next(self.consts[x] for x in producer.input if x in self.consts)
        after = self.consumers.get(mul.output[0], [])
        bias = None
        if len(after) == 1 and after[0].op_type == "Add":
            bias_name = next((x for x in after[0].input if x in self.consts), None)
            if bias_name is not None:
                bias, after = self.consts[bias_name].reshape(-1), after[0].output[0]
        return [cast.output[0], mul.output[0]] + ([after] if bias is not None else []), w_scale, bias

    def forward(self, x):
        env = {self.graph.input[0].name: x}
        passthrough = {}
        gates = set()  # sigmoid outputs (and their roundings): squeeze-and-excitation gates
        value = lambda name: env[name] if name in env else torch.from_numpy(self.consts[name])  # noqa: E731
        for node in self.graph.node:
            op, ins, a = node.op_type, list(node.input), _attrs(node)
            if all(i in self.consts or not i for i in ins) and op != "DynamicQuantizeLinear":
                if op == "Reshape":  # a bias reshaped to [1, C, 1, 1]
                    self.consts[node.output[0]] = self.consts[ins[0]].reshape(self.consts[ins[1]])
                elif op == "Identity":  # an exporter's shared (equal) bias
                    self.consts[node.output[0]] = self.consts[ins[0]]
                continue  # weights (folded above) and other constants
            if node.output[0] in passthrough:
                env[node.output[0]] = env[passthrough[node.output[0]]]
                continue
            if op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") and ins[0] in gates:
                gates.add(node.output[0])
            if op == "QuantizeLinear" and ins[0] in self.integers:  # the deployed run's rounding
                zero, scale = float(self.consts[ins[2]]), float(self.consts[ins[1]])
                q = torch.from_numpy(self.integers[ins[0]].astype(np.float32))
                y = value(ins[0]) + ((q - zero) * scale - value(ins[0])).detach()
            elif op == "QuantizeLinear":
                zero = self.consts[ins[2]]
                y = _fake_quant(value(ins[0]), float(self.consts[ins[1]]), float(zero), INTEGER_RANGES[zero.dtype],
                                self.margins)
            elif op == "DequantizeLinear":
                y = value(ins[0])  # already the dequantized value (see QuantizeLinear)
            elif op == "DynamicQuantizeLinear":
                v = value(ins[0]).detach()
                lo, hi = torch.clamp(v.min(), max=0), torch.clamp(v.max(), min=0)
                scale = (hi - lo) / 255
                zero = torch.clamp(torch.round(-lo / scale), 0, 255)
                env[node.output[1]], env[node.output[2]] = scale, zero
                y = _fake_quant(value(ins[0]), scale, zero, (0, 255), self.margins)
            elif op in ("ConvInteger", "MatMulInteger"):
                passing, w_scale, bias = self._integer_scale(node)
                w = self.consts[ins[1]].astype(np.float32)
                if len(ins) > 3 and ins[3]:
                    wz = self.consts[ins[3]].astype(np.float32)
                    w = w - (wz.reshape(-1, *[1] * (w.ndim - 1)) if op == "ConvInteger" else wz)
                if op == "ConvInteger":
                    w = w * np.asarray(w_scale, np.float32).reshape(-1, *[1] * (w.ndim - 1))
                    layer = self._module(node, lambda: self._conv(node, w, bias))
                else:
                    layer = self._module(node, lambda: self._linear((w * np.asarray(w_scale, np.float32)).T, bias))
                y = layer(value(ins[0]))
                passthrough.update({name: node.output[0] for name in passing})
            elif op == "Conv":
                layer = self._module(node, lambda: self._conv(
                    node, self.consts[ins[1]], self.consts[ins[2]] if len(ins) > 2 and ins[2] else None))
                y = layer(value(ins[0]))
            elif op == "Gemm":
                w = self.consts[ins[1]]
                layer = self._module(node, lambda: self._linear(w if a.get("transB", 0) else w.T,
                                                                self.consts.get(ins[2]) if len(ins) > 2 else None))
                y = layer(value(ins[0]))
            elif op == "MatMul" and ins[1] in self.consts:
                layer = self._module(node, lambda: self._linear(self.consts[ins[1]].T, None))
                y = layer(value(ins[0]))
            elif op == "Add" and all(i in env for i in ins):
                key = self._key(node)
                if key not in self.sums:
                    self.sums[key] = import_zennit().layer.Sum()
                y = self.sums[key](torch.stack([env[ins[0]], env[ins[1]]], dim=-1))
            elif op == "Add":
                y = value(ins[0]) + value(ins[1])
            elif op == "Mul" and any(i in gates for i in ins) and all(i in env for i in ins):
                gate = next(i for i in ins if i in gates)  # x * sigmoid(...): a constant gate relevance passes
                signal = value(next(i for i in ins if i != gate) if ins[0] != ins[1] else ins[0])
                y = signal + (signal * value(gate) - signal).detach()  # Zennit's gradients are relevances
            elif op == "Mul":  # x_scale · w_scale (the product itself is folded into the layer above)
                y = value(ins[0]) * value(ins[1])
            elif op == "Sigmoid":
                y = torch.sigmoid(value(ins[0]))
                gates.add(node.output[0])
            elif op == "Clip" and all(self.consts.get(i) is not None for i in ins[1:3]) and \
                    (float(self.consts[ins[1]]), float(self.consts[ins[2]])) == (0.0, 6.0):
                y = self._module(node, nn.ReLU6)(value(ins[0]))  # a module: Zennit's activation rule
            elif op == "Relu":
                y = torch.relu(value(ins[0]))
            elif op == "MaxPool":
                y = nn.functional.max_pool2d(value(ins[0]), a["kernel_shape"], a.get("strides", 1),
                                             a.get("pads", [0, 0])[:2])
            elif op == "AveragePool":  # modules: Zennit gives pooling layers its Norm rule
                y = self._module(node, lambda: nn.AvgPool2d(a["kernel_shape"], a.get("strides", 1),
                                                            a.get("pads", [0, 0])[:2]))(value(ins[0]))
            elif op == "GlobalAveragePool":
                y = self._module(node, lambda: nn.AdaptiveAvgPool2d(1))(value(ins[0]))
            elif op == "Flatten":
                y = torch.flatten(value(ins[0]), a.get("axis", 1))
            elif op == "Reshape":
                y = value(ins[0]).reshape([int(d) for d in self.consts[ins[1]]])
            else:
                raise NotImplementedError(f"reference: {op}")
            env[node.output[0]] = y
        self.env = env  # every value, for inspection
        return env[self.graph.output[0].name]


def rounding_margin(model: onnx.ModelProto, x: np.ndarray) -> float:
    """The smallest distance, in quantization steps, of any rounded activation of ``model``
    on batch ``x`` from a rounding boundary (``k + 0.5``). Two float32 implementations of
    the same network differ by ~1e-4 steps (their sums run in other orders); a value that
    close to a boundary rounds either way, and a dynamic scale (the batch's range) carries
    the difference to every sample. References agree only on batches with a larger margin."""
    net = QuantizedNet(model).eval()
    with torch.no_grad():
        net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return min(net.margins)


def qoperator_integers(model: onnx.ModelProto, feeds: dict, qdq: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``{tensor of the QDQ file: integers}`` of a QOperator file's run, for :class:`QuantizedNet`
    on the QDQ file of the same calibration: QOperator kernels round ties their own way (and,
    on CPUs without VNNI, saturate u8×s8 sums), and lrpc reads their integers. onnxruntime
    names each op's quantized output ``<float tensor>_quantized``; a layer's output is found by
    its weight (the QDQ file drops the ReLU a quantization range implies and names the layer's
    output after it)."""
    from .onnx_torch import quantized_integers

    computed = quantized_integers(model, feeds)
    out = {name[:-len("_quantized")]: q for name, q in computed.items() if name.endswith("_quantized")}
    weighted = {n.input[3]: n.output[0] for n in model.graph.node if n.op_type in ("QLinearConv", "QLinearMatMul", "QGemm")}
    dequantized = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    for node in qdq.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            layer = weighted.get(dequantized.get(node.input[1], ""))
            if layer in computed:
                out[node.output[0]] = computed[layer]
    return out


def quantized_relevance(model: onnx.ModelProto, x: np.ndarray, composite_name: str, target=None,
                        integers: dict | None = None) -> np.ndarray:
    """Zennit's relevance for the quantized ``model`` rebuilt by :class:`QuantizedNet`."""
    from .zennit_ref import _attribute, composite

    net = QuantizedNet(model, integers).eval()
    with torch.no_grad():
        net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))  # builds the layers
    return _attribute(net, x, target, composite(composite_name), normalize=True)


# -- transformers: the Hugging Face model with the deployed file's weights -----------------


def _deployed_value(deployed: dict, name: str) -> np.ndarray | None:
    """The float value onnxruntime's quantizers store for float initializer ``name``:
    ``name_quantized`` with ``name_scale`` / ``name_zero_point`` (a Gemm's weight as
    ``name_Transposed_...``, then transposed back), dequantized per tensor or per axis."""
    for stem, transposed in ((name, False), (name + "_Transposed", True)):
        q = deployed.get(stem + "_quantized")
        if q is not None:
            scale = deployed[stem + "_scale"]
            value = _dequantize(q, scale.astype(np.float64), deployed.get(stem + "_zero_point"),
                                1 if q.ndim == 2 and scale.size == q.shape[1] else 0)
            return value.T if transposed else value
    return None


def deployed_parameters(model: nn.Module, float_file: onnx.ModelProto, deployed_file: onnx.ModelProto,
                        weights: dict | None = None) -> tuple[nn.Module, list[nn.Module]]:
    """A copy of ``model`` whose parameters are the deployed file's (dequantized), and the
    modules whose weights the file stores quantized. Parameters are matched to the float
    export's initializers by value (``W`` or ``Wᵀ``: MatMul stores ``Wᵀ``); ``weights``
    gives float values by float-initializer name for forms not stored as ``_quantized``."""
    import copy

    floats = {t.name: numpy_helper.to_array(t) for t in float_file.graph.initializer}
    deployed = {t.name: numpy_helper.to_array(t) for t in deployed_file.graph.initializer}
    out = copy.deepcopy(model)
    quantized = []
    for module in out.modules():
        p = getattr(module, "weight", None)
        if not isinstance(p, nn.Parameter) or p.ndim < 2:
            continue
        w = p.detach().numpy()
        for name, value in floats.items():
            transposed = value.shape == w.T.shape and np.array_equal(value, w.T)
            if not (transposed or (value.shape == w.shape and np.array_equal(value, w))):
                continue
            new = (weights or {}).get(name)
            new = _deployed_value(deployed, name) if new is None else new
            if new is not None:
                with torch.no_grad():
                    p.copy_(torch.from_numpy(np.ascontiguousarray(new.T if transposed else new)))
                quantized.append(module)
            break
    return out, quantized


def _dynamic_rounding(v: torch.Tensor) -> torch.Tensor:
    """``DynamicQuantizeLinear`` then ``DequantizeLinear`` (uint8, scale and zero point from
    the tensor's range, round half to even), in float32 as the op computes it: the
    references run in float64, where a value next to a rounding boundary could round the
    other way."""
    x = v.float()
    lo, hi = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
    scale = (hi - lo) / 255
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return ((torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale).to(v.dtype)


def _rounded_input(module, inputs):
    """The layer's input rounded, relevance passing the rounding unchanged. The references
    here are Gradient × Input (``attnlrp_ref``): a straight-through gradient would scale the
    relevance by ``x / round(x)``, so the rounding takes the identity rule's backward."""
    from .attnlrp_ref import identity

    return (identity(_dynamic_rounding, inputs[0]),) + tuple(inputs[1:])


def dynamic_int8(model: nn.Module, float_file: onnx.ModelProto, deployed_file: onnx.ModelProto) -> nn.Module:
    """The network ``quantize_dynamic``'s file computes: dequantized weights (and embedding
    tables), each quantized layer's input rounded as ``DynamicQuantizeLinear`` rounds it."""
    out, quantized = deployed_parameters(model, float_file, deployed_file)
    for module in quantized:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.register_forward_pre_hook(_rounded_input)
    return out


def weight_only_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``{float initializer name: value}`` for the weight-only quantized tensors of ``model``,
    as onnxruntime's own kernels compute them (each node run alone): ``MatMulNBits``
    (``Wᵀ [K, N]``, read by multiplying the identity; packed weight ``<name>_Q<bits>``),
    ``GatherBlockQuantized`` (the table, by looking up every row; ``<name>_Q4``) and a
    blocked ``DequantizeLinear`` of an int4 initializer (``<name>_DQ_Q4``), all written by
    onnxruntime's ``MatMulNBitsQuantizer``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inits = {t.name: t for t in model.graph.initializer}

    def alone(node, feeds: dict, inputs: list) -> np.ndarray:
        graph = helper.make_graph([node], "w", [helper.make_tensor_value_info(k, dtype, list(v.shape))
                                                for k, (v, dtype) in feeds.items()],
                                  [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                                  [inits[x] for x in inputs if x in inits])
        single = helper.make_model(graph, opset_imports=list(model.opset_import))
        single.ir_version = model.ir_version
        session = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {k: v for k, (v, _) in feeds.items()})[0]

    out = {}
    for node in model.graph.node:
        attrs = _attrs(node)
        if node.op_type == "MatMulNBits":
            k = int(attrs["K"])
            probe = helper.make_node("MatMulNBits", ["eye", *node.input[1:5]], ["w"], domain="com.microsoft",
                                     **attrs)
            out[node.input[1].rsplit("_Q", 1)[0]] = alone(
                probe, {"eye": (np.eye(k, dtype=np.float32), TensorProto.FLOAT)}, node.input[1:5])
        elif node.op_type == "GatherBlockQuantized":
            rows = inits[node.input[0]].dims[int(attrs.get("gather_axis", 0))]
            probe = helper.make_node("GatherBlockQuantized", [node.input[0], "ids", *node.input[2:]], ["w"],
                                     domain="com.microsoft", **attrs)
            out[node.input[0].rsplit("_Q", 1)[0]] = alone(
                probe, {"ids": (np.arange(rows, dtype=np.int64), TensorProto.INT64)}, node.input)
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and "_DQ_Q" in node.input[0]:
            probe = helper.make_node("DequantizeLinear", node.input, ["w"], **attrs)
            out[node.input[0].rsplit("_DQ_Q", 1)[0]] = alone(probe, {}, node.input)
    return out
