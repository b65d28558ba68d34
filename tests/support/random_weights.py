"""Every parameter of a Hugging Face model drawn at random, seeded.

Hugging Face initializes biases to 0 and norms to γ = 1, β = 0, which hides mistakes:
parameters are drawn from N(0, 0.3²), norm scales from 1 + N(0, 0.3²) so activations keep
their size. Torch only: the deploy-tools environment (``deploy_tools.py``, run as a
script) imports it too.
"""

from __future__ import annotations

import torch


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with every parameter redrawn (in place), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.3
            is_scale = ("norm" in pname.lower() or "ln_" in pname) and pname.endswith("weight")
            p.copy_(noise + 1.0 if is_scale else noise)
    return model.eval()
