"""Checks for user-given parameters: each raises :class:`~lrpc.errors.ParameterError`
naming the parameter, so a typo becomes one clear line instead of NaN relevance."""

from __future__ import annotations

import math
import numbers

import numpy as np

from .errors import ParameterError


def number(where: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite real number (not a bool), optionally > 0 or >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterError(f"{where} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ParameterError(f"{where} must be finite, got {value!r}")
    if positive and result <= 0:
        raise ParameterError(f"{where} must be greater than 0, got {value!r}")
    if nonnegative and result < 0:
        raise ParameterError(f"{where} must not be negative, got {value!r}")
    return result


def integer(where: str, value, *, minimum: int | None = None) -> int:
    """A whole number (not a bool), optionally at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParameterError(f"{where} must be a whole number, got {value!r}")
    result = int(value)
    if minimum is not None and result < minimum:
        raise ParameterError(f"{where} must be at least {minimum}, got {value!r}")
    return result


def finite_array(where: str, value) -> np.ndarray:
    """A scalar or array of finite numbers, as float32."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ParameterError(f"{where} must be a number or an array of numbers, got {value!r}") from None
    if isinstance(value, bool) or array.dtype == bool:
        raise ParameterError(f"{where} must be a number or an array of numbers, got {value!r}")
    if not np.all(np.isfinite(array)):
        raise ParameterError(f"{where} must be finite, got {value!r}")
    if np.any(np.abs(array) > np.finfo(np.float32).max):
        raise ParameterError(f"{where} is beyond float32's range, got {value!r}")
    return array.astype(np.float32)
