"""Symbolic tensors: numpy-like Python that writes ONNX nodes.

Rules and VJPs are written against :class:`Sym`, a thin wrapper around an
onnx-graphsurgeon tensor. Arithmetic on a ``Sym`` appends the matching ONNX node to the
graph being built, so a rule written in plain Python (``w + gamma * w.clamp(min=0)``)
becomes part of the compiled file. Operations on initializers stay operations (not
pre-computed copies): onnxruntime folds them once when the session starts, so the file
does not grow by modified weight copies.

A ``Sym`` also carries two facts the emitter uses to skip work:

- ``nonneg`` / ``nonpos``: the value is known to be >= 0 (a Relu output, ones, ...) or
  <= 0 (``clamp(max=0)``), so ``clamp(max=0)`` of a non-negative value is zero and a
  stabilizer needs no sign test;
- ``kind``: ``"zero"`` or ``"one"`` for symbolic constants that need no node at all until
  something asks for their value.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import numpy as np
import onnx_graphsurgeon as gs


class Emitter:
    """Appends nodes to a graph under a common name prefix."""

    def __init__(self, graph: gs.Graph, dtype=np.float32, prefix: str = "lrp"):
        self.graph = graph
        self.dtype = np.dtype(dtype)
        self.prefix = prefix
        self._counter = itertools.count()
        self._consts: dict[tuple, gs.Constant] = {}
        # Common-subexpression cache: rules ask for W⁺ or Shape(a) many times; every op
        # emitted here is deterministic, so equal (op, inputs, attrs) give one node.
        self._memo: dict[tuple, object] = {}

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._counter)}"

    def op(
        self,
        op_type: str,
        inputs: Sequence,
        attrs: dict | None = None,
        num_outputs: int = 1,
        dtype=None,
        hint: str | None = None,
    ):
        """Append one node; returns its output variable (or list of them)."""
        ins = [_tensor(x) for x in inputs]
        key = (op_type, tuple(id(t) for t in ins), repr(sorted((attrs or {}).items())), num_outputs)
        if key in self._memo:
            return self._memo[key]
        name = self.fresh(hint or op_type)
        outs = [gs.Variable(f"{name}:{i}", dtype=dtype) for i in range(num_outputs)]
        node = gs.Node(op=op_type, name=name, attrs=dict(attrs or {}), inputs=ins, outputs=outs)
        self.graph.nodes.append(node)
        result = outs[0] if num_outputs == 1 else outs
        self._memo[key] = result
        return result

    def cast(self, value, dtype):
        """``value`` as ``dtype`` (a Cast node)."""
        return self.op("Cast", [value], {"to": _onnx_dtype(dtype)}, dtype=dtype)

    def const(self, value, dtype=None) -> gs.Constant:
        """A (cached) initializer for a small constant."""
        arr = np.asarray(value, dtype=dtype if dtype is not None else self.dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = gs.Constant(self.fresh("const"), arr)
        return self._consts[key]

    def ints(self, values: Iterable[int]) -> gs.Constant:
        return self.const(np.asarray(list(values), dtype=np.int64), dtype=np.int64)

    def sym(self, tensor, nonneg: bool = False, nonpos: bool = False) -> "Sym":
        return Sym(self, tensor, nonneg=nonneg, nonpos=nonpos)

    def filled(self, shape, value: float):
        """``ConstantOfShape``: a tensor of the given runtime shape filled with ``value``."""
        fill = gs.Constant(self.fresh("fill"), np.array([value], dtype=self.dtype))
        return self.op("ConstantOfShape", [shape], {"value": fill}, dtype=self.dtype, hint="filled")

    # -- shape helpers used by several VJPs -------------------------------------------
    def shape_of(self, x) -> gs.Variable:
        return self.op("Shape", [x], dtype=np.int64)

    def sample_shape(self, x):
        """``[1, *x.shape[1:]]``: one sample's shape, for values shared by the whole batch."""
        return self.op("Concat", [self.ints([1]), self.dims_of(x, 1)], {"axis": 0}, dtype=np.int64)

    def dims_of(self, x, start: int, end: int | None = None) -> gs.Variable:
        attrs = {"start": start} if end is None else {"start": start, "end": end}
        return self.op("Shape", [x], attrs, dtype=np.int64)


def _static(tensor) -> tuple | None:
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return None
    return tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape)


def _tensor(x):
    if isinstance(x, Sym):
        return x.value
    return x


