"""Layer indices and rules, as tables: ``show_layer_indices`` and ``lrpc inspect``."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from .compiler import Analysis, analyze_model
from .layers import module_name


@dataclass(frozen=True)
class LayerIndex:
    index: int  # flat, from 0 (LayerMap(index, ...))
    path: tuple  # hierarchical, from the module path (LayerMap((0, 2), ...))
    name: str  # node name (LayerMap("/features/*", ...) globs on it)
    op_type: str


def layer_indices(analysis: Analysis) -> list[LayerIndex]:
    return [LayerIndex(layer.index, layer.path_index, layer.name, layer.op_type) for layer in analysis.table.layers]


def layer_table(analysis: Analysis, with_rules: bool) -> Table:
    title = f"rules: {analysis.composite!r}" if with_rules else "layer indices"
    table = Table(title=escape(title))
    columns = ["#", "path", "node", "module", "op"] + (["rule"] if with_rules else [])
    for column in columns:
        table.add_column(column)
    for layer, rule in analysis.layer_rules():
        cells = [str(layer.index), str(layer.path_index), layer.name, module_name(layer.name), layer.op_type]
        if with_rules:
            cells.append(repr(rule))
        table.add_row(*(escape(c) for c in cells))
    return table


def show_layer_indices(model, *, file=None, **kwargs) -> list[LayerIndex]:
    """Print the flat and hierarchical index of every layer (RelevancePropagation.jl's
    ``show_layer_indices``) and return them. ``LayerMap`` takes either, or a node name."""
    from rich.console import Console

    analysis = analyze_model(model, skip_checks=True, **kwargs)
    Console(file=file or sys.stdout, highlight=False, width=160).print(layer_table(analysis, with_rules=False))
    return layer_indices(analysis)
