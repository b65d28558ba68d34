"""Running a model in onnxruntime (quietly, on the CPU) and in other runtimes, for the
portability checks; the relative error the parity tests assert on."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest


def onnxruntime_run(model, feeds: dict, optimized: bool = True) -> list:
    """The outputs of ``model`` (bytes or ``ModelProto``) in onnxruntime's CPU provider;
    ``optimized=False`` runs the graph as written, without onnxruntime's fusions."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def relative_error(got, want) -> float:
    """``max |got − want| / max |want|``, in float64."""
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def openvino_run(model: bytes, feeds: dict) -> dict:
    """``{output name: value}`` of ``model`` in OpenVINO's CPU plugin, in full float32."""
    ov = pytest.importorskip("openvino")  # a dev dependency: present whenever make test runs
    core = ov.Core()
    # full float32 arithmetic: on CPUs with bf16 units OpenVINO would otherwise lower precision
    network = core.compile_model(core.read_model(model, b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = network.create_infer_request()
    request.infer({name: np.ascontiguousarray(value) for name, value in feeds.items()})
    return {out.get_any_name(): request.get_tensor(out).data.copy() for out in network.outputs}
