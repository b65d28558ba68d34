"""Gradient methods, compiled into the same one file as LRP.

A method is a choice of rule per op, like a composite: every layer and every activation
takes :class:`~lrpc.rules.GradientRule` (the op's exact VJP, :attr:`OpSpec.exact_vjp`),
so the one emitter that writes LRP's backward pass writes the model's true gradient.
What a method adds is where the gradient is taken and how it becomes an attribution:

- :class:`Gradient`: ``∂f_c/∂x`` (Captum's ``Saliency(abs=False)``; Simonyan et al. 2014);
- :class:`InputTimesGradient`: ``x ⊙ ∂f_c/∂x`` (Shrikumar et al. 2016);
- :class:`SmoothGrad`: the mean gradient over ``samples`` noisy copies ``x + N(0, stdev²)``
  (Smilkov et al. 2017), the noise drawn inside the graph;
- :class:`IntegratedGradients`: ``(x − x̄) ⊙ Σ_k w_k ∂f_c/∂x(x̄ + α_k(x − x̄))`` with
  Captum's quadratures (Sundararajan et al. 2017);
- :class:`GradCAM`: at a layer's output ``A`` ``[N, C, ...]``, ``Σ_c mean(∂f_c/∂A_c) · A_c``,
  ``[N, 1, ...]``, no ReLU (Captum's ``LayerGradCam(relu_attributions=False)``; Selvaraju
  et al. 2017).

SmoothGrad's copies and IntegratedGradients' steps are batched: the forward pass is
written once more over ``copies × N`` rows (:func:`lrpc.emit.emit_attribution`), and the
copies are averaged back to ``N``. Parameters are checked in the constructors, so a typo
is one clear line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import validate
from .errors import ParameterError
from .symbolic import Emitter, Sym

#: the output a method's file adds (LRP's is ``relevance``)
ATTRIBUTION_NAME = "attribution"


class Method:
    """Base class: the gradient at the explained input, combined by :meth:`combine`."""

    #: XAIBase's heatmap style: "attribution" (signed), "sensitivity" (a magnitude), "cam"
    heatmap = "attribution"
    #: how many rows per sample the batched pass takes (1: the model's own forward)
    copies = 1
    #: where the gradient is taken: None (the explained input) or a layer reference
    layer = None

    def rows(self, em: Emitter, x) -> "Sym":
        """``[copies·N, ...]``: the inputs the gradient is taken at, copy-major."""
        raise NotImplementedError

    def combine(self, em: Emitter, x, grad: Sym) -> Sym:
        """The attribution ``[N, ...]`` from the gradient (``[copies·N, ...]`` for batched methods)."""
        return grad

    @property
    def name(self) -> str:
        return type(self).__name__

    def _args(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        return f"{self.name}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


class Gradient(Method):
    """``∂f_c/∂x``: how the explained logit changes with each input (a sensitivity map)."""

    heatmap = "sensitivity"


class InputTimesGradient(Method):
    """``x ⊙ ∂f_c/∂x``: the first-order contribution of each input."""

    def combine(self, em, x, grad):
        return em.sym(x) * grad


def _copy_major(em: Emitter, x, copies: int, stacked: Sym) -> Sym:
    """``[copies, N, ...]`` -> ``[copies·N, ...]`` (row ``k·N + n`` is copy ``k`` of sample ``n``)."""
    rest = em.op("Shape", [x], {"start": 1}, dtype=np.int64)
    shape = em.op("Concat", [em.ints([-1]), rest], {"axis": 0}, dtype=np.int64)
    return em.sym(em.op("Reshape", [stacked, shape], dtype=em.dtype))


def _per_copy(em: Emitter, x, copies: int, rows: Sym) -> Sym:
    """``[copies·N, ...]`` -> ``[copies, N, ...]``."""
    shape = em.op("Concat", [em.ints([copies]), em.shape_of(x)], {"axis": 0}, dtype=np.int64)
    return em.sym(em.op("Reshape", [rows, shape], dtype=em.dtype))


def _stacked(em: Emitter, x) -> Sym:
    """``x`` as ``[1, N, ...]``."""
    return em.sym(em.op("Unsqueeze", [x, em.ints([0])], dtype=em.dtype))


def _weights(em: Emitter, values, rank: int) -> Sym:
    """Per-copy weights as ``[copies, 1, ...]`` for a ``[copies, N, ...]`` tensor of rank ``rank + 1``."""
    array = np.asarray(values, dtype=em.dtype).reshape(-1, *([1] * rank))
    return em.sym(em.const(array))


def _rank(x) -> int:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ParameterError(f"the explained input {x.name!r} has no known rank")
    return len(shape)


class SmoothGrad(Method):
    """The mean gradient over ``samples`` copies of the input with Gaussian noise of standard
    deviation ``stdev`` (absolute, as Captum's ``stdevs``) added; ``seed`` seeds the graph's
    ``RandomNormalLike`` (each session then draws the same sequence; None: unseeded)."""

    heatmap = "sensitivity"

    def __init__(self, samples: int = 50, stdev: float = 0.1, seed: int | None = 0):
        self.samples = validate.integer("SmoothGrad: samples", samples, minimum=1)
        self.stdev = validate.number("SmoothGrad: stdev", stdev, nonnegative=True)
        self.seed = None if seed is None else validate.integer("SmoothGrad: seed", seed)

    @property
    def copies(self) -> int:
        return self.samples

    def rows(self, em, x):
        shape = em.op("Concat", [em.ints([self.samples]), em.shape_of(x)], {"axis": 0}, dtype=np.int64)
        copies = em.sym(em.op("Expand", [_stacked(em, x), shape], dtype=em.dtype))
        if self.stdev == 0:
            return _copy_major(em, x, self.samples, copies)
        attrs = {"mean": 0.0, "scale": self.stdev}
        if self.seed is not None:
            attrs["seed"] = float(self.seed)
        noise = em.op("RandomNormalLike", [copies], attrs, dtype=em.dtype, hint="smoothgrad_noise")
        return _copy_major(em, x, self.samples, copies + em.sym(noise))

    def combine(self, em, x, grad):
        return _per_copy(em, x, self.samples, grad).sum([0], keepdims=False) * (1.0 / self.samples)

    def _args(self):
        return {"samples": self.samples, "stdev": self.stdev, "seed": self.seed}


#: Captum's integral approximations (captum.attr._utils.approximation_methods)
QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, step sizes)`` of ``method`` with ``steps`` points, as Captum computes them."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if steps < 2:
        raise ParameterError(f"IntegratedGradients: {method} needs at least 2 steps, got {steps}")
    sizes = np.full(steps, 1.0 / steps)
    kind = method.split("_", 1)[1]
    if kind == "trapezoid":
        sizes[0] /= 2
        sizes[-1] /= 2
        return np.linspace(0.0, 1.0, steps), sizes
    # float32 linspace, as torch.linspace computes Captum's alphas
    start, stop = {"left": (0.0, 1.0 - 1.0 / steps), "right": (1.0 / steps, 1.0),
                   "middle": (1.0 / (2 * steps), 1.0 - 1.0 / (2 * steps))}[kind]
    return np.linspace(start, stop, steps), sizes


class IntegratedGradients(Method):
    """``(x − x̄) ⊙ ∫₀¹ ∂f_c/∂x(x̄ + α(x − x̄)) dα`` by ``method`` with ``steps`` points.
    ``baseline``: a number, an array broadcast to one sample's shape, or an ``.npy`` path."""

    def __init__(self, steps: int = 32, baseline=0.0, method: str = "gausslegendre"):
        self.steps = validate.integer("IntegratedGradients: steps", steps, minimum=1)
        if method not in QUADRATURES:
            raise ParameterError(f"IntegratedGradients: method must be one of {', '.join(QUADRATURES)}, got {method!r}")
        self.method = method
        self.alphas, self.step_sizes = quadrature(method, self.steps)
        self.baseline_source = baseline
        self.baseline = self._baseline(baseline)

    @staticmethod
    def _baseline(value) -> np.ndarray:
        if isinstance(value, (str, Path)):
            path = Path(value)
            if path.suffix != ".npy":
                raise ParameterError(f"IntegratedGradients: baseline must be a number, an array or an .npy file, "
                                     f"got {str(value)!r}")
            try:
                value = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ParameterError(f"IntegratedGradients: cannot read baseline {str(path)!r}: {exc}") from None
        return validate.finite_array("IntegratedGradients: baseline", value)

    @property
    def copies(self) -> int:
        return self.steps

    def _baseline_for(self, em, x) -> Sym:
        rank = _rank(x)
        b = self.baseline
        if b.ndim > rank - 1 and not (b.ndim == rank and b.shape[0] == 1):
            raise ParameterError(f"IntegratedGradients: baseline of shape {list(b.shape)} does not fit one sample "
                                 f"of {x.name!r} (rank {rank - 1}); give one sample's shape or a number")
        if b.ndim == rank:
            b = b[0]
        return em.sym(em.const(b.astype(em.dtype)))

    def rows(self, em, x):
        b = self._baseline_for(em, x)
        alphas = _weights(em, self.alphas, _rank(x))
        return _copy_major(em, x, self.steps, b + alphas * (_stacked(em, x) - b))

    def combine(self, em, x, grad):
        sizes = _weights(em, self.step_sizes, _rank(x))
        total = (_per_copy(em, x, self.steps, grad) * sizes).sum([0], keepdims=False)
        return (em.sym(x) - self._baseline_for(em, x)) * total

    def _args(self):
        baseline = self.baseline_source
        if isinstance(baseline, np.ndarray):
            baseline = f"<array {list(baseline.shape)}>"
        elif isinstance(baseline, Path):
            baseline = str(baseline)
        return {"steps": self.steps, "baseline": baseline, "method": self.method}


class GradCAM(Method):
    """Grad-CAM at ``layer`` (an index, a node name or a tensor, as ``--relevance-at`` takes
    them): the layer's output ``A`` weighted per channel by its mean gradient, summed over
    channels, ``[N, 1, ...]`` at the layer's resolution (no ReLU)."""

    heatmap = "cam"

    def __init__(self, layer=None):
        if layer is None:
            raise ParameterError("GradCAM: give the layer, e.g. GradCAM(layer=5) or GradCAM(layer=\"/features/7/Relu\")")
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise ParameterError(f"GradCAM: layer must be an index, a node name or a tensor name, got {layer!r}")
        self.layer = layer

    def combine(self, em, activation, grad):
        rank = _rank(activation)
        spatial = list(range(2, rank))
        weights = grad.mean(spatial, shape_of=activation) if spatial else grad
        return (weights * em.sym(activation)).sum([1], keepdims=True)

    def _args(self):
        return {"layer": self.layer}


#: every method, by name (the CLI's --method expressions)
METHODS = {cls.__name__: cls for cls in (Gradient, InputTimesGradient, SmoothGrad, IntegratedGradients, GradCAM)}


def as_method(value) -> Method | None:
    """A :class:`Method`, from itself, its class, or an expression such as
    ``"IntegratedGradients(steps=32)"``; None stays None (LRP)."""
    if value is None or isinstance(value, Method):
        return value
    if isinstance(value, type) and issubclass(value, Method):
        return value()
    if isinstance(value, str):
        from .expressions import parse_method

        return parse_method(value)
    raise ParameterError(f"method must be a method such as Gradient() or an expression, got {value!r}")
