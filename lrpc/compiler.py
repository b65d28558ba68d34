"""The pipeline: load -> canonize -> check -> assign rules -> emit -> one ONNX file."""

from __future__ import annotations

import fnmatch
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from . import __version__
from .check import CheckReport, check_layers, raise_if_unsupported
from .composites import Composite, EpsilonPlusFlat
from .emit import REGION_NAME, TARGET_NAME, ConceptSpec, emit_attribution, emit_relevance
from .errors import LrpcError
from .deployed import FLOATS, analysis_twin, needs_twin, relevance_type, stitch
from .files import check, default_opset, load_model, save_model
from .graph import Program
from .layers import LayerTable, find_layers
from .passes import canonize
from .passes.names import name_from_scopes
from .methods import Method, as_method
from .spec import Layer
from .rules import GradientRule, Rule

#: how the compiled file takes its target: an input with a default (an initializer also
#: listed as an input), or a plain required input that every runtime and server shows
TARGET_INPUTS = ("optional", "required")


@dataclass
class Analysis:
    """A canonized model with its layers, check report and rules (no emission yet)."""

    program: Program
    table: LayerTable
    report: CheckReport
    rules: list[Rule]
    composite: Composite
    relevance_dtype: str | None = None
    method: Method | None = None  # a gradient method instead of LRP (lrpc.methods)

    def layer_rules(self) -> list[tuple[Layer, Rule]]:
        return list(zip(self.table.layers, self.rules))


def _as_composite(composite) -> Composite:
    if composite is None:
        return EpsilonPlusFlat()
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, Rule):
        from .composites import GlobalMap

        return Composite(GlobalMap(composite))
    if isinstance(composite, (list, tuple)) and all(isinstance(r, Rule) for r in composite):
        return _rule_list(list(composite))
    if isinstance(composite, str):
        from .expressions import parse_composite

        return parse_composite(composite)
    raise LrpcError(f"composite must be a Composite, a rule, a list of rules or an expression, got {composite!r}")


def _rule_list(rules: list[Rule]) -> Composite:
    """A list with one rule per layer, like ``LRP(model, rules)``."""
    from .composites import LayerMap

    composite = Composite(*[LayerMap(i, r) for i, r in enumerate(rules)])
    composite.expected_layers = len(rules)
    return composite


def analyze_model(
    model,
    composite=None,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    skip_checks: bool = False,
    verbose: bool = True,
    position: int | None = None,
    split_layernorm: bool = False,
    max_constant_bytes: int | None = None,
    relevance_dtype: str | None = None,
    input_shape=None,
    method=None,
) -> Analysis:
    """Everything up to emission: canonize, check, assign rules. A quantized or
    half-precision model is analysed through its float twin (:mod:`lrpc.deployed`);
    ``relevance_dtype`` (``"float32"``, ``"float16"``) is the twin's precision.
    ``input_shape``: the explained input's dims fixed for compilation (a recurrent layer
    over a dynamic sequence length is written out for that length); the compiled file
    declares them. ``method``: a gradient method (:mod:`lrpc.methods`) instead of LRP."""
    method = as_method(method)
    if method is not None and composite is not None:
        raise LrpcError(f"give a composite (LRP) or a method ({method!r}), not both")
    gradient = GradientRule()
    composite = _as_composite(gradient if method is not None else composite)
    proto = load_model(model)
    _refuse_compiled(proto)
    if input_shape is not None:
        proto = with_input_shape(proto, input_name, input_shape)
    relevance_type(relevance_dtype)  # validated before any work
    twin = analysis_twin(proto, relevance_dtype) if needs_twin(proto, relevance_dtype) else proto
    program = name_from_scopes(Program.from_model(twin), twin)
    program.deployed = proto if twin is not proto else None
    program = canonize(program, input_name=input_name, output_name=output_name, position=position,
                       split_layernorms=split_layernorm, max_constant_bytes=max_constant_bytes)
    table = find_layers(program, exact=method is not None)
    report = check_layers(program, table)
    if not skip_checks:
        raise_if_unsupported(report, verbose=verbose)
    expected = getattr(composite, "expected_layers", None)
    if expected is not None and expected != len(table.layers):
        raise LrpcError(f"got {expected} rules for a model with {len(table.layers)} layers")
    rules = [gradient] * len(table.layers) if method is not None else composite.assign(table.layers)
    return Analysis(program, table, report, rules, composite, relevance_dtype, method)


