"""Recurrent layers (LSTM, GRU, RNN): LRP for gated recurrent networks (Arras et al.), the
time steps written out in the analysis twin (lrpc/recurrent.py).

The reference is ``support/recurrent_lrp.py``, the rule written from the papers in numpy
(float64) from the torch module's own weights: gates constant, signal-take-all, the ε-rule
on each step's linear map of ``[x_t, h_{t−1}]``. Models: torch's nn.LSTM / nn.GRU / nn.RNN
(two layers, bidirectional, batch first) through both exporters, and ONNX graphs built by
hand for what torch does not export (``layout=1``, ``sequence_lens``, initial states,
``linear_before_reset=0``)."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lrpc
from lrpc.deployed import analysis_twin
from support import recurrent_lrp as ref
from support.export import export_onnx
from support.runtimes import onnxruntime_run as _run, relative_error as _relative

EPS = 1e-9
TOLERANCE = 1e-5
BATCH, STEPS, FEATURES, HIDDEN = 2, 6, 5, 4
MODULES = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}
EPSILON = lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(EPS)))


class Classifier(torch.nn.Module):
    """A two-layer bidirectional recurrent stack and a linear head over every step."""

    def __init__(self, kind: str, bias: bool = True):
        super().__init__()
        self.rnn = MODULES[kind](FEATURES, HIDDEN, num_layers=2, batch_first=True, bidirectional=True, bias=bias)
        self.head = torch.nn.Linear(STEPS * 2 * HIDDEN, 3, bias=bias)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y.reshape(len(y), -1))


@functools.lru_cache(maxsize=None)
def _model(kind: str, bias: bool = True) -> Classifier:
    torch.manual_seed({"LSTM": 0, "GRU": 1, "RNN": 2}[kind])
    model = Classifier(kind, bias).eval()
    with torch.no_grad():  # larger weights than torch's init: gates away from ½, states that matter
        for p in model.parameters():
            p.mul_(2.0)
    return model


@functools.lru_cache(maxsize=None)
def _exported(kind: str, dynamo: bool, bias: bool = True) -> bytes:
    model = _model(kind, bias)
    with tempfile.TemporaryDirectory() as directory:
        path = export_onnx(model, _input(), os.path.join(directory, "m.onnx"), dynamo=dynamo)
        with open(path, "rb") as handle:
            return handle.read()


def _input() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((BATCH, STEPS, FEATURES)).astype(np.float32)


def _explain(model, x, target, composite=EPSILON):
    """The compiled file's first output (the logits) and relevance."""
    compiled = lrpc.compile(model, composite, verbose=False)
    outputs = _run(compiled, {compiled.graph.input[0].name: x, "lrp_target": target})
    names = [o.name for o in compiled.graph.output]
    return outputs[0], outputs[names.index("relevance")]


TARGET = np.array([0, 2])


def _reference(kind: str, x: np.ndarray) -> np.ndarray:
    """The rule from the papers on the torch stack's own weights, for ``TARGET``."""
    model = _model(kind)
    head = model.head
    return ref.stack_lrp(kind, ref.torch_layers(model.rnn, kind), x, head.weight.detach().double().numpy(),
                         head.bias.detach().double().numpy(), TARGET, EPS)[1]


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_recurrent_stack_has_the_reference_relevance(kind, dynamo):
    data = _exported(kind, dynamo)
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert kind in ops or (kind == "RNN" and dynamo)  # torch's dynamo exporter unrolls nn.RNN itself
    model, x = _model(kind), _input()
    logits, relevance = _explain(data, x, TARGET)
    with torch.no_grad():
        want_logits = model(torch.from_numpy(x)).numpy()
    assert np.abs(logits - want_logits).max() < 1e-5  # the deployed forward: the op itself
    want = _reference(kind, x)
    assert relevance.shape == x.shape and np.abs(want).max() > 0
    assert _relative(relevance, want) < TOLERANCE


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_recurrent_stack_without_biases_conserves_relevance(kind):
    """Gates take none, zero biases and initial states absorb none: each sample's relevance
    sums to the explained logit's (1)."""
    _, relevance = _explain(_exported(kind, False, bias=False), _input(), TARGET)
    np.testing.assert_allclose(relevance.reshape(BATCH, -1).sum(1), 1.0, atol=1e-4)


