"""Sliding-window geometry shared by Conv and pooling VJPs (a ConvTranspose each)."""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedModelError
from ..graph import static_shape
from ..spec import Layer, int_list, text_attr
from ..symbolic import Emitter, Sym


def spatial_pads(node, in_spatial, kernel, strides, dilations) -> list[int]:
    """Explicit [begin..., end...] pads, resolving ``auto_pad`` from static shapes."""
    auto = text_attr(node, "auto_pad", "NOTSET")
    n = len(kernel)
    if auto in ("NOTSET", ""):
        return int_list(node, "pads", [0] * (2 * n))
    if auto == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for i in range(n):
        out = -(-in_spatial[i] // strides[i])
        total = max((out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - in_spatial[i], 0)
        small = total // 2
        begin = small if auto == "SAME_UPPER" else total - small
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def _spatial(tensor):
    shape = static_shape(tensor)
    if shape is None or len(shape) < 3 or None in shape[2:]:
        return None
    return list(shape[2:])


def transposed_window(em: Emitter, layer: Layer, s: Sym, weight, kernel, group: int) -> Sym:
    """ConvTranspose of ``s`` with the layer's window geometry: the VJP of a windowed op.

    With static spatial sizes, ``output_padding`` makes the result exactly the input's
    size (a negative one, from ceil_mode windows past the input, becomes a crop). With
    dynamic sizes the largest padding (stride - 1) is used and the result is cropped to
    the input's runtime shape.
    """
    node = layer.node
    n = len(kernel)
    strides = int_list(node, "strides", [1] * n)
    dilations = int_list(node, "dilations", [1] * n)
    in_sp, out_sp = _spatial(layer.act()), _spatial(layer.output)
    attrs = {"kernel_shape": list(kernel), "strides": strides, "dilations": dilations, "group": group}
    axes = em.ints(range(2, 2 + n))
    if in_sp is not None and out_sp is not None:
        pads = spatial_pads(node, in_sp, kernel, strides, dilations)
        padding = [
            in_sp[i] - ((out_sp[i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - pads[i] - pads[i + n])
            for i in range(n)
        ]
        attrs.update(pads=pads, output_padding=[max(p, 0) for p in padding])
        out = em.op("ConvTranspose", [s, weight], attrs, dtype=em.dtype)
        if any(p < 0 for p in padding):
            out = em.op("Slice", [out, em.ints([0] * n), em.ints(in_sp), axes], dtype=em.dtype)
        return em.sym(out)
    if text_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        raise UnsupportedModelError(
            f"{layer.describe()}: auto_pad {text_attr(node, 'auto_pad', '')} needs a static height/width"
        )
    pads = spatial_pads(node, None, kernel, strides, dilations)
    attrs.update(pads=pads, output_padding=[st - 1 for st in strides])
    out = em.op("ConvTranspose", [s, weight], attrs, dtype=em.dtype)
    if any(st > 1 for st in strides) or int(node.attrs.get("ceil_mode", 0)):
        ends = em.dims_of(layer.act(), 2)
        out = em.op("Slice", [out, em.ints([0] * n), ends, axes], dtype=em.dtype)
    return em.sym(out)


def ones_like_spatial(em: Emitter, layer: Layer):
    """A ``[1, 1, H, W]`` tensor of ones with the input's spatial size (static or not)."""
    in_sp = _spatial(layer.act())
    if in_sp is not None:
        return em.const(np.ones((1, 1, *in_sp)))
    shape = em.op("Concat", [em.ints([1, 1]), em.dims_of(layer.act(), 2)], {"axis": 0}, dtype=np.int64)
    return em.filled(shape, 1.0)