def _refuse_compiled(model: onnx.ModelProto) -> None:
    meta = {p.key: p.value for p in model.metadata_props}
    if "lrpc.version" in meta:
        raise LrpcError(f"the model was already compiled by lrpc {meta['lrpc.version']} (it returns "
                        f"{meta.get('lrpc.relevance', 'relevance')!r}); compile the original model instead")
    names = {t.name for t in model.graph.input} | {t.name for t in model.graph.initializer}
    names |= {o for n in model.graph.node for o in n.output}
    if TARGET_NAME in names:
        raise LrpcError(f"the model already has a tensor named {TARGET_NAME!r}, the compiled file's target input; "
                        "rename it before compiling")


def compile(
    model,
    composite=None,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    normalize_output_relevance: bool = True,
    skip_checks: bool = False,
    verbose: bool = True,
    relevance_at=(),
    crp_layer=None,
    features=None,
    position: int | None = None,
    split_layernorm: bool = False,
    max_constant_bytes: int | None = None,
    report: bool = False,
    labels: bool = False,
    target_input: str = "optional",
    targets: int = 1,
    relevance_dtype: str | None = None,
    input_shape=None,
    method=None,
) -> onnx.ModelProto:
    """Compile ``model`` (path or ModelProto) into an ONNX model that also returns ``relevance``.

    ``composite``: a :class:`Composite`, a preset such as ``EpsilonPlusFlat()``, one rule
    for every layer, a list with one rule per layer, or a composite expression string.
    ``relevance_at``: layers (index or name) or tensors whose relevance becomes an extra
    output ``relevance_at:<tensor>``. ``crp_layer`` + ``features``
    (:class:`~lrpc.crp.TopNFeatures` / :class:`~lrpc.crp.IndexedFeatures`): Concept
    Relevance Propagation; ``relevance`` then holds features × inputs rows and
    ``crp_features`` the feature explained by each. ``position``: for sequence outputs
    ``[N, T, V]`` (language models), the explained position (default -1, the last).
    ``split_layernorm``: split LayerNorm from its affine part so each takes its own rule.
    ``max_constant_bytes``: the most constant folding may materialize (default: the larger
    of 256 MiB and the model's largest weight). ``report``: also output the per-layer
    relevance sums ``lrp_report`` (:class:`lrpc.report.ConservationReport`). ``labels``:
    also output the class each row explains (``lrp_class``, the arg-max resolved) and its
    logit (``lrp_logit``). ``target_input``: ``"optional"`` (``lrp_target`` defaults to the
    arg-max) or ``"required"`` (a plain input every runtime and server lists). ``targets``:
    K > 1 explains K classes per sample in one call: ``lrp_target`` ``[N, K]`` (default:
    each sample's top K), ``relevance`` ``[K·N, ...]``, target-major. ``relevance_dtype``:
    the precision of the relevance pass of a quantized or half-precision model
    (``"float32"``, the default, or ``"float16"``); without it ``relevance`` has the
    explained input's dtype. ``input_shape``: the explained input's dims, fixed for
    compilation (``-1`` keeps one dynamic; needed for a recurrent layer over a dynamic
    sequence length, whose time steps are written out). ``method``: a gradient method
    instead of LRP (:mod:`lrpc.methods`: ``Gradient()``, ``IntegratedGradients(steps=32)``,
    ..., or its expression); the file then returns ``attribution`` instead of ``relevance``.
    """
    analysis = analyze_model(
        model, composite, input_name=input_name, output_name=output_name,
        skip_checks=skip_checks, verbose=verbose, position=position, split_layernorm=split_layernorm,
        max_constant_bytes=max_constant_bytes, relevance_dtype=relevance_dtype, input_shape=input_shape,
        method=method,
    )
    return emit_model(analysis, normalize_output_relevance, relevance_at=relevance_at,
                      crp_layer=crp_layer, features=features, report=report, labels=labels,
                      target_input=target_input, targets=targets)


