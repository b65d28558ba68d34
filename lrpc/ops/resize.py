"""Resize: resampling is linear in its input, whatever the mode.

Along each resized axis the output is ``A · x`` with a fixed interpolation matrix ``A``
(``[out, in]``: nearest picks one input, linear two, cubic four, antialiased ones more);
the axes are separable, so the VJP applies ``Aᵀ`` axis by axis. ``A`` is computed at
compile time by onnxruntime's own Resize applied to the identity, with the node's own
attributes and scale, so every mode, coordinate transformation, cubic coefficient,
``exclude_outside`` and ``antialias`` is the runtime's. That needs the input's spatial
sizes and the scales (or sizes) to be static; without static sizes, nearest upsampling by
integer factors (a block copy) still works: its VJP sums each block.

The CNN presets give Resize the PassRule (``Aᵀ R``: each output's relevance shared among
the inputs it interpolates by the interpolation weights), which is what Zennit's gradient
through ``nn.Upsample`` does; under the ε- or z-rule it is ``x ⊙ Aᵀ (R / A x)``. For a
nearest copy the two agree.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import constant_value, static_shape
from ..spec import Kind, OpSpec, text_attr, vjp_route

# (coordinate_transformation_mode, nearest_mode) pairs under which an integer upscale
# copies each input into a whole block of outputs
_BLOCK_COPY = {
    ("asymmetric", "floor"),
    ("half_pixel", "round_prefer_floor"), ("half_pixel", "round_prefer_ceil"),
    ("pytorch_half_pixel", "round_prefer_floor"), ("pytorch_half_pixel", "round_prefer_ceil"),
}
#: attributes the per-axis matrices are computed with (the rest say how scales map to axes)
_INTERPOLATION_ATTRS = ("mode", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside",
                        "extrapolation_value", "nearest_mode", "antialias")


def _scales(node: gs.Node) -> list[float] | str:
    """The scale per axis (given, or output size over input size), or why there is none."""
    found = _scales_and_sizes(node)
    return found if isinstance(found, str) else found[0]


def _scales_and_sizes(node: gs.Node) -> tuple[list[float], list[int] | None] | str:
    """The scale per axis and, where the node gives sizes, the size per axis."""
    in_shape = static_shape(node.inputs[0])
    if in_shape is None:
        return "input rank is unknown"
    rank = len(in_shape)
    scales = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    sizes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    axes = node.attrs.get("axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    per_axis = [1.0] * rank
    if scales is not None and scales.size:
        for a, v in zip(axes, scales):
            per_axis[a] = float(v)
        return per_axis, None
    if sizes is None:
        return "its scales are not constant"
    if text_attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        return "sizes with a kept aspect ratio"
    out_sizes = list(in_shape)
    for a, v in zip(axes, sizes):
        if in_shape[a] is None:
            return "sizes given for a dynamic axis"
        per_axis[a] = float(v) / float(in_shape[a])
        out_sizes[a] = int(v)
    return per_axis, out_sizes


def _resampled_axes(node: gs.Node) -> dict[int, tuple[int, float, int | None]] | str:
    """``{axis: (input length, scale, output size where sizes are given)}`` for every axis
    the op changes, or why not."""
    found = _scales_and_sizes(node)
    if isinstance(found, str):
        return found
    scales, sizes = found
    in_shape = static_shape(node.inputs[0])
    out = {a: (in_shape[a], s, None if sizes is None else sizes[a]) for a, s in enumerate(scales) if s != 1.0}
    if any(a < 2 for a in out):
        return "only spatial resampling is supported"
    return out


def _interpolation(node: gs.Node, length: int, scale: float, size: int | None) -> np.ndarray:
    """``A`` ``[out, in]`` of one axis: onnxruntime's Resize of the identity, with the
    node's scale (or its size, which is how the node states it then)."""
    attrs = tuple(sorted((k, v.decode() if isinstance(v, bytes) else v) for k, v in node.attrs.items()
                         if k in _INTERPOLATION_ATTRS))
    return _matrix(attrs, int(length), float(scale), size)


