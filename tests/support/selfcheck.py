"""Self-checks of the reference infrastructure (run: ``python -m support.selfcheck`` from ``tests/``).

* every zoo model exports with both exporters, runs in onnxruntime with batch 1 and 3 and matches
  torch within 1e-4; the legacy export without constant folding keeps BatchNormalization; every
  Conv/Gemm node maps back to its torch module name;
* BatchNorm fusion and the Zennit residual ``Sum`` leave the model function unchanged;
* Zennit with Epsilon on all Linear layers of the MLP agrees with an independent numpy
  implementation of LRP-epsilon (and :class:`~support.zennit_ref.OriginalGamma` with a numpy
  LRP-gamma), and conserves relevance when all biases are zero.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from . import zoo
from .export import INPUT_NAME, export_onnx, parametric_nodes
from .zennit_ref import OriginalGamma, name_map_relevance, prepare, zennit

EXPORT_MODES = {
    'legacy': dict(dynamo=False, do_constant_folding=True),
    'legacy_nofold': dict(dynamo=False, do_constant_folding=False),
    'dynamo': dict(dynamo=True),
}


# --------------------------------------------------------------------------------------------------
# independent numpy LRP for the MLP
# --------------------------------------------------------------------------------------------------

def _stabilize(z: np.ndarray, eps: float) -> np.ndarray:
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def numpy_lrp_mlp(model: torch.nn.Module, x: np.ndarray, target, rule: str = 'epsilon',
                  eps: float = 1e-6, gamma: float = 0.25, normalize: bool = True) -> np.ndarray:
    """LRP in float64 numpy for a Sequential of Linear/ReLU layers.

    ``rule='epsilon'``: ``R_in = a * (W^T (R / stab(a W^T + b)))`` on every Linear layer.
    ``rule='gamma'``: the same with ``W + gamma W+`` and ``b + gamma b+`` (original LRP-gamma).
    Relevance passes ReLUs unchanged.
    """
    layers = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
              for m in model if isinstance(m, torch.nn.Linear)]
    activations = [np.asarray(x, dtype=np.float64)]
    for index, (weight, bias) in enumerate(layers):
        z = activations[-1] @ weight.T + bias
        activations.append(np.maximum(z, 0.0) if index < len(layers) - 1 else z)
    logits = activations[-1]
    n = logits.shape[0]
    index = logits.argmax(1) if target is None else np.broadcast_to(np.asarray(target), (n,))
    relevance = np.zeros_like(logits)
    relevance[np.arange(n), index] = 1.0 if normalize else logits[np.arange(n), index]
    for (weight, bias), a in zip(reversed(layers), reversed(activations[:-1])):
        if rule == 'gamma':
            weight = weight + gamma * np.maximum(weight, 0.0)
            bias = bias + gamma * np.maximum(bias, 0.0)
        elif rule != 'epsilon':
            raise ValueError(rule)
        z = a @ weight.T + bias
        relevance = a * ((relevance / _stabilize(z, eps)) @ weight)
    return relevance


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------

def check_exports(directory: str, names=zoo.MODEL_NAMES, tol: float = 1e-4) -> dict:
    """Export the zoo models ``names`` in every mode; returns ``{(model, mode): [op types]}``."""
    import onnx
    import onnxruntime as ort

    summary = {}
    for name in names:
        model = zoo.build(name, seed=0)
        for mode, kwargs in EXPORT_MODES.items():
            path = export_onnx(model, zoo.example_input(name, 1), os.path.join(directory, f'{name}_{mode}.onnx'),
                               **kwargs)
            proto = onnx.load(path)
            onnx.checker.check_model(proto, full_check=True)
            session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
            for batch in (1, 3):
                x = zoo.example_input(name, batch, seed=7)
                got = session.run(None, {INPUT_NAME: x})[0]
                want = zoo.forward_numpy(model, x)
                err = float(np.abs(got - want).max())
                assert err <= tol, f'{name}/{mode}/batch {batch}: max |onnx - torch| = {err}'
            ops = [node.op_type for node in proto.graph.node]
            modules = [row[2] for row in parametric_nodes(proto)]
            assert modules == zoo.parametric_layers(model), f'{name}/{mode}: layer names {modules}'
            if name == 'resnet' and mode == 'legacy_nofold':
                assert ops.count('BatchNormalization') == 6, ops
            summary[name, mode] = ops
    return summary


def check_reference_models(tol: float = 1e-5) -> None:
    """BN fusion + zennit Sum keep the model function (relative to the logit scale)."""
    for name in zoo.MODEL_NAMES:
        model = zoo.build(name, seed=3)
        x = zoo.example_input(name, 4, seed=3)
        want = zoo.forward_numpy(model, x)
        got = zoo.forward_numpy(prepare(model), x)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err <= tol, f'{name}: prepared model deviates by {err}'


def check_mlp_lrp(tol: float = 1e-5) -> None:
    """Zennit vs numpy on the MLP for LRP-epsilon and original LRP-gamma; conservation."""
    model = zoo.mlp(seed=1)
    x = zoo.example_input('mlp', 5, seed=2)
    linears = zoo.parametric_layers(model)
    cases = [('epsilon', lambda: zennit.rules.Epsilon(epsilon=1e-6)), ('gamma', lambda: OriginalGamma(0.25))]
    for rule, make in cases:
        for normalize in (True, False):
            rules = {name: make() for name in linears}
            ref = name_map_relevance(model, x, None, rules, normalize=normalize, double=True)
            got = numpy_lrp_mlp(model, x, None, rule=rule, normalize=normalize)
            err = float(np.abs(ref - got).max() / np.abs(got).max())
            assert err <= tol, f'mlp {rule} normalize={normalize}: zennit vs numpy rel. error {err}'
            ref32 = name_map_relevance(model, x, [0, 1, 2, 3, 4], rules, normalize=normalize)
            got32 = numpy_lrp_mlp(model, x, [0, 1, 2, 3, 4], rule=rule, normalize=normalize)
            err = float(np.abs(ref32 - got32).max() / np.abs(got32).max())
            assert err <= tol, f'mlp {rule} float32: zennit vs numpy rel. error {err}'

    zero = zoo.zero_biases(zoo.mlp(seed=1))
    rules = {name: zennit.rules.Epsilon(epsilon=1e-6) for name in linears}
    sums = name_map_relevance(zero, x, None, rules).sum(axis=1)
    assert np.allclose(sums, 1.0, atol=1e-4), sums


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        summary = check_exports(directory)
    for (name, mode), ops in summary.items():
        print(f'{name:8s} {mode:14s} {" ".join(ops)}')
    check_reference_models()
    check_mlp_lrp()
    print('support self-checks passed')


if __name__ == '__main__':
    main()
