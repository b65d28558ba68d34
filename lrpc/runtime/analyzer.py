"""The LRP analyzer: compile once, explain many batches in one onnxruntime call each."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..emit import CLASS_NAME, FEATURES_NAME, LOGIT_NAME, REGION_NAME, RELEVANCE_NAME, REPORT_NAME, TARGET_NAME
from ..errors import InputError, LrpcError, TargetError
from .session import make_session


@dataclass
class Explanation:
    """What an analyzer returns (RelevancePropagation.jl's ``Explanation``).

    ``val``: the relevance (a gradient method's attribution), shaped like the input
    (GradCAM: ``[N, 1, h, w]`` at its layer); ``output``: the model's output (the explained
    one, softmax included); ``output_selection``: the explained class per sample;
    ``analyzer``: ``"LRP"``, ``"CRP"`` or the method (``"Gradient"``,
    ``"IntegratedGradients"``, ...); ``heatmap``: the preset heatmapping style
    (``"attribution"``, ``"sensitivity"`` for gradients, ``"cam"``); ``extras``: other
    outputs of the compiled file, by name.
    """

    val: np.ndarray
    output: np.ndarray
    output_selection: np.ndarray
    analyzer: str = "LRP"
    heatmap: str = "attribution"
    extras: dict[str, Any] = field(default_factory=dict)
    report_layers: str | None = field(default=None, repr=False)

    @property
    def logit(self) -> np.ndarray | None:
        """The explained logit of each sample (before any stripped softmax)."""
        return self.extras.get("logit")

    def report(self, threshold: float | None = None):
        """Per-layer relevance balance (:class:`lrpc.report.ConservationReport`); needs a file
        compiled with ``report=True``."""
        from ..report import DEFAULT_THRESHOLD, ConservationReport

        if "report" not in self.extras or self.report_layers is None:
            raise LrpcError("no conservation report: compile with report=True (lrpc explain --report)")
        return ConservationReport.from_metadata(self.extras["report"], self.report_layers,
                                                DEFAULT_THRESHOLD if threshold is None else threshold)


def _is_compiled(model: onnx.ModelProto) -> bool:
    return any(p.key == "lrpc.version" for p in model.metadata_props)


def load_compiled(source) -> onnx.ModelProto:
    """A file ``lrpc compile`` wrote (path, bytes or ModelProto) for a server: anything else
    is refused in one line, and so is a file of several targets per sample, whose rows
    (``[K·N]``, target-major) a server could not split back per request."""
    from ..files import load_model

    model = load_model(source)
    if not _is_compiled(model):
        raise LrpcError(f"{source}: not a compiled file; run lrpc compile first")
    _refuse_several_targets({p.key: p.value for p in model.metadata_props}, source)
    return model


def servable(source):
    """As :func:`load_compiled`, but a compiled file on disk comes back as its path (for
    :class:`LRP`, which hands it to onnxruntime unparsed)."""
    from ..files import read_metadata

    if isinstance(source, (str, os.PathLike)):
        meta = read_metadata(source)
        if "lrpc.version" in meta:
            _refuse_several_targets(meta, source)
            return os.fspath(source)
    return load_compiled(source)


def _refuse_several_targets(meta: dict, source) -> None:
    if int(meta.get("lrpc.targets", 1)) > 1:
        raise LrpcError(f"{source}: compiled with --targets {meta['lrpc.targets']}; servers take one target per "
                        "sample (compile without --targets)")


class LRP:
    """``LRP(model, composite)``: compile ``model`` with ``composite`` and open a session.

    ``model`` may be a path or ModelProto of a plain model (compiled here) or of a file
    ``lrpc compile`` already wrote (used as is). Keyword arguments as in
    RelevancePropagation.jl: ``normalize_output_relevance``, ``skip_checks``,
    ``verbose``; ``position`` (sequence outputs: the explained position, default the
    last) and ``split_layernorm`` as in :func:`lrpc.compile`; ``providers`` /
    ``threads`` for onnxruntime.
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
        relevance_at=(),
        position: int | None = None,
        split_layernorm: bool = False,
        max_constant_bytes: int | None = None,
        report: bool = False,
        targets: int = 1,
        providers: list[str] | None = None,
        threads: int | None = None,
        input_shape=None,
        method=None,
    ):
        from ..files import load_model, read_metadata
        from ..methods import as_method

        # a compiled file on disk goes to onnxruntime by its path: parsing it here first would
        # hold its weights twice more at the peak (a GPT-2 6 x 768: 1.86 against 0.66 GiB)
        path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        metadata = read_metadata(path) if path is not None else {}
        compiled_file = "lrpc.version" in metadata
        proto = None if compiled_file else load_model(model)
        options = dict(normalize_output_relevance=normalize_output_relevance, skip_checks=skip_checks,
                       verbose=verbose, input_name=input_name, output_name=output_name, relevance_at=tuple(relevance_at),
                       position=position, split_layernorm=split_layernorm, max_constant_bytes=max_constant_bytes,
                       report=report, targets=targets, input_shape=input_shape, method=as_method(method))
        if compiled_file or _is_compiled(proto):
            if (composite is not None or not normalize_output_relevance or input_name or output_name or relevance_at
                    or position is not None or split_layernorm or max_constant_bytes is not None or report
                    or targets != 1 or input_shape is not None or method is not None):
                raise LrpcError("the model is already compiled: its rules and options are fixed; "
                                "pass the original model to change them")
            self.source, self.composite, self.options = None, None, options
            self._open(path if compiled_file else proto, None, providers, threads, metadata if compiled_file else None)
        else:
            self.source, self.composite, self.options = proto, composite, options
            self._compile_and_open({}, providers, threads)

    def _compile_and_open(self, concept: dict, providers, threads) -> None:
        from ..compiler import analyze_model, emit_model

        opts = self.options
        analysis = analyze_model(self.source, self.composite, input_name=opts["input_name"],
                                 output_name=opts["output_name"], skip_checks=opts["skip_checks"],
                                 verbose=opts["verbose"], position=opts["position"],
                                 split_layernorm=opts["split_layernorm"],
                                 max_constant_bytes=opts["max_constant_bytes"], input_shape=opts["input_shape"],
                                 method=opts["method"])
        model = emit_model(analysis, opts["normalize_output_relevance"], relevance_at=opts["relevance_at"],
                           report=opts["report"] and not concept, labels=True,
                           targets=1 if concept else opts["targets"], **concept)
        self._open(model, analysis, providers, threads)

    def _open(self, model, analysis, providers, threads, metadata: dict | None = None) -> None:
        """A session of ``model``: a compiled ``ModelProto``, or the path of a compiled file
        (read by onnxruntime; :attr:`model` parses it only when asked) and its ``metadata``
        when already read."""
        from ..files import read_metadata

        self.analysis = analysis
        if isinstance(model, onnx.ModelProto):
            self._model, self._path = model, None
            meta = {p.key: p.value for p in model.metadata_props}
        else:
            self._model, self._path = None, model
            meta = read_metadata(model) if metadata is None else metadata
        self._session_options = (providers, threads)
        self.metadata = meta  # the file's metadata_props (lrpc.* keys)
        self.session = make_session(model, providers=providers, threads=threads,
                                    metadata=None if self._path is None else meta)
        self.layout = meta.get("lrpc.layout", "flat")
        self.input_name = meta.get("lrpc.input", self.session.get_inputs()[0].name)
        self.position = int(meta["lrpc.position"]) if "lrpc.position" in meta else None
        self.targets = int(meta.get("lrpc.targets", 1))  # classes per sample in one call
        # an integer input (token ids) is explained at its embedding: relevance [N, T, H]
        self.explains_tokens = meta.get("lrpc.explained", self.input_name) != self.input_name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.relevance_name = meta.get("lrpc.relevance", RELEVANCE_NAME)
        method = meta.get("lrpc.method")  # a gradient method's file: "IntegratedGradients(steps=32, ...)"
        self.name = method.split("(", 1)[0] if method else type(self).name
        self.method = method
        self.heatmap = meta.get("lrpc.heatmap", "attribution")
        model_outputs = [n for n in self.output_names if n != self.relevance_name]
        self.explained_output = meta.get("lrpc.output", model_outputs[0])
        self.other_inputs = [i for i in self.session.get_inputs()
                             if i.name not in (self.input_name, TARGET_NAME, REGION_NAME)]
        self._num_classes = None

    @property
    def model(self) -> onnx.ModelProto:
        """The compiled model; for a file opened by its path, parsed from it on first use."""
        if self._model is None:
            from ..files import load_model

            self._model = load_model(self._path)
        return self._model

    @property
    def path(self) -> str | None:
        """The compiled file the session was opened from, if any."""
        return self._path

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def rules(self):
        """(layer, rule) pairs, as ``lrp_rules`` gives them."""
        return self.analysis.layer_rules() if self.analysis else []

    def __repr__(self) -> str:
        if self.method:
            return self.method
        if not self.analysis:
            return "LRP(<compiled model>)"
        lines = [f"  {layer.name} ({layer.op_type}) => {rule!r}," for layer, rule in self.rules()]
        return "LRP(\n" + "\n".join(lines) + "\n)"

    def analyze(self, input, output_selection=None, extra_inputs: dict | None = None, region=None) -> Explanation:
        """Explain a batch. ``output_selection``: None (arg-max), an int for every sample,
        or one int per sample (for language models: a vocabulary index; for dense outputs
        a channel). ``extra_inputs``: the model's other inputs by name (``attention_mask``,
        ...); see :meth:`other_feeds`. ``region``: for dense outputs ``[N, K, H, W]``, where
        the explained channel counts: ``[H, W]`` (every sample) or ``[N, H, W]``, weights
        (a 0/1 mask, or soft); default everywhere."""
        x = self._check_input(input)
        n = x.shape[0]
        feeds = {self.input_name: x, **self.other_feeds(x, extra_inputs)}
        if region is not None:
            feeds[REGION_NAME] = self._region(region, n)
        # always fed (a -1 per sample: the arg-max), so files with a required target work too
        if self.targets > 1:  # [N, K]; -1 in column j: the j-th highest-scoring class
            feeds[TARGET_NAME] = (np.full((n, self.targets), -1, dtype=np.int64) if output_selection is None
                                  else self._several_targets(output_selection, n, feeds))
        else:
            feeds[TARGET_NAME] = (np.full(n, -1, dtype=np.int64) if output_selection is None
                                  else self._targets(output_selection, n, feeds))
        results = dict(zip(self.output_names, self._run(feeds, n)))
        relevance = results.pop(self.relevance_name)
        output = results.pop(self.explained_output)
        selection = results.pop(CLASS_NAME, None)
        if selection is None:  # a file from an lrpc before lrp_class
            scores = output if self.position is None else output[:, self.position]
            order = np.argsort(-scores.reshape(n, -1), axis=1, kind="stable")
            given = feeds[TARGET_NAME].reshape(n, -1)  # [N] or [N, K]: -1 in column j is the j-th highest
            selection = np.concatenate([np.where(given[:, j] < 0, order[:, j], given[:, j])
                                        for j in range(given.shape[1])])
        unexplained = np.flatnonzero(~np.isfinite(relevance.reshape(len(relevance), -1)).all(axis=1))
        if unexplained.size:
            warnings.warn(RelevanceWarning(
                f"the relevance of sample(s) {_list(unexplained)} is not finite: their values overflow float32 "
                "on the way through the model"), stacklevel=2)
        if FEATURES_NAME in results:
            results["features"] = results.pop(FEATURES_NAME)
        if LOGIT_NAME in results:
            results["logit"] = results.pop(LOGIT_NAME)
        if REPORT_NAME in results:
            results["report"] = results.pop(REPORT_NAME)
        return Explanation(relevance, output, selection, analyzer=self.name, heatmap=self.heatmap, extras=results,
                           report_layers=self.metadata.get("lrpc.report"))

    name = "LRP"

    def _region(self, region, n: int) -> np.ndarray:
        if self.layout != "dense":
            raise InputError("a region applies to dense outputs [N, K, H, W] (segmentation, detection maps)")
        meta = next(o for o in self.session.get_outputs() if o.name == self.explained_output)
        spatial = len(meta.shape) - 2
        mask = np.asarray(region, dtype=np.float32)
        if mask.ndim == spatial:
            mask = mask[None]
        if mask.ndim != spatial + 1 or mask.shape[0] not in (1, n) or not np.isfinite(mask).all():
            raise InputError(f"the region must be finite weights shaped like the output's positions "
                             f"{_show(meta.shape[2:])}, one for all samples or one per sample; got {mask.shape}")
        return mask[:, None]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was exported with, when it is not dynamic."""
        meta = next(i for i in self.session.get_inputs() if i.name == self.input_name)
        return meta.shape[0] if meta.shape and isinstance(meta.shape[0], int) else None

    def _run(self, feeds: dict, n: int) -> list:
        """One session run, or runs of the model's fixed batch size (the last one padded by
        repeating its final sample), concatenated."""
        size = self.fixed_batch
        if size is None or size == n:
            return self.session.run(None, feeds)
        parts = []
        for start in range(0, n, size):
            rows = np.minimum(np.arange(start, start + size), n - 1)
            chunk = {name: value[rows] if np.ndim(value) and np.shape(value)[0] == n else value
                     for name, value in feeds.items()}
            parts.append([out[:min(size, n - start)] for out in self.session.run(None, chunk)])
        return [np.concatenate(outs) for outs in zip(*parts)]

    def _targets(self, output_selection, n: int, feeds: dict) -> np.ndarray:
        """One class per sample; a negative entry means the arg-max."""
        target = np.asarray(output_selection)
        if target.dtype.kind not in "iu" or target.ndim > 1:
            raise TargetError(f"targets must be integer class indices (one, or one per sample), got {output_selection!r}")
        target = target.reshape(-1).astype(np.int64)
        if target.size == 1 and n > 1:
            target = np.repeat(target, n)
        if target.size != n:
            raise TargetError(f"{target.size} targets for a batch of {n}")
        return self._in_range(target, feeds, "the arg-max")

    def _several_targets(self, output_selection, n: int, feeds: dict) -> np.ndarray:
        """``[N, K]`` classes (one row for every sample, or one row per sample)."""
        target = np.asarray(output_selection)
        k = self.targets
        if target.dtype.kind not in "iu" or target.ndim not in (1, 2) or target.shape[-1] != k:
            raise TargetError(f"this file explains {k} classes per sample: give [N, {k}] or [{k}] class indices "
                              f"(-1: the next highest), got {output_selection!r}")
        target = np.broadcast_to(target.reshape(-1, k), (n, k)) if target.ndim == 1 or len(target) == 1 else target
        if len(target) != n:
            raise TargetError(f"{len(target)} rows of targets for a batch of {n}")
        return np.ascontiguousarray(self._in_range(target, feeds, "the next highest-scoring class"), dtype=np.int64)

    def _in_range(self, target: np.ndarray, feeds: dict, negative: str) -> np.ndarray:
        classes = self._classes({name: value[:1] for name, value in feeds.items()})
        bad = target[target >= classes]
        if bad.size:
            raise TargetError(f"target {int(bad[0])} is out of range for {classes} classes (0..{classes - 1}; "
                              f"negative: {negative})")
        return target

    def _classes(self, sample_feeds: dict) -> int:
        """Number of classes of the explained output (static shape, else one probe run);
        for sequence outputs ``[N, T, V]`` the vocabulary size ``V``."""
        if self._num_classes is None:
            meta = next(o for o in self.session.get_outputs() if o.name == self.explained_output)
            dims = {"sequence": meta.shape[2:], "dense": meta.shape[1:2]}.get(self.layout, meta.shape[1:])
            if dims and all(isinstance(d, int) for d in dims):
                self._num_classes = int(np.prod(dims))
            else:
                out = self.session.run([self.explained_output], sample_feeds)[0]
                shape = {"sequence": out.shape[2:], "dense": out.shape[1:2]}.get(self.layout, out.shape[1:])
                self._num_classes = int(np.prod(shape))
        return self._num_classes

    def other_feeds(self, x: np.ndarray, given: dict | None = None) -> dict:
        """Values for the model's other inputs: ``given`` by name, else the defaults a
        transformer assumes when they are left out (``attention_mask``: ones,
        ``token_type_ids``: zeros, ``position_ids``: 0..T-1), else an error naming them."""
        given = dict(given or {})
        unknown = set(given) - {i.name for i in self.other_inputs}
        if unknown:
            raise InputError(f"the model has no input(s) {sorted(unknown)}; its other inputs are "
                             f"{[i.name for i in self.other_inputs]}")
        feeds, missing = {}, []
        for meta in self.other_inputs:
            value = given[meta.name] if meta.name in given else _default_feed(meta, x)
            if value is None:
                missing.append(meta.name)
                continue
            feeds[meta.name] = np.asarray(value, dtype=_numpy_type(meta.type) or None)
        if missing:
            raise InputError(f"the model also needs {', '.join(repr(m) for m in missing)}: pass "
                             "extra_inputs={name: array} (command line: --feed NAME=FILE.npy)")
        return feeds

    def _check_input(self, input) -> np.ndarray:
        meta = next(i for i in self.session.get_inputs() if i.name == self.input_name)
        dtype = _numpy_type(meta.type)
        if np.iscomplexobj(input):
            raise InputError("the input holds complex numbers; the model takes real ones")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # numpy's overflow/precision warnings are refusals here
                x = np.asarray(input, dtype=dtype)
        except (TypeError, ValueError, OverflowError, RuntimeWarning) as exc:
            raise InputError(f"the input cannot be converted to {meta.type}: {exc}") from None
        if x.ndim == 0 or x.shape[0] == 0:
            raise InputError(f"input has shape {x.shape}: an empty batch")
        if x.ndim != len(meta.shape):
            raise InputError(f"input has shape {x.shape}; the model expects {_show(meta.shape)}")
        # a fixed batch size (an export without dynamic axes) is met by running in chunks
        for got, want in list(zip(x.shape, meta.shape))[1:]:
            if isinstance(want, int) and want != got:
                raise InputError(f"input has shape {x.shape}; the model expects {_show(meta.shape)}")
        if x.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
            if bad.size:
                raise InputError(f"sample(s) {_list(bad)} of the input hold NaN or infinite values")
        return x


class CRP(LRP):
    """``CRP(lrp_analyzer, layer, features)``: Concept Relevance Propagation.

    ``layer``: the layer (flat index or node name) on whose output the concepts live;
    ``features``: :class:`~lrpc.crp.TopNFeatures` or :class:`~lrpc.crp.IndexedFeatures`.
    ``analyze`` returns one explanation per feature and input in the batch axis, features
    first (``[f1_x1, f1_x2, f2_x1, ...]``); ``extras["features"]`` holds the feature of
    each row block, shape ``[F, N]``.
    """

    name = "CRP"

    def __init__(self, lrp_analyzer: LRP, layer, features, *, providers=None, threads=None):
        if not isinstance(lrp_analyzer, LRP) or lrp_analyzer.source is None:
            raise LrpcError("CRP needs an LRP analyzer built from a plain (not yet compiled) model")
        self.source, self.composite, self.options = lrp_analyzer.source, lrp_analyzer.composite, lrp_analyzer.options
        self.layer, self.features = layer, features
        providers = providers or lrp_analyzer._session_options[0]
        threads = threads or lrp_analyzer._session_options[1]
        self._compile_and_open({"crp_layer": layer, "features": features}, providers, threads)

    def __repr__(self) -> str:
        return f"CRP(layer={self.layer!r}, features={self.features!r})"


class RelevanceWarning(UserWarning):
    """Some samples got non-finite relevance (their values overflow inside the model)."""


def _list(indices, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _numpy_type(onnx_type: str):
    return _NUMPY_TYPES.get(onnx_type)


def _default_feed(meta, x: np.ndarray):
    """What Hugging Face models assume for an input left out, shaped like the ids; a KV
    cache's past (``past_key_values.*``, ``[B, heads, past, head size]``): empty."""
    name = meta.name.lower()
    if x.ndim < 2 or meta.shape is None:
        return None
    n, length = x.shape[:2]
    if len(meta.shape) == 4 and ("past" in name or "cache" in name):
        return _empty_past(meta.shape, n)
    if len(meta.shape) != 2:
        return None
    if "attention_mask" in name or name in ("mask", "attn_mask"):
        return np.ones((n, length))
    if "token_type" in name or "segment" in name:
        return np.zeros((n, length))
    if "position_ids" in name:
        return np.broadcast_to(np.arange(length), (n, length)).copy()
    return None


def _empty_past(shape, n: int):
    """A past of length 0: the batch axis first, the one other dynamic axis (the past's
    length, wherever the layout puts it) 0, the others as the file fixes them."""
    dynamic = [i for i, d in enumerate(shape[1:], 1) if not isinstance(d, int)]
    if len(dynamic) != 1:
        return None
    dims = [n, *(d if isinstance(d, int) else 0 for d in shape[1:])]
    return np.zeros(dims)


def _show(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


def analyze(input, method: LRP, output_selection=None) -> Explanation:
    """``analyze(input, analyzer[, output_selection])`` (the XAIBase call)."""
    if not isinstance(method, LRP):
        raise LrpcError("analyze: method must be an lrpc.LRP analyzer")
    return method.analyze(input, output_selection)
