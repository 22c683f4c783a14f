"""The MLP's GEMMs: Linear + bias + GELU (fc1) and Linear + bias (fc2), forward and backward.

Both run one Triton GEMM (``kernels/linear_gelu.py``) with the bias and activation in its
epilogue; the backward reuses it with swapped strides (see that module's docstring).

Precision: fp16/bf16 operands, fp32 accumulation, output in the input dtype. float32 runs the
kernel only in the interpreter (``backend.float32_dots_on_kernels``), with the dot precision of
``backend.dot_precision``; float64 runs the reference.

Memory vs time (fc1): by default the forward stores the pre-activation ``x @ W^T + b`` when a
gradient will be needed, and the backward forms ``dY * act'(pre)`` while loading it. With
``recompute=True`` nothing beyond x, W, b is kept and the backward recomputes the
pre-activation with one more GEMM (about +50% of fc1's backward time, one (M, N) activation
less: 4 * C values per token).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend, reference

if backend.triton_installed():  # without triton, backend.runs_kernels picks the reference
    from ..kernels import linear_gelu as kernels


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features); got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (N, {x.shape[-1]}) for x of shape {tuple(x.shape)}; "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")


def _check_dtypes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}; got {t.dtype}")


def _autocast(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """Cast to the autocast dtype as nn.Linear would: floating tensors other than float64."""
    device_type = tensors[0].device.type
    # is_autocast_enabled raises for the meta device (the compile report's), which has no autocast.
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def _launch(a, b, c, M, N, K, a_strides, b_strides, *, bias=None, act="none", pre=None, pre_strides=(0, 0),
            aux=None, prologue_grad=False, epilogue_grad=False, store_pre=False, row_sum=None):
    """c (M, N) = epilogue(prologue(a) @ b) with a (M, K) and b (K, N) given as strides."""
    if M == 0 or N == 0:
        return  # nothing to write, and Triton rejects an empty grid
    placeholder = c  # unused pointer arguments: the constexpr flags keep the kernel off them
    aux_strides = (aux.stride(0), aux.stride(1)) if aux is not None else (0, 0)
    backend.launcher(kernels.gemm)[kernels.grid(M, N)](
        a, b, c,
        placeholder if bias is None else bias,
        placeholder if pre is None else pre,
        placeholder if aux is None else aux,
        placeholder if row_sum is None else row_sum,
        M, N, K, *a_strides, *b_strides, c.stride(0), c.stride(1), *pre_strides, *aux_strides,
        HAS_BIAS=bias is not None, ACT=kernels.ACT_IDS[act], PROLOGUE_GRAD=prologue_grad,
        EPILOGUE_GRAD=epilogue_grad, STORE_PRE=store_pre, ROW_SUM=row_sum is not None,
        DOT_PRECISION=backend.dot_precision(a.dtype),
    )


def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
         save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x @ weight^T + bias) for x (M, K), weight (N, K); and the pre-activation (M, N) if save_pre, else (0,)."""
    if activation not in kernels.ACT_IDS:
        raise ValueError(f"activation must be one of {tuple(kernels.ACT_IDS)}; got {activation!r}")
    M, K = x.shape
    N = weight.shape[0]
    save_pre = save_pre and activation != "none"
    out = x.new_empty((M, N))
    pre = x.new_empty((M, N) if save_pre else (0,))
    # W^T as the (K, N) operand: swapped strides, no copy.
    _launch(x, weight, out, M, N, K, (x.stride(0), x.stride(1)), (weight.stride(1), weight.stride(0)),
            bias=bias, act=activation, aux=pre if save_pre else None, store_pre=save_pre)
    return out, pre


