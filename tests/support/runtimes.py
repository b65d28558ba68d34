"""Running a compiled file in other runtimes than onnxruntime, for the portability checks."""

from __future__ import annotations

import numpy as np
import pytest


def openvino_run(model: bytes, feeds: dict) -> dict:
    """``{output name: value}`` of ``model`` in OpenVINO's CPU plugin, in full float32."""
    ov = pytest.importorskip("openvino")  # a dev dependency: present whenever make test runs
    core = ov.Core()
    # full float32 arithmetic: on CPUs with bf16 units OpenVINO would otherwise lower precision
    network = core.compile_model(core.read_model(model, b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = network.create_infer_request()
    request.infer({name: np.ascontiguousarray(value) for name, value in feeds.items()})
    return {out.get_any_name(): request.get_tensor(out).data.copy() for out in network.outputs}
