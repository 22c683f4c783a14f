"""Linear + bias (``linear``) and Linear + bias + activation (``linear_gelu``), forward and backward,
and the GEMM launches they share with the MLP op (``_mlp``).

Every GEMM is one launch of the persistent kernel of ``kernels/gemm.py``, with operands given
as (possibly transposed) views: W^T, dY^T and x^T are strides, never copies. Weight gradients
are split over K (``weight_grad``); bias gradients are float32 sums of the output gradient.

Precision: fp16/bf16 operands, fp32 accumulation, output in the input dtype. float32 runs the
kernel only in the interpreter (``backend.float32_dots_on_kernels``): on a GPU it runs PyTorch,
i.e. cuBLAS, whatever ``torch.get_float32_matmul_precision`` says; float64 runs the reference.

Memory vs time (``linear_gelu``): by default the forward stores the pre-activation when a
gradient will be needed and the backward forms dY * act'(pre) from it in one elementwise pass.
With ``recompute=True`` nothing beyond x, W, b is kept: the backward recomputes the
pre-activation in a GEMM whose epilogue writes dY * act'(pre) directly (one GEMM more, one
(M, N) activation less). Inside an MLP, ``vk.ops.mlp`` needs neither: act' goes in the
epilogue of the GEMM that produces dH.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend, reference

if backend.triton_installed():  # without triton, backend.runs_kernels picks the reference
    import triton

    from ..kernels import gemm as kernels


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], prefix: str = "",
                  in_features: Optional[int] = None) -> None:
    """weight (N, in_features) and bias (N,) on x's device, in_features x's last size unless given;
    ``prefix`` names them in errors (``fc1_`` for fc1_weight)."""
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features); got a 0-d tensor")
    in_features = x.shape[-1] if in_features is None else in_features
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"{prefix}weight must have shape (N, {in_features}) for x of shape {tuple(x.shape)}; "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{prefix}{name} must be on x's device {x.device}; got {t.device}")


def _check_dtypes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], prefix: str = "") -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{prefix}{name} must have x's dtype {x.dtype}; got {t.dtype}")


def _autocast(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """Cast to the autocast dtype as nn.Linear would: floating tensors other than float64."""
    device_type = tensors[0].device.type
    # is_autocast_enabled raises for the meta device (the compile report's), which has no autocast.
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def _address(t: torch.Tensor) -> int:
    """Where ``t``'s data starts, modulo 16 at least. A traced (fake) or meta tensor has no address:
    its offset into an allocation stands in, since PyTorch's allocations are aligned (and
    torch.compile copies a misaligned input before a compiled graph reads it)."""
    if t.device.type != "meta":
        try:
            return t.data_ptr()
        except (RuntimeError, NotImplementedError):  # fake and functional tensors have no storage
            pass
    return t.storage_offset() * t.element_size()


def _tma_transposed(t: torch.Tensor) -> Optional[bool]:
    """How a TMA descriptor can read the 2-d view ``t``: False if it is row-major, True if its
    transpose is, None if neither (then the kernel reads through pointers). TMA needs unit
    stride along the inner dimension, a 16-byte aligned base and 16-byte multiples elsewhere."""
    if t.numel() == 0 or _address(t) % 16:
        return None
    size = t.element_size()
    for transposed, (outer, inner) in ((False, t.stride()), (True, t.stride()[::-1])):
        rows, cols = t.shape[::-1] if transposed else t.shape
        if (inner == 1 or cols == 1) and outer * size % 16 == 0 and outer >= cols:
            return transposed
    return None


def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, bias=None, act: str = "none",
         epilogue=None, aux=None, store_pre: bool = False, col_sum=None, split: int = 1) -> torch.Tensor:
    """c = epilogue(a @ b) for views a (M, K) and b (K, N) of any strides; returns c.

    c is (M, N), or (split, M, N) float32 partial products with ``split`` > 1. ``epilogue`` is
    one of the kernel's EPILOGUE_* (act by default); ``aux`` its (M, N) second tensor; col_sum a
    zeroed ``col_sum_buffer`` buffer for the column sums of c per row tile."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c  # nothing to write, and Triton rejects an empty grid
    a_t, b_t = _tma_transposed(a), _tma_transposed(b)
    placeholder = c  # unused pointer arguments: the constexpr flags keep the kernel off them
    aux_strides = aux.stride() if aux is not None else (0, 0)
    programs = kernels.num_programs(a.device)
    backend.launcher(kernels.gemm)[kernels.grid(M, N, split, programs)](
        a, b, c,
        placeholder if bias is None else bias,
        placeholder if aux is None else aux,
        placeholder if col_sum is None else col_sum,
        M, N, K, *a.stride(), *b.stride(), c.stride(0) if split > 1 else 0, c.stride(-2), c.stride(-1),
        *aux_strides,
        A_T=bool(a_t), B_T=bool(b_t), TMA=a_t is not None and b_t is not None,
        HAS_BIAS=bias is not None, ACT=kernels.ACT_IDS[act],
        EPILOGUE=kernels.EPILOGUE_ACT if epilogue is None else epilogue,
        STORE_PRE=store_pre, COL_SUM=col_sum is not None, SPLIT_K=split,
        DOT_PRECISION=backend.dot_precision(a.dtype),
    )
    return c


