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
#: the longest sequence written out (T = 256 compiles in about 30 s on a 2-core CPU)
MAX_STEPS = 2048
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
        if self.length > MAX_STEPS:
            raise Unsupported(f"{self.length} time steps (at most {MAX_STEPS} are written out: about 360 nodes "
                              "per step and layer; compile time grows with them)")
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
        self._inside: dict[int, str] = {}  # step → its rows-inside-their-length mask, made once

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
        if t not in self._inside:
            self._inside[t] = self.w.op("Less", self.w.const(np.array([[t]], np.int64), np.int64), self.lengths)
        return self.w.op("Where", self._inside[t], new, old)

    def split(self, z: str, parts: int) -> list[str]:
        return self.w.split(z, [self.hidden] * parts, axis=1)


class _Weights:
    """One direction's parameters as graph tensors, in the shapes each step multiplies with
    (``W`` ``[G·H, I]``, ``R`` ``[G·H, H]``, ``B`` ``[2·G·H]``, ``P`` ``[3·H]`` sliced and
    stacked by ops, which constant folding turns into weights: a file may compute them)."""

    def __init__(self, w: _Writer, node: onnx.NodeProto, d: int, gates: int, hidden: int):
        self.w, self.hidden, self.gates = w, hidden, gates
        self.W, self.R = self._direction(node.input[1], d), self._direction(node.input[2], d)
        self.B = self._direction(_arg(node, 3), d) if _arg(node, 3) else None
        self.P = self._direction(_arg(node, 7), d) if len(node.input) > 7 and _arg(node, 7) else None

    def _direction(self, name: str, d: int) -> str:
        w = self.w
        return w.op("Squeeze", w.op("Slice", name, w.ints(d), w.ints(d + 1), w.ints(0)), w.ints(0))

    def rows(self, tensor: str, start: int, end: int) -> str:
        """Gate blocks ``start`` to ``end`` (in units of H) of a parameter."""
        h = self.hidden
        return self.w.op("Slice", tensor, self.w.ints(start * h), self.w.ints(end * h), self.w.ints(0))

    def bias(self, start: int, end: int) -> str | None:
        """``Wb + Rb`` of gate blocks ``start`` to ``end``."""
        if self.B is None:
            return None
        g = self.gates
        return self.w.op("Add", self.rows(self.B, start, end), self.rows(self.B, g + start, g + end))

    def input_bias(self, start: int, end: int) -> str | None:
        return None if self.B is None else self.rows(self.B, start, end)

    def recurrent_bias(self, start: int, end: int) -> str | None:
        return None if self.B is None else self.rows(self.B, self.gates + start, self.gates + end)

    def stacked(self, start: int, end: int) -> str:
        """``[W; R]ᵀ`` of gate blocks ``start`` to ``end``: ``[I + H, (end − start)·H]``."""
        joined = self.w.op("Concat", self.rows(self.W, start, end), self.rows(self.R, start, end), axis=1)
        return self.w.op("Transpose", joined, perm=[1, 0])

    def transposed(self, tensor: str, start: int, end: int) -> str:
        return self.w.op("Transpose", self.rows(tensor, start, end), perm=[1, 0])


def _affine(w: _Writer, x: str, weight: str, bias: str | None) -> str:
    product = w.op("MatMul", x, weight)
    return w.op("Add", product, bias) if bias else product


def _linear(w: _Writer, inputs: list[str], weight: str, bias: str | None) -> str:
    """``Concat(x_t, h_{t−1}) · [W; R]ᵀ + b``: one linear map of the step's input and state,
    so the ε-rule shares relevance among all of them as Arras et al.'s linear layer does."""
    return _affine(w, w.op("Concat", *inputs, axis=1), weight, bias)