def _bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
         pre: torch.Tensor, activation: str, need_dx: bool, need_dw: bool,
         need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K), dw (N, K), db (N,)) for grad (M, N); an unneeded one is returned as (0,).

    ``pre`` is the saved pre-activation (M, N), or (0,) to recompute it.
    """
    M, K = x.shape
    N = weight.shape[0]
    need_db = need_db and bias is not None
    dx = x.new_empty((M, K) if need_dx else (0,))
    dw = weight.new_empty((N, K) if need_dw else (0,))
    db = weight.new_empty((N,) if need_db else (0,))
    if M == 0 or N == 0:
        for t in (dx, dw, db):
            t.zero_()
        return dx, dw, db
    fused = activation != "none" and pre.numel() > 0
    if activation != "none" and not fused:
        # Recompute mode: dY' = dY * act'(x @ W^T + b) from one more GEMM, then plain GEMMs.
        dy = grad.new_empty((M, N))
        _launch(x, weight, dy, M, N, K, (x.stride(0), x.stride(1)), (weight.stride(1), weight.stride(0)),
                bias=bias, act=activation, aux=grad, epilogue_grad=True)
        grad, activation = dy, "none"
    prologue = dict(act=activation, prologue_grad=fused, pre=pre if fused else None)
    if need_dx:
        prologue["pre_strides"] = (pre.stride(0), pre.stride(1)) if fused else (0, 0)
        _launch(grad, weight, dx, M, K, N, (grad.stride(0), grad.stride(1)), (weight.stride(0), weight.stride(1)),
                **prologue)
    if need_dw or need_db:
        # dY'^T as the (N, M) operand; its row sums over the M tokens are db.
        prologue["pre_strides"] = (pre.stride(1), pre.stride(0)) if fused else (0, 0)
        dw_out = dw if need_dw else weight.new_empty((N, K))  # rare: a frozen weight with a trained bias
        _launch(grad, x, dw_out, N, K, M, (grad.stride(1), grad.stride(0)), (x.stride(0), x.stride(1)),
                row_sum=db if need_db else None, **prologue)
    return dx, dw, db


linear_act_bwd_op = backend.kernel_op("vit_kernels::linear_act_bwd", _bwd)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(x, weight, bias, pre)
    ctx.activation = activation


def _backward(ctx, grad, _grad_pre):
    backend.refuse_double_backward("linear" if ctx.activation == "none" else "linear_gelu")
    x, weight, bias, pre = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = linear_act_bwd_op(grad, x, weight, bias, pre, ctx.activation, need_dx, need_dw, need_db)
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None


linear_act_fwd_op = backend.kernel_op("vit_kernels::linear_act_fwd", _fwd, backward=_backward,
                                      setup_context=_setup_context)


def _run(x, weight, bias, activation: str, recompute: bool) -> Optional[torch.Tensor]:
    """The kernel's result, or None where the reference must run."""
    _check_linear(x, weight, bias)
    x, weight, bias = _autocast(x, weight, bias)
    _check_dtypes(x, weight, bias)
    # An empty x (no tokens, or in_features = 0: an empty reduction) runs the reference.
    if not backend.runs_kernels("linear" if activation == "none" else "linear_gelu", x, dots=True):
        return None
    # A view wherever the leading dims flatten; otherwise reshape makes the one needed copy.
    x2d = x.reshape(-1, x.shape[-1])
    # The epilogue indexes the bias as contiguous; a strided or expanded view is copied (N elements).
    bias = None if bias is None else bias.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    out, _ = linear_act_fwd_op(x2d, weight, bias, activation, needs_grad and not recompute)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight^T + bias, as ``F.linear``: x (..., K), weight (N, K), bias (N,) -> (..., N)."""
    out = _run(x, weight, bias, "none", False)
    return reference.linear(x, weight, bias) if out is None else out


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                activation: str = "gelu", *, recompute: bool = False) -> torch.Tensor:
    """activation(x @ weight^T + bias): "gelu" (exact erf), "gelu_tanh" or "quick_gelu".

    ``recompute=True`` keeps no pre-activation for the backward and recomputes it there.
    """
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}; got {activation!r}")
    out = _run(x, weight, bias, activation, recompute)
    return reference.linear_gelu(x, weight, bias, activation) if out is None else out
