"""lrpc: compile an ONNX model into one ONNX file that also returns its LRP explanation."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CompositeSyntaxError,
    IncompatibleRuleError,
    InputError,
    LrpcError,
    ModelLoadError,
    ParameterError,
    TargetError,
    UnsupportedModelError,
)
from .rules import (  # noqa: E402
    AlphaBetaRule,
    ConstantGateRule,
    LayerNormRule,
    MergeRule,
    TaylorRule,
    EpsilonRule,
    FlatRule,
    GammaRule,
    GeneralizedGammaRule,
    PassRule,
    Rule,
    WSquareRule,
    ZBoxRule,
    ZeroRule,
    ZPlusRule,
)
from .composites import (  # noqa: E402
    AttnLRP,
    CPLRP,
    Composite,
    LayerNormLayer,
    ConvLayer,
    DenseLayer,
    DropoutLayer,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    FirstLayerMap,
    FirstLayerTypeMap,
    FirstNTypeMap,
    GlobalMap,
    GlobalTypeMap,
    LastLayerMap,
    LastLayerTypeMap,
    LayerMap,
    MergeLayer,
    NormalizationLayer,
    PoolingLayer,
    RangeMap,
    RangeTypeMap,
    ReshapingLayer,
)
from .registry import register_activation, register_layer  # noqa: E402
from .compiler import compile, compile_file, lrp_rules  # noqa: E402
from .expressions import parse_composite  # noqa: E402
from .runtime import CRP, LRP, Explanation, analyze  # noqa: E402
from .crp import IndexedFeatures, TopNFeatures  # noqa: E402
from .inspection import show_layer_indices  # noqa: E402
from .heatmap import heatmap, text_heatmap  # noqa: E402
from .dataset import explain_dataset  # noqa: E402

__all__ = [name for name in dir() if not name.startswith("_")]
