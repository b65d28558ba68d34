"""An AttnLRP / CP-LRP reference in torch, written from the formulas (no lrpc code).

In the gradient picture, LRP-ε with ε → 0 is Gradient × Input with some backward passes
changed (Achtibat et al. 2024; Ali et al. 2022):

- LayerNorm: σ detached (the centring stays linear); RMSNorm: 1/rms detached;
- elementwise non-linearities (GELU, SiLU, Tanh, ...): the identity rule, backward
  ``g · f(x) / x``;
- a product of two activations (``q·kᵀ``, ``p·v``, ``SiLU(g) * u``): each factor gets
  half of its gradient (AttnLRP's uniform rule; along a path the halvings multiply, so
  q and k end with ÷4 and v with ÷2);
- the softmax: its true Jacobian (with the inputs' own values this is the Taylor rule
  ``x ⊙ (R − p Σ R)``);
- CP-LRP: the softmax output and the activated factor of a gated product are detached,
  so all relevance flows through ``v`` and the signal branch.

:func:`relevance` applies these with a ``TorchFunctionMode`` (for functional ops) and
forward hooks on activation modules, so it works for any Hugging Face model built from
standard modules. It runs on a float64 copy of the model.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm}
_MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


class _Halves(torch.autograd.Function):
    """``op(a, b)`` whose backward gives each factor half of its gradient."""

    @staticmethod
    def forward(ctx, a, b, op):
        ctx.save_for_backward(a, b)
        ctx.op = op
        return op(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            ga, gb = torch.autograd.grad(ctx.op(a_, b_), (a_, b_), g)
        return 0.5 * ga, 0.5 * gb, None


class _Identity(torch.autograd.Function):
    """``y = f(x)`` with backward ``g · y / x`` (relevance passes unchanged)."""

    @staticmethod
    def forward(ctx, x, y):
        ratio = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, torch.ones_like(x), x))
        ctx.save_for_backward(ratio)
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        (ratio,) = ctx.saved_tensors
        return g * ratio, None


def _both_need_grad(args) -> bool:
    return len(args) >= 2 and all(isinstance(a, torch.Tensor) and a.requires_grad for a in args[:2])


class _Rules(TorchFunctionMode):
    def __init__(self, cp: bool):
        super().__init__()
        self.cp = cp

    def _product(self, op, a, b):
        if self.cp:
            gates = [getattr(t, "_lrp_gate", False) for t in (a, b)]
            if gates[0] != gates[1]:
                return op(a.detach(), b) if gates[0] else op(a, b.detach())
        return _Halves.apply(a, b, op)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func is torch.rsqrt or func is torch.Tensor.rsqrt:
            return func(*args, **kwargs).detach()
        if func in _SOFTMAX:
            out = func(*args, **kwargs)
            return out.detach() if self.cp else out
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func in _MATMULS and _both_need_grad(args):
            return self._product(torch.matmul, args[0], args[1])
        if func in _MULS and _both_need_grad(args):
            return self._product(torch.mul, args[0], args[1])
        return func(*args, **kwargs)

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        if k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        kt = k.transpose(-2, -1)
        scores = (self._product(torch.matmul, q, kt) if q.requires_grad and kt.requires_grad else q @ kt) * scale
        low = torch.finfo(scores.dtype).min
        if is_causal:
            keep = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
            scores = scores.masked_fill(~keep, low)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, low) if attn_mask.dtype == torch.bool else scores + attn_mask
        p = torch.softmax(scores, dim=-1)
        if self.cp:
            p = p.detach()
        return self._product(torch.matmul, p, v) if p.requires_grad and v.requires_grad else p @ v


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps).detach()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _is_activation(module: torch.nn.Module) -> bool:
    return type(module).__module__ == "transformers.activations" or isinstance(
        module, (torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.ReLU, torch.nn.Softplus))


def _identity_hook(module, inputs, output):
    out = _Identity.apply(inputs[0], output.detach())
    out._lrp_gate = True  # an activated factor: CP-LRP's gate when multiplied
    return out


def gradient_relevance(fn, x: np.ndarray, target, cp: bool = False, normalize: bool = False,
                       position=None, dtype=np.float64) -> np.ndarray:
    """Relevance at ``x`` for a plain torch function ``fn(x) -> logits`` written with
    ``torch.matmul``/``*``/``F.softmax``/``F.layer_norm`` (the products and softmax follow
    the rules above; use :func:`identity` for elementwise non-linearities)."""
    xt = torch.tensor(np.asarray(x, dtype=dtype), requires_grad=True)
    with _Rules(cp):
        logits = fn(xt)
    scores = logits if position is None else logits[:, position]
    scores = scores.reshape(scores.shape[0], -1)
    chosen = scores.argmax(1) if target is None else torch.as_tensor(np.array(np.broadcast_to(target, (len(scores),))))
    # the output relevance R = z ⊙ g: g is the one-hot (R = logit) or one-hot / logit (R = 1)
    seed = torch.zeros_like(scores)
    seed[torch.arange(len(scores)), chosen] = 1.0
    if normalize:
        seed = seed / scores.detach()
    (scores * seed).sum().backward()
    return (xt * xt.grad).detach().numpy()


def identity(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with the identity rule's backward (``g · f(x) / x``)."""
    out = _Identity.apply(x, fn(x.detach()))
    out._lrp_gate = True
    return out


def relevance(model: torch.nn.Module, forward, x: np.ndarray, target=None, position=None, cp: bool = False,
              normalize: bool = False) -> np.ndarray:
    """Relevance at ``x`` for ``forward(model, x_tensor) -> logits``.

    ``x`` is the explained float tensor (pixels, or the embedding output for token
    models). ``target``: class per sample (None: arg-max). ``position``: for logits
    ``[N, T, V]``, the explained position. ``normalize``: start from 1 instead of the logit.
    """
    model = copy.deepcopy(model).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = [m.register_forward_hook(_identity_hook) for m in model.modules() if _is_activation(m)]
    try:
        return gradient_relevance(lambda xt: forward(model, xt), x, target, cp=cp, normalize=normalize,
                                  position=position)
    finally:
        for h in hooks:
            h.remove()
