"""Canonizing passes: each a small function ``Program -> Program`` with its own test.

:func:`canonize` runs them in the order that lets each one rely on the previous:
function inlining, opset upgrade, shape inference, constant folding, Identity/Dropout
removal, constant arithmetic in affine form, per-channel affine and BatchNorm fusion into
the layer before, shape inference again (the emitter reads static shapes), choosing the
explained input (an integer input: its embedding), the relevance start (the logits before
a final Softmax/LogSoftmax) and, for sequence outputs, the explained position; optionally
LayerNorm split from its affine part; and last the exporter patterns fused into one op
(LayerNorm, RMSNorm, LRN, GELU, HardSwish, SiLU).
"""

from __future__ import annotations

from ..graph import Program
from .affine import constant_arithmetic_to_affine
from .batchnorm import fuse_affine, fuse_batchnorm
from .constants import fold_constants
from .functions import inline_functions
from .fusion import fuse_gelu, fuse_hardswish, fuse_layernorm, fuse_lrn, fuse_rmsnorm, fuse_silu
from .identity import remove_identity
from .io import choose_layout, select_input, strip_softmax
from .layernorm import split_layernorm
from .opset import upgrade_opset
from .activations import fuse_activations_by_value
from .shapes import infer_shapes

__all__ = [
    "canonize",
    "choose_layout",
    "constant_arithmetic_to_affine",
    "fold_constants",
    "fuse_affine",
    "fuse_batchnorm",
    "fuse_gelu",
    "fuse_hardswish",
    "fuse_layernorm",
    "fuse_lrn",
    "fuse_rmsnorm",
    "fuse_silu",
    "inline_functions",
    "fuse_activations_by_value",
    "infer_shapes",
    "remove_identity",
    "select_input",
    "split_layernorm",
    "strip_softmax",
    "upgrade_opset",
]


def canonize(program: Program, input_name: str | None = None, output_name: str | None = None,
             position: int | None = None, split_layernorms: bool = False,
             max_constant_bytes: int | None = None) -> Program:
    program = inline_functions(program)
    program = upgrade_opset(program)
    program = infer_shapes(program)
    program = fold_constants(program, max_constant_bytes)
    program = remove_identity(program)
    program = constant_arithmetic_to_affine(program)
    program = fuse_affine(program)
    program = fuse_batchnorm(program)
    program = infer_shapes(program)
    program = select_input(program, input_name)
    program = strip_softmax(program, output_name)
    program = choose_layout(program, position)
    if split_layernorms:
        program = split_layernorm(program)
    # pattern fusion comes last: fused nodes live only until the compiled model is written
    for fuse in (fuse_layernorm, fuse_rmsnorm, fuse_lrn, fuse_gelu, fuse_hardswish, fuse_silu,
                 fuse_activations_by_value):
        program = fuse(program)
    return program
