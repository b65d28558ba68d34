"""onnxruntime sessions for compiled models: the providers asked for, else CUDA when
available, else the CPU."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx

from ..errors import LrpcError, ModelLoadError

#: short names for ``--providers`` (full onnxruntime names work too)
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}


class ProviderWarning(UserWarning):
    """An execution provider was asked for but this onnxruntime does not offer it."""


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def default_providers() -> list[str]:
    providers = available_providers()
    preferred = [p for p in ("CUDAExecutionProvider",) if p in providers]
    return preferred + ["CPUExecutionProvider"]


def resolve_providers(requested) -> list[str]:
    """``["cuda", "cpu"]`` / ``"cuda,cpu"`` / full names -> the providers to use, in order.
    One asked for but not offered here is left out with a :class:`ProviderWarning`; the CPU
    always comes last, so a session can always be made."""
    if requested is None:
        return default_providers()
    if isinstance(requested, str):
        requested = [p for p in requested.split(",") if p.strip()]
    offered = available_providers()
    chosen = []
    for name in requested:
        full = PROVIDER_NAMES.get(str(name).strip().lower(), str(name).strip())
        if full not in PROVIDER_NAMES.values() and not full.endswith("ExecutionProvider"):
            raise LrpcError(f"unknown execution provider {name!r}; give one of {', '.join(PROVIDER_NAMES)} "
                            "or an onnxruntime provider name")
        if full in offered:
            chosen.append(full)
        else:
            warnings.warn(ProviderWarning(f"{full} is not available in this onnxruntime "
                                          f"({', '.join(offered)}); using the CPU"), stacklevel=3)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return list(dict.fromkeys(chosen))


def reads_product_weights_twice(model: onnx.ModelProto, share: float = 0.5) -> bool:
    """True when at least ``share`` of the weight bytes are constant right factors of a
    ``MatMul`` or ``Gemm`` that another node reads too (a compiled transformer: its
    relevance pass multiplies by the same weights)."""
    from onnx import helper

    sizes = {}
    for t in model.graph.initializer:
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 4
        count = 1
        for d in t.dims:
            count *= d
        sizes[t.name] = count * itemsize
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            if name in sizes:
                readers[name] = readers.get(name, 0) + 1
    shared = {node.input[1] for node in model.graph.node
              if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and readers.get(node.input[1], 0) > 1}
    total = sum(sizes.values())
    return total > 0 and sum(sizes[name] for name in shared) >= share * total


#: metadata key of a compiled file: "false" when its sessions should not pack weights
PACK_WEIGHTS_KEY = "lrpc.pack_weights"


def packs_weights(model: onnx.ModelProto) -> bool:
    """Whether a session of ``model`` should let onnxruntime pack its product weights: the
    compiled file says so (``lrpc.pack_weights``, decided when it was compiled), else decided
    from the graph."""
    metadata = {p.key: p.value for p in model.metadata_props}
    if PACK_WEIGHTS_KEY in metadata:
        return metadata[PACK_WEIGHTS_KEY] != "false"
    return not reads_product_weights_twice(model)


def make_session(model: onnx.ModelProto | str | Path | bytes, providers=None, threads: int | None = None,
                 metadata: dict | None = None):
    """An InferenceSession with full graph optimization (folds the rule-modified weights once)
    and without onnxruntime's memory pattern (see below).

    A path is handed to onnxruntime as it is (the file's metadata, read without its graph,
    says whether to pack weights): a session made from a ``ModelProto`` costs its serialized
    bytes on top, and onnxruntime keeps more of a model given as bytes than of one it reads
    itself (a compiled GPT-2 6 x 768: 0.97 against 0.52 GiB resident, BENCHMARKS.md). Errors
    onnxruntime raises for a path come back as one line. A ``ModelProto`` too large for one
    protobuf message is handed over as a file with external data. ``metadata``: a path's
    metadata when the caller has read it already."""
    import onnxruntime as ort

    from ..files import EXTERNAL_DATA_THRESHOLD, _weight_bytes, read_metadata, save_model

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # onnxruntime's memory pattern plans one arena block for the whole run: for a compiled
    # file, whose forward activations all live until the relevance pass reads them, that
    # plan is 1.5x the peak of allocating as it goes (ResNet-50, batch 8: 2.35 against 1.5
    # GiB) at the same speed (BENCHMARKS.md, "Peak memory")
    options.enable_mem_pattern = False
    by_path = isinstance(model, (str, os.PathLike))
    if by_path:
        pack = (read_metadata(model) if metadata is None else metadata).get(PACK_WEIGHTS_KEY) != "false"
    else:
        pack = not isinstance(model, onnx.ModelProto) or packs_weights(model)
    if not pack:
        # onnxruntime packs each constant right factor of a MatMul/Gemm into a copy of its own; the
        # relevance pass reads the same weights as left factors, so the originals stay too:
        # a transformer's file then holds its product weights twice (GPT-2 6 x 768 at T = 256:
        # 1.39 against 1.01 GiB, 6 % slower unpacked; BENCHMARKS.md). Convolutions keep it.
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        if int(threads) < 1:
            raise LrpcError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = int(threads)
    chosen = resolve_providers(providers)
    if by_path:
        try:
            return ort.InferenceSession(str(model), sess_options=options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            text = str(exc).strip().splitlines()
            raise ModelLoadError(f"{model}: onnxruntime cannot open it ({text[0] if text else type(exc).__name__})"
                                 ) from None
    if isinstance(model, onnx.ModelProto) and _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        with tempfile.TemporaryDirectory(prefix="lrpc-session-") as folder:
            path = save_model(model, Path(folder) / "model.onnx", external_data=True)
            return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    payload = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(payload, sess_options=options, providers=chosen)