class Sym:
    """A symbolic tensor bound to an :class:`Emitter`."""

    __slots__ = ("em", "_tensor", "nonneg", "nonpos", "kind", "like", "batched")

    def __init__(self, em: Emitter, tensor=None, nonneg: bool = False, kind: str = "tensor", like=None,
                 batched: bool = False, nonpos: bool = False):
        self.em = em
        self._tensor = tensor
        self.nonneg = nonneg or kind in ("zero", "one")
        self.nonpos = nonpos or kind == "zero"
        self.kind = kind  # "tensor" | "zero" | "one"
        self.like = like  # for zero/one: the tensor whose shape they take
        # an activation with a batch axis: its ones/zeros are the same for every sample,
        # so they are made once ([1, ...]) and broadcast, which makes f(ones) a constant
        self.batched = batched

    # -- materialization -------------------------------------------------------------
    @property
    def value(self):
        """The graph tensor; symbolic zeros/ones get a node only when needed."""
        if self._tensor is None:
            fill = 0.0 if self.kind == "zero" else 1.0
            like = _tensor(self.like)
            shape = _static(like)
            # ConstantOfShape of a constant shape: onnxruntime folds it at session start,
            # and the file stores no array of ones
            if self.like.batched and shape is not None and None not in shape[1:]:
                self._tensor = self.em.filled(self.em.ints([1, *shape[1:]]), fill)
            elif not self.like.batched and shape is not None and None not in shape:
                self._tensor = self.em.filled(self.em.ints(shape), fill)
            else:
                dims = self.em.sample_shape(like) if self.like.batched else self.em.shape_of(like)
                self._tensor = self.em.filled(dims, fill)
        return self._tensor

    @property
    def is_zero(self) -> bool:
        return self.kind == "zero"

    @property
    def is_one(self) -> bool:
        return self.kind == "one"

    def _wrap(self, tensor, nonneg=False, nonpos=False) -> "Sym":
        return Sym(self.em, tensor, nonneg=nonneg, nonpos=nonpos)

    def _coerce(self, other) -> "Sym":
        if isinstance(other, Sym):
            return other
        value = np.asarray(other)
        return Sym(self.em, self.em.const(other), nonneg=bool(np.all(value >= 0)), nonpos=bool(np.all(value <= 0)))

    def _binary(self, op_type, other, nonneg=False, nonpos=False) -> "Sym":
        other = self._coerce(other)
        return self._wrap(self.em.op(op_type, [self, other], dtype=self.em.dtype), nonneg=nonneg, nonpos=nonpos)

    # -- arithmetic ------------------------------------------------------------------
    def __add__(self, other):
        other = self._coerce(other)
        if other.is_zero:
            return self
        if self.is_zero:
            return other
        return self._binary("Add", other, nonneg=self.nonneg and other.nonneg, nonpos=self.nonpos and other.nonpos)

    __radd__ = __add__

    def __sub__(self, other):
        other = self._coerce(other)
        if other.is_zero:
            return self
        if self.is_zero:
            return -other
        return self._binary("Sub", other)

    def __rsub__(self, other):
        return self._coerce(other) - self

    def __mul__(self, other):
        other = self._coerce(other)
        if self.is_zero or other.is_zero:
            return self if self.is_zero else other
        if other.is_one:
            return self
        if self.is_one:
            return other
        return self._binary("Mul", other, nonneg=same_sign(self, other), nonpos=opposite_sign(self, other))

    __rmul__ = __mul__

    def __truediv__(self, other):
        other = self._coerce(other)
        if self.is_zero:
            return self
        return self._binary("Div", other, nonneg=self.nonneg and other.nonneg)

    def __neg__(self):
        if self.is_zero:
            return self
        return self._wrap(self.em.op("Neg", [self], dtype=self.em.dtype), nonneg=self.nonpos, nonpos=self.nonneg)

    def __pow__(self, exponent):
        if exponent == 2:
            if self.is_zero or self.is_one:
                return self
            return self._wrap(self.em.op("Mul", [self, self], dtype=self.em.dtype), nonneg=True)
        return self._binary("Pow", exponent)

    def clamp(self, min=None, max=None) -> "Sym":
        """Elementwise clamp, written as Relu where possible (the cheapest kernel)."""
        if min == 0 and max is None:
            if self.nonneg:
                return self
            return self._wrap(self.em.op("Relu", [self], dtype=self.em.dtype), nonneg=True)
        if max == 0 and min is None:
            if self.nonneg:
                return self.zeros_like()
            return -((-self).clamp(min=0))
        out = self
        if min is not None:
            out = out._binary("Max", min, nonneg=min >= 0)
        if max is not None:
            out = out._binary("Min", max, nonneg=out.nonneg)
        return out

    def sum(self, axes: Sequence[int], keepdims: bool = True) -> "Sym":
        """``ReduceSum`` over ``axes`` (axes as an input: every opset from 13 on)."""
        em = self.em
        out = em.op("ReduceSum", [self, em.ints(axes)], {"keepdims": int(keepdims)}, dtype=em.dtype)
        return self._wrap(out, nonneg=self.nonneg, nonpos=self.nonpos)

    def mean(self, axes: Sequence[int], shape_of=None) -> "Sym":
        """Mean over ``axes`` (kept): ``ReduceSum`` times ``1/count``, whatever the opset.
        ``shape_of``: a tensor of the same shape whose static shape gives the count."""
        shape = _static(shape_of if shape_of is not None else self.value)
        if shape is not None and all(shape[a] is not None for a in axes):
            count = float(np.prod([shape[a] for a in axes]))
            return self.sum(axes) * (1.0 / count)
        em = self.em
        dims = em.op("Gather", [em.shape_of(self), em.ints(axes)], {"axis": 0}, dtype=np.int64)
        count = em.op("ReduceProd", [dims], {"keepdims": 0}, dtype=np.int64)
        return self.sum(axes) / self._wrap(em.op("Cast", [count], {"to": _onnx_dtype(em.dtype)}, dtype=em.dtype),
                                           nonneg=True)

    def where(self, condition, other) -> "Sym":
        """``self`` where the boolean tensor ``condition`` holds, else ``other``."""
        other = self._coerce(other)
        if self.is_zero:
            self = self._coerce(0.0)
        return self._wrap(self.em.op("Where", [condition, self, other], dtype=self.em.dtype))

    def positive(self) -> "Sym":
        return self.clamp(min=0)

    def negative(self) -> "Sym":
        return self.clamp(max=0)

    def abs(self) -> "Sym":
        return self._wrap(self.em.op("Abs", [self], dtype=self.em.dtype), nonneg=True)

    def sign(self) -> "Sym":
        return self._wrap(self.em.op("Sign", [self], dtype=self.em.dtype))

    def ones_like(self) -> "Sym":
        return Sym(self.em, kind="one", like=self)

    def zeros_like(self) -> "Sym":
        return Sym(self.em, kind="zero", like=self)

    def mask(self, comparison: str) -> "Sym":
        """1.0 where ``self <comparison> 0`` holds, else 0.0 (``"gt"``, ``"lt"``, ``"eq"``, ``"ge"``)."""
        op_type = {"gt": "Greater", "lt": "Less", "eq": "Equal", "ge": "GreaterOrEqual"}[comparison]
        flag = self.em.op(op_type, [self, self.em.const(0.0)], dtype=np.bool_)
        return self._wrap(self.em.op("Cast", [flag], {"to": _onnx_dtype(self.em.dtype)}, dtype=self.em.dtype), nonneg=True)


