"""The LRP analyzer: compile once, explain many batches in one onnxruntime call each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..emit import RELEVANCE_NAME, TARGET_NAME
from ..errors import InputError, LrpcError, TargetError
from .session import make_session


@dataclass
class Explanation:
    """What an analyzer returns (RelevancePropagation.jl's ``Explanation``).

    ``val``: the relevance, shaped like the input; ``output``: the model's output (the
    explained one, softmax included); ``output_selection``: the explained class per
    sample; ``analyzer``: ``"LRP"``; ``heatmap``: the preset heatmapping style
    (``"attribution"``); ``extras``: other outputs of the compiled file, by name.
    """

    val: np.ndarray
    output: np.ndarray
    output_selection: np.ndarray
    analyzer: str = "LRP"
    heatmap: str = "attribution"
    extras: dict[str, Any] = field(default_factory=dict)


def _is_compiled(model: onnx.ModelProto) -> bool:
    return any(o.name == RELEVANCE_NAME for o in model.graph.output) and any(
        i.name == TARGET_NAME for i in model.graph.input
    )


class LRP:
    """``LRP(model, composite)``: compile ``model`` with ``composite`` and open a session.

    ``model`` may be a path or ModelProto of a plain model (compiled here) or of a file
    ``lrpc compile`` already wrote (used as is). Keyword arguments as in
    RelevancePropagation.jl: ``normalize_output_relevance``, ``skip_checks``,
    ``verbose``; plus ``providers`` / ``threads`` for onnxruntime.
    """

    def __init__(
        self,
        model,
        composite=None,
        *,
        normalize_output_relevance: bool = True,
        skip_checks: bool = False,
        verbose: bool = True,
        input_name: str | None = None,
        output_name: str | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        from ..compiler import analyze_model, emit_model
        from ..graph import load_model

        proto = load_model(model)
        if _is_compiled(proto):
            if composite is not None or not normalize_output_relevance or input_name or output_name:
                raise LrpcError("the model is already compiled: its rules and options are fixed; "
                                "pass the original model to change them")
            self.model = proto
            self.analysis = None
        else:
            self.analysis = analyze_model(
                proto, composite, input_name=input_name, output_name=output_name,
                skip_checks=skip_checks, verbose=verbose,
            )
            self.model = emit_model(self.analysis, normalize_output_relevance)
        meta = {p.key: p.value for p in self.model.metadata_props}
        self.input_name = meta.get("lrpc.input", self.model.graph.input[0].name)
        self.session = make_session(self.model, providers=providers, threads=threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        model_outputs = [n for n in self.output_names if n != RELEVANCE_NAME]
        self.explained_output = meta.get("lrpc.output", model_outputs[0])
        self._num_classes = None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def rules(self):
        """(layer, rule) pairs, as ``lrp_rules`` gives them."""
        return self.analysis.layer_rules() if self.analysis else []

    def __repr__(self) -> str:
        if not self.analysis:
            return "LRP(<compiled model>)"
        lines = [f"  {layer.name} ({layer.op_type}) => {rule!r}," for layer, rule in self.rules()]
        return "LRP(\n" + "\n".join(lines) + "\n)"

    def analyze(self, input, output_selection=None) -> Explanation:
        """Explain a batch. ``output_selection``: None (arg-max), an int for every sample,
        or one int per sample."""
        x = self._check_input(input)
        n = x.shape[0]
        feeds = {self.input_name: x}
        if output_selection is not None:
            target = np.asarray(output_selection).reshape(-1)
            if target.dtype.kind not in "iu":
                raise TargetError(f"output_selection must be integer class indices, got {output_selection!r}")
            target = target.astype(np.int64)
            if target.size == 1 and n > 1:
                target = np.repeat(target, n)
            if target.size != n:
                raise TargetError(f"output_selection has {target.size} entries for a batch of {n}")
            classes = self._classes(x[:1])
            bad = target[(target < 0) | (target >= classes)]
            if bad.size:
                raise TargetError(f"output_selection {int(bad[0])} is out of range: the model has {classes} outputs (0..{classes - 1})")
            feeds[TARGET_NAME] = target
        results = dict(zip(self.output_names, self.session.run(None, feeds)))
        relevance = results.pop(RELEVANCE_NAME)
        output = results.pop(self.explained_output)
        selection = np.asarray(feeds.get(TARGET_NAME, np.argmax(output.reshape(n, -1), axis=1)))
        return Explanation(relevance, output, selection, extras=results)

    def _classes(self, sample: np.ndarray) -> int:
        """Number of classes of the explained output (static shape, else one probe run)."""
        if self._num_classes is None:
            meta = next(o for o in self.session.get_outputs() if o.name == self.explained_output)
            dims = meta.shape[1:]
            if dims and all(isinstance(d, int) for d in dims):
                self._num_classes = int(np.prod(dims))
            else:
                out = self.session.run([self.explained_output], {self.input_name: sample})[0]
                self._num_classes = int(np.prod(out.shape[1:]))
        return self._num_classes

    def _check_input(self, input) -> np.ndarray:
        meta = next(i for i in self.session.get_inputs() if i.name == self.input_name)
        dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}.get(meta.type)
        try:
            x = np.asarray(input, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise InputError(f"input cannot be converted to {meta.type}: {exc}") from None
        if x.ndim == 0 or x.shape[0] == 0:
            raise InputError(f"input has shape {x.shape}: an empty batch")
        if x.ndim != len(meta.shape):
            raise InputError(f"input has shape {x.shape}; the model expects {_show(meta.shape)}")
        for got, want in zip(x.shape, meta.shape):
            if isinstance(want, int) and want != got:
                raise InputError(f"input has shape {x.shape}; the model expects {_show(meta.shape)}")
        return x


def _show(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


def analyze(input, method: LRP, output_selection=None) -> Explanation:
    """``analyze(input, analyzer[, output_selection])`` (the XAIBase call)."""
    if not isinstance(method, LRP):
        raise LrpcError("analyze: method must be an lrpc.LRP analyzer")
    return method.analyze(input, output_selection)