def emit_model(
    analysis: Analysis,
    normalize_output_relevance: bool = True,
    relevance_at=(),
    crp_layer=None,
    features=None,
    report: bool = False,
    labels: bool = False,
    target_input: str = "optional",
    targets: int = 1,
) -> onnx.ModelProto:
    program = analysis.program
    if int(targets) < 1:
        raise LrpcError(f"targets must be at least 1, got {targets}")
    targets = int(targets)
    if target_input not in TARGET_INPUTS:
        raise LrpcError(f"target_input must be one of {', '.join(TARGET_INPUTS)}, got {target_input!r}")
    graph = program.graph
    concept = None
    if crp_layer is not None or features is not None:
        if crp_layer is None or features is None:
            raise LrpcError("CRP needs both a layer and the features to explain")
        concept = ConceptSpec(find_layer(analysis, crp_layer), features)
    method = analysis.method
    if method is not None:
        if concept is not None or report or relevance_at or not normalize_output_relevance:
            raise LrpcError(f"{method.name} is a gradient method: CRP, --report, --relevance-at and "
                            "normalize_output_relevance are LRP's")
        at = _relevance_point(analysis, method.layer) if method.layer is not None else None
        emitted = emit_attribution(program, analysis.table, method, analysis.rules[0] if analysis.rules
                                   else GradientRule(), at=at, labels=labels, targets=targets)
    else:
        watched = [_relevance_point(analysis, ref) for ref in relevance_at]
        emitted = emit_relevance(program, analysis.table, analysis.rules, normalize_output_relevance,
                                 relevance_at=watched, concept=concept, report=report, labels=labels, targets=targets)
    graph.inputs.append(emitted.target)
    if emitted.region is not None:
        graph.inputs.append(emitted.region)
    graph.outputs.append(emitted.relevance)
    graph.outputs.extend(emitted.extra_outputs)
    program.unfuse()  # before cleanup: fused patterns may own the only reader of a tensor
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    proven = _proven_input_dims(program)
    out = program.to_model()
    _declare_dims(out, proven)
    # the backward's intermediate types are for the checker only: runtimes infer them
    keep = [vi for vi in out.graph.value_info if not vi.name.startswith("lrp/")]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep)
    # lrp_target defaults to [-1] ("explain the arg-max"; one row of -1 with several targets)
    # so callers may omit it, unless it is a required input (--target-input required: every
    # runtime and server sees it); a dense output's region to all ones (the whole output
    # counts unless the caller marks a part)
    defaults = [] if target_input == "required" else [
        numpy_helper.from_array(np.full((1, targets) if targets > 1 else 1, -1, dtype=np.int64), TARGET_NAME)]
    if emitted.region is not None:
        ones = np.ones([1] * len(emitted.region.shape), dtype=np.dtype(emitted.region.dtype))
        defaults.append(numpy_helper.from_array(ones, REGION_NAME))
    out.graph.initializer.extend(defaults)
    meta = {
        "lrpc.version": __version__,
        "lrpc.relevance": emitted.relevance.name,
        "lrpc.composite": repr(analysis.composite),
        "lrpc.input": program.input_name,
        "lrpc.explained": program.explained_name,
        "lrpc.output": program.output_name,
        "lrpc.relevance_start": program.start_name,
        "lrpc.normalize_output_relevance": str(bool(normalize_output_relevance)).lower(),
        "lrpc.rules": "; ".join(f"{layer.index}:{layer.name}={rule!r}" for layer, rule in analysis.layer_rules()),
    }
    if method is not None:
        meta["lrpc.method"] = repr(method)
        meta["lrpc.heatmap"] = method.heatmap
        for key in ("lrpc.composite", "lrpc.rules", "lrpc.normalize_output_relevance"):
            del meta[key]  # LRP's
    meta["lrpc.layout"] = program.layout
    meta["lrpc.target_input"] = target_input
    meta["lrpc.targets"] = str(targets)
    if program.position is not None:
        meta["lrpc.position"] = str(program.position)
    if report:
        meta["lrpc.report"] = json.dumps([[layer.index, layer.name, layer.op_type, repr(rule)]
                                          for layer, rule in analysis.layer_rules()])
    if concept is not None:
        meta["lrpc.crp"] = f"{concept.layer.index}:{concept.layer.name} {concept.features!r}"
    if program.deployed is not None:
        meta["lrpc.deployed"] = "twin"
    for key, value in meta.items():
        entry = out.metadata_props.add()
        entry.key, entry.value = key, value
    if program.deployed is not None:
        out = _deployed_file(program, out, emitted.relevance.name, analysis.relevance_dtype)
        _declare_dims(out, proven)
    _record_weight_packing(out)
    if program.deployed is not None:
        try:
            check(out, "compiled model", full=True)
        except LrpcError as exc:
            try:  # the file carries the deployed forward as it is: its own types must agree
                check(program.deployed, "the model", full=True)
            except LrpcError as own:
                raise LrpcError(f"{own}: its forward pass goes into the compiled file unchanged, so it must pass "
                                "the ONNX checker's full check") from None
            raise LrpcError(f"internal error: the compiled model fails the ONNX checker: {exc}") from None
        _verify_loads(out)
        return out
    try:
        light = program.to_model(light=True)  # the checker needs shapes, not weights
        light.graph.initializer.extend(defaults)
        check(light, "compiled model", full=True)
    except LrpcError as exc:  # a bug in lrpc, not in the user's model
        raise LrpcError(f"internal error: the compiled model fails the ONNX checker: {exc}") from None
    _verify_loads(out)
    return out