@functools.lru_cache(maxsize=256)
def _matrix(attrs: tuple, length: int, scale: float, size: int | None) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if size is None:
        inputs, value = ["x", "", "scales"], np.array([1, 1, 1, scale], np.float32)
    else:
        inputs, value = ["x", "", "", "scales"], np.array([length, 1, 1, size], np.int64)
    node = helper.make_node("Resize", inputs, ["y"], **dict(attrs))
    graph = helper.make_graph([node], "interpolation", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(value, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    basis = np.eye(length, dtype=np.float32).reshape(length, 1, 1, length)
    out = session.run(None, {"x": basis})[0]  # [in, 1, 1, out]: row i is A's column i
    return np.ascontiguousarray(out[:, 0, 0, :].T)


#: the largest interpolation matrix written into the relevance pass (a 4096 → 8192 axis
#: is 128 MiB); a file asking for more is refused rather than allocated
MAX_MATRIX_BYTES = 256 * 2**20


def _matrices_known(node: gs.Node) -> bool:
    axes = _resampled_axes(node)
    return not isinstance(axes, str) and all(isinstance(n, int) for n, _, _ in axes.values())


def _matrix_bytes(node: gs.Node) -> int:
    """The bytes of the largest of the node's interpolation matrices."""
    largest = 0
    for length, scale, size in _resampled_axes(node).values():
        out = size if size is not None else int(np.floor(length * scale))
        largest = max(largest, 4 * int(length) * max(out, 1))
    return largest


def _block_factors(node: gs.Node) -> list[int] | str:
    """Integer upsampling factors of a nearest block copy, or why it is not one."""
    scales = _scales(node)
    if isinstance(scales, str):
        return scales
    if any(f < 1 or f != int(f) for f in scales):
        return f"only integer upsampling factors are supported where the input's sizes are dynamic (got {scales})"
    if scales[:2] != [1.0, 1.0]:
        return "only spatial resampling is supported"
    modes = (text_attr(node, "coordinate_transformation_mode", "half_pixel"),
             text_attr(node, "nearest_mode", "round_prefer_floor"))
    if text_attr(node, "mode", "nearest") != "nearest" or (modes not in _BLOCK_COPY and any(f > 1 for f in scales)):
        return "the input's spatial sizes are dynamic (an interpolation matrix needs them)"
    return [int(f) for f in scales]


def _resize_check(node: gs.Node, acts: list[int]) -> str | None:
    if acts != [0]:
        return "relevance must enter through the data input"
    mode = text_attr(node, "mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        return f"unknown mode {mode!r}"
    if text_attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        return "coordinate mode 'tf_crop_and_resize' (a crop by a region of interest)"
    axes = _resampled_axes(node)
    if isinstance(axes, str):
        return axes
    if _matrices_known(node):
        size = _matrix_bytes(node)
        if size > MAX_MATRIX_BYTES:
            return f"an interpolation matrix of {size:,} bytes (over {MAX_MATRIX_BYTES:,})"
        return None
    factors = _block_factors(node)
    return factors if isinstance(factors, str) else None


def _resize_vjp(em, layer, inputs, params, s):
    """``Aᵀ`` along each resized axis (the axis moved last, a MatMul with ``A``); without
    static sizes, a nearest block copy's blocks summed (an average pool times the block)."""
    node = layer.node
    if not _matrices_known(node):
        factors = _block_factors(node)[2:]
        block = float(np.prod(factors))
        if block == 1:
            return [s]
        pooled = em.op("AveragePool", [s], {"kernel_shape": factors, "strides": factors}, dtype=em.dtype)
        return [em.sym(pooled) * block]
    rank = len(static_shape(node.inputs[0]))
    g = s
    for axis, (length, scale, size) in sorted(_resampled_axes(node).items()):
        matrix = em.const(_interpolation(node, length, scale, size))
        if axis == rank - 1:
            g = em.sym(em.op("MatMul", [g, matrix], dtype=em.dtype))
            continue
        perm = list(range(rank))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        moved = em.op("Transpose", [g], {"perm": perm}, dtype=em.dtype)
        g = em.sym(em.op("Transpose", [em.op("MatMul", [moved, matrix], dtype=em.dtype)], {"perm": perm},
                         dtype=em.dtype))
    return [g]


SPECS = [OpSpec("Resize", Kind.RESHAPING, _resize_vjp, route=vjp_route, check=_resize_check)]
