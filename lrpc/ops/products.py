"""Products of activations: which factor is a gate.

AttnLRP shares the relevance of a product equally among its factors (the generic
formula with ``OpSpec.multilinear``); CP-LRP holds one factor constant: the attention
probabilities of ``A·V`` or the activated branch of a gated MLP (``SiLU(x W_g) * x W_u``).
That factor is found from the graph: walking up through reshapes, casts and routing
ops, it comes from a Softmax or from an activation, and the other factor does not.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph import is_float

# ops that only move values: a gate stays a gate through them
_MOVERS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Gather", "Cast",
           "Identity", "Dropout", "Where", "Concat", "Split"}


def source_kind(tensor: gs.Tensor, limit: int = 12) -> str | None:
    """``"softmax"`` or ``"activation"`` when ``tensor`` is (a moved or rounded copy of) such
    an op's output, else None (a quantized model's roundings are activations themselves,
    and would hide what they round)."""
    from ..graph import rounded_from
    from ..registry import lookup
    from ..spec import Kind

    for _ in range(limit):
        if not isinstance(tensor, gs.Constant):
            tensor, _ = rounded_from(tensor)
        if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        spec = lookup(node.op)
        if spec is not None and spec.gradient_only:
            spec = None  # not an LRP op: no gate
        if spec is not None and spec.kind is Kind.SOFTMAX:
            return "softmax"
        if spec is not None and spec.kind is Kind.ACTIVATION:
            return "activation"
        if node.op not in _MOVERS:
            return None
        data = [t for t in node.inputs if not isinstance(t, gs.Constant) and is_float(t)]
        if not data:
            return None
        tensor = data[0] if node.op != "Where" else data[-1]
    return None


def gate_slot(node: gs.Node, acts: list[int]) -> int | None:
    """The input slot of a two-factor product that is its gate, or None: attention
    probabilities first, else the one activated factor."""
    if len(acts) != 2:
        return None
    kinds = {slot: source_kind(node.inputs[slot]) for slot in acts}
    for wanted in ("softmax", "activation"):
        hits = [slot for slot, kind in kinds.items() if kind == wanted]
        if len(hits) == 1:
            return hits[0]
        if hits:
            return None
    return None
