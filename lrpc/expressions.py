"""Composite expressions from the command line and rules files, parsed with ``ast``.

Only lrpc's own names can be called: presets, rules, composite primitives and layer
groups; arguments are literals (numbers, strings, lists/tuples, dicts with op-type or
group keys). Nothing is ever evaluated as Python.

    EpsilonPlusFlat
    EpsilonGammaBox(low=-3.0, high=3.0)
    Composite(GlobalMap(EpsilonRule(epsilon=1e-9)))
    Composite(GlobalTypeMap({ConvLayer: ZPlusRule(), "Gemm": EpsilonRule()}), FirstLayerMap(FlatRule()))
"""

from __future__ import annotations

import ast
import math
import tomllib
from pathlib import Path

from .composites import GROUPS, PRESETS, PRIMITIVES, Composite, GlobalMap, LayerMap, Primitive, RangeMap
from .composites import FirstLayerMap, LastLayerMap, GlobalTypeMap
from .errors import CompositeSyntaxError, LrpcError
from .rules import RULES, Rule

CALLABLES = {**PRESETS, **PRIMITIVES, **RULES, "Composite": Composite, "range": range}

#: bounds checked before parsing: an expression is a few lines, never megabytes deep
MAX_LENGTH = 20_000
MAX_DEPTH = 64
MAX_INTEGER = 2**63


def parse_composite(text: str) -> Composite:
    """A preset name, a preset call, a ``Composite(...)`` or a single rule (applied globally)."""
    value = _parse(text)
    if callable(value) and getattr(value, "__name__", "") in PRESETS:
        value = _call(value, [], {}, text)
    if isinstance(value, Rule):
        return Composite(GlobalMap(value))
    if not isinstance(value, Composite):
        raise CompositeSyntaxError(f"composite expression must give a composite or a rule, got {type(value).__name__}: {text!r}")
    return value


def parse_rule(text: str) -> Rule:
    value = _parse(text)
    if isinstance(value, type) and issubclass(value, Rule):
        value = _call(value, [], {}, text)
    if not isinstance(value, Rule):
        raise CompositeSyntaxError(f"expected a rule such as EpsilonRule(epsilon=1e-6), got {text!r}")
    return value


def parse_method(text: str):
    """A gradient method: ``Gradient``, ``SmoothGrad(samples=50, stdev=0.1)``,
    ``IntegratedGradients(steps=32, method="riemann_trapezoid")``, ``GradCAM(layer=5)``."""
    from .methods import METHODS, Method

    value = _parse(text, METHODS)
    if isinstance(value, type) and issubclass(value, Method):
        value = _call(value, [], {}, text)
    if not isinstance(value, Method):
        raise CompositeSyntaxError(f"expected a method ({', '.join(METHODS)}), got {text!r}")
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise CompositeSyntaxError(f"{where} must be a string such as \"EpsilonRule(epsilon=1e-6)\", got {value!r}")
    return value


