"""Multi-head attention: ``attention`` on (B, H, N, D) tensors, ``qkv_attention`` on the packed projection."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend, reference


def implementation(device: torch.device) -> tuple[str, str]:
    """Which implementation runs attention on ``device``, and why."""
    return "torch", "PyTorch reference (no kernel has landed yet)"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(scale * q @ k^T) @ v; q, k, v of shape (B, H, N, D) with any strides."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D); got {tuple(t.shape)}")
    if k.shape != v.shape or k.shape[:2] + k.shape[3:] != q.shape[:2] + q.shape[3:]:
        raise ValueError(f"q, k, v shapes do not match: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    return reference.attention(q, k, v, scale, dropout_p)


def qkv_attention(qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None,
                  dropout_p: float = 0.0, q_norm=None, k_norm=None) -> torch.Tensor:
    """Attention read from the packed (B, N, 3 * C) qkv projection; returns (B, N, C).

    ``q_norm``/``k_norm``: a norm over the head dim (timm's qk-norm, e.g. ``nn.LayerNorm(D)``) or None.
    """
    if qkv.dim() != 3:
        raise ValueError(f"qkv must have shape (B, N, 3 * C); got {tuple(qkv.shape)}")
    if num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv has {qkv.shape[-1]} features; expected a multiple of 3 * num_heads = {3 * num_heads}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    return reference.qkv_attention(qkv, num_heads, scale, dropout_p, q_norm, k_norm)
