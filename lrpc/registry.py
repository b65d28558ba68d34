"""The support registry: op type -> :class:`~lrpc.spec.OpSpec`, and how users extend it.

The built-in specs live in :mod:`lrpc.ops` (one module per family). ``register_layer``
and ``register_activation`` are RelevancePropagation.jl's ``LRP_CONFIG.supports_layer``
and ``LRP_CONFIG.supports_activation``.
"""

from __future__ import annotations

from dataclasses import replace

from .ops import ACTIVATIONS, BUILTIN
from .ops.elementwise import activation_spec
from .spec import Forward, Kind, Layer, OpSpec, Route, Vjp  # noqa: F401  (re-exported)

#: Elementwise non-linearities the check names as activations rather than unknown layers.
KNOWN_ACTIVATION_NAMES = {"Softsign", "ThresholdedRelu", "Shrink", "Erf", "Sin", "Cos", "Exp", "Log"}

REGISTRY: dict[str, OpSpec] = {spec.op_type: spec for spec in BUILTIN}
_DEFAULTS = dict(REGISTRY)


def register_layer(
    op_type: str,
    *,
    like: str | None = None,
    vjp: Vjp | None = None,
    forward: Forward | None = None,
    kind: Kind | str = Kind.LINEAR,
    params=None,
    linear: bool = True,
    route: Route | None = None,
    derivative: Vjp | None = None,
) -> OpSpec:
    """Tell lrpc how relevance flows through ``op_type`` (LRP_CONFIG.supports_layer).

    ``like="Reshape"`` reuses a supported op's treatment; otherwise give ``vjp``: a
    function ``(emitter, layer, inputs, params, s) -> [gradient per relevance input]``
    written with :class:`lrpc.symbolic.Sym` arithmetic. ``linear=False`` with a ``vjp``
    that linearizes the op: give its exact VJP as ``derivative`` for the gradient methods.
    """
    if like is not None:
        if like not in REGISTRY:
            raise KeyError(f"register_layer: {like!r} is not a supported op type")
        spec = replace(REGISTRY[like], op_type=op_type)
    else:
        if vjp is None:
            raise TypeError("register_layer needs like= or vjp=")
        spec = OpSpec(op_type, Kind(kind), vjp, forward=forward, params=params, linear=linear, route=route,
                      derivative=derivative)
    REGISTRY[op_type] = spec
    return spec


def register_activation(op_type: str, derivative=None) -> OpSpec:
    """Treat ``op_type`` as a ReLU-like activation (LRP_CONFIG.supports_activation).

    ``derivative``: ``(emitter, x, y, node) -> f'(x)`` in :class:`lrpc.symbolic.Sym`
    arithmetic, for the gradient methods (without one they refuse the op)."""
    spec = activation_spec(op_type, derivative)
    REGISTRY[op_type] = spec
    return spec


def unregister(op_type: str) -> None:
    """Forget a registration (built-in ops return to their default treatment)."""
    REGISTRY.pop(op_type, None)
    if op_type in _DEFAULTS:
        REGISTRY[op_type] = _DEFAULTS[op_type]


def lookup(op_type: str) -> OpSpec | None:
    return REGISTRY.get(op_type)


__all__ = ["ACTIVATIONS", "KNOWN_ACTIVATION_NAMES", "REGISTRY", "lookup", "register_activation", "register_layer",
           "unregister"]
