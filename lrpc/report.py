"""Where relevance leaks: per layer, the relevance that reaches it and what it passes on.

LRP's rules conserve relevance exactly only in special cases: biases absorb their share,
the stabilizer takes a little, ZPlus drops a neuron whose contributions are all negative,
AlphaBeta can create relevance. A compiled file made with ``report=True`` (``lrpc explain
--report``) also returns ``lrp_report``, the sums per sample and layer;
:class:`ConservationReport` turns them into a table that names the layers losing or
creating more than a threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.05


@dataclass(frozen=True)
class LayerBalance:
    index: int
    name: str
    op_type: str
    rule: str
    relevance_out: float  # arriving at the layer's output (summed over samples)
    relevance_in: float  # passed on to its inputs
    threshold: float

    @property
    def change(self) -> float:
        """(in − out) / |out|: negative where relevance is lost (absorbed), positive where created."""
        if self.relevance_out == 0:
            return 0.0 if self.relevance_in == 0 else float("inf")
        return (self.relevance_in - self.relevance_out) / abs(self.relevance_out)

    @property
    def flagged(self) -> bool:
        return abs(self.change) > self.threshold


class ConservationReport:
    """``sums``: ``[N, layers, 2]`` (relevance at the inputs, at the output) from the file;
    ``layers``: ``(index, name, op, rule)`` rows in the same order."""

    def __init__(self, sums: np.ndarray, layers: list, threshold: float = DEFAULT_THRESHOLD):
        totals = np.asarray(sums, dtype=np.float64).sum(axis=0)
        self.threshold = float(threshold)
        self.rows = [LayerBalance(int(i), name, op, rule, float(out), float(inp), self.threshold)
                     for (i, name, op, rule), (inp, out) in zip(layers, totals)]
        self.samples = int(np.asarray(sums).shape[0])

    @classmethod
    def from_metadata(cls, sums, text: str, threshold: float = DEFAULT_THRESHOLD) -> "ConservationReport":
        return cls(sums, json.loads(text), threshold)

    @property
    def flagged(self) -> list[LayerBalance]:
        return [r for r in self.rows if r.flagged]

    def table(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"relevance per layer, summed over {self.samples} sample(s); flagged: more than "
                            f"{self.threshold:.0%} lost or created")
        for column in ("#", "node", "op", "rule", "at output", "to inputs", "change", ""):
            table.add_column(column, justify="right" if column in ("at output", "to inputs", "change") else "left")
        for r in self.rows:
            table.add_row(str(r.index), escape(r.name), r.op_type, escape(r.rule), f"{r.relevance_out:.4g}",
                          f"{r.relevance_in:.4g}", f"{r.change:+.1%}", "!" if r.flagged else "",
                          style="bold red" if r.flagged else None)
        return table

    def to_dict(self) -> dict:
        return {"samples": self.samples, "threshold": self.threshold,
                "layers": [dict(index=r.index, name=r.name, op=r.op_type, rule=r.rule, relevance_out=r.relevance_out,
                                relevance_in=r.relevance_in, change=r.change, flagged=r.flagged) for r in self.rows]}