# -- what torch does not export: layout 1, sequence lengths, initial states, peepholes ---------


def _onnx_order(kind: str, W: np.ndarray) -> np.ndarray:
    """torch's gate blocks in ONNX's order (LSTM: i f g o → i o f c; GRU: r z n → z r h)."""
    blocks = np.split(W, {"LSTM": 4, "GRU": 3, "RNN": 1}[kind], axis=0)
    order = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}[kind]
    return np.concatenate([blocks[i] for i in order], axis=0)


CASES = {
    "lstm-layout1-lengths-states": dict(kind="LSTM", layout=1, lengths=[6, 3], states=True),
    "lstm-reverse-lengths": dict(kind="LSTM", layout=0, lengths=[4, 6], direction="reverse"),
    "gru-reset-after": dict(kind="GRU", layout=1, lengths=None, linear_before_reset=0, states=True),
    "gru-bidirectional-lengths": dict(kind="GRU", layout=0, lengths=[5, 2], direction="bidirectional",
                                      linear_before_reset=1),
    "rnn-layout1-states": dict(kind="RNN", layout=1, lengths=[6, 4], states=True),
}


def _hand_built(kind, layout, lengths, states=False, direction="forward", linear_before_reset=None):
    """One ONNX recurrent op with the weights of a torch module, then a linear head over Y."""
    directions = 2 if direction == "bidirectional" else 1
    torch.manual_seed(3)
    module = MODULES[kind](FEATURES, HIDDEN, bidirectional=directions == 2)
    rng = np.random.default_rng(4)
    dirs = ref.torch_layers(module, kind)[0]
    for d in dirs:
        d.update({k: d[k] * 2.0 for k in ("W", "U", "bw", "bu")})
    W = np.stack([_onnx_order(kind, d["W"]) for d in dirs]).astype(np.float32)
    R = np.stack([_onnx_order(kind, d["U"]) for d in dirs]).astype(np.float32)
    B = np.stack([np.concatenate([_onnx_order(kind, d["bw"][:, None])[:, 0], _onnx_order(kind, d["bu"][:, None])[:, 0]])
                  for d in dirs]).astype(np.float32)
    inits = {"W": W, "R": R, "B": B}
    inputs = ["x", "W", "R", "B", "", "", ""]
    if lengths is not None:
        inits["lengths"] = np.array(lengths, np.int32)
        inputs[4] = "lengths"
    if states:
        inits["h0"] = rng.standard_normal((directions, BATCH, HIDDEN)).astype(np.float32)
        inputs[5] = "h0"
        if kind == "LSTM":
            inits["c0"] = rng.standard_normal((directions, BATCH, HIDDEN)).astype(np.float32)
            inputs[6] = "c0"
    inputs = inputs[:7 if kind == "LSTM" else 6]
    while inputs[-1] == "":
        inputs.pop()
    attrs = {"hidden_size": HIDDEN, "layout": layout, "direction": direction}
    if linear_before_reset is not None:
        attrs["linear_before_reset"] = linear_before_reset
    head = rng.standard_normal((STEPS * directions * HIDDEN, 3)).astype(np.float32)
    inits["head"], inits["flat"] = head, np.array([BATCH, -1], np.int64)
    x_dims = [BATCH, STEPS, FEATURES] if layout else [STEPS, BATCH, FEATURES]
    nodes = [helper.make_node(kind, inputs, ["y"], **attrs)]
    if not layout:  # Y [T, D, B, H] → [B, T, D, H]
        nodes.append(helper.make_node("Transpose", ["y"], ["yt"], perm=[2, 0, 1, 3]))
    nodes += [helper.make_node("Reshape", ["yt" if not layout else "y", "flat"], ["f"]),
              helper.make_node("MatMul", ["f", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "recurrent", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    layers = [[dict(W=d["W"], U=d["U"], bw=d["bw"], bu=d["bu"], reverse=d["reverse"] or direction == "reverse",
                    lengths=lengths,
                    h0=inits["h0"][k] if states else None, c0=inits["c0"][k] if states and kind == "LSTM" else None,
                    **({"linear_before_reset": bool(linear_before_reset)} if kind == "GRU" else {}))
               for k, d in enumerate(dirs)]]
    return model, layers, head


@pytest.mark.parametrize("case", sorted(CASES))
def test_recurrent_op_variants_have_the_reference_relevance(case):
    spec = CASES[case]
    model, layers, head = _hand_built(**spec)
    if spec["layout"]:  # onnxruntime has no batch-first recurrent kernels (the compiled file would
        model = analysis_twin(model)  # not load, as the file itself does not): explain the written-out twin
        assert spec["kind"] not in {n.op_type for n in model.graph.node}
    x = _input()  # [B, T, I]
    feed = x if spec["layout"] else np.ascontiguousarray(x.transpose(1, 0, 2))
    logits, relevance = _explain(model, feed, TARGET)
    want_logits, want = ref.stack_lrp(spec["kind"], layers, x, head.T.astype(np.float64), np.zeros(3), TARGET, EPS)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    if not spec["layout"]:
        relevance = relevance.transpose(1, 0, 2)
    assert np.abs(want).max() > 0
    assert _relative(relevance, want) < TOLERANCE
    if spec.get("lengths"):  # the steps past a row's length got none
        row = int(np.argmin(spec["lengths"]))
        assert np.all(relevance[row, spec["lengths"][row]:] == 0)


def test_dynamic_sequence_length_is_refused_with_its_reason():
    model, _, _ = _hand_built("LSTM", 1, None)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "T"
    with pytest.raises(lrpc.UnsupportedModelError, match="dynamic sequence length"):
        lrpc.compile(model)


def _dynamic_length_export(tmp_path):
    model = _model("LSTM")
    path = tmp_path / "lstm.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(_input()),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N", 1: "T"}})
    return path


