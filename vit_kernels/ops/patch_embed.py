"""Patch embedding: image -> normalised patches -> projection + bias + position embedding + prefix tokens."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend, reference

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


def implementation(device: torch.device) -> tuple[str, str]:
    """Which implementation runs patch_embed on ``device``, and why."""
    return "torch", "PyTorch reference (the extension has not landed yet)"


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                pos_embed: Optional[torch.Tensor] = None, prefix_tokens: Optional[torch.Tensor] = None,
                mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, C, H, W) uint8 or float images -> (B, P + L, D) tokens; see ``reference.patch_embed``."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W); got {tuple(images.shape)}")
    if images.dtype not in IMAGE_DTYPES:
        raise ValueError(f"images must be one of {IMAGE_DTYPES}; got {images.dtype}")
    if weight.dim() != 4 or weight.shape[1] != images.shape[1]:
        raise ValueError(f"weight must have shape (D, {images.shape[1]}, p, p); got {tuple(weight.shape)}")
    ph, pw = weight.shape[-2:]
    if images.shape[2] % ph or images.shape[3] % pw:
        raise ValueError(f"image size {tuple(images.shape[2:])} is not divisible by the patch size {(ph, pw)}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together")
    return reference.patch_embed(images, weight, bias, pos_embed, prefix_tokens, mean, std)
