"""Residual add (with LayerScale and DropPath's per-sample scale) fused into the LayerNorm after it.

Two ops, ``vit_kernels::add_layer_norm_fwd`` and ``vit_kernels::add_layer_norm_bwd``, registered
with ``backend.kernel_op`` (the forward's autograd formula runs the backward op).
Gradients: x, residual, weight, bias, gamma, and row_scale when it requires grad (DropPath's
scale does not, so that reduction is skipped unless asked for).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference

if backend.triton_installed():  # without triton, backend.runs_kernels picks the reference
    import triton

    from ..kernels import add_layer_norm as kernels


def _rows(t: Tensor, width: int) -> Tensor:
    # A view whenever the leading dims collapse (the usual case); otherwise reshape copies, which
    # the kernel needs because it walks rows with one stride. The column stride is passed as is.
    return t.reshape(-1, width)


def _rows_per_sample(x: Tensor) -> int:
    return x.numel() // (x.shape[-1] * x.shape[0]) if x.dim() > 1 and x.shape[0] else 1


def _fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
         gamma: Optional[Tensor], row_scale: Optional[Tensor], eps: float, residual_dtype: torch.dtype,
         store_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (normed like x, new_residual in residual_dtype (empty unless stored), mean, rstd (rows,) fp32)."""
    width = x.shape[-1]
    x2 = _rows(x, width)
    r2 = x2 if residual is None else _rows(residual, width)
    rows = x2.shape[0]
    normed = x.new_empty(x.shape)
    new_residual = x.new_empty(x.shape if store_residual else (0,), dtype=residual_dtype)
    mean = x.new_empty((rows,), dtype=torch.float32)
    rstd = x.new_empty((rows,), dtype=torch.float32)
    nr2 = _rows(new_residual, width) if store_residual else x2  # without a store only its dtype is read
    block_m, block_n, num_warps = kernels.add_layer_norm_config(width, rows, backend.interpreter_enabled())
    if rows:
        backend.launcher(kernels._add_layer_norm_fwd)[(triton.cdiv(rows, block_m),)](
            x2, r2, gamma, row_scale, weight, bias, normed, nr2, mean, rstd,
            rows, width, _rows_per_sample(x), eps,
            x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None, HAS_GAMMA=gamma is not None,
            HAS_ROW_SCALE=row_scale is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            STORE_RESIDUAL=store_residual, ONE_CHUNK=width <= block_n, num_warps=num_warps)
    return normed, new_residual, mean, rstd


