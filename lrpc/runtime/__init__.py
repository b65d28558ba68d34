"""Running compiled models: sessions, the :class:`LRP` analyzer and :class:`Explanation`."""

from .analyzer import CRP, LRP, Explanation, analyze
from .methods import GradCAM, Gradient, InputTimesGradient, IntegratedGradients, SmoothGrad
from .session import available_providers, make_session

__all__ = ["CRP", "LRP", "Explanation", "GradCAM", "Gradient", "InputTimesGradient", "IntegratedGradients",
           "SmoothGrad", "analyze", "available_providers", "make_session"]
