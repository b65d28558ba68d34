"""``lrpc.LRP``'s siblings for the gradient methods: ``lrpc.Gradient(model)``,
``lrpc.IntegratedGradients(model, steps=32)``, ... Each compiles ``model`` with its method
(:mod:`lrpc.methods`) and explains batches in one onnxruntime call, as ``LRP`` does;
``analyze`` returns an :class:`~lrpc.runtime.analyzer.Explanation` whose ``analyzer`` names
the method and whose ``heatmap`` is ``"sensitivity"``, ``"attribution"`` or ``"cam"``."""

from __future__ import annotations

from .. import methods
from ..errors import LrpcError
from .analyzer import LRP, _is_compiled


class MethodAnalyzer(LRP):
    """Base of the method analyzers. Method parameters are keyword arguments of the
    constructor (``IntegratedGradients(model, steps=64, method="riemann_trapezoid")``);
    the options of :class:`~lrpc.LRP` that apply (``skip_checks``, ``input_name``,
    ``output_name``, ``position``, ``targets``, ``input_shape``, ``providers``,
    ``threads``, ...) are the same. A file already compiled with the method is used as is."""

    method_class: type[methods.Method] = methods.Method

    def __init__(self, model, *args, skip_checks: bool = False, verbose: bool = True, input_name=None,
                 output_name=None, position=None, max_constant_bytes=None, targets: int = 1, providers=None,
                 threads=None, input_shape=None, **params):
        from ..files import load_model

        proto = load_model(model)
        if _is_compiled(proto):
            recorded = {p.key: p.value for p in proto.metadata_props}.get("lrpc.method", "LRP")
            if recorded.split("(", 1)[0] != self.method_class.__name__:
                raise LrpcError(f"the file was compiled for {recorded}, not {self.method_class.__name__}")
            if args or params:
                raise LrpcError(f"the file is already compiled with {recorded}: its parameters are fixed")
            super().__init__(proto, skip_checks=skip_checks, verbose=verbose, providers=providers, threads=threads)
            return
        method = self.method_class(*args, **params)
        super().__init__(proto, method=method, skip_checks=skip_checks, verbose=verbose, input_name=input_name,
                         output_name=output_name, position=position, max_constant_bytes=max_constant_bytes,
                         targets=targets, providers=providers, threads=threads, input_shape=input_shape)


def _analyzer(method_class: type[methods.Method]) -> type[MethodAnalyzer]:
    doc = f"``{method_class.__name__}(model, ...)``: {method_class.__doc__}"
    return type(method_class.__name__, (MethodAnalyzer,), {"method_class": method_class, "__doc__": doc,
                                                          "__module__": __name__, "name": method_class.__name__})


Gradient = _analyzer(methods.Gradient)
InputTimesGradient = _analyzer(methods.InputTimesGradient)
SmoothGrad = _analyzer(methods.SmoothGrad)
IntegratedGradients = _analyzer(methods.IntegratedGradients)
GradCAM = _analyzer(methods.GradCAM)
