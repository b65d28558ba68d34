"""Recurrent layers (``LSTM``, ``GRU``, ``RNN``) written out in their time steps, for the
analysis twin.

The rule is LRP for gated recurrent networks (Arras et al. 2017, "Explaining Recurrent
Neural Network Predictions in Sentiment Analysis", WASSA; Arras et al. 2019, "Evaluating
Recurrent Neural Network Explanations", BlackboxNLP):

- gates are constants: a product of a gate and a signal gives the signal all of its
  relevance (signal-take-all);
- relevance flows through the signal: the cell state, the candidate, and each step's
  linear map of ``[x_t, h_{t−1}]`` by the layer's rule (the ε-rule; the bias absorbs its
  share).

Written out in standard ops, every piece is one lrpc already has a spec for:
- each step's pre-activations are one ``MatMul`` of ``Concat(x_t, h_{t−1})`` with the
  stacked weights, plus the bias;
- the gates are ``Sigmoid``/``HardSigmoid`` factors of a product, which the ``Mul`` spec
  holds constant;
- ``Tanh`` passes relevance unchanged;
- the cell update is a merge.

So the rule follows from the specs; no rule is written for recurrent layers, and every
composite applies to their linear maps as to any other.

The steps are unrolled at compile time, so the sequence length must be static (a dynamic
one leaves the op fused, with its reason, in the check). The deployed forward keeps the op
itself: the compiled file's outputs are the file's own, and the twin's steps compute the
same values within float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx

from .contrib import Unsupported, _arg, _attrs, _out, _text, _Writer

#: activations a gate may have (what the Mul spec holds constant) and a signal may have
GATE_ACTIVATIONS = {"Sigmoid", "HardSigmoid"}
SIGNAL_ACTIVATIONS = {"Tanh", "Relu", "LeakyRelu", "Elu", "Softplus", "Softsign", "Sigmoid", "HardSigmoid"}
#: the gates of each op in ONNX's order, and its default activations (one direction)
GATES = {"LSTM": ("i", "o", "f", "c"), "GRU": ("z", "r", "h"), "RNN": ("h",)}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class _Activation:
    """One of the op's ``activations`` with its ``activation_alpha``/``beta``."""

    def __init__(self, name: str, alpha: float | None, beta: float | None):
        self.name, self.alpha, self.beta = name, alpha, beta

    def __call__(self, w: _Writer, x: str) -> str:
        attrs = {}
        if self.name in ("LeakyRelu", "Elu") and self.alpha is not None:
            attrs["alpha"] = self.alpha
        if self.name == "HardSigmoid":
            attrs = {"alpha": 0.2 if self.alpha is None else self.alpha, "beta": 0.5 if self.beta is None else self.beta}
        return w.op(self.name, x, **attrs)

    def complement(self, w: _Writer, x: str) -> str:
        """``1 − f(x)``, spelled as a gate: ``σ(−x)``; a hard sigmoid's ``αx + β`` mirrored."""
        if self.name == "Sigmoid":
            return w.op("Sigmoid", w.op("Neg", x))
        alpha = 0.2 if self.alpha is None else self.alpha
        beta = 0.5 if self.beta is None else self.beta
        return w.op("HardSigmoid", x, alpha=-alpha, beta=1.0 - beta)


def _activations(kind: str, a: dict, directions: int) -> list[list[_Activation]]:
    names = [_text(n) for n in a.get("activations", [])] or DEFAULT_ACTIVATIONS[kind] * directions
    alphas = list(a.get("activation_alpha", []))
    betas = list(a.get("activation_beta", []))
    per = len(DEFAULT_ACTIVATIONS[kind])
    if len(names) != per * directions:
        raise Unsupported(f"{len(names)} activations for {directions} direction(s)")
    acts = [_Activation(n, alphas[i] if i < len(alphas) else None, betas[i] if i < len(betas) else None)
            for i, n in enumerate(names)]
    for act in acts:
        if act.name not in SIGNAL_ACTIVATIONS:
            raise Unsupported(f"activation {act.name}")
    chunks = [acts[d * per:(d + 1) * per] for d in range(directions)]
    if kind != "RNN":
        for chunk in chunks:
            if chunk[0].name not in GATE_ACTIVATIONS or any(c.name in GATE_ACTIVATIONS for c in chunk[1:]):
                raise Unsupported(f"gate activation {chunk[0].name} with signal activations "
                                  f"{', '.join(c.name for c in chunk[1:])} (gates must be sigmoids, signals not)")
    return chunks


