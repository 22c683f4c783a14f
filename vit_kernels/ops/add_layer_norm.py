"""Residual add (with LayerScale and DropPath's per-sample scale) fused into the LayerNorm after it."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend, reference


def implementation(device: torch.device) -> tuple[str, str]:
    """Which implementation runs add_layer_norm on ``device``, and why."""
    return "torch", "PyTorch reference (no kernel has landed yet)"


def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float = 1e-6, gamma: Optional[torch.Tensor] = None,
                   row_scale: Optional[torch.Tensor] = None,
                   residual_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = residual + gamma * row_scale[:, None] * x; normed = LayerNorm(new_residual).

    Returns ``(normed, new_residual)``. See ``reference.add_layer_norm`` for the exact semantics.
    """
    width = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("gamma", gamma)):
        if t is not None and t.shape != (width,):
            raise ValueError(f"{name} must have shape ({width},); got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}; got {tuple(residual.shape)}")
    if row_scale is not None and row_scale.shape != (x.shape[0],):
        raise ValueError(f"row_scale must have shape ({x.shape[0]},); got {tuple(row_scale.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    return reference.add_layer_norm(x, residual, weight, bias, eps, gamma, row_scale, residual_dtype)