def _onnx_dtype(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def same_sign(*syms: Sym) -> bool:
    """A product of these is >= 0: all non-negative, or all non-positive (of an even count)."""
    return all(s.nonneg for s in syms) or (len(syms) % 2 == 0 and all(s.nonpos for s in syms))


def opposite_sign(a: Sym, b: Sym) -> bool:
    """``a * b`` is <= 0."""
    return (a.nonneg and b.nonpos) or (a.nonpos and b.nonneg)


def add_all(terms: Sequence[Sym]) -> Sym:
    """Sum of symbolic tensors, skipping symbolic zeros (one Sum node for three or more)."""
    live = [t for t in terms if not t.is_zero]
    if not live:
        return terms[0]
    if len(live) == 1:
        return live[0]
    if len(live) == 2:
        return live[0] + live[1]
    em = live[0].em
    return Sym(em, em.op("Sum", live, dtype=em.dtype), nonneg=all(t.nonneg for t in live))


def stabilize(z: Sym, epsilon: float) -> Sym:
    """``z + eps * (sign(z) + [z == 0])``: the stabilizer of Zennit and RelevancePropagation.jl.

    Written as ``(z - eps) + 2 eps [z >= 0]``: the same values, and on onnxruntime's CPU
    provider 2x faster than Sign/Equal and 6x faster than Where (measured on 6.4M floats:
    16 ms vs 32 ms vs 92 ms). Known non-negative ``z`` (ZPlus) just gets ``+ eps``.
    """
    if epsilon == 0:
        return z
    if z.nonneg:
        return z + epsilon
    return (z - epsilon) + z.mask("ge") * (2.0 * epsilon)
