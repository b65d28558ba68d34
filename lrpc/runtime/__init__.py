"""Running compiled models: sessions, the :class:`LRP` analyzer and :class:`Explanation`."""

from .analyzer import LRP, Explanation, analyze
from .session import available_providers, make_session

__all__ = ["LRP", "Explanation", "analyze", "available_providers", "make_session"]