def _deployed_file(program: Program, twin: onnx.ModelProto, relevance: str, relevance_dtype) -> onnx.ModelProto:
    """The deployed model's own forward in front of the compiled twin (lrpc.deployed.stitch),
    its opset raised to the twin's where the canonizing passes raised that; ``relevance``
    in the explained tensor's own dtype unless ``relevance_dtype`` was given."""
    deployed = program.deployed
    opset = default_opset(deployed)
    if opset < program.opset:
        try:
            deployed = version_converter.convert_version(deployed, program.opset)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise LrpcError(f"cannot upgrade the deployed model's opset {opset} to {program.opset}: "
                            f"{str(exc).splitlines()[0]}") from None
    deployed = _without_stale_shapes(deployed)  # (after the conversion: its hints are checked as converted)
    out_type = None
    if relevance_dtype is None:
        explained = _declared_type(deployed, program.explained_name)
        out_type = explained if explained in FLOATS else None
    return stitch(deployed, twin, relevance, out_type)


def with_input_shape(model: onnx.ModelProto, input_name: str | None, shape) -> onnx.ModelProto:
    """A copy of ``model`` whose explained input (``input_name``, else the first input that
    is not a weight) has the dims ``shape`` (``-1`` or None keeps one as it is)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    chosen = [i for i in inputs if i.name == input_name] if input_name else inputs[:1]
    if not chosen:
        raise LrpcError(f"the model has no input {input_name!r} to give a shape")
    dims = chosen[0].type.tensor_type.shape.dim
    try:
        shape = [None if d is None or int(d) < 0 else int(d) for d in shape]
    except (TypeError, ValueError):
        raise LrpcError(f"input shape {shape!r}: give one integer per axis (-1 keeps an axis dynamic)") from None
    if len(shape) != len(dims):
        raise LrpcError(f"input shape {shape} has {len(shape)} axes; {chosen[0].name!r} has {len(dims)}")
    for d, value in zip(dims, shape):
        if value is not None and d.HasField("dim_value") and d.dim_value != value:
            raise LrpcError(f"input shape {shape}: {chosen[0].name!r} has {d.dim_value} where {value} was given")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _declare_dims(out, {chosen[0].name: shape})
    return out


def _proven_input_dims(program: Program) -> dict[str, list]:
    """Input dims the file leaves symbolic that the relevance pass's shape inference proves
    fixed: a KV cache's head size (onnxruntime-genai's ``kv_cache_dim``), read off the
    ``Concat`` with the new keys, whose other axes must agree. Declared in the compiled
    file, so an empty past can be built from its inputs alone (``lrpc explain``)."""
    found = {}
    for tensor in program.graph.inputs:
        if not tensor.shape:
            continue
        dims = list(tensor.shape)
        for consumer in tensor.outputs:
            out = consumer.outputs[0].shape if consumer.op == "Concat" and consumer.outputs else None
            if out is None or len(out) != len(dims):
                continue
            axis = int(consumer.attrs.get("axis", 0)) % len(dims)
            for i, d in enumerate(out):
                if i != axis and isinstance(d, int) and not isinstance(dims[i], int):
                    dims[i] = d
        if dims != list(tensor.shape):
            found[tensor.name] = dims
    return found


def _declare_dims(model: onnx.ModelProto, dims: dict[str, list]) -> None:
    """The ints in ``dims`` (input name → dims, None where one stays as it is) declared on
    the model's inputs where they are not fixed already."""
    for vi in model.graph.input:
        for dim, value in zip(vi.type.tensor_type.shape.dim, dims.get(vi.name, ())):
            if isinstance(value, int) and not dim.HasField("dim_value"):
                dim.dim_value = value


