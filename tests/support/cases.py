"""Hand-built ONNX cases and a step-by-step autograd LRP-ε reference for them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import lrpc
from support.autograd_ref import epsilon_lrp, one_hot

EPS = 1e-6
RNG = np.random.default_rng(7)


def rand(*shape, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.1 if positive else a


def t(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def build(nodes, inits, x_shape, out="logits", opset=17, dynamic_batch=True):
    x_dims = ["N", *x_shape[1:]] if dynamic_batch else list(x_shape)
    graph = helper.make_graph(
        nodes,
        "case",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["rows", "classes"])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def flatten(src="y"):
    return helper.make_node("Flatten", [src], ["logits"], axis=1)


def run_compiled(model, x, composite=None, target=None):
    compiled = lrpc.compile(model, composite or lrpc.Composite(lrpc.GlobalMap(lrpc.EpsilonRule(EPS))))
    sess = ort.InferenceSession(compiled.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x}
    if target is not None:
        feeds["lrp_target"] = np.asarray(target, dtype=np.int64)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return out["logits"], out["relevance"]


def chain_reference(steps, x, target):
    """``steps``: list of (forward fn, rule) with rule "eps" or "pass"; LRP backward by autograd."""
    acts = [t(x)]
    for fn, _ in steps:
        acts.append(fn(acts[-1]))
    logits = acts[-1].detach().numpy()
    R = one_hot(target, logits.shape[1])
    for (fn, rule), a in zip(reversed(steps), reversed(acts[:-1])):
        R = R.reshape(fn(a).shape)
        R = R if rule == "pass" else epsilon_lrp(fn, [a.detach().numpy()], R, EPS)[0]
    return logits, R


def flat(z):
    return z.reshape(z.shape[0], -1)


def check_chain(model, x, steps, composite=None, target=None):
    acts = t(x)
    for fn, _ in steps:
        acts = fn(acts)
    rows, classes = acts.shape
    target = np.arange(rows) % classes if target is None else np.asarray(target)
    logits_ref, R_ref = chain_reference(steps, x, target)
    logits, R = run_compiled(model, x, composite, target)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-4)
    assert R.shape == x.shape and R.dtype == np.float32
    err = np.abs(R - R_ref).max() / np.abs(R_ref).max()
    assert err < 1e-4, f"relative error {err:.2e}"


#: lrpc's presets by name; EpsilonGammaBox gets the bounds the tests use everywhere
PRESET_NAMES = ("EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox")
BOX = dict(low=-3.0, high=3.0)


def preset(name: str) -> lrpc.Composite:
    return getattr(lrpc, name)(**BOX) if name == "EpsilonGammaBox" else getattr(lrpc, name)()
