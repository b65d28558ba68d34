"""Ops that move values around: Concat, Split, Slice, Pad, reshapes and permutations."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import static_shape
from ..spec import Kind, OpSpec, first_input_only, identity_route, identity_vjp, text_attr, vjp_route
from .elementwise import unbroadcast
from .pooling import reshape_back


def _concat_vjp(em, layer, inputs, params, s):
    node = layer.node
    rank = len(static_shape(layer.output))
    axis = int(node.attrs["axis"]) % rank
    sizes = [em.op("Shape", [t], {"start": axis, "end": axis + 1}, dtype=np.int64) for t in node.inputs]
    split = em.op("Concat", sizes, {"axis": 0}, dtype=np.int64)
    parts = em.op("Split", [s, split], {"axis": axis}, num_outputs=len(node.inputs), dtype=em.dtype)
    parts = parts if isinstance(parts, list) else [parts]
    return [em.sym(parts[slot]) for slot in layer.acts]


def _rank_known(node: gs.Node, acts: list[int]) -> str | None:
    if static_shape(node.outputs[0]) is None:
        return "output rank is unknown"
    return None


def _split_route(em, layer, relevances: list) -> list:
    """Split's relevance is the concatenation of its outputs' (zeros where none arrived)."""
    node = layer.node
    rank = len(static_shape(layer.act()))
    axis = int(node.attrs.get("axis", 0)) % rank
    parts = [r if r is not None else em.sym(out).zeros_like() for r, out in zip(relevances, node.outputs)]
    return [em.sym(em.op("Concat", parts, {"axis": axis}, dtype=em.dtype))]


def _split_check(node: gs.Node, acts: list[int]) -> str | None:
    if static_shape(node.inputs[0]) is None:
        return "input rank is unknown"
    return first_input_only(node, acts)


def _reshape_vjp(em, layer, inputs, params, s):
    return [reshape_back(em, layer, s)]


def _transpose_vjp(em, layer, inputs, params, s):
    perm = layer.node.attrs.get("perm")
    if perm is None:
        perm = list(reversed(range(len(static_shape(layer.act())))))
    inverse = [int(i) for i in np.argsort(perm)]
    return [em.sym(em.op("Transpose", [s], {"perm": inverse}, dtype=em.dtype))]


def _scatter_back(em, layer, s, select):
    """The VJP of an op that picks input elements (Slice, Gather): ``select`` applied to a
    tensor of flat indices shaped like the input says where each output came from, and
    ``s`` is scatter-added there (any starts/ends/steps, negative or repeated indices)."""
    a = layer.act()
    shape = em.shape_of(a)
    count = em.op("ReduceProd", [shape], {"keepdims": 0}, dtype=np.int64)
    flat_index = em.op("Range", [em.const(0, np.int64), count, em.const(1, np.int64)], dtype=np.int64)
    picked = select(em.op("Reshape", [flat_index, shape], dtype=np.int64))
    flat = em.ints([-1])
    zeros = em.filled(em.op("Reshape", [count, em.ints([1])], dtype=np.int64), 0.0)
    scattered = em.op(
        "ScatterElements",
        [zeros, em.op("Reshape", [picked, flat], dtype=np.int64), em.op("Reshape", [s, flat], dtype=em.dtype)],
        {"axis": 0, "reduction": "add"},
        dtype=em.dtype,
    )
    return [em.sym(em.op("Reshape", [scattered, shape], dtype=em.dtype))]


def _picking_vjp(em, layer, inputs, params, s, others=None):
    """The VJP of an op that picks input elements, replayed on the input's flat indices with
    the node's own other inputs (``others``: where the data's dtype is in them) and
    attributes: Slice, Gather on an activation (the class token, the last position),
    GatherElements (DeBERTa's relative-position scores), Pad copying values into its border."""
    node = layer.node
    rest = list(node.inputs[1:]) if others is None else others
    return _scatter_back(em, layer, s, lambda index: em.op(node.op, [index, *rest], dict(node.attrs), dtype=np.int64))


def _expand_vjp(em, layer, inputs, params, s):
    """Broadcasting copies: the copies' relevance sums back onto the original."""
    return [unbroadcast(em, s, layer, 0)]


def _slice_check(node: gs.Node, acts: list[int]) -> str | None:
    # starts/ends may be computed from shapes at run time: the VJP replays the same Slice
    return first_input_only(node, acts)


#: Pad's modes: constant fills a border that took no input; the others copy input values
#: out into it (mirrored, repeated from the edge, wrapped around)
PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_check(node: gs.Node, acts: list[int]) -> str | None:
    # pads may be computed from shapes at run time (Swin's window padding): the VJP replays them
    if acts != [0]:
        return "relevance must enter through the data input"
    mode = text_attr(node, "mode", "constant")
    if mode not in PAD_MODES:
        return f"unknown padding mode {mode!r}"
    if static_shape(node.inputs[0]) is None:
        return "input rank is unknown"
    return None


def _pad_vjp(em, layer, inputs, params, s):
    """constant: the padded border took no input, and padding by the negated amounts crops
    it off again (where the pads were negative, a crop, it pads the cut-off part back with
    zeros). reflect / edge / wrap copy input values into the border: the same Pad of the
    input's flat indices says where each output came from, and ``s`` is scatter-added
    there (a mirrored border element adds to the one it mirrors). The amounts are the
    forward's own tensors, so pads computed at run time replay."""
    node = layer.node
    axes = [node.inputs[3]] if len(node.inputs) > 3 and node.inputs[3].name else []  # opset 18's axes
    mode = text_attr(node, "mode", "constant")
    if mode != "constant":  # the index tensor's pad value is an int (the data's is a float)
        return _picking_vjp(em, layer, inputs, params, s,
                            [node.inputs[1], *([em.const(0, np.int64), *axes] if axes else [])])
    back = [s, em.op("Neg", [node.inputs[1]], dtype=np.int64)]
    if axes:
        back += [em.const(0.0), *axes]
    return [em.sym(em.op("Pad", back, {"mode": "constant"}, dtype=em.dtype))]


def _expand_check(node: gs.Node, acts: list[int]) -> str | None:
    if static_shape(node.inputs[0]) is None or static_shape(node.outputs[0]) is None:
        return "input or output rank is unknown"
    return first_input_only(node, acts)


def _cast_check(node: gs.Node, acts: list[int]) -> str | None:
    from onnx import helper

    to = np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if to.kind != "f":
        return f"relevance cannot pass a cast to {to}"
    return None


SPECS = [
    OpSpec("Cast", Kind.ROUTING, identity_vjp, route=identity_route, check=_cast_check),
    OpSpec("Concat", Kind.MERGE, _concat_vjp, check=_rank_known),
    OpSpec("Split", Kind.ROUTING, route_outputs=_split_route, check=_split_check),
    OpSpec("Slice", Kind.RESHAPING, _picking_vjp, route=vjp_route, check=_slice_check),
    OpSpec("Gather", Kind.RESHAPING, _picking_vjp, route=vjp_route, check=first_input_only),
    OpSpec("GatherElements", Kind.RESHAPING, _picking_vjp, route=vjp_route, check=first_input_only),
    OpSpec("Expand", Kind.RESHAPING, _expand_vjp, route=vjp_route, check=_expand_check),
    OpSpec("Pad", Kind.RESHAPING, _pad_vjp, route=vjp_route, check=_pad_check),
    OpSpec("Reshape", Kind.RESHAPING, _reshape_vjp, route=vjp_route, check=first_input_only),
    OpSpec("Flatten", Kind.RESHAPING, _reshape_vjp, route=vjp_route, check=first_input_only),
    OpSpec("Squeeze", Kind.RESHAPING, _reshape_vjp, route=vjp_route, check=first_input_only),
    OpSpec("Unsqueeze", Kind.RESHAPING, _reshape_vjp, route=vjp_route, check=first_input_only),
    OpSpec("Transpose", Kind.RESHAPING, _transpose_vjp, route=vjp_route, check=_rank_known),
    OpSpec("Identity", Kind.RESHAPING, identity_vjp, route=identity_route),
    OpSpec("Dropout", Kind.DROPOUT, identity_vjp, route=identity_route, check=first_input_only),
]