class _Steps:
    """What every direction shares: the inputs per time step, the batch's zeros."""

    def __init__(self, w: _Writer, node: onnx.NodeProto, kind: str):
        a = _attrs(node)
        self.w, self.node, self.kind, self.a = w, node, kind, a
        self.layout = int(a.get("layout", 0))
        dims = w.shape(node.input[0])
        if len(dims) != 3:
            raise Unsupported("an input that is not [sequence, batch, features]")
        self.length = dims[1] if self.layout else dims[0]
        if not isinstance(self.length, int):
            raise Unsupported("a dynamic sequence length (the time steps are written out at compile time: "
                              "export with a fixed sequence length)")
        if kind == "LSTM" and a.get("input_forget", 0):
            raise Unsupported("coupled input and forget gates (input_forget)")
        self.hidden = int(a["hidden_size"])
        x = node.input[0]
        if self.layout:  # [B, T, I] → [T, B, I]
            x = w.op("Transpose", x, perm=[1, 0, 2])
        parts = w.split(x, [1] * self.length, axis=0) if self.length > 1 else [x]
        self.inputs = [w.op("Squeeze", p, w.ints(0)) for p in parts]  # [B, I] each
        batch = w.op("Slice", w.op("Shape", self.inputs[0]), w.ints(0), w.ints(1))  # (Shape's start: opset 15)
        self.zeros = w.op("ConstantOfShape", w.op("Concat", batch, w.ints(self.hidden), axis=0),
                          value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
        lengths = _arg(node, 4)
        self.lengths = w.op("Unsqueeze", w.op("Cast", lengths, to=onnx.TensorProto.INT64), w.ints(1)) \
            if lengths else None  # [B, 1]
        self.clip = a.get("clip")

    def weights(self, index: int, name: str) -> np.ndarray:
        value = self.w.value(self.node.input[index])
        if value is None:
            raise Unsupported(f"{name} that is not a constant")
        return value

    def initial(self, index: int, direction: int) -> str:
        given = _arg(self.node, index)
        if given is None:
            return self.zeros
        return self.w.op("Squeeze", self.w.op("Slice", given, self.w.ints(direction), self.w.ints(direction + 1),
                                              self.w.ints(0)), self.w.ints(0))

    def gate_input(self, z: str) -> str:
        """A pre-activation, clipped as the op's ``clip`` says."""
        if self.clip is None:
            return z
        return self.w.op("Clip", z, self.w.const(-float(self.clip)), self.w.const(float(self.clip)))

    def kept(self, t: int, new: str, old: str) -> str:
        """``new`` where step ``t`` is inside the row's sequence length, else ``old``."""
        if self.lengths is None:
            return new
        inside = self.w.op("Less", self.w.const(np.array([[t]], np.int64), np.int64), self.lengths)
        return self.w.op("Where", inside, new, old)

    def split(self, z: str, parts: int) -> list[str]:
        return self.w.split(z, [self.hidden] * parts, axis=1)


def _linear(w: _Writer, inputs: list[str], weights: list[np.ndarray], bias: np.ndarray) -> str:
    """``Concat(inputs) · [W; R]ᵀ + b``: one linear map of the step's input and state, so the
    ε-rule shares relevance among all of them as Arras et al.'s linear layer does."""
    stacked = np.concatenate(weights, axis=1).T.astype(np.float32)  # [I + H, gates·H]
    joined = w.op("Concat", *inputs, axis=1) if len(inputs) > 1 else inputs[0]
    return w.op("Add", w.op("MatMul", joined, w.weight(stacked)), w.weight(bias.astype(np.float32)))


def _lstm_step(steps: _Steps, d: int, acts, x: str, h: str, c: str, W, R, B, P):
    w, hidden = steps.w, steps.hidden
    f_act, g_act, h_act = acts
    z = _linear(w, [x, h], [W, R], B[: 4 * hidden] + B[4 * hidden:])
    zi, zo, zf, zc = steps.split(z, 4)
    if P is not None:
        zi = w.op("Add", zi, w.op("Mul", c, w.weight(P[:hidden])))
        zf = w.op("Add", zf, w.op("Mul", c, w.weight(P[2 * hidden:])))
    i, f = f_act(w, steps.gate_input(zi)), f_act(w, steps.gate_input(zf))
    g = g_act(w, steps.gate_input(zc))
    c_new = w.op("Add", w.op("Mul", f, c), w.op("Mul", i, g))
    if P is not None:
        zo = w.op("Add", zo, w.op("Mul", c_new, w.weight(P[hidden: 2 * hidden])))
    o = f_act(w, steps.gate_input(zo))
    h_new = w.op("Mul", o, h_act(w, c_new))
    return h_new, c_new


def _gru_step(steps: _Steps, d: int, acts, x: str, h: str, W, R, B, linear_before_reset: bool):
    w, hidden = steps.w, steps.hidden
    f_act, g_act = acts
    wb, rb = B[: 3 * hidden], B[3 * hidden:]
    zr = _linear(w, [x, h], [W[: 2 * hidden], R[: 2 * hidden]], wb[: 2 * hidden] + rb[: 2 * hidden])
    z_pre, r_pre = steps.split(zr, 2)
    r = f_act(w, steps.gate_input(r_pre))
    candidate_x = w.op("Add", w.op("MatMul", x, w.weight(W[2 * hidden:].T.astype(np.float32))),
                       w.weight(wb[2 * hidden:].astype(np.float32)))
    recurrent = w.weight(R[2 * hidden:].T.astype(np.float32))
    if linear_before_reset:  # r ⊙ (h Rₕᵀ + Rbₕ)
        state = w.op("Mul", r, w.op("Add", w.op("MatMul", h, recurrent), w.weight(rb[2 * hidden:].astype(np.float32))))
    else:  # (r ⊙ h) Rₕᵀ + Rbₕ
        state = w.op("Add", w.op("MatMul", w.op("Mul", r, h), recurrent), w.weight(rb[2 * hidden:].astype(np.float32)))
    n = g_act(w, steps.gate_input(w.op("Add", candidate_x, state)))
    z_in = steps.gate_input(z_pre)
    keep, update = f_act(w, z_in), f_act.complement(w, z_in)  # z and 1 − z
    return w.op("Add", w.op("Mul", update, n), w.op("Mul", keep, h))


def _rnn_step(steps: _Steps, d: int, acts, x: str, h: str, W, R, B):
    hidden = steps.hidden
    z = _linear(steps.w, [x, h], [W, R], B[:hidden] + B[hidden:])
    return acts[0](steps.w, steps.gate_input(z))


def _recurrent(kind: str):
    def write(w: _Writer, node: onnx.NodeProto) -> None:
        steps = _Steps(w, node, kind)
        a, hidden = steps.a, steps.hidden
        direction = _text(a.get("direction", b"forward"))
        names = ["forward", "reverse"] if direction == "bidirectional" else [direction]
        activations = _activations(kind, a, len(names))
        W, R = steps.weights(1, "W"), steps.weights(2, "R")
        gates = len(GATES[kind])
        B = steps.weights(3, "B") if _arg(node, 3) else np.zeros((len(names), 2 * gates * hidden), np.float32)
        P = steps.weights(7, "P") if kind == "LSTM" and _arg(node, 7) else None
        outputs, finals, cells = [], [], []
        for d, name in enumerate(names):
            h = steps.initial(5, d)
            c = steps.initial(6, d) if kind == "LSTM" else None
            ys = [None] * steps.length
            order = range(steps.length) if name == "forward" else reversed(range(steps.length))
            for t in order:
                x = steps.inputs[t]
                if kind == "LSTM":
                    h_new, c_new = _lstm_step(steps, d, activations[d], x, h, c, W[d], R[d], B[d],
                                              None if P is None else P[d])
                    c = steps.kept(t, c_new, c)
                elif kind == "GRU":
                    h_new = _gru_step(steps, d, activations[d], x, h, W[d], R[d], B[d],
                                      bool(a.get("linear_before_reset", 0)))
                else:
                    h_new = _rnn_step(steps, d, activations[d], x, h, W[d], R[d], B[d])
                h = steps.kept(t, h_new, h)
                ys[t] = steps.kept(t, h_new, steps.zeros)  # zeros past a row's length
            outputs.append(w.op("Concat", *[w.op("Unsqueeze", y, w.ints(0)) for y in ys], axis=0))  # [T, B, H]
            finals.append(h)
            cells.append(c)
        _write_outputs(w, node, steps, outputs, finals, cells)

    return write


def _write_outputs(w: _Writer, node: onnx.NodeProto, steps: _Steps, outputs, finals, cells) -> None:
    """``Y`` ``[T, directions, B, H]`` (layout 1: ``[B, T, directions, H]``), ``Y_h`` and
    ``Y_c`` ``[directions, B, H]`` (layout 1: ``[B, directions, H]``)."""
    def stacked(parts: list[str], axis: int, out: str | None, perm: list[int]) -> None:
        joined = w.op("Concat", *[w.op("Unsqueeze", p, w.ints(axis)) for p in parts], axis=axis) \
            if len(parts) > 1 else w.op("Unsqueeze", parts[0], w.ints(axis))
        if steps.layout:
            w.op("Transpose", joined, out=out, perm=perm)
        else:
            w.op("Identity", joined, out=out)

    if _out(node, 0):
        stacked(outputs, 1, node.output[0], [2, 0, 1, 3])
    if _out(node, 1):
        stacked(finals, 0, node.output[1], [1, 0, 2])
    if _out(node, 2) and steps.kind == "LSTM":
        stacked(cells, 0, node.output[2], [1, 0, 2])


#: the recurrent ops, written out like opset 23's attention ops
RECURRENT_DECOMPOSITIONS = {kind: _recurrent(kind) for kind in GATES}