def col_sum_buffer(M: int, N: int, like: torch.Tensor) -> torch.Tensor:
    """The zeroed float32 buffer ``gemm(col_sum=)`` writes: one row of sums per row tile of the
    smallest tile height (taller tiles leave their extra rows 0)."""
    return torch.zeros((triton.cdiv(M, kernels.MIN_BLOCK_M), N), dtype=torch.float32, device=like.device)


def weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW (N, K) = grad^T @ x for grad (M, N), x (M, K): split over the M tokens so that the few
    output tiles fill the machine, the float32 slices summed in a fixed order (deterministic)."""
    M, N = grad.shape
    K = x.shape[1]
    split = kernels.split_k(N, K, M, kernels.num_programs(x.device))
    if split == 1:
        return gemm(grad.t(), x, x.new_empty((N, K)))
    partial = gemm(grad.t(), x, x.new_empty((split, N, K), dtype=torch.float32), split=split)
    return partial.sum(0).to(x.dtype)


def bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """db = the column sums of grad (M, N), accumulated in float32."""
    return grad.sum(0, dtype=torch.float32).to(grad.dtype)


def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
         save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x @ weight^T + bias) for x (M, K), weight (N, K); and the pre-activation (M, N) if save_pre, else (0,)."""
    if activation not in kernels.ACT_IDS:
        raise ValueError(f"activation must be one of {tuple(kernels.ACT_IDS)}; got {activation!r}")
    M = x.shape[0]
    N = weight.shape[0]
    save_pre = save_pre and activation != "none"
    pre = x.new_empty((M, N) if save_pre else (0,))
    out = gemm(x, weight.t(), x.new_empty((M, N)), bias=bias, act=activation, aux=pre if save_pre else None,
               store_pre=save_pre)
    return out, pre


def _bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
         pre: torch.Tensor, activation: str, need_dx: bool, need_dw: bool,
         need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (M, K), dw (N, K), db (N,)) for grad (M, N); an unneeded one (False for an absent bias) is
    returned as (0,).

    ``pre`` is the saved pre-activation (M, N), or (0,) to recompute it with ``bias`` (read only then).
    """
    M, K = x.shape
    N = weight.shape[0]
    if activation != "none" and pre.numel() > 0:
        # grad may be an expanded view; the elementwise kernel reads it flat.
        dy, grad = grad.contiguous(), x.new_empty((M, N))
        numel = grad.numel()
        backend.launcher(kernels._act_grad_product)[(triton.cdiv(numel, kernels.ELEMENTWISE_BLOCK),)](
            dy, pre, grad, numel, ACT=kernels.ACT_IDS[activation], BLOCK=kernels.ELEMENTWISE_BLOCK)
    elif activation != "none":
        # Recompute mode: dY' = dY * act'(x @ W^T + b) from one more GEMM.
        grad = gemm(x, weight.t(), x.new_empty((M, N)), bias=bias, act=activation,
                    epilogue=kernels.EPILOGUE_GRAD_OF_ACC, aux=grad)
    dx = gemm(grad, weight, x.new_empty((M, K))) if need_dx else x.new_empty((0,))
    dw = weight_grad(grad, x) if need_dw else x.new_empty((0,))
    db = bias_grad(grad) if need_db else x.new_empty((0,))
    return dx, dw, db


linear_act_bwd_op = backend.kernel_op("vit_kernels::linear_act_bwd", _bwd)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    # The bias gradient is a column sum of the output gradient: the bias is kept only to recompute pre.
    recomputes = activation != "none" and pre.numel() == 0
    ctx.save_for_backward(x, weight, bias if recomputes else None, pre)
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


@backend.traceable
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight^T + bias, as ``F.linear``: x (..., K), weight (N, K), bias (N,) -> (..., N)."""
    out = _run(x, weight, bias, "none", False)
    return reference.linear(x, weight, bias) if out is None else out


@backend.traceable
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                activation: str = "gelu", *, recompute: bool = False) -> torch.Tensor:
    """activation(x @ weight^T + bias): "gelu" (exact erf), "gelu_tanh" or "quick_gelu".

    ``recompute=True`` keeps no pre-activation for the backward and recomputes it there.
    """
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}; got {activation!r}")
    out = _run(x, weight, bias, activation, recompute)
    return reference.linear_gelu(x, weight, bias, activation) if out is None else out