def _parse(text: str, names: dict | None = None):
    if not isinstance(text, str):
        raise CompositeSyntaxError(f"a composite expression must be a string, got {type(text).__name__}")
    shown = text if len(text) <= 80 else text[:77] + "..."
    if len(text) > MAX_LENGTH:
        raise CompositeSyntaxError(f"composite expression too long ({len(text)} characters, at most {MAX_LENGTH})")
    if _nesting(text) > MAX_DEPTH:
        raise CompositeSyntaxError(f"composite expression nested too deeply (more than {MAX_DEPTH} levels): {shown!r}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise CompositeSyntaxError(f"malformed composite expression {shown!r}: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise CompositeSyntaxError(f"composite expression too complex to parse: {shown!r}") from None
    try:
        return _value(tree.body, shown, CALLABLES if names is None else names)
    except RecursionError:
        raise CompositeSyntaxError(f"composite expression nested too deeply: {shown!r}") from None


def _nesting(text: str) -> int:
    """Deepest bracket nesting, and runs of unary signs (``- - - 1`` nests as deeply)."""
    depth = deepest = signs = 0
    for char in text:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
        if char in "+-~":
            signs += 1
            deepest = max(deepest, depth + signs)
        elif not char.isspace():
            signs = 0
    return deepest


def _value(node: ast.AST, text: str, names: dict):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)) or (
        isinstance(node, ast.Constant) and node.value is None
    ):
        value = node.value
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_INTEGER:
            raise CompositeSyntaxError(f"the number {str(value)[:20]}... is too large in {text!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CompositeSyntaxError(f"numbers must be finite (got {value}) in {text!r}")
        return value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand, text, names)
        if not isinstance(operand, (int, float)):
            raise CompositeSyntaxError(f"unary sign on a non-number in {text!r}")
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e, text, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise CompositeSyntaxError(f"**mappings are not allowed in {text!r}")
        result = {}
        for k, v in zip(node.keys, node.values):
            key = _value(k, text, names)
            try:
                if key in result:
                    raise CompositeSyntaxError(f"the key {key!r} is given twice in {text!r}")
            except TypeError:
                raise CompositeSyntaxError(f"{key!r} cannot be a dict key in {text!r}") from None
            result[key] = _value(v, text, names)
        return result
    if isinstance(node, ast.Name):
        if names is CALLABLES and node.id in GROUPS:
            return GROUPS[node.id]
        if node.id in names:
            return names[node.id]
        raise CompositeSyntaxError(f"unknown name {node.id!r} in {text!r}")
    if isinstance(node, ast.Call):
        func = _value(node.func, text, names)
        if not callable(func) or isinstance(node.func, ast.Call):
            raise CompositeSyntaxError(f"cannot call {ast.unparse(node.func)!r} in {text!r}")
        args = [_value(a, text, names) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise CompositeSyntaxError(f"**kwargs are not allowed in {text!r}")
            kwargs[kw.arg] = _value(kw.value, text, names)
        value = _call(func, args, kwargs, text)
        return _strict(value) if isinstance(value, Primitive) else value
    raise CompositeSyntaxError(f"unsupported syntax {ast.unparse(node)!r} in {text!r}")


def _call(func, args, kwargs, text):
    name = getattr(func, "__name__", str(func))
    try:
        return func(*args, **kwargs)
    except LrpcError as exc:
        raise CompositeSyntaxError(f"{exc} (in {text!r})") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise CompositeSyntaxError(f"{name}: {exc} (in {text!r})") from None


def load_rules_file(path) -> Composite:
    """A TOML rules file::

        composite = "EpsilonPlusFlat"          # optional starting point (any expression)

        [[rule]]                                # applied in order, later ones win
        layers = "/classifier/*"                # index, node name or glob; or
        # type = "Conv"  (op type or group)   range = [0, 3]   first = true   last = true
        rule = "EpsilonRule(epsilon=1e-9)"
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CompositeSyntaxError(f"{path}: no such rules file") from None
    except IsADirectoryError:
        raise CompositeSyntaxError(f"{path}: is a directory, not a rules file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CompositeSyntaxError(f"{path}: not a valid TOML rules file ({exc})") from None
    unknown = set(data) - {"composite", "rule", "default"}
    if unknown:
        raise CompositeSyntaxError(f"{path}: unknown keys {sorted(unknown)} (allowed: composite, default, [[rule]])")
    entries = data.get("rule", [])
    if not isinstance(entries, list):
        raise CompositeSyntaxError(f"{path}: 'rule' must be a list of [[rule]] tables")
    base = parse_composite(_text(data["composite"], f"{path}: composite")) if "composite" in data else Composite()
    primitives = list(base.primitives)
    for i, entry in enumerate(entries):
        where = f"{path}: [[rule]] #{i + 1}"
        try:
            primitives.append(_rule_entry(entry, where))
        except LrpcError as exc:
            if isinstance(exc, CompositeSyntaxError):
                raise
            raise CompositeSyntaxError(f"{where}: {exc}") from None
    default = parse_rule(_text(data["default"], f"{path}: default")) if "default" in data else base.default
    return Composite(*primitives, default=default, name=None)


_SELECTORS = ("layers", "type", "range", "first", "last")


def _rule_entry(entry, where: str):
    """One ``[[rule]]`` table as a primitive. Every key is checked: a typo must not turn a
    rule for one layer into a rule for all of them."""
    if not isinstance(entry, dict) or "rule" not in entry:
        raise CompositeSyntaxError(f"{where}: needs a 'rule' key")
    unknown = set(entry) - {"rule", *_SELECTORS}
    if unknown:
        raise CompositeSyntaxError(f"{where}: unknown keys {sorted(unknown)} (allowed: rule, {', '.join(_SELECTORS)})")
    rule = parse_rule(_text(entry["rule"], f"{where}: rule"))
    selectors = [k for k in _SELECTORS if k in entry]
    if len(selectors) > 1:
        raise CompositeSyntaxError(f"{where}: give one of layers/type/range/first/last, not {selectors}")
    if not selectors:
        return GlobalMap(rule)
    key = selectors[0]
    value = entry[key]
    if key == "layers":
        if isinstance(value, bool) or not (isinstance(value, (int, str)) or
                                           (isinstance(value, list) and all(isinstance(v, int) for v in value))):
            raise CompositeSyntaxError(f"{where}: layers must be an index, a [hierarchical, index], a node name or "
                                       f"a glob, got {value!r}")
        return LayerMap(value, rule)
    if key == "type":
        if not isinstance(value, str):
            raise CompositeSyntaxError(f"{where}: type must be an op type or layer group name, got {value!r}")
        return _strict(GlobalTypeMap({value: rule}))
    if key == "range":
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
            raise CompositeSyntaxError(f"{where}: range must be [start, stop], got {value!r}")
        return RangeMap(tuple(value), rule)
    if value is not True:
        raise CompositeSyntaxError(f"{where}: {key} must be true (leave it out otherwise), got {value!r}")
    return _strict(FirstLayerMap(rule) if key == "first" else LastLayerMap(rule))


def _strict(primitive):
    """A primitive written by a user must match something: an empty match is an error."""
    primitive.strict = True
    return primitive