class _Direction:
    """The parameters one direction's steps share, built once (not once per step)."""

    def __init__(self, steps: _Steps, node: onnx.NodeProto, d: int):
        kind, hidden = steps.kind, steps.hidden
        p = _Weights(steps.w, node, d, len(GATES[kind]), hidden)
        self.peep = None  # LSTM peepholes: i, o, f
        if kind == "LSTM":
            self.gates, self.gates_bias = p.stacked(0, 4), p.bias(0, 4)
            if p.P is not None:
                self.peep = [p.rows(p.P, k, k + 1) for k in range(3)]
        elif kind == "GRU":
            self.gates, self.gates_bias = p.stacked(0, 2), p.bias(0, 2)
            self.candidate_x, self.candidate_x_bias = p.transposed(p.W, 2, 3), p.input_bias(2, 3)
            self.candidate_h, self.candidate_h_bias = p.transposed(p.R, 2, 3), p.recurrent_bias(2, 3)
        else:
            self.gates, self.gates_bias = p.stacked(0, 1), p.bias(0, 1)


def _lstm_step(steps: _Steps, d: _Direction, acts, x: str, h: str, c: str):
    w = steps.w
    f_act, g_act, h_act = acts
    zi, zo, zf, zc = steps.split(_linear(w, [x, h], d.gates, d.gates_bias), 4)
    peep = d.peep
    if peep:
        zi = w.op("Add", zi, w.op("Mul", c, peep[0]))
        zf = w.op("Add", zf, w.op("Mul", c, peep[2]))
    i, f = f_act(w, steps.gate_input(zi)), f_act(w, steps.gate_input(zf))
    g = g_act(w, steps.gate_input(zc))
    c_new = w.op("Add", w.op("Mul", f, c), w.op("Mul", i, g))
    if peep:
        zo = w.op("Add", zo, w.op("Mul", c_new, peep[1]))
    o = f_act(w, steps.gate_input(zo))
    return w.op("Mul", o, h_act(w, c_new)), c_new


def _gru_step(steps: _Steps, d: _Direction, acts, x: str, h: str, linear_before_reset: bool):
    w = steps.w
    f_act, g_act = acts
    z_pre, r_pre = steps.split(_linear(w, [x, h], d.gates, d.gates_bias), 2)
    r = f_act(w, steps.gate_input(r_pre))
    candidate_x = _affine(w, x, d.candidate_x, d.candidate_x_bias)
    if linear_before_reset:  # r ⊙ (h Rₕᵀ + Rbₕ)
        state = w.op("Mul", r, _affine(w, h, d.candidate_h, d.candidate_h_bias))
    else:  # (r ⊙ h) Rₕᵀ + Rbₕ
        state = _affine(w, w.op("Mul", r, h), d.candidate_h, d.candidate_h_bias)
    n = g_act(w, steps.gate_input(w.op("Add", candidate_x, state)))
    z_in = steps.gate_input(z_pre)
    keep, update = f_act(w, z_in), f_act.complement(w, z_in)  # z and 1 − z
    return w.op("Add", w.op("Mul", update, n), w.op("Mul", keep, h))


def _rnn_step(steps: _Steps, d: _Direction, acts, x: str, h: str):
    return acts[0](steps.w, steps.gate_input(_linear(steps.w, [x, h], d.gates, d.gates_bias)))


def _recurrent(kind: str):
    def write(w: _Writer, node: onnx.NodeProto) -> None:
        steps = _Steps(w, node, kind)
        a = steps.a
        direction = _text(a.get("direction", b"forward"))
        names = ["forward", "reverse"] if direction == "bidirectional" else [direction]
        activations = _activations(kind, a, len(names))
        outputs, finals, cells = [], [], []
        for d, name in enumerate(names):
            params = _Direction(steps, node, d)
            h = steps.initial(5, d)
            c = steps.initial(6, d) if kind == "LSTM" else None
            ys = [None] * steps.length
            order = range(steps.length) if name == "forward" else reversed(range(steps.length))
            for t in order:
                x = steps.inputs[t]
                if kind == "LSTM":
                    h_new, c_new = _lstm_step(steps, params, activations[d], x, h, c)
                    c = steps.kept(t, c_new, c)
                elif kind == "GRU":
                    h_new = _gru_step(steps, params, activations[d], x, h, bool(a.get("linear_before_reset", 0)))
                else:
                    h_new = _rnn_step(steps, params, activations[d], x, h)
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