def _bwd(dnormed: Tensor, dnew_residual: Optional[Tensor], h: Tensor, x: Optional[Tensor], weight: Optional[Tensor],
         has_bias: bool, gamma: Optional[Tensor], row_scale: Optional[Tensor], mean: Tensor, rstd: Tensor,
         residual_dtype: Optional[torch.dtype], row_scale_grad: bool
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dresidual, dweight, dbias, dgamma, drow_scale); the last four fp32; absent ones empty.

    ``h`` is new_residual (or x when new_residual is x); ``x`` None when no gradient reads it (no
    gamma, no row_scale gradient); ``residual_dtype`` None: no d(residual). d(x) has dnormed's dtype, x's.
    """
    width = h.shape[-1]
    dy2, h2 = _rows(dnormed, width), _rows(h, width)
    x2 = h2 if x is None else _rows(x, width)  # without x, h stands in: its values go unused
    dnr2 = dy2 if dnew_residual is None else _rows(dnew_residual, width)
    rows = h2.shape[0]
    block_m, block_n, num_warps = kernels.add_layer_norm_config(width, rows, backend.interpreter_enabled())
    programs = triton.cdiv(rows, block_m)
    dx = dnormed.new_empty(h.shape)
    store_dr = residual_dtype is not None
    dresidual = h.new_empty(h.shape if store_dr else (0,), dtype=residual_dtype or dx.dtype)
    dr2 = _rows(dresidual, width) if store_dr else dx.view(-1, width)

    def partials(present: bool) -> Tensor:
        return h.new_empty((programs, width) if present else (0,), dtype=torch.float32)

    dw_part, db_part, dg_part = partials(weight is not None), partials(has_bias), partials(gamma is not None)
    drow = h.new_empty((rows,) if row_scale_grad else (0,), dtype=torch.float32)
    if rows:
        backend.launcher(kernels._add_layer_norm_bwd)[(programs,)](
            dy2, dnr2, h2, x2, gamma, row_scale, weight, mean, rstd, dx, dr2, dw_part, db_part, dg_part, drow,
            rows, width, _rows_per_sample(h),
            dy2.stride(0), dy2.stride(1), dnr2.stride(0), dnr2.stride(1), h2.stride(0), h2.stride(1),
            x2.stride(0), x2.stride(1), width, width,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_DNR=dnew_residual is not None, HAS_GAMMA=gamma is not None,
            HAS_ROW_SCALE=row_scale is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias,
            STORE_DR=store_dr, ROW_SCALE_GRAD=row_scale_grad, num_warps=num_warps)
    # Fixed-order fp32 sums over the per-program partials: deterministic, no atomics.
    dweight, dbias, dgamma = (p.sum(0) if p.numel() else p for p in (dw_part, db_part, dg_part))
    drow_scale = drow.view(h.shape[0], _rows_per_sample(h)).sum(1) if row_scale_grad else drow
    return dx, dresidual, dweight, dbias, dgamma, drow_scale


_FWD_SCHEMA = ("(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor? gamma, Tensor? row_scale, "
               "float eps, ScalarType residual_dtype, bool store_residual) -> (Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dnormed, Tensor? dnew_residual, Tensor h, Tensor? x, Tensor? weight, bool has_bias, "
               "Tensor? gamma, Tensor? row_scale, Tensor mean, Tensor rstd, ScalarType? residual_dtype, "
               "bool row_scale_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
add_layer_norm_bwd_op = backend.kernel_op("vit_kernels::add_layer_norm_bwd", _bwd, schema=_BWD_SCHEMA)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, gamma, row_scale, _eps, _residual_dtype, store_residual = inputs
    _normed, new_residual, mean, rstd = output
    # x is read for d(gamma) and d(row_scale) only; else new_residual is all the backward keeps of the
    # activations, as timm's add then LayerNorm keeps only the LayerNorm's input.
    reads_x = gamma is not None or (row_scale is not None and ctx.needs_input_grad[5])
    ctx.save_for_backward(new_residual if store_residual else x, x if reads_x else None, weight, gamma, row_scale,
                          mean, rstd)
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.store_residual = store_residual


def _backward(ctx, dnormed, dnew_residual, _dmean, _drstd):
    backend.refuse_double_backward("add_layer_norm")
    h, x, weight, gamma, row_scale, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not ctx.store_residual:
        dnew_residual = None  # new_residual is x itself there; its gradient reaches x directly
    # Without gamma and row_scale, d(x) = d(residual): one store serves both when dtypes agree.
    shared = gamma is None and row_scale is None and ctx.residual_dtype == dnormed.dtype
    store_dr = ctx.residual_dtype is not None and not shared
    dx, dres, dw, db, dg, ds = add_layer_norm_bwd_op(
        dnormed, dnew_residual, h, x, weight, ctx.bias_dtype is not None, gamma, row_scale, mean, rstd,
        ctx.residual_dtype if store_dr else None, row_scale is not None and needs[5])
    if ctx.residual_dtype is not None and shared:
        dres = dx
    return (dx, dres if ctx.residual_dtype is not None else None,
            None if weight is None else dw.to(weight.dtype), None if ctx.bias_dtype is None else db.to(ctx.bias_dtype),
            None if gamma is None else dg.to(gamma.dtype),
            ds.to(row_scale.dtype) if row_scale is not None and needs[5] else None,
            None, None, None)


add_layer_norm_fwd_op = backend.kernel_op("vit_kernels::add_layer_norm_fwd", _fwd, schema=_FWD_SCHEMA,
                                          backward=_backward, setup_context=_setup_context)


def _check(name: str, t: Optional[Tensor], x: Tensor, shape: tuple, dtypes: tuple) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}; expected x's device {x.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {dtypes}")


@backend.traceable
def add_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float = 1e-6, gamma: Optional[Tensor] = None,
                   row_scale: Optional[Tensor] = None,
                   residual_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """new_residual = residual + gamma * row_scale[:, None] * x; normed = LayerNorm(new_residual).

    Returns ``(normed, new_residual)``: normed in x's dtype; new_residual in ``residual_dtype`` if
    given, else in the promoted dtype of residual and x. ``weight``/``bias`` may be x's dtype or
    float32; ``gamma``/``row_scale`` x's dtype; ``residual`` x's dtype or float32. With no residual,
    gamma, row_scale or dtype change, new_residual is ``x`` itself. See ``reference.add_layer_norm``.
    """
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a last dim of width >= 1; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
    width = x.shape[-1]
    _check("residual", residual, x, tuple(x.shape), (x.dtype, torch.float32))
    _check("weight", weight, x, (width,), (x.dtype, torch.float32))
    _check("bias", bias, x, (width,), (x.dtype, torch.float32))
    _check("gamma", gamma, x, (width,), (x.dtype,))
    if row_scale is not None and x.dim() < 2:
        raise ValueError(f"row_scale needs x of shape (B, ..., C); got {tuple(x.shape)}")
    _check("row_scale", row_scale, x, tuple(x.shape[:1]), (x.dtype,))
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    if residual_dtype is not None and not residual_dtype.is_floating_point:
        raise ValueError(f"residual_dtype must be a floating-point dtype; got {residual_dtype}")
    if not backend.runs_kernels("add_layer_norm", x, dots=False):
        return reference.add_layer_norm(x, residual, weight, bias, eps, gamma, row_scale, residual_dtype)
    out_dtype = residual_dtype or (x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype))
    if out_dtype not in backend.KERNEL_DTYPES:
        return reference.add_layer_norm(x, residual, weight, bias, eps, gamma, row_scale, residual_dtype)
    store = residual is not None or gamma is not None or row_scale is not None or out_dtype != x.dtype
    # The kernels index the 1-D parameters as contiguous; a strided or expanded view is copied
    # (C or B elements), and autograd takes the gradient back through the copy.
    weight, bias, gamma, row_scale = (None if t is None else t.contiguous() for t in (weight, bias, gamma, row_scale))
    normed, new_residual, _, _ = add_layer_norm_fwd_op(
        x, residual, weight, bias, gamma, row_scale, float(eps), out_dtype, store)
    return normed, new_residual if store else x
