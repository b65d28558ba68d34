"""LRP rules as data over one generic formula.

For a layer ``f`` with input activations ``a``, parameters ``θ`` and output relevance
``R``, every rule here is an instance of

    z_g    = Σ_{t∈g} sign_t · f_{θ_t}(m_t(a))                 (one sum per group g)
    s_g    = gate_g(z) · R / modify_denominator(z_g)
    R_in   = Σ_g coeff_g · Σ_{t∈g} sign_t · m_t(a) ⊙ vjp_{f_{θ_t}}(s_g)

A *term* ``t`` is an input modifier ``m_t`` plus a parameter modifier ``θ_t``; a *group*
shares one denominator. Epsilon is one group of one term, ZPlus one group of two terms
(positive and negative inputs), AlphaBeta two groups (α and −β), ZBox one group of three
terms with signs (+, −, −). This is Zennit's ``BasicHook`` structure (input modifiers,
parameter modifiers, gradient mapper, reducer) written as data, so the emitter has no
per-rule code and a new rule is a new subclass with different hooks.

The hooks (``modify_input``, ``modify_parameters``, ``modify_weight``, ``modify_bias``,
``modify_layer``, ``modify_denominator``, ``is_compatible``) are those of
RelevancePropagation.jl; they receive :class:`lrpc.symbolic.Sym` tensors, so a rule
written in ordinary arithmetic becomes ONNX nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import validate
from .errors import ParameterError
from .spec import TRANSPARENT, Kind, Layer
from .symbolic import Emitter, Sym, add_all, stabilize


@dataclass
class Term:
    """One modified forward ``f_{θ_t}(m_t(a))`` of the generic formula."""

    input: Callable[[Sym], Sym]
    params: Callable[[dict], dict]
    sign: float = 1.0


@dataclass
class Group:
    """Terms that share one stabilized denominator."""

    terms: list[Term]
    coefficient: float = 1.0
    gate: str | None = None  # "gt" / "lt": only outputs whose plain z is > 0 / < 0


def _same(x):
    return x


class Rule:
    """Base class: one group with one term built from the modify_* hooks (LRP-0 family).

    Subclass and override hooks to write a new rule; override :meth:`groups` for rules
    with several terms. ``epsilon`` is the stabilizer of the denominator.
    """

    epsilon: float = 1e-9
    #: the rule changes parameters, so the layer must have a weight
    needs_weight: bool = False

    # -- hooks (RelevancePropagation.jl names) ---------------------------------------
    def modify_input(self, a: Sym) -> Sym:
        return a

    def modify_parameters(self, param: Sym) -> Sym:
        return param

    def modify_weight(self, weight: Sym) -> Sym:
        return self.modify_parameters(weight)

    def modify_bias(self, bias: Sym) -> Sym:
        return self.modify_parameters(bias)

    def modify_layer(self, params: dict) -> dict:
        return {
            role: self.modify_weight(p) if role == "weight" else self.modify_bias(p)
            for role, p in params.items()
        }

    def modify_denominator(self, z: Sym) -> Sym:
        return stabilize(z, self.epsilon)

    def is_compatible(self, layer: Layer) -> bool:
        if layer.spec.kind in TRANSPARENT:
            return False
        if self.needs_weight and not layer.has_weight:
            return False
        if not layer.spec.linear or layer.share < 1:
            # The generic formula needs f(m(a)) to be linear in m(a); for selecting ops
            # (MaxPool), the softmax and products of activations only rules that keep
            # the input as it is make sense.
            return not self.modifies_input
        return True

    def incompatibility(self, layer: Layer) -> str:
        if self.needs_weight and not layer.has_weight:
            return "it modifies weights and the layer has none"
        if not layer.spec.linear or layer.share < 1:
            return f"{layer.op_type} is not linear, only rules that keep the input unmodified apply"
        return "the rule does not support this layer"

    @property
    def modifies_input(self) -> bool:
        """True when some term feeds the layer something other than its own input."""
        for group in self.groups():
            for term in group.terms:
                fn = getattr(term.input, "__func__", term.input)
                if fn is not _same and fn is not Rule.modify_input:
                    return True
        return False

    # -- structure -------------------------------------------------------------------
    def groups(self) -> list[Group]:
        return [Group([Term(self.modify_input, self.modify_layer)])]

    def propagate(self, em: Emitter, layer: Layer, R: Sym) -> list[Sym]:
        """Relevance for each relevance-carrying input of ``layer`` (the generic formula)."""
        return propagate_generic(self, em, layer, R)

    # -- display ---------------------------------------------------------------------
    def _args(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


def propagate_generic(rule: Rule, em: Emitter, layer: Layer, R: Sym) -> list[Sym]:
    """The generic formula (module docstring). On a product of activations every factor
    gets ``layer.share`` of what the formula gives it: ``Σ_k a_k ⊙ vjp_k(s)`` is
    ``degree · z ⊙ s`` there, so equal shares conserve relevance (AttnLRP's uniform rule)."""
    spec = layer.spec
    acts = [Sym(em, layer.act(k), nonneg=_known_nonneg(layer.act(k)), batched=True) for k in range(len(layer.acts))]
    params = {role: em.sym(t, nonneg=_constant_sign(t, 1), nonpos=_constant_sign(t, -1))
              for role, t in layer.param_values.items()}
    plain_z: Sym | None = None

    def plain_output() -> Sym:
        nonlocal plain_z
        if plain_z is None:
            plain_z = em.sym(layer.output)
        return plain_z

    totals: list[list[Sym]] = [[] for _ in acts]
    for group in rule.groups():
        modified = []
        for term in group.terms:
            inputs = [term.input(a) for a in acts]
            theta = term.params(dict(params))
            modified.append((term, inputs, theta))
        zs = []
        for term, inputs, theta in modified:
            if all(x.is_zero for x in inputs) and all(theta.get(r) is None or theta[r].is_zero for r in ("bias",)):
                zs.append(None)  # a linear map of zeros without bias is zero
                continue
            if all(x is a for x, a in zip(inputs, acts)) and all(theta[r] is params[r] for r in params):
                z = plain_output()  # the rule's forward is the node's own forward: reuse it
            else:
                z = spec.run_forward(em, layer, inputs, theta)
            zs.append(z * term.sign if term.sign != 1.0 else z)
        live = [z for z in zs if z is not None]
        if not live:
            continue
        s = R / rule.modify_denominator(add_all(live))
        if group.gate is not None:
            s = s * plain_output().mask(group.gate)
        for (term, inputs, theta), z in zip(modified, zs):
            if z is None:
                continue
            grads = spec.vjp(em, layer, inputs, theta, s)
            for k, (x, g) in enumerate(zip(inputs, grads)):
                contribution = x * g
                scale = group.coefficient * term.sign * layer.share
                if scale != 1.0:
                    contribution = contribution * scale
                totals[k].append(contribution)
    return [add_all(t) if t else acts[k].zeros_like() for k, t in enumerate(totals)]


def _constant_sign(tensor, sign: int) -> bool:
    """A constant whose values are all >= 0 (sign 1) or all <= 0 (sign -1)."""
    values = getattr(tensor, "values", None)
    return values is not None and bool(np.all(sign * np.asarray(values) >= 0))


def _known_nonneg(tensor) -> bool:
    """True when the producer guarantees ``tensor >= 0`` (Relu, pooling of Relu, ...)."""
    seen = 0
    while tensor is not None and seen < 16:
        producers = getattr(tensor, "inputs", [])
        if not producers:
            return False
        node = producers[0]
        if node.op == "Relu":
            return True
        if node.op in ("MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Identity",
                       "Dropout", "Squeeze", "Unsqueeze", "Transpose", "GlobalMaxPool"):
            tensor = node.inputs[0]
            seen += 1
            continue
        if node.op == "Clip" and len(node.inputs) > 1 and node.inputs[1].name:
            low = getattr(node.inputs[1], "values", None)
            return low is not None and float(np.min(low)) >= 0
        return False
    return False


# -- parameter-modifier helpers ------------------------------------------------------


def _positive(x: Sym) -> Sym:
    return x.clamp(min=0)


def _negative(x: Sym) -> Sym:
    return x.clamp(max=0)


def _map_params(weight_fn, bias_fn=None):
    """A parameter modifier applying ``weight_fn`` to the weight and ``bias_fn`` (default:
    the same) to the bias; ``bias_fn="zero"`` drops the bias (Zennit's ``zero_bias``)."""

    def modify(params: dict) -> dict:
        out = {}
        for role, p in params.items():
            if role == "weight":
                out[role] = weight_fn(p)
            elif bias_fn == "zero":
                out[role] = p.zeros_like()
            else:
                out[role] = (bias_fn or weight_fn)(p)
        return out

    return modify


# -- the rules -----------------------------------------------------------------------


class ZeroRule(Rule):
    """LRP-0: ``R_j = Σ_i a_j w_ij / z_i · R_i`` (stabilized with 1e-9 only).

    On a selecting op (MaxPool) ``z_i`` *is* the winning ``a_j``, so ``a_j · R_i / z_i``
    is exactly ``R_i`` routed to the winner: emitted as that (winner takes all), which
    also keeps the relevance of windows whose maximum is 0.
    """

    def __init__(self):
        self.epsilon = 1e-9

    def propagate(self, em: Emitter, layer: Layer, R: Sym) -> list[Sym]:
        if layer.spec.selects:
            acts = [em.sym(layer.act(k)) for k in range(len(layer.acts))]
            return layer.spec.vjp(em, layer, acts, {}, R)
        return super().propagate(em, layer, R)


class EpsilonRule(Rule):
    """LRP-ε: the denominator is ``z + ε·sign(z)``."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = validate.number(f"{type(self).__name__}: epsilon", epsilon, positive=True)

    def _args(self):
        return {"epsilon": self.epsilon}


class GammaRule(Rule):
    """LRP-γ: parameters ``W + γW⁺`` and ``b + γb⁺`` on the unmodified input."""

    needs_weight = True

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6):
        self.gamma = validate.number(f"{type(self).__name__}: gamma", gamma, nonnegative=True)
        self.epsilon = validate.number(f"{type(self).__name__}: epsilon", epsilon, positive=True)

    def modify_parameters(self, param: Sym) -> Sym:
        return param + param.clamp(min=0) * self.gamma

    def _args(self):
        return {"gamma": self.gamma}


class WSquareRule(Rule):
    """LRP-w²: input replaced by ones, every parameter (bias too) squared."""

    needs_weight = True

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = validate.number(f"{type(self).__name__}: epsilon", epsilon, positive=True)

    def modify_input(self, a: Sym) -> Sym:
        return a.ones_like()

    def modify_parameters(self, param: Sym) -> Sym:
        return param**2


class FlatRule(Rule):
    """LRP-flat: input and weights replaced by ones, bias dropped."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = validate.number(f"{type(self).__name__}: epsilon", epsilon, positive=True)

    def modify_input(self, a: Sym) -> Sym:
        return a.ones_like()

    def modify_weight(self, weight: Sym) -> Sym:
        return weight.ones_like()

    def modify_bias(self, bias: Sym) -> Sym:
        return bias.zeros_like()


class PassRule(Rule):
    """Relevance passes through unchanged (identity, or the inverse reshape/permutation)."""

    def is_compatible(self, layer: Layer) -> bool:
        return layer.spec.route is not None and len(layer.acts) == 1

    def incompatibility(self, layer: Layer) -> str:
        return "PassRule only applies to single-input elementwise, reshaping and normalization layers"

    def propagate(self, em: Emitter, layer: Layer, R: Sym) -> list[Sym]:
        return layer.spec.route(em, layer, R)


class ZPlusRule(Rule):
    """LRP-z⁺ (Zennit's ``ZPlus``): ``a⁺`` with ``(W⁺, b⁺)`` plus ``a⁻`` with ``(W⁻, 0)``."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = validate.number(f"{type(self).__name__}: epsilon", epsilon, positive=True)

    def groups(self) -> list[Group]:
        return [Group([Term(_positive, _map_params(_positive)), Term(_negative, _map_params(_negative, "zero"))])]


class AlphaBetaRule(Rule):
    """LRP-αβ (Zennit's ``AlphaBeta``): ``α·R⁺ − β·R⁻`` with separate denominators; α − β = 1."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, epsilon: float = 1e-6):
        alpha = validate.number("AlphaBetaRule: alpha", alpha, nonnegative=True)
        beta = validate.number("AlphaBetaRule: beta", beta, nonnegative=True)
        if not np.isclose(alpha - beta, 1.0):
            raise ParameterError(f"AlphaBetaRule: alpha - beta must equal 1 (got alpha={alpha}, beta={beta})")
        self.alpha, self.beta = alpha, beta
        self.epsilon = validate.number("AlphaBetaRule: epsilon", epsilon, positive=True)

    def groups(self) -> list[Group]:
        positive = Group(
            [Term(_positive, _map_params(_positive)), Term(_negative, _map_params(_negative, "zero"))],
            coefficient=self.alpha,
        )
        negative = Group(
            [Term(_positive, _map_params(_negative)), Term(_negative, _map_params(_positive, "zero"))],
            coefficient=-self.beta,
        )
        return [positive, negative] if self.beta else [positive]

    def _args(self):
        return {"alpha": self.alpha, "beta": self.beta}


class GeneralizedGammaRule(Rule):
    """Generalized LRP-γ (Zennit's ``Gamma``): positive and negative inputs and outputs
    handled separately, ``W + γW⁺`` / ``W + γW⁻``; for LeakyReLU networks."""

    needs_weight = True

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6):
        self.gamma = validate.number(f"{type(self).__name__}: gamma", gamma, nonnegative=True)
        self.epsilon = validate.number(f"{type(self).__name__}: epsilon", epsilon, positive=True)

    def groups(self) -> list[Group]:
        g = self.gamma

        def plus(p):
            return p + p.clamp(min=0) * g

        def minus(p):
            return p + p.clamp(max=0) * g

        return [
            Group([Term(_positive, _map_params(plus)), Term(_negative, _map_params(minus, "zero"))], gate="gt"),
            Group([Term(_positive, _map_params(minus)), Term(_negative, _map_params(plus, "zero"))], gate="lt"),
        ]

    def _args(self):
        return {"gamma": self.gamma}


class ZBoxRule(Rule):
    """LRP-z^B for bounded inputs: ``low``/``high`` are scalars or arrays broadcast to the
    input (e.g. per-channel bounds shaped ``[1, C, 1, 1]``)."""

    needs_weight = True

    def __init__(self, low=0.0, high=1.0, epsilon: float = 1e-6):
        self.low = validate.finite_array("ZBoxRule: low", low)
        self.high = validate.finite_array("ZBoxRule: high", high)
        try:
            ordered = bool(np.all(self.low <= self.high))
        except ValueError:
            raise ParameterError(f"ZBoxRule: low {self.low.shape} and high {self.high.shape} do not broadcast") from None
        if not ordered:
            raise ParameterError("ZBoxRule: low must not exceed high")
        self.epsilon = validate.number("ZBoxRule: epsilon", epsilon, positive=True)

    def _bounds_fit(self, layer: Layer) -> bool:
        from .graph import static_shape

        shape = static_shape(layer.act())
        if shape is None:
            return True
        sample = tuple(1 if d is None else d for d in (1, *shape[1:]))
        for bound in (self.low, self.high):
            if bound.ndim > len(sample):
                return False
            for have, want in zip(reversed(bound.shape), reversed(sample)):
                if have not in (1, want) and want != 1:
                    return False
        return True

    def is_compatible(self, layer: Layer) -> bool:
        return super().is_compatible(layer) and self._bounds_fit(layer)

    def incompatibility(self, layer: Layer) -> str:
        if super().is_compatible(layer):
            from .graph import static_shape

            return (f"its bounds (low {list(self.low.shape)}, high {list(self.high.shape)}) do not broadcast to "
                    f"the layer's input {list(static_shape(layer.act()))} (give scalars or one value per channel "
                    "shaped [1, C, 1, 1])")
        return super().incompatibility(layer)

    def groups(self) -> list[Group]:
        def bound(value):
            def modify(a: Sym) -> Sym:
                # the bound broadcast to one sample's shape: f(bound) is then a constant
                # onnxruntime folds, shared by the whole batch
                em = a.em
                shape = a.value.shape
                static = shape is not None and all(isinstance(d, int) for d in shape[1:])
                target = em.ints([1, *shape[1:]]) if static else em.sample_shape(a.value)
                full = em.op("Expand", [em.const(value), target], dtype=em.dtype)
                return em.sym(full, nonneg=bool(np.all(value >= 0)))

            return modify

        return [
            Group(
                [
                    Term(_same, _same),
                    Term(bound(self.low), _map_params(_positive), sign=-1.0),
                    Term(bound(self.high), _map_params(_negative), sign=-1.0),
                ]
            )
        ]

    def _args(self):
        def show(v):
            return float(v) if v.ndim == 0 else v.tolist()

        return {"low": show(self.low), "high": show(self.high)}


class MergeRule(EpsilonRule):
    """The ε-rule for merges of branches (residual additions, concatenations): Zennit's
    ``Norm`` for ``Sum`` with the stabilizer as a knob (``--merge-epsilon``). Each branch
    gets relevance in proportion to what it added; a larger ε damps the relevance of
    near-cancelling sums, which makes deep residual networks' heatmaps steadier."""

    def is_compatible(self, layer: Layer) -> bool:
        return layer.spec.kind is Kind.MERGE

    def incompatibility(self, layer: Layer) -> str:
        return "MergeRule applies to Add, Sub, Sum and Concat"


class LayerNormRule(Rule):
    """LRP-LN (Ali et al. 2022, "XAI for Transformers: Better Explanations through
    Conservative Propagation"; AttnLRP, Achtibat et al. 2024): the normalization's σ is
    held at its forward value, so LayerNorm is the linear centring
    ``R_i = Σ_j a_i(δ_ij − 1/N) / Σ_l a_l(δ_lj − 1/N) · R_j`` followed by its affine part
    ``(γ, β)``, propagated together by the ε-rule (β absorbs its share). On RMSNorm
    (no centring) relevance passes through unchanged up to the stabilizer.

    Applies to LayerNormalization and RMSNormalization (the ops or the exporters'
    decomposed patterns). To give LayerNorm's affine part its own rule, compile with
    ``split_layernorm=True``.
    """

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = validate.number(f"{type(self).__name__}: epsilon", epsilon, positive=True)

    def is_compatible(self, layer: Layer) -> bool:
        return layer.spec.kind is Kind.NORMALIZATION and layer.spec.linear and layer.op_type != "BatchNormalization"

    def incompatibility(self, layer: Layer) -> str:
        return "LayerNormRule applies to LayerNormalization and RMSNorm layers"

    def _args(self):
        return {"epsilon": self.epsilon}


class TaylorRule(Rule):
    """The first-order Taylor expansion at the input, ``R_in = x ⊙ J(x)ᵀ (R ⊘ f(x))``, in
    an exact form the op provides (no stabilizer). On a softmax inside the network it is
    AttnLRP's rule ``R_in = x ⊙ (R − p ⊙ Σ R)`` (Achtibat et al. 2024, Prop. 3.1);
    masked positions (``p = 0``) receive 0."""

    def is_compatible(self, layer: Layer) -> bool:
        return layer.spec.taylor is not None

    def incompatibility(self, layer: Layer) -> str:
        return f"{layer.op_type} has no exact Taylor form (TaylorRule applies to Softmax)"

    def propagate(self, em: Emitter, layer: Layer, R: Sym) -> list[Sym]:
        return layer.spec.taylor(em, layer, R)


class ConstantGateRule(Rule):
    """CP-LRP's product rule (Ali et al. 2022): in a product of two activations, the
    gate (the attention probabilities of ``A·V``, the activated branch of a gated MLP) is
    held constant, so all relevance goes to the other factor by the ε-rule with the gate
    as its weight; the gate's branch (``Q·Kᵀ``, the softmax) receives none. Layers that
    are not such products get the ε-rule, products without a recognizable gate the
    uniform split."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = validate.number(f"{type(self).__name__}: epsilon", epsilon, positive=True)

    def propagate(self, em: Emitter, layer: Layer, R: Sym) -> list[Sym]:
        slot = layer.spec.gate(layer.node, layer.acts) if layer.spec.gate else None
        if slot is None:
            return propagate_generic(self, em, layer, R)
        signal = iter(propagate_generic(self, em, layer.holding_constant(slot), R))
        return [None if s == slot else next(signal) for s in layer.acts]

    def _args(self):
        return {"epsilon": self.epsilon}


class GradientRule(Rule):
    """The exact VJP of the layer: ``R_in = Jᵀ R``, no input times, no division. Every
    layer and every activation of a gradient method (:mod:`lrpc.methods`) takes it, so the
    backward pass is the model's true gradient; LRP composites do not use it."""

    def is_compatible(self, layer: Layer) -> bool:
        return layer.spec.exact_vjp is not None

    def incompatibility(self, layer: Layer) -> str:
        return f"no exact derivative of {layer.op_type} is known"

    def propagate(self, em: Emitter, layer: Layer, R: Sym) -> list[Sym]:
        vjp = layer.spec.exact_vjp
        acts = [em.sym(layer.act(k)) for k in range(len(layer.acts))]
        params = {role: em.sym(t) for role, t in layer.param_values.items()}
        return vjp(em, layer, acts, params, R)


#: every built-in rule, by name (the composite expression parser and TOML use this)
RULES = {
    cls.__name__: cls
    for cls in (
        ZeroRule, EpsilonRule, GammaRule, GeneralizedGammaRule, ZPlusRule, AlphaBetaRule,
        ZBoxRule, WSquareRule, FlatRule, PassRule, LayerNormRule, TaylorRule, ConstantGateRule, MergeRule,
    )
}
