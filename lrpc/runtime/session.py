"""onnxruntime sessions for compiled models: CUDA when available, else CPU."""

from __future__ import annotations

import onnx


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def default_providers() -> list[str]:
    providers = available_providers()
    preferred = [p for p in ("CUDAExecutionProvider",) if p in providers]
    return preferred + ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto | str | bytes, providers: list[str] | None = None, threads: int | None = None):
    """An InferenceSession with full graph optimization (folds the rule-modified weights once)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(payload, sess_options=options, providers=providers or default_providers())