def _without_stale_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or, when its shape annotations contradict what its ops make (onnxruntime-genai's
    builder declares a ``[1]`` constant a scalar; ddddocr a rank-3 output as rank 2; onnxruntime
    ignores such hints), ``model`` without its intermediate ones, and if need be without its
    outputs' shapes: the compiled file must pass the full check."""
    try:
        check(model, "the model", full=True)
        return model
    except LrpcError:
        pass
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.value_info[:]
    for attempt in ("hints", "output shapes"):
        if attempt == "output shapes":  # ddddocr declares [1, seqlen] for a [T, 1, V] output:
            for out in stripped.graph.output:  # the outputs get the shapes inference gives them
                out.type.tensor_type.ClearField("shape")
            try:
                inferred = onnx.shape_inference.infer_shapes(stripped, data_prop=True)
            except Exception:  # noqa: BLE001 - inference refuses what the checker then names
                break
            del stripped.graph.output[:]
            stripped.graph.output.extend(inferred.graph.output)
        try:
            check(stripped, "the model", full=True)
            return stripped
        except LrpcError:
            continue
    return model  # not the hints: the caller names what the checker says


def _declared_type(model: onnx.ModelProto, name: str) -> int | None:
    """The element type ``model`` declares or infers for tensor ``name``."""
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # shape inference refuses some contrib graphs: keep the twin's dtype
        return None
    return next((vi.type.tensor_type.elem_type for vi in inferred.value_info if vi.name == name), None)


def _record_weight_packing(model: onnx.ModelProto) -> None:
    """``lrpc.pack_weights``: whether sessions should let onnxruntime pack the product
    weights, decided here once from the graph, so that a session opened from the file's path
    (its graph never parsed in Python) knows it too."""
    from .runtime.session import PACK_WEIGHTS_KEY, reads_product_weights_twice

    entry = model.metadata_props.add()
    entry.key, entry.value = PACK_WEIGHTS_KEY, "false" if reads_product_weights_twice(model) else "true"


def _verify_loads(model: onnx.ModelProto) -> None:
    """A file that compiles but cannot run is refused now, not at the user's first run:
    onnxruntime (when installed) builds a session from it, optimizations off (kernel
    lookup and type checks are what matter), its large weights read as zeros from a sparse
    file (never copied, so any size is checked, in well under a second)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    from .files import save_with_placeholder_weights

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="lrpc-verify-") as folder:
        path = save_with_placeholder_weights(model, folder)
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            first = first.replace(f"Load model from {path} failed:", "")  # the temporary copy's name
            raise LrpcError(f"the compiled model does not load in onnxruntime {ort.__version__}: {first}") from None


def find_layer(analysis: Analysis, ref) -> Layer:
    """A layer by flat index, node name or glob on node names (exactly one must match)."""
    layers = analysis.table.layers
    if isinstance(ref, (int, np.integer)) or (isinstance(ref, str) and ref.lstrip("-").isdigit()):
        index = int(ref)
        if not 0 <= index < len(layers):
            raise LrpcError(f"layer {index} does not exist; the model has {len(layers)} layers (see `lrpc inspect`)")
        return layers[index]
    hits = [layer for layer in layers if layer.name == ref] or [
        layer for layer in layers if fnmatch.fnmatchcase(layer.name, str(ref))]
    if len(hits) != 1:
        found = "no layer" if not hits else f"{len(hits)} layers ({', '.join(h.name for h in hits[:4])}...)"
        raise LrpcError(f"layer {ref!r} matches {found}; give an index or a unique name (see `lrpc inspect`)")
    return hits[0]


def _relevance_point(analysis: Analysis, ref) -> gs.Tensor:
    """Where ``--relevance-at`` (and GradCAM) reads: a layer's output, a tensor by name, or
    the output of any node on the relevance path by name (an activation too; a dynamo
    export's own node names are known as well as the module paths lrpc names them by)."""
    program, table = analysis.program, analysis.table
    tensors = program.graph.tensors()
    if isinstance(ref, str) and ref in tensors and ref in table.carriers:
        return tensors[ref]
    if isinstance(ref, str):
        name = program.aliases.get(ref, ref)
        nodes = [n for n in table.nodes if n.name == name and n.outputs and n.outputs[0].name in table.carriers]
        if len(nodes) == 1 and id(nodes[0]) not in {id(layer.node) for layer in table.layers}:
            return nodes[0].outputs[0]
        ref = name
    return find_layer(analysis, ref).output


def compile_file(src, dst, composite=None, external_data: bool | None = None, **kwargs) -> Path:
    """Compile ``src`` and write the result atomically to ``dst`` (weights in
    ``dst.data`` with ``external_data``, automatically for models near 2 GiB)."""
    model = compile(src, composite, **kwargs)
    return save_model(model, dst, external_data=external_data)


def lrp_rules(model, composite=None, **kwargs) -> list[tuple[Layer, Rule]]:
    """The rule each layer gets under ``composite``, without compiling."""
    return analyze_model(model, composite, **kwargs).layer_rules()
