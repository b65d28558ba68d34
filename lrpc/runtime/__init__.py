"""Running compiled models: sessions, the :class:`LRP` analyzer and :class:`Explanation`."""

from .analyzer import CRP, LRP, Explanation, analyze
from .session import available_providers, make_session

__all__ = ["CRP", "LRP", "Explanation", "analyze", "available_providers", "make_session"]
