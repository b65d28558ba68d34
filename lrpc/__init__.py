"""lrpc: compile an ONNX model into one ONNX file that also returns its LRP explanation (or a
gradient method's attribution)."""

__version__ = "0.1.0"

# The public names load on first use (PEP 562): ``lrpc -h`` and the commands that need only
# a part of the package do not pay for onnx, onnx-graphsurgeon, networkx and onnxruntime.
_EXPORTS = {
    "CompositeSyntaxError": "errors",
    "IncompatibleRuleError": "errors",
    "InputError": "errors",
    "LrpcError": "errors",
    "ModelLoadError": "errors",
    "ParameterError": "errors",
    "TargetError": "errors",
    "UnsupportedModelError": "errors",
    "AlphaBetaRule": "rules",
    "ConstantGateRule": "rules",
    "LayerNormRule": "rules",
    "MergeRule": "rules",
    "TaylorRule": "rules",
    "EpsilonRule": "rules",
    "FlatRule": "rules",
    "GammaRule": "rules",
    "GeneralizedGammaRule": "rules",
    "PassRule": "rules",
    "Rule": "rules",
    "WSquareRule": "rules",
    "ZBoxRule": "rules",
    "ZeroRule": "rules",
    "ZPlusRule": "rules",
    "AttnLRP": "composites",
    "CPLRP": "composites",
    "Composite": "composites",
    "LayerNormLayer": "composites",
    "ConvLayer": "composites",
    "DenseLayer": "composites",
    "DropoutLayer": "composites",
    "EpsilonAlpha2Beta1": "composites",
    "EpsilonAlpha2Beta1Flat": "composites",
    "EpsilonGammaBox": "composites",
    "EpsilonPlus": "composites",
    "EpsilonPlusFlat": "composites",
    "FirstLayerMap": "composites",
    "FirstLayerTypeMap": "composites",
    "FirstNTypeMap": "composites",
    "GlobalMap": "composites",
    "GlobalTypeMap": "composites",
    "LastLayerMap": "composites",
    "LastLayerTypeMap": "composites",
    "LayerMap": "composites",
    "MergeLayer": "composites",
    "NormalizationLayer": "composites",
    "PoolingLayer": "composites",
    "RangeMap": "composites",
    "RangeTypeMap": "composites",
    "ReshapingLayer": "composites",
    "register_activation": "registry",
    "register_layer": "registry",
    "compile": "compiler",
    "compile_file": "compiler",
    "lrp_rules": "compiler",
    "parse_composite": "expressions",
    "CRP": "runtime",
    "LRP": "runtime",
    "Explanation": "runtime",
    "Gradient": "runtime",
    "InputTimesGradient": "runtime",
    "SmoothGrad": "runtime",
    "IntegratedGradients": "runtime",
    "GradCAM": "runtime",
    "GradientRule": "rules",
    "analyze": "runtime",
    "IndexedFeatures": "crp",
    "TopNFeatures": "crp",
    "show_layer_indices": "inspection",
    "heatmap": "heatmap",
    "text_heatmap": "heatmap",
    "explain_dataset": "dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    import importlib
    import importlib.util

    module = _EXPORTS.get(name)
    if module is None:
        # a submodule (``lrpc.compiler``) is an attribute once imported, as without lazy exports
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'lrpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
