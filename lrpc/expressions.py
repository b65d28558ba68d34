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
import tomllib
from pathlib import Path

from .composites import GROUPS, PRESETS, PRIMITIVES, Composite, GlobalMap, LayerMap, RangeMap
from .composites import FirstLayerMap, LastLayerMap, GlobalTypeMap
from .errors import CompositeSyntaxError
from .rules import RULES, Rule

CALLABLES = {**PRESETS, **PRIMITIVES, **RULES, "Composite": Composite, "range": range}


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


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise CompositeSyntaxError(f"{where} must be a string such as \"EpsilonRule(epsilon=1e-6)\", got {value!r}")
    return value


def _parse(text: str):
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise CompositeSyntaxError(f"malformed composite expression {text!r}: {exc.msg}") from None
    return _value(tree.body, text)


def _value(node: ast.AST, text: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)) or (
        isinstance(node, ast.Constant) and node.value is None
    ):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand, text)
        if not isinstance(operand, (int, float)):
            raise CompositeSyntaxError(f"unary sign on a non-number in {text!r}")
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e, text) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_value(k, text): _value(v, text) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        if node.id in GROUPS:
            return GROUPS[node.id]
        if node.id in CALLABLES:
            return CALLABLES[node.id]
        raise CompositeSyntaxError(f"unknown name {node.id!r} in {text!r}")
    if isinstance(node, ast.Call):
        func = _value(node.func, text)
        if not callable(func) or isinstance(node.func, ast.Call):
            raise CompositeSyntaxError(f"cannot call {ast.unparse(node.func)!r} in {text!r}")
        args = [_value(a, text) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise CompositeSyntaxError(f"**kwargs are not allowed in {text!r}")
            kwargs[kw.arg] = _value(kw.value, text)
        return _call(func, args, kwargs, text)
    raise CompositeSyntaxError(f"unsupported syntax {ast.unparse(node)!r} in {text!r}")


def _call(func, args, kwargs, text):
    try:
        return func(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        name = getattr(func, "__name__", str(func))
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
        raise CompositeSyntaxError(f"{path}: unknown keys {sorted(unknown)}")
    entries = data.get("rule", [])
    if not isinstance(entries, list):
        raise CompositeSyntaxError(f"{path}: 'rule' must be a list of [[rule]] tables")
    base = parse_composite(_text(data["composite"], f"{path}: composite")) if "composite" in data else Composite()
    primitives = list(base.primitives)
    for i, entry in enumerate(entries):
        where = f"{path}: [[rule]] #{i + 1}"
        if not isinstance(entry, dict) or "rule" not in entry:
            raise CompositeSyntaxError(f"{where}: needs a 'rule' key")
        rule = parse_rule(_text(entry["rule"], f"{where}: rule"))
        selectors = [k for k in ("layers", "type", "range", "first", "last") if k in entry]
        if len(selectors) > 1:
            raise CompositeSyntaxError(f"{where}: give one of layers/type/range/first/last, not {selectors}")
        if not selectors:
            primitives.append(GlobalMap(rule))
        elif "layers" in entry:
            primitives.append(LayerMap(entry["layers"], rule))
        elif "type" in entry:
            key = GROUPS.get(entry["type"], entry["type"])
            primitives.append(GlobalTypeMap({key: rule}))
        elif "range" in entry:
            r = entry["range"]
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r)):
                raise CompositeSyntaxError(f"{where}: range must be [start, stop]")
            primitives.append(RangeMap(tuple(r), rule))
        elif entry.get("first"):
            primitives.append(FirstLayerMap(rule))
        elif entry.get("last"):
            primitives.append(LastLayerMap(rule))
    default = parse_rule(_text(data["default"], f"{path}: default")) if "default" in data else base.default
    return Composite(*primitives, default=default, name=None)
