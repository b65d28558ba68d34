"""``lrpc export triton``: a compiled file as a Triton model repository entry.

Triton's own onnxruntime backend then serves the file with no Python in the request path:
``REPO/NAME/config.pbtxt`` plus ``REPO/NAME/1/model.onnx``. The config declares the
model's inputs and outputs with their per-sample shapes, ``lrp_target`` as one INT64 per
row (reshaped to the file's ``[N]``; optional when the file gives it a default), dynamic
batching, and the instance kind (``KIND_GPU`` with ``gpu=True``).
"""
from __future__ import annotations

from pathlib import Path

import onnx

from .emit import REGION_NAME, TARGET_NAME
from .errors import LrpcError
from .files import OutputFolder, save_model

# ONNX element types as Triton names them
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def _tensor_entry(value: onnx.ValueInfoProto, batched: bool, optional: bool = False) -> str:
    kind = value.type.tensor_type
    if not value.type.HasField("tensor_type") or kind.elem_type not in _TRITON_TYPES:
        raise LrpcError(f"{value.name!r}: Triton has no tensor type for it")
    dims = _dims(value)
    if not dims:
        raise LrpcError(f"{value.name!r}: a tensor without a batch dimension cannot be batched")
    lines = [f'    name: "{value.name}"', f"    data_type: {_TRITON_TYPES[kind.elem_type]}"]
    if not batched:  # the file's own shape, batch axis included
        lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
    elif len(dims) == 1:  # one value per row: Triton needs a dimension, the file has none
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    else:
        lines.append(f"    dims: [ {', '.join(str(d) for d in dims[1:])} ]")
    if optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def model_config(model: onnx.ModelProto, name: str, max_batch_size: int = 64, queue_delay_us: int = 2000,
                 gpu: bool = False, instances: int = 1) -> str:
    """The ``config.pbtxt`` text for a compiled model. A model exported with a fixed batch
    size cannot take Triton's batches: it gets ``max_batch_size: 0`` (each request is one
    call of the model's own shape) and no dynamic batching."""
    if max_batch_size < 1:
        raise LrpcError(f"max_batch_size must be at least 1, got {max_batch_size}")
    defaults = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in defaults or i.name in (TARGET_NAME, REGION_NAME)]
    batched = all(_dims(i)[:1] == [-1] for i in inputs if i.name not in (TARGET_NAME, REGION_NAME))
    entries = [_tensor_entry(i, batched, optional=i.name in defaults) for i in inputs]
    outputs = [_tensor_entry(o, batched) for o in model.graph.output]
    return "\n".join([
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size if batched else 0}",
        "input [\n" + ",\n".join(entries) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
        *([f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}"] if batched else []),
        f"instance_group [ {{ kind: {'KIND_GPU' if gpu else 'KIND_CPU'} count: {instances} }} ]",
        "",
    ])


def export_triton(model_path, repository, name: str = "lrpc", **config) -> Path:
    """Write ``repository/name/{config.pbtxt, 1/model.onnx}``; an earlier export of the same
    name is replaced as a whole. Returns the model's folder."""
    from .runtime.analyzer import load_compiled

    model = load_compiled(model_path)
    if not name or "/" in name or name in (".", ".."):
        raise LrpcError(f"--model-name {name!r}: give a plain folder name")
    text = model_config(model, name, **config)
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise LrpcError(f"{repository}: exists and is not a folder")
    repository.mkdir(parents=True, exist_ok=True)
    target = repository / name
    with OutputFolder(target, marker="config.pbtxt") as tmp:
        (tmp / "config.pbtxt").write_text(text)
        save_model(model, tmp / "1" / "model.onnx")
    return target
