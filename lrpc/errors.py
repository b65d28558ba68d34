"""The errors lrpc raises on bad input.

Every error a user can cause derives from :class:`LrpcError`; the command line prints
its message (one line, or the model-check table) and exits non-zero, never a traceback.
"""

from __future__ import annotations


class LrpcError(Exception):
    """Base class of all errors caused by the input (model, composite, data)."""


class ModelLoadError(LrpcError):
    """The file is missing, is not ONNX, is truncated or fails the ONNX checker."""


class UnsupportedModelError(LrpcError):
    """The model check found ops that lrpc cannot propagate relevance through.

    ``report`` is the :class:`lrpc.check.CheckReport`; ``str(error)`` is its table.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class IncompatibleRuleError(LrpcError):
    """A composite mapped a rule onto a layer the rule cannot handle."""


class CompositeSyntaxError(LrpcError):
    """A composite expression or rules file could not be parsed."""


class ParameterError(LrpcError, ValueError, TypeError):
    """A rule, composite primitive or feature selection got a parameter it cannot use
    (not finite, wrong sign, wrong order, not an integer, ...); the message names it."""


class TargetError(LrpcError, ValueError):
    """An explanation target (``output_selection`` / ``lrp_target``) is out of range."""


class InputError(LrpcError, ValueError):
    """The data given to an analyzer does not match the model's input."""
