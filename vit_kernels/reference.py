"""The pure-PyTorch version of every op: the CPU fallback and the oracle of every test.

Each function states the op's semantics in a few lines of PyTorch; the kernels must agree
with it to within PyTorch's own rounding error.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Norm = Optional[Callable[[torch.Tensor], torch.Tensor]]


def attention(q, k, v, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(scale * q @ k^T) @ v over (B, H, N, D) tensors; ``scale`` defaults to D ** -0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if dropout_p > 0:
        # The mask drawn as F.dropout draws it, as timm's SDPA does on a CPU; autograd keeps it and
        # the probabilities, as SDPA's math path does.
        return F.dropout(_probabilities(q, k, scale), p=dropout_p) @ v
    if torch.compiler.is_compiling():
        # A compiled graph plans what it keeps for the backward itself (and torch 2.11's dynamo cannot
        # trace the autocast queries in _Attention.setup_context).
        return _probabilities(q, k, scale) @ v
    return _Attention.apply(q, k, v, scale)


def _probabilities(q, k, scale: float) -> torch.Tensor:
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


class _Attention(torch.autograd.Function):
    """``_probabilities(q, k, scale) @ v`` keeping only q, k, v for the backward. Autograd would keep
    the (B, H, N, N) scores and probabilities; timm's SDPA keeps q, k, v, out and lse.

    The backward recomputes the probabilities (one q @ k^T more) under the forward's autocast, so it
    rounds where the forward did, then applies the gradient formulas as differentiable ops, so
    double backward works (SDPA's CPU kernel has none).
    """

    @staticmethod
    def forward(q, k, v, scale: float) -> torch.Tensor:
        return _probabilities(q, k, scale) @ v

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, ctx.scale = inputs
        ctx.save_for_backward(q, k, v)
        device = q.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        ctx.autocast_dtype = torch.get_autocast_dtype(device) if autocast else None

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        dtype = ctx.autocast_dtype
        with torch.autocast(q.device.type, dtype) if dtype is not None else contextlib.nullcontext():
            probs = _probabilities(q, k, ctx.scale)
            # In the probabilities' dtype, as autograd hands it on (float32 where autocast runs softmax so).
            dprobs = (dout @ v.transpose(-2, -1)).to(probs.dtype)
            dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))  # softmax's backward
            # Scaled in q's dtype, as autograd scales the gradient of q * scale.
            dq = (dscores @ k).to(q.dtype) * ctx.scale
            dk = dscores.transpose(-2, -1) @ (q * ctx.scale)
            dv = probs.transpose(-2, -1) @ dout
        return dq, dk, dv, None


def split_qkv(qkv: torch.Tensor, num_heads: int):
    """(B, N, 3 * H * D) packed projection -> q, k, v of shape (B, H, N, D) (views)."""
    return qkv.unflatten(-1, (3, num_heads, qkv.shape[-1] // (3 * num_heads))).permute(2, 0, 3, 1, 4).unbind(0)


def qkv_attention(qkv, num_heads: int, scale: Optional[float] = None, dropout_p: float = 0.0,
                  q_norm: Norm = None, k_norm: Norm = None) -> torch.Tensor:
    """Attention on the packed (B, N, 3 * C) qkv projection -> (B, N, C) for the output projection.

    ``q_norm``/``k_norm`` (timm's qk-norm) are applied over the head dim of q and k.
    """
    B, N, _ = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    out = attention(q, k, v, scale, dropout_p)
    return out.transpose(1, 2).reshape(B, N, qkv.shape[-1] // 3)


def residual_branch(x, gamma=None, row_scale=None):
    """What a residual add adds: ``x * gamma * row_scale[:, None]`` in timm's order (LayerScale, then
    DropPath); absent factors are 1. ``row_scale`` has one entry per sample (dim 0)."""
    if gamma is not None:
        x = x * gamma
    if row_scale is not None:
        x = x * row_scale.reshape(-1, *([1] * (x.dim() - 1)))
    return x


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-6, gamma=None, row_scale=None,
                   residual_dtype: Optional[torch.dtype] = None):
    """new_residual = residual + gamma * row_scale[:, None] * x;  normed = LayerNorm(new_residual).

    Absent factors are 1; ``residual=None`` means new_residual = gamma * row_scale * x.
    ``row_scale`` has one entry per sample (dim 0), broadcast over the other dims.
    Returns (normed, new_residual); new_residual is in ``residual_dtype`` if given.
    """
    branch = residual_branch(x, gamma, row_scale)
    new_residual = branch if residual is None else residual + branch
    if residual_dtype is not None:
        new_residual = new_residual.to(residual_dtype)
    # Parameters of another dtype than new_residual (float32 ones with a 16-bit stream, or the
    # reverse): normalise in the widest of them, as the kernel does in float32, and round once.
    # F.layer_norm's own mixed-dtype support covers only some of these cases (not CPU backward).
    dtype = new_residual.dtype
    for t in (weight, bias):
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    weight, bias = (None if t is None else t.to(dtype) for t in (weight, bias))
    normed = F.layer_norm(new_residual.to(dtype), (x.shape[-1],), weight, bias, eps).to(x.dtype)
    return normed, new_residual


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """gelu (exact erf), gelu_tanh (tanh approximation) or quick_gelu (x * sigmoid(1.702 x))."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {name!r}")


def linear(x, weight, bias=None) -> torch.Tensor:
    """x @ weight^T + bias."""
    return F.linear(x, weight, bias)


def linear_gelu(x, weight, bias=None, activation_name: str = "gelu") -> torch.Tensor:
    """activation(x @ weight^T + bias); exact-erf GELU by default."""
    return activation(F.linear(x, weight, bias), activation_name)


def mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias=None, activation_name: str = "gelu") -> torch.Tensor:
    """fc2(activation(fc1(x))), as timm's Mlp without dropout or norm."""
    return F.linear(linear_gelu(x, fc1_weight, fc1_bias, activation_name), fc2_weight, fc2_bias)


def patch_embed(images, weight, bias=None, pos_embed=None, prefix_tokens=None,
                mean=None, std=None) -> torch.Tensor:
    """Image (B, C, H, W) -> tokens (B, P + L, D).

    uint8 images are scaled to [0, 1]; then (image - mean) / std per channel if given; then a
    Conv2d with kernel = stride = patch, flattened to L = (H / p) * (W / p) tokens. Prefix
    tokens (1, P, D) go in front. A pos_embed of length P + L is added to every token, one of
    length L to the patch tokens only (timm's ``no_embed_class``).
    """
    x = images.to(weight.dtype)
    if images.dtype == torch.uint8:
        x = x / 255
    if mean is not None:
        x = (x - mean.to(x).reshape(1, -1, 1, 1)) / std.to(x).reshape(1, -1, 1, 1)
    if x.shape[1] == 0:  # F.conv2d gives 0 output channels for 0 input channels (pytorch/pytorch#56998):
        x, weight = F.pad(x, (0, 0, 0, 0, 0, 1)), F.pad(weight, (0, 0, 0, 0, 0, 1))  # a zero channel adds 0
    tokens = F.conv2d(x, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == tokens.shape[1]:
        tokens = tokens + pos_embed
        pos_embed = None
    if num_prefix:
        tokens = torch.cat([prefix_tokens.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens
