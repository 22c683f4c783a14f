"""The fused residual stream: each residual add of a block runs inside the LayerNorm after it.

A pre-norm block computes ``x + drop_path(ls(branch))`` and then normalises the sum. Here
that add is left *pending* — ``(branch, gamma, row_scale)`` — and the next LayerNorm (norm2,
the next block's norm1, or the model's final norm) performs it with ``ops.add_layer_norm``,
so the residual stream is read and written once per add instead of three times.

``FusedBlock.forward(x)`` is still a drop-in for timm's ``Block.forward`` (it completes its own
last add), so any code that calls the blocks one by one (``forward_intermediates``,
``checkpoint_seq``, masked attention) keeps working unchanged.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .layers import LayerNorm, drop_path_scale

# (branch, LayerScale gamma or None, DropPath per-sample factor or None)
Pending = Optional[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]


def _gamma(ls: nn.Module) -> Optional[Tensor]:
    return None if isinstance(ls, nn.Identity) else ls.gamma


def _row_scale(drop_path: nn.Module, branch: Tensor) -> Optional[Tensor]:
    if isinstance(drop_path, nn.Identity):
        return None
    return drop_path_scale(branch, drop_path.drop_prob, drop_path.training, drop_path.scale_by_keep)


def add_pending(x: Tensor, pending: Pending) -> Tensor:
    """The residual stream with the pending add done, in timm's order: x + (branch * gamma) * scale."""
    if pending is None:
        return x
    branch, gamma, row_scale = pending
    if gamma is not None:
        branch = branch * gamma
    if row_scale is not None:
        branch = branch * row_scale.reshape(-1, *([1] * (branch.dim() - 1)))
    return x + branch


def add_norm(x: Tensor, pending: Pending, norm: nn.LayerNorm) -> Tuple[Tensor, Tensor]:
    """(norm(x + pending), x + pending) in one add+LayerNorm op."""
    if pending is None:
        return ops.add_layer_norm(x, None, norm.weight, norm.bias, norm.eps)[0], x
    branch, gamma, row_scale = pending
    return ops.add_layer_norm(branch, x, norm.weight, norm.bias, norm.eps, gamma=gamma, row_scale=row_scale)


def has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class FusedBlock(nn.Module):
    """A pre-norm transformer block (timm's ``Block``) on the fused residual stream.

    Holds the original block's children under their original names (so state_dict keys and
    Parameter objects are the block's); norm1 and norm2 must be last-dim LayerNorms, ls1/ls2
    LayerScale or Identity, drop_path1/2 DropPath or Identity. ``attn`` and ``mlp`` can be any
    module with timm's call signature.
    """

    def __init__(self, children: dict) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward_fused(self, x: Tensor, pending: Pending, cls_only: bool = False) -> Tuple[Tensor, Pending]:
        """(residual stream, this block's pending MLP add) from the stream and the previous pending add.

        ``cls_only``: after attention keep token 0 only, so the MLP and norm2 run on one token
        per image (for class-token pooling in eval mode); the stream returned is (B, 1, C).
        """
        normed, x = add_norm(x, pending, self.norm1)
        branch = self.attn(normed)
        if cls_only:
            branch, x = branch[:, :1], x[:, :1]
        normed, x = ops.add_layer_norm(branch, x, self.norm2.weight, self.norm2.bias, self.norm2.eps,
                                       gamma=_gamma(self.ls1), row_scale=_row_scale(self.drop_path1, branch))
        branch = self.mlp(normed)
        return x, (branch, _gamma(self.ls2), _row_scale(self.drop_path2, branch))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        normed = add_norm(x, None, self.norm1)[0]
        branch = self.attn(normed, attn_mask=attn_mask, is_causal=is_causal)
        normed, x = ops.add_layer_norm(branch, x, self.norm2.weight, self.norm2.bias, self.norm2.eps,
                                       gamma=_gamma(self.ls1), row_scale=_row_scale(self.drop_path1, branch))
        branch = self.mlp(normed)
        return add_pending(x, (branch, _gamma(self.ls2), _row_scale(self.drop_path2, branch)))


def run_blocks(blocks, x: Tensor, final_norm: nn.Module, grad_checkpointing: bool = False,
               cls_only: bool = False) -> Tensor:
    """final_norm(blocks(x)) with every residual add fused into the LayerNorm after it.

    Blocks that are not ``FusedBlock`` (or carry forward hooks) run as they are, after the
    pending add is completed. ``cls_only`` is honoured when the last block is fused: the
    result is then (B, 1, C), the class token only.
    """
    blocks = list(blocks)
    grad_checkpointing = grad_checkpointing and torch.is_grad_enabled()
    pending: Pending = None
    for i, block in enumerate(blocks):
        if isinstance(block, FusedBlock) and not has_hooks(block):
            last_cls_only = cls_only and i == len(blocks) - 1
            if grad_checkpointing:
                x, pending = checkpoint(block.forward_fused, x, pending, last_cls_only, use_reentrant=False)
            else:
                x, pending = block.forward_fused(x, pending, last_cls_only)
        else:
            x, pending = add_pending(x, pending), None
            x = checkpoint(block, x, use_reentrant=False) if grad_checkpointing else block(x)
    if pending is not None and _fusable_norm(final_norm):
        return add_norm(x, pending, final_norm)[0]
    return final_norm(add_pending(x, pending))


def _fusable_norm(norm: nn.Module) -> bool:
    # optimize() swaps every fusable final norm for vk's LayerNorm; anything else (a subclass
    # with its own forward, RMSNorm, Identity) runs as it is.
    return type(norm) is LayerNorm and len(norm.normalized_shape) == 1 and not has_hooks(norm)
