"""Gradient methods (``lrpc.compile(..., method=...)``) against Captum 0.9 on identical weights.

Every model is exported with both torch exporters (``torch.onnx.export`` legacy at opset 17
and dynamo at 18; the ResNet also legacy without constant folding, so BatchNormalization
stays a node), compiled with each method, run in onnxruntime with explicit targets (sample 0
its arg-max, the others not) and compared with Captum on the torch model:

- ``Gradient()`` = ``Saliency(abs=False)``; ``InputTimesGradient()`` = ``InputXGradient``;
- ``IntegratedGradients(steps=8, baseline=0.0, method=q)`` = ``IntegratedGradients`` with
  ``baselines=0.0, n_steps=8, method=q`` for each of Captum's five quadratures;
- ``GradCAM(layer=...)`` = ``LayerGradCam(relu_attributions=False)`` on the module whose output
  is that ONNX tensor (found by value, ``captum_models.matching_tensor``), the layer given as a
  tensor name, a node name and a layer index;
- ``SmoothGrad(samples=8, stdev=0.0)`` = the gradient; with noise, 2048 samples correlate
  (Pearson, per sample) with Captum's ``NoiseTunnel(Saliency)`` over 2048 samples.

Token models (BERT: ids + attention mask with padding) are explained at the word-embedding
lookup's output; the Captum reference runs the model on the same ids and mask with that
layer's output replaced (``captum_models.AtEmbedding``), which equals Captum's
``LayerGradientXActivation`` on ``word_embeddings`` (checked below). Captum's
``LayerIntegratedGradients`` cannot be the IG reference there: it interpolates between the
layer outputs of a baseline *input*, and no ids give an all-zero embedding, while lrpc
interpolates the embedding output itself from 0.

Models: the zoo's LeNet and ResNet (BatchNorm with non-trivial running statistics), an MLP
with GELU/Tanh/Sigmoid/SiLU, ``nn.TransformerEncoderLayer`` and a written-out pre-norm encoder
on ``[N, T, D]`` with a mean-pool + Linear head, and the tiny Hugging Face BERT.

Tolerance: ``max|a − ref| / max|ref| < 1e-5`` against a float32 Captum reference (measured
≤ ~2e-6 everywhere, so no float64 reference was needed).

Regression cases of what this comparison found: the batched forward's declared shapes (the
batch at another axis, derived and inferred symbols: ``nn.TransformerEncoderLayer``, BERT's
legacy export), the explained input straight into a LayerNormalization, and GradCAM given a
dynamo file's own node name.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from captum import attr as captum

import lrpc
from lrpc.compiler import analyze_model
from support import captum_models as cm
from support import transformer_zoo as tz, zoo
from support.runtimes import relative_error

TOLERANCE = 1e-5
STEPS = 8
QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
N = 3
NOISY_SAMPLES = 2048
STDEV = 0.1  # inputs are N(0, 1)
CORRELATION = 0.95

CNNS = ("lenet", "resnet")
MODELS = ("lenet", "resnet", "gelu_mlp", "torch_encoder", "written_encoder", "bert", "gpt2")
TOKEN_MODELS = ("bert", "gpt2")  # GPT-2: a causal LM, its last position explained
EXPORTERS = ("legacy", "dynamo")
CASES = [(m, e) for m in MODELS for e in EXPORTERS] + [("resnet", "legacy-nofold")]

# ---------------------------------------------------------------------------------------------
# models, exports, inputs: built once per worker
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    exporter: str
    data: bytes  # the ONNX export
    feeds: dict  # its inputs (numpy)
    explained: np.ndarray  # what the attribution is of: the input, or BERT's embedding output
    logits: np.ndarray  # the export's own output on feeds
    targets: np.ndarray  # int64 [N]


@dataclass
class TorchSide:
    model: torch.nn.Module  # the torch model (eval mode, float32)
    forward: torch.nn.Module  # what Captum attributes: model, or AtEmbedding(model)
    inputs: torch.Tensor  # forward's first argument
    extra: tuple  # additional_forward_args
    logits: np.ndarray


def _float_input(name: str) -> np.ndarray:
    """``[N, ...]`` from N(0, 1)."""
    if name in zoo.INPUT_SHAPES:
        return zoo.example_input(name, N, seed=1)
    shape = (cm.MLP_FEATURES,) if name == "gelu_mlp" else (cm.SEQUENCE, cm.WIDTH)
    return np.random.default_rng(1).standard_normal((N, *shape)).astype(np.float32)


_BUILDERS = {"lenet": zoo.lenet, "resnet": zoo.resnet, "gelu_mlp": cm.smooth_mlp,
             "torch_encoder": cm.torch_encoder, "written_encoder": cm.written_encoder}


@functools.lru_cache(maxsize=None)
def torch_side(name: str) -> TorchSide:
    if name in TOKEN_MODELS:
        model = tz.build(name, "eager")
        ex = tz.example(name, N)  # the last sample's last two positions are padding
        ids, mask = torch.from_numpy(ex.ids), torch.from_numpy(ex.mask)
        forward = cm.AtEmbedding(model, position=-1 if tz.is_causal_lm(name) else None).eval()
        inputs = torch.from_numpy(tz.embed(model, ex.ids))
        extra = (ids, mask)
    else:
        model = forward = _BUILDERS[name]()
        inputs, extra = torch.from_numpy(_float_input(name)), ()
    with torch.no_grad(), cm.no_mha_fastpath():
        logits = forward(inputs, *extra).numpy()
    return TorchSide(model, forward, inputs, extra, logits)


@pytest.fixture(scope="module", autouse=True)
def _built_once():
    """Models, exports and references are built on first use and kept (``functools.lru_cache``:
    one per worker, shared by every test of the module whatever its parameters), then dropped."""
    yield
    for cached in (torch_side, case, reference):
        cached.cache_clear()


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=None)
def case(name: str, exporter: str) -> Case:
    side = torch_side(name)
    if name in TOKEN_MODELS:
        data = tz.export_bytes(name, "eager", exporter)
        ex = tz.example(name, N)
        feeds = {"input": ex.ids, "mask": ex.mask}
    else:
        x = side.inputs.numpy()
        data = cm.export_bytes(side.model, x, exporter)
        feeds = {"input": x}
    logits = _session(data).run(["logits"], feeds)[0]
    assert relative_error(logits[:, -1] if tz.is_causal_lm(name) else logits, side.logits) < 1e-5
    best = side.logits.argmax(1)
    targets = ((best + np.arange(N)) % side.logits.shape[1]).astype(np.int64)  # sample 0: its arg-max
    return Case(name, exporter, data, feeds, side.inputs.numpy(), logits, targets)


def run_lrpc(c: Case, method: str) -> tuple[np.ndarray, dict]:
    """The compiled file's attribution on ``c``'s inputs with its targets, and its metadata."""
    compiled = lrpc.compile(onnx.load_from_string(c.data), method=method, verbose=False)
    meta = {p.key: p.value for p in compiled.metadata_props}
    names = [o.name for o in compiled.graph.output]
    assert "attribution" in names and "logits" in names
    logits, attribution = _session(compiled.SerializeToString()).run(
        ["logits", "attribution"], {**c.feeds, "lrp_target": c.targets})
    assert relative_error(logits, c.logits) < 1e-5  # the model's own output is unchanged
    return attribution, meta


def _expected_repr(method: str) -> str:
    return repr(lrpc.methods.as_method(method))


def _check_meta(meta: dict, method: str):
    name = method.split("(")[0]
    assert meta["lrpc.method"].startswith(name + "(")
    assert meta["lrpc.method"] == _expected_repr(method)


# ---------------------------------------------------------------------------------------------
# Captum references (float32, cached per worker: they do not depend on the exporter)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def reference(name: str, method: str, targets: tuple) -> np.ndarray:
    side = torch_side(name)
    target = torch.tensor(targets)
    inputs, extra = side.inputs.clone().requires_grad_(), side.extra
    if method == "Gradient()":
        out = captum.Saliency(side.forward).attribute(inputs, target=target, abs=False, additional_forward_args=extra)
    elif method == "InputTimesGradient()":
        out = captum.InputXGradient(side.forward).attribute(inputs, target=target, additional_forward_args=extra)
    elif method.startswith("IntegratedGradients"):
        quadrature = method.split("'")[1]
        out = captum.IntegratedGradients(side.forward).attribute(
            inputs, baselines=0.0, target=target, additional_forward_args=extra, n_steps=STEPS, method=quadrature)
    elif method.startswith("SmoothGrad"):
        torch.manual_seed(0)
        out = captum.NoiseTunnel(captum.Saliency(side.forward)).attribute(
            inputs, nt_type="smoothgrad", nt_samples=NOISY_SAMPLES, stdevs=STDEV, target=target, abs=False,
            additional_forward_args=extra)
    else:
        raise KeyError(method)
    return out.detach().numpy()


def _ig(quadrature: str) -> str:
    return f"IntegratedGradients(steps={STEPS}, baseline=0.0, method='{quadrature}')"


METHODS = ["Gradient()", "InputTimesGradient()"] + [_ig(q) for q in QUADRATURES]


def _short(method: str) -> str:
    """A test id: ``IntegratedGradients-riemann_left``, ``SmoothGrad-2048``, ``Gradient``."""
    parsed = lrpc.methods.as_method(method)
    detail = {"IntegratedGradients": lambda m: m.method, "SmoothGrad": lambda m: f"{m.samples}x{m.stdev}"}
    return f"{parsed.name}-{detail[parsed.name](parsed)}" if parsed.name in detail else parsed.name


def _params(methods, cases=CASES):
    return [pytest.param(name, exporter, method, id=f"{name}-{exporter}-{_short(method)}")
            for name, exporter in cases for method in methods]


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, exporter, method", _params(METHODS))
def test_method_equals_captum(name, exporter, method, record_property):
    c = case(name, exporter)
    attribution, meta = run_lrpc(c, method)
    _check_meta(meta, method)
    assert attribution.shape == c.explained.shape
    error = relative_error(attribution, reference(name, method, tuple(c.targets.tolist())))
    record_property("relative_error", f"{error:.3e}")
    assert error < TOLERANCE, f"max|Δ|/max|ref| = {error:.2e}"


SMOOTH_ZERO = "SmoothGrad(samples=8, stdev=0.0)"


@pytest.mark.parametrize("name, exporter, method", _params([SMOOTH_ZERO]))
def test_smoothgrad_without_noise_is_the_gradient(name, exporter, method, record_property):
    c = case(name, exporter)
    attribution, meta = run_lrpc(c, method)
    _check_meta(meta, method)
    assert attribution.shape == c.explained.shape
    gradient, _ = run_lrpc(c, "Gradient()")
    saliency = reference(name, "Gradient()", tuple(c.targets.tolist()))
    error = relative_error(attribution, saliency)
    record_property("relative_error", f"{error:.3e}")
    assert error < TOLERANCE
    assert relative_error(attribution, gradient) < TOLERANCE


NOISY = f"SmoothGrad(samples={NOISY_SAMPLES}, stdev={STDEV}, seed=0)"


@pytest.mark.parametrize("name, exporter, method", _params([NOISY], [(m, e) for m in ("lenet", "gelu_mlp")
                                                                     for e in EXPORTERS]))
def test_smoothgrad_correlates_with_noise_tunnel(name, exporter, method, record_property):
    c = case(name, exporter)
    attribution, meta = run_lrpc(c, method)
    _check_meta(meta, method)
    assert attribution.shape == c.explained.shape
    expected = reference(name, method, tuple(c.targets.tolist()))
    ours, theirs = attribution.reshape(N, -1), expected.reshape(N, -1)
    correlations = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ours, theirs)]
    record_property("pearson", " ".join(f"{r:.4f}" for r in correlations))
    assert min(correlations) >= CORRELATION, correlations
    # the noise is there: the mean over noisy copies is not the plain gradient
    gradient = reference(name, "Gradient()", tuple(c.targets.tolist()))
    assert relative_error(attribution, gradient) > 1e-3
    assert relative_error(expected, gradient) > 1e-3


# GradCAM: per CNN, the torch module Captum's LayerGradCam hooks, for each way of naming the
# ONNX layer: its output tensor, its node, its flat layer index. Activation (Relu) nodes are not
# layers for lrpc (``find_layer``: "matches no layer"), so a ReLU's output is named by tensor.
GRADCAM_MODULES = {
    "lenet": {"tensor": "relu2", "node": "pool2", "index": "conv2"},
    "resnet": {"tensor": "layer2", "node": "layer2.downsample", "index": "layer2.bn2"},
}
GRADCAM_CASES = [(m, e) for m, e in CASES if m in CNNS]


def _gradcam_ref(c: Case, module_name: str, kind: str):
    """``(lrpc's layer reference, the torch module)``: the ONNX tensor equal to the module's
    output; for ``node`` / ``index`` the layer lrpc lists (``lrpc inspect``) with that output
    (lrpc names dynamo nodes after their module path and fuses BatchNormalization into the
    Conv before it, whose output the fused layer then writes)."""
    side = torch_side(c.name)
    module = side.model.get_submodule(module_name)
    activation = cm.module_output(side.model, module, c.feeds["input"])
    tensor, _ = cm.matching_tensor(c.data, c.feeds, activation)
    if kind == "tensor":
        return tensor, module
    layers = analyze_model(onnx.load_from_string(c.data), None, method="Gradient()", verbose=False).table.layers
    found = [layer for layer in layers if layer.output.name == tensor]
    assert len(found) == 1, (tensor, [(layer.name, layer.output.name) for layer in layers])
    return (found[0].name if kind == "node" else found[0].index), module


@pytest.mark.parametrize("kind", ["tensor", "node", "index"])
@pytest.mark.parametrize("name, exporter", GRADCAM_CASES)
def test_gradcam_equals_layer_gradcam(name, exporter, kind, record_property):
    c = case(name, exporter)
    layer, module = _gradcam_ref(c, GRADCAM_MODULES[name][kind], kind)
    method = f"GradCAM(layer={layer!r})"
    attribution, meta = run_lrpc(c, method)
    _check_meta(meta, method)
    side = torch_side(name)
    expected = captum.LayerGradCam(side.model, module).attribute(
        side.inputs.clone().requires_grad_(), target=torch.tensor(c.targets), relu_attributions=False).detach().numpy()
    assert expected.shape[:2] == (N, 1) and expected.ndim == 4
    assert attribution.shape == expected.shape
    error = relative_error(attribution, expected)
    record_property("relative_error", f"{error:.3e}")
    record_property("layer", repr(layer))
    assert error < TOLERANCE, f"max|Δ|/max|ref| = {error:.2e}"


def test_bert_reference_is_captums_layer_attribution():
    """The BERT reference (Captum on ``AtEmbedding``) is Captum's layer attribution at
    ``word_embeddings`` of the ids model: its gradient, and gradient × activation."""
    side = torch_side("bert")
    ids, mask = side.extra
    target = torch.tensor([0, 1, 2])

    def on_ids(ids, mask):
        return side.model(input_ids=ids, attention_mask=mask).logits

    layer = side.model.bert.embeddings.word_embeddings
    for times_input, method in ((False, "Gradient()"), (True, "InputTimesGradient()")):
        layer_ref = captum.LayerGradientXActivation(on_ids, layer, multiply_by_inputs=times_input).attribute(
            ids, target=target, additional_forward_args=(mask,))
        ours = reference("bert", method, (0, 1, 2))
        assert relative_error(layer_ref.detach().numpy(), ours) < 1e-6


def test_gradcam_takes_a_dynamo_files_own_node_name():
    c = case("lenet", "dynamo")
    proto = onnx.load_from_string(c.data)
    node = [n.name for n in proto.graph.node if n.op_type == "MaxPool"][1]  # lenet.pool2's, 'node_max_pool2d_1'
    attribution, _ = run_lrpc(c, f"GradCAM(layer={node!r})")
    side = torch_side("lenet")
    expected = captum.LayerGradCam(side.model, side.model.pool2).attribute(
        side.inputs.clone().requires_grad_(), target=torch.tensor(c.targets), relu_attributions=False)
    assert relative_error(attribution, expected.detach().numpy()) < TOLERANCE


# the explained input straight into a LayerNormalization (a pre-norm transformer without a
# position embedding): the batched rows must carry their shape into the copied normalization
@pytest.mark.parametrize("method", [_ig("gausslegendre"), SMOOTH_ZERO], ids=_short)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_layernorm_on_the_explained_input(exporter, method):
    model = cm.norm_first()
    x = np.random.default_rng(0).standard_normal((N, 4)).astype(np.float32)
    c = Case("norm_first", exporter, cm.export_bytes(model, x, exporter), {"input": x}, x,
             zoo.forward_numpy(model, x), np.array([0, 1, 2], dtype=np.int64))
    attribution, _ = run_lrpc(c, method)
    inputs = torch.from_numpy(x).requires_grad_()
    if method.startswith("Integrated"):
        expected = captum.IntegratedGradients(model).attribute(inputs, baselines=0.0, target=torch.tensor(c.targets),
                                                               n_steps=STEPS, method="gausslegendre")
    else:
        expected = captum.Saliency(model).attribute(inputs, target=torch.tensor(c.targets), abs=False)
    assert relative_error(attribution, expected.detach().numpy()) < TOLERANCE
