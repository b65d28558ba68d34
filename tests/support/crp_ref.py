"""Reference Concept Relevance Propagation (CRP) relevances computed with Zennit.

CRP conditions an LRP explanation on single features ("concepts") of one layer: the relevance that
arrives at the output of that layer is masked so that only one channel keeps its relevance, and the
masked relevance is propagated further down to the input with the usual LRP rules. The relevance
*above* the layer is the plain LRP relevance and does not depend on the feature.

Recipe (mirrors :func:`support.zennit_ref.zennit_relevance`): the model is prepared with
:func:`support.zennit_ref.prepare` (BatchNorm fused, residual additions as ``zennit.layer.Sum``,
optionally float64), the output relevance is one-hot(target) (``normalize=True``) or
one-hot(target) * logit (``normalize=False``), and Zennit's ``Gradient`` attributor is run with the
composite. A forward hook on the module ``module_name`` calls ``output.register_hook(...)`` on the
module's output tensor; that tensor hook multiplies the incoming relevance by a channel mask (1 on
the selected channel of each sample, 0 elsewhere), and the Zennit rule hooks below the module
propagate the masked relevance. The activation following a Conv/Linear module has the Pass rule, so
masking at the module output equals masking at the activation output.

Features (``features`` argument):

* ``('top', n)``: per input, the ``n`` channels with the largest relevance summed over the spatial
  dimensions at the module output (from the plain, unmasked attribution of that input), in
  descending order of that sum. Ties keep the lower channel index first (stable sort, like Julia's
  ``sortperm(x; rev=true)``).
* ``('indexed', [i1, i2, ...])``: the given 0-based channel indices, the same for every input.

Output ordering: the input relevance has shape ``[F * N, *x.shape[1:]]`` and is ordered features
first, then inputs: ``[f1_x1, f1_x2, ..., f1_xN, f2_x1, ...]``, i.e. rows ``k*N:(k+1)*N`` belong to
feature ``k`` and ``R.reshape(F, N, *x.shape[1:])[k, i]`` is feature ``k`` of input ``i``. The
selected channels are an int64 array ``[F, N]``: ``indices[k, i]`` is the channel of feature ``k``
for input ``i`` (for top-n: input ``i``'s ``k``-th most relevant channel).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .zennit_ref import Gradient, _output_relevance, prepare

# --------------------------------------------------------------------------------------------------
# feature specifications
# --------------------------------------------------------------------------------------------------

def top_features(n: int) -> tuple:
    """The feature spec ``('top', n)``."""
    return ('top', int(n))


def indexed_features(*indices: int) -> tuple:
    """The feature spec ``('indexed', [i1, i2, ...])`` (0-based channel indices)."""
    if len(indices) == 1 and not isinstance(indices[0], (int, np.integer)):
        indices = tuple(indices[0])
    return ('indexed', [int(i) for i in indices])


def _parse_features(features):
    try:
        kind, value = features
    except (TypeError, ValueError):
        raise ValueError(f"features must be ('top', n) or ('indexed', [i, ...]), got {features!r}") from None
    if kind == 'top':
        n = int(value)
        if n <= 0:
            raise ValueError(f'top-n needs n > 0, got {n}')
        return kind, n
    if kind == 'indexed':
        indices = [int(i) for i in np.atleast_1d(np.asarray(value)).ravel()]
        if not indices:
            raise ValueError('indexed features need at least one index')
        if min(indices) < 0:
            raise ValueError(f'feature indices must be >= 0 (0-based), got {indices}')
        return kind, indices
    raise ValueError(f"unknown feature kind {kind!r}; expected 'top' or 'indexed'")


def num_features(features) -> int:
    """Number ``F`` of features a spec selects (``n`` for top-n, the number of indices otherwise)."""
    kind, value = _parse_features(features)
    return value if kind == 'top' else len(value)


def channel_scores(layer_rel: np.ndarray) -> np.ndarray:
    """Per-channel relevance ``[N, C]``: ``layer_rel`` ``[N, C, ...]`` summed over all dims after C."""
    layer_rel = np.asarray(layer_rel)
    if layer_rel.ndim < 2:
        raise ValueError(f'layer relevance must be [N, C, ...], got shape {layer_rel.shape}')
    return layer_rel.reshape(layer_rel.shape[0], layer_rel.shape[1], -1).sum(axis=2)


def select_features(layer_rel: np.ndarray, features) -> np.ndarray:
    """Selected channels ``[F, N]`` (int64) for the layer relevance ``layer_rel`` ``[N, C, ...]``.

    ``('top', n)``: ``indices[k, i]`` is the channel with the ``k``-th largest spatially summed
    relevance of input ``i`` (stable descending sort: ties keep the lower index first).
    ``('indexed', idx)``: ``indices[k, i] = idx[k]`` for every ``i``.
    """
    kind, value = _parse_features(features)
    scores = channel_scores(layer_rel)
    n_inputs, channels = scores.shape
    if kind == 'top':
        if value > channels:
            raise ValueError(f'top-{value} features requested, but the layer has only {channels} channels')
        order = np.argsort(-scores, axis=1, kind='stable')     # [N, C], descending, stable
        return np.ascontiguousarray(order[:, :value].T).astype(np.int64)
    if max(value) >= channels:
        raise ValueError(f'feature indices {value} out of range for {channels} channels')
    return np.repeat(np.asarray(value, dtype=np.int64)[:, None], n_inputs, axis=1)


# --------------------------------------------------------------------------------------------------
# attribution with a relevance hook on one module's output
# --------------------------------------------------------------------------------------------------

class _OutputHook:
    """Forward hook that puts a tensor hook on the module output: records and/or masks its relevance."""

    def __init__(self):
        self.mask = None        # torch tensor broadcastable to the output, or None (no masking)
        self.recorded = None    # relevance arriving at the output (after masking)
        self.calls = 0

    def __call__(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f'CRP needs a module with a single tensor output, got {type(output).__name__}')
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError('the CRP module is called more than once per forward pass')
        if output.requires_grad:
            output.register_hook(self._tensor_hook)

    def _tensor_hook(self, grad):
        if self.mask is not None:
            grad = grad * self.mask.to(grad.dtype)
        self.recorded = grad.detach().clone()
        return grad


def _module(ref: nn.Module, module_name: str) -> nn.Module:
    try:
        return ref.get_submodule(module_name)
    except AttributeError:
        known = [name for name, _ in ref.named_modules() if name]
        raise KeyError(f'no module named {module_name!r}; known: {known}') from None


def _channel_mask(channels: np.ndarray, n_channels: int, out_ndim: int, dtype) -> torch.Tensor:
    """``[N, C, 1, ...]`` mask with a 1 at ``channels[i]`` for sample ``i``."""
    n = len(channels)
    mask = torch.zeros((n, n_channels), dtype=dtype)
    mask[torch.arange(n), torch.as_tensor(channels, dtype=torch.int64)] = 1
    return mask.reshape(n, n_channels, *([1] * (out_ndim - 2)))


def _targets(logits: torch.Tensor, target) -> torch.Tensor:
    """Class index per sample, as :func:`support.zennit_ref._output_relevance` picks it."""
    if target is None:
        return logits.argmax(dim=1)
    return torch.as_tensor(np.broadcast_to(np.asarray(target, dtype=np.int64), (logits.shape[0],)).copy())


class CRPResult(NamedTuple):
    """Everything :func:`crp` computes.

    ``relevance``: input relevance ``[F * N, *x.shape[1:]]``, features first, then inputs.
    ``indices``: selected channels ``[F, N]`` (int64).
    ``layer_relevance``: unmasked relevance at the module output ``[N, C, ...]``.
    ``targets``: output class per input ``[N]`` (int64).
    """
    relevance: np.ndarray
    indices: np.ndarray
    layer_relevance: np.ndarray
    targets: np.ndarray


def _prepare_inputs(model, x, target, normalize: bool, double: bool):
    """Prepared model, input tensor, output relevance and targets, as ``zennit_ref`` builds them."""
    ref = prepare(model, double)
    dtype = next(ref.parameters()).dtype
    inputs = torch.as_tensor(np.array(x, dtype=np.float32)).to(dtype)
    if inputs.ndim < 1 or inputs.shape[0] < 1:
        raise ValueError(f'x must be a non-empty batch [N, ...], got shape {tuple(inputs.shape)}')
    with torch.no_grad():
        logits = ref(inputs)
    return ref, inputs, _output_relevance(logits, target, normalize), _targets(logits, target)


def _attributions(ref, inputs, grad_output, composite, module_name: str, masks):
    """Yield ``(input relevance, relevance at the module output)`` per mask (``None``: unmasked).

    ``masks`` may be a generator that reads earlier results (the composite stays registered).
    """
    hook = _OutputHook()
    handle = _module(ref, module_name).register_forward_hook(hook)
    try:
        with Gradient(model=ref, composite=composite) as attributor:
            for mask in masks:
                hook.mask, hook.recorded, hook.calls = mask, None, 0
                _, relevance = attributor(inputs, grad_output)
                if hook.recorded is None:
                    raise RuntimeError(f'no relevance reached the output of {module_name!r}')
                yield relevance.detach().cpu().numpy(), hook.recorded.cpu().numpy()
    finally:
        handle.remove()


def crp(model: nn.Module, x: np.ndarray, target, composite, module_name: str, features,
        normalize: bool = True, double: bool = True) -> CRPResult:
    """CRP relevances of ``model`` for the batch ``x`` conditioned on channels of ``module_name``.

    See the module docstring for the recipe, the feature specs and the output ordering. ``target``:
    ``None`` (arg-max per sample), an int, or one class per sample. Runs one unmasked attribution
    (for the layer relevance and the top-n choice) and one masked attribution per feature, all in
    one registration of ``composite`` and with the same output relevance (from the logits of ``x``).
    """
    _parse_features(features)  # validate before any work
    ref, inputs, grad_output, targets = _prepare_inputs(model, x, target, normalize, double)
    state = {}

    def masks():
        yield None
        layer_rel = state['layer']
        state['indices'] = select_features(layer_rel, features)
        for channels in state['indices']:
            yield _channel_mask(channels, layer_rel.shape[1], layer_rel.ndim, inputs.dtype)

    relevances = []
    for relevance, at_layer in _attributions(ref, inputs, grad_output, composite, module_name, masks()):
        if 'layer' not in state:
            state['layer'] = at_layer
        else:
            relevances.append(relevance)
    indices = state['indices']
    relevance = np.concatenate(relevances, axis=0)
    assert relevance.shape == (len(indices) * inputs.shape[0], *inputs.shape[1:])
    return CRPResult(relevance, indices, state['layer'], targets.cpu().numpy().astype(np.int64))


def crp_relevance(model: nn.Module, x: np.ndarray, target, composite, module_name: str, features,
                  normalize: bool = True, double: bool = True, return_indices: bool = False):
    """Input relevance ``[F * N, *x.shape[1:]]`` of CRP (features first, then inputs).

    Rows ``k*N:(k+1)*N`` hold feature ``k`` for inputs ``0..N-1``. ``features``: ``('top', n)`` or
    ``('indexed', [i1, ...])`` (0-based channels of the output of ``module_name``). float64 if
    ``double`` (default), else float32. With ``return_indices=True`` returns
    ``(relevance, indices)`` with ``indices`` the selected channels ``[F, N]`` (int64).
    """
    result = crp(model, x, target, composite, module_name, features, normalize=normalize, double=double)
    return (result.relevance, result.indices) if return_indices else result.relevance


def layer_relevance(model: nn.Module, x: np.ndarray, target, composite, module_name: str,
                    normalize: bool = True, double: bool = True) -> np.ndarray:
    """Plain (unmasked) LRP relevance at the output of ``module_name``: ``[N, C, ...]``.

    This is the quantity the top-n choice is made from (summed over the dims after C, see
    :func:`channel_scores`). float64 if ``double`` (default), else float32.
    """
    ref, inputs, grad_output, _ = _prepare_inputs(model, x, target, normalize, double)
    (_, at_layer), = _attributions(ref, inputs, grad_output, composite, module_name, [None])
    return at_layer


def feature_indices(model: nn.Module, x: np.ndarray, target, composite, module_name: str, features,
                    normalize: bool = True, double: bool = True) -> np.ndarray:
    """Selected channels ``[F, N]`` (int64) without computing the masked attributions."""
    return select_features(layer_relevance(model, x, target, composite, module_name,
                                           normalize=normalize, double=double), features)


def split_features(relevance: np.ndarray, n_inputs: int) -> np.ndarray:
    """View ``[F * N, ...]`` CRP relevance as ``[F, N, ...]``."""
    relevance = np.asarray(relevance)
    if relevance.shape[0] % n_inputs:
        raise ValueError(f'{relevance.shape[0]} rows are not a multiple of {n_inputs} inputs')
    return relevance.reshape(relevance.shape[0] // n_inputs, n_inputs, *relevance.shape[1:])


__all__ = [
    'CRPResult', 'channel_scores', 'crp', 'crp_relevance', 'feature_indices', 'indexed_features',
    'layer_relevance', 'num_features', 'select_features', 'split_features', 'top_features',
]
