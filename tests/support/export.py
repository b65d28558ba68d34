"""ONNX export of torch models with the legacy (TorchScript) or the dynamo exporter.

The exported file is self-contained (no external data), has one input ``input`` and one output
``logits``, both with a symbolic batch dimension (``batch``). Legacy exports use opset 17, dynamo
exports opset 18.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import tempfile
import warnings

import numpy as np
import torch

INPUT_NAME = 'input'
OUTPUT_NAME = 'logits'
LEGACY_OPSET = 17
DYNAMO_OPSET = 18

_NOISY_LOGGERS = ('torch.onnx', 'torch.export', 'torch._dynamo', 'torch._export', 'torch.fx',
                  'torch._subclasses', 'torch.utils._sympy', 'torch.fx.experimental.symbolic_shapes',
                  'onnxscript', 'onnx_ir')


@contextlib.contextmanager
def _quiet():
    """Silence warnings, log records and stdout/stderr chatter of the exporters."""
    saved = {}
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter('ignore')
            yield sink
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def export_onnx(model: torch.nn.Module, x: np.ndarray, path, dynamo: bool,
                do_constant_folding: bool = True) -> str:
    """Export ``model`` (in eval mode) to ``path`` and return ``str(path)``.

    ``x`` is an example batch (numpy, float32). ``do_constant_folding`` only applies to the legacy
    exporter (``dynamo=False``): with folding, BatchNormalization is fused into the preceding Conv,
    without it the BatchNormalization nodes stay in the graph. The dynamo exporter always runs its
    optimizer, which fuses BatchNormalization into the Conv as well.
    """
    path = os.fspath(path)
    model = model.eval()
    example = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with _quiet() as log, torch.no_grad():
        try:
            if dynamo:
                # a batch of 1 would be specialised by torch.export: trace with at least 2 samples
                if example.shape[0] < 2:
                    example = example.repeat(2, *([1] * (example.dim() - 1)))
                batch = torch.export.Dim('batch')
                torch.onnx.export(
                    model, (example,), path,
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=DYNAMO_OPSET,
                    dynamic_shapes=({0: batch},),
                    external_data=False,
                    verbose=False,
                    report=False,
                )
            else:
                torch.onnx.export(
                    model, (example,), path,
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=LEGACY_OPSET,
                    dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}},
                    do_constant_folding=do_constant_folding,
                    verbose=False,
                )
        except Exception as error:
            raise RuntimeError(f'ONNX export failed (dynamo={dynamo}):\n{log.getvalue()}') from error
    return path


@functools.lru_cache(maxsize=None)
def zoo_onnx_bytes(name: str, seed: int = 0, dynamo: bool = False, do_constant_folding: bool = True,
                   zero_bias: bool = False) -> bytes:
    """Serialized ONNX export of zoo model ``name``, memoized per process (dynamo exports take ~1 s)."""
    from . import zoo

    model = zoo.build(name, seed)
    if zero_bias:
        zoo.zero_biases(model)
    with tempfile.TemporaryDirectory() as directory:
        path = export_onnx(model, zoo.example_input(name, 2), os.path.join(directory, f'{name}.onnx'),
                           dynamo=dynamo, do_constant_folding=do_constant_folding)
        with open(path, 'rb') as handle:
            return handle.read()


def export_zoo(name: str, path, seed: int = 0, dynamo: bool = False, do_constant_folding: bool = True,
               zero_bias: bool = False) -> str:
    """Write the (memoized) ONNX export of zoo model ``name`` to ``path``; returns ``str(path)``."""
    path = os.fspath(path)
    with open(path, 'wb') as handle:
        handle.write(zoo_onnx_bytes(name, seed, dynamo, do_constant_folding, zero_bias))
    return path


def _module_from_scope(node_name: str) -> str | None:
    """``'/layer2/downsample/downsample.0/Conv'`` -> ``'layer2.downsample.0'`` (legacy node names)."""
    if not node_name.startswith('/'):
        return None
    path: list[str] = []
    for part in node_name.strip('/').split('/')[:-1]:
        if path and part.startswith(path[-1] + '.'):
            path[-1] = part          # nested containers are named '<parent attr>.<child>'
        else:
            path.append(part)
    return '.'.join(path) or None


def parametric_nodes(model) -> list[tuple[str, str, str | None]]:
    """``(node name, op type, torch module name)`` for every Conv/Gemm/MatMul node, in graph order.

    ``model`` is an ``onnx.ModelProto`` or a path. The torch module name (as in
    ``model.named_modules()``) is recovered from the weight initializer name (``'<module>.weight'``,
    dynamo and unfolded legacy exports) or from the legacy node name scope (``'/<module path>/Conv'``,
    folded legacy exports, whose initializers are named ``'onnx::Conv_<n>'``).
    """
    import onnx

    proto = onnx.load(os.fspath(model)) if not isinstance(model, onnx.ModelProto) else model
    initializers = {init.name for init in proto.graph.initializer}
    rows = []
    for node in proto.graph.node:
        if node.op_type not in ('Conv', 'Gemm', 'MatMul'):
            continue
        module = None
        weight = node.input[1] if len(node.input) > 1 else ''
        if weight in initializers and weight.endswith('.weight'):
            module = weight[:-len('.weight')]
        if module is None:
            module = _module_from_scope(node.name)
        rows.append((node.name, node.op_type, module))
    return rows
