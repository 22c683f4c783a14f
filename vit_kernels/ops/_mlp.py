"""The transformer MLP as one op: fc2(act(fc1(x))), forward and backward, on the persistent GEMM.

Why one op and not two Linear ops: its backward applies act' once, in the epilogue of the GEMM
that produces dH = dY @ W2, and takes the fc1 bias gradient from that epilogue's column sums;
the four other GEMMs are plain (see ``kernels/gemm.py`` for the launches). Two separate ops
would need act' either inside a K loop or in an extra pass over an (M, 4C) tensor.

Saved for the backward (like timm's eager Mlp): x, the weights, the pre-activation and h = act(pre).
With ``recompute=True`` x, the weights and fc1's bias: the backward recomputes both with one GEMM
(fc1's forward again). Neither bias is kept otherwise: their gradients are column sums of output gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend, reference
from ._linear_gelu import _autocast, _check_dtypes, _check_linear, bias_grad, col_sum_buffer, gemm, weight_grad

if backend.triton_installed():  # without triton, backend.runs_kernels picks the reference
    from ..kernels import gemm as kernels


def _fc1(x, fc1_weight, fc1_bias, activation, pre):
    """h = act(x @ fc1_weight^T + fc1_bias), the pre-activation stored into ``pre`` when it is (M, H)."""
    M, H = x.shape[0], fc1_weight.shape[0]
    store = pre.numel() > 0
    return gemm(x, fc1_weight.t(), x.new_empty((M, H)), bias=fc1_bias, act=activation,
                aux=pre if store else None, store_pre=store)


def _fwd(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
         fc2_bias: Optional[torch.Tensor], activation: str,
         save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (M, C_out), pre (M, H), h (M, H)) for x (M, C); pre and h are (0,) unless ``save``."""
    M, H = x.shape[0], fc1_weight.shape[0]
    pre = x.new_empty((M, H) if save else (0,))
    h = _fc1(x, fc1_weight, fc1_bias, activation, pre)
    y = gemm(h, fc2_weight.t(), x.new_empty((M, fc2_weight.shape[0])), bias=fc2_bias)
    return y, pre, h if save else x.new_empty((0,))


def _bwd(grad: torch.Tensor, x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
         fc2_weight: torch.Tensor, pre: torch.Tensor, h: torch.Tensor,
         activation: str, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias) for grad (M, C_out); an unneeded
    one (``needs``, in that order; False for an absent bias) is returned as (0,). pre and h (0,):
    recompute them with fc1_bias (read only then)."""
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs
    M, H = x.shape[0], fc1_weight.shape[0]
    if pre.numel() == 0:
        pre = x.new_empty((M, H))
        h = _fc1(x, fc1_weight, fc1_bias, activation, pre)
    grads = [x.new_empty((0,)) for _ in range(5)]
    if need_dw2:
        grads[3] = weight_grad(grad, h)
    if need_db2:
        grads[4] = bias_grad(grad)
    if need_dx or need_dw1 or need_db1:
        col_sums = col_sum_buffer(M, H, x) if need_db1 else None
        dpre = gemm(grad, fc2_weight, x.new_empty((M, H)), act=activation, epilogue=kernels.EPILOGUE_GRAD_OF_AUX,
                    aux=pre, col_sum=col_sums)
        if need_db1:
            grads[2] = col_sums.sum(0).to(x.dtype)
        if need_dx:
            grads[0] = gemm(dpre, fc1_weight, x.new_empty(x.shape))
        if need_dw1:
            grads[1] = weight_grad(dpre, x)
    return tuple(grads)


mlp_bwd_op = backend.kernel_op("vit_kernels::mlp_bwd", _bwd)


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, _fc2_bias, activation, _ = inputs
    _, pre, h = output
    ctx.mark_non_differentiable(pre, h)
    ctx.save_for_backward(x, fc1_weight, None if pre.numel() else fc1_bias, fc2_weight, pre, h)
    ctx.activation = activation


def _backward(ctx, grad, _grad_pre, _grad_h):
    backend.refuse_double_backward("mlp")
    needs = list(ctx.needs_input_grad[:5])
    grads = mlp_bwd_op(grad, *ctx.saved_tensors, ctx.activation, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


mlp_fwd_op = backend.kernel_op("vit_kernels::mlp_fwd", _fwd, backward=_backward, setup_context=_setup_context)


@backend.traceable
def mlp(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor] = None, activation: str = "gelu", *, recompute: bool = False) -> torch.Tensor:
    """fc2(act(fc1(x))): x (..., C), fc1_weight (H, C), fc1_bias (H,), fc2_weight (C_out, H),
    fc2_bias (C_out,) -> (..., C_out); biases may be None. ``activation``: "gelu" (exact erf),
    "gelu_tanh" or "quick_gelu". ``recompute=True`` keeps only x for the backward."""
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}; got {activation!r}")
    _check_linear(x, fc1_weight, fc1_bias, "fc1_")
    # fc2 reads fc1's H features.
    _check_linear(x, fc2_weight, fc2_bias, "fc2_", in_features=fc1_weight.shape[0])
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = _autocast(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    _check_dtypes(x, fc1_weight, fc1_bias, "fc1_")
    _check_dtypes(x, fc2_weight, fc2_bias, "fc2_")
    if not backend.runs_kernels("mlp", x, dots=True):
        return reference.mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation)
    x2d = x.reshape(-1, x.shape[-1])
    # The epilogues index the biases as contiguous; a strided or expanded view is copied.
    fc1_bias, fc2_bias = (None if b is None else b.contiguous() for b in (fc1_bias, fc2_bias))
    params = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params) and not recompute
    y, _, _ = mlp_fwd_op(x2d, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, save)
    return y.reshape(*x.shape[:-1], fc2_weight.shape[0])