def test_input_shape_fixes_a_dynamic_sequence_length(tmp_path, cli):
    """Exported with a dynamic length, the LSTM is written out for the length given at
    compile time (and the compiled file declares it); the relevance is the reference's."""
    path = _dynamic_length_export(tmp_path)
    with pytest.raises(lrpc.UnsupportedModelError, match="dynamic sequence length"):
        lrpc.compile(str(path))
    compiled = lrpc.compile(str(path), EPSILON, input_shape=[-1, STEPS, FEATURES], verbose=False)
    dims = [d.dim_value or d.dim_param for d in compiled.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [STEPS, FEATURES]
    x = _input()
    outputs = _run(compiled, {"x": x, "lrp_target": TARGET})
    relevance = outputs[[o.name for o in compiled.graph.output].index("relevance")]
    want = _reference("LSTM", x)
    assert _relative(relevance, want) < TOLERANCE
    out = tmp_path / "lstm.lrp.onnx"
    assert cli("compile", path, "-o", out, "--input-shape", f"N,{STEPS},{FEATURES}").code == 0 and out.exists()
    for bad, says in (("2,6.5,5", "not a shape"), ("2,6", "has 2 axes"), ("3,6,9", "has 5 where 9 was given")):
        result = cli("compile", path, "-o", tmp_path / "bad.onnx", "--input-shape", bad)
        assert result.code != 0 and says in result.err and len(result.err.strip().splitlines()) <= 2, result.err


def test_a_sequence_longer_than_is_written_out_is_refused_with_its_reason():
    from lrpc.recurrent import MAX_STEPS

    model, _, _ = _hand_built("LSTM", 1, None)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = MAX_STEPS + 1
    with pytest.raises(lrpc.UnsupportedModelError, match=f"{MAX_STEPS + 1} time steps"):
        lrpc.compile(model)
