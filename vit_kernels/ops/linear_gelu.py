"""The MLP's GEMMs: Linear + bias + GELU (fc1) and Linear + bias (fc2)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend, reference


def implementation(device: torch.device) -> tuple[str, str]:
    """Which implementation runs linear_gelu on ``device``, and why."""
    return "torch", "PyTorch reference (no kernel has landed yet)"


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (N, {x.shape[-1]}) for x of shape {tuple(x.shape)}; "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight^T + bias, as ``F.linear``."""
    _check_linear(x, weight, bias)
    return reference.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                activation: str = "gelu") -> torch.Tensor:
    """activation(x @ weight^T + bias): "gelu" (exact erf), "gelu_tanh" or "quick_gelu"."""
    _check_linear(x, weight, bias)
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}; got {activation!r}")
    return reference.linear_gelu(x, weight, bias, activation)
