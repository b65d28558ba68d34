"""An independent LRP-ε reference for single ops, by autograd ("gradient × input").

For a layer ``z = f(a)`` the ε-rule is ``R_a = a ⊙ ∂/∂a [f(a) · s]`` with
``s = R / stabilize(z)`` held constant. torch's autograd supplies the VJP, so this checks
lrpc's hand-written ONNX VJPs against an implementation that shares no code with them.
"""

from __future__ import annotations

import numpy as np
import torch


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * (torch.sign(z) + (z == 0).to(z))


def epsilon_lrp(fn, inputs, relevance, eps: float = 1e-6):
    """Relevance for each input of ``fn`` under LRP-ε, given its output relevance."""
    xs = [torch.as_tensor(np.asarray(x, dtype=np.float64)).requires_grad_(True) for x in inputs]
    z = fn(*xs)
    s = (torch.as_tensor(np.asarray(relevance, dtype=np.float64)) / stabilize(z, eps)).detach()
    grads = torch.autograd.grad((z * s).sum(), xs)
    return [(x * g).detach().numpy() for x, g in zip(xs, grads)]


def one_hot(targets, classes: int) -> np.ndarray:
    out = np.zeros((len(targets), classes))
    out[np.arange(len(targets)), targets] = 1.0
    return out
