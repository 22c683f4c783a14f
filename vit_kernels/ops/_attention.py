"""Multi-head attention: ``attention`` on (B, H, N, D) tensors, ``qkv_attention`` on the packed projection.

On the kernel path both run the flash-attention kernels of ``vit_kernels.kernels.attention``:
q, k, v are read through strides (``qkv_attention`` reads the (B, N, 3, H, D) projection in
place), the output is written through strides ((B, N, H * D) for ``qkv_attention``, no
transpose copy) and the packed gradient is written straight into one (B, N, 3 * C) buffer.

Kernel-path limits: 16 <= head_dim <= 128, float16 / bfloat16 (float32 too in the interpreter; on
a GPU float32 runs the reference, see ``backend.float32_dots_on_kernels``), q, k, v of one length.
float32 dots take ``backend.dot_precision``: TF32 only where PyTorch's own float32 matmuls may.

qk-norm: ``nn.LayerNorm(head_dim)`` modules (timm's ``qk_norm=True``) are fused into the kernel,
forward and backward (their weight and bias get gradients). Any other norm module (RMSNorm, ...)
is applied in PyTorch to the strided q, k views and the kernel runs on the result; the packed
gradient then goes through autograd's view machinery (one extra copy).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import backend, reference

if backend.triton_installed():  # without triton, backend.runs_kernels picks the reference
    import triton

    from ..kernels import attention as kernels


LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------
# Launches. q, k, v, o, do, dq, dk, dv are (B, H, N, D) views with any strides.

def _constants(q: Tensor, norms, dropout_p: float) -> dict:
    """The kernels' constexpr flags; ``norms`` is ((q_w, q_b, q_eps), (k_w, k_b, k_eps)), None w = no norm."""
    (qw, _, _), (kw, _, _) = norms
    block_d, block_e = kernels.head_dim_tiles(q.shape[-1])
    return dict(HEAD_DIM=q.shape[-1], BLOCK_D=block_d, BLOCK_E=block_e, Q_NORM=qw is not None,
                K_NORM=kw is not None, DROPOUT=dropout_p > 0, INPUT_PRECISION=backend.dot_precision(q.dtype))


def _head_offsets_fit(t: Tensor) -> Tensor:
    """``t``, or a contiguous copy where one head's (N, D) span passes 2^31 elements: the kernels
    index within a head with 32-bit offsets (only strange views get there, e.g. a transposed batch)."""
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[2:], t.stride()[2:]))
    return t if span < 2**31 else t.contiguous()


def _launch_fwd(q, k, v, o, lse, seed, scale, dropout_p, norms):
    B, H, N, _ = q.shape
    q, k, v = map(_head_offsets_fit, (q, k, v))
    (qw, qb, q_eps), (kw, kb, k_eps) = norms
    grid = lambda meta: (B * H, kernels.forward_programs(N, meta["BLOCK_M"]))  # noqa: E731
    backend.launcher(kernels._attention_fwd)[grid](
        q, k, v, o, lse, seed, qw, qb, kw, kb, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, N, scale * LOG2E, q_eps, k_eps, dropout_p, **_constants(q, norms, dropout_p))


def _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, seed, scale, dropout_p, norms):
    """Fills dq, dk, dv; returns the float32 (dw, db) sums of the q- and k-norm, each (2, D)."""
    B, H, N, D = q.shape
    do, q, k, v, o = map(_head_offsets_fit, (do, q, k, v, o))
    (qw, qb, q_eps), (kw, kb, k_eps) = norms
    consts = _constants(q, norms, dropout_p)
    consts["KEY_TAILS"] = kernels.key_tails(consts["BLOCK_D"], consts["BLOCK_E"], qw is not None or kw is not None)
    programs = kernels.backward_programs(B * H, q.device)
    rows = kernels.scratch_rows(N)
    lanes = consts["BLOCK_D"] + consts["BLOCK_E"]
    # Per program: delta and the (D, N) float32 partial sum of dq^T (see _attention_bwd).
    scratch = lse.new_empty(programs, (1 + lanes) * rows)
    # Per head: [q-norm, k-norm] x [dw, db]; the kernel writes those of the norms that exist.
    norm_grads = lse.new_zeros((B * H, 2, 2, D) if qw is not None or kw is not None else (1, 2, 2, D))
    normed_q = q.new_empty((programs, rows, lanes) if qw is not None else (0,))
    backend.launcher(kernels._attention_bwd)[(programs,)](
        q, k, v, o, do, lse, dq, dk, dv, seed, qw, qb, kw, kb, norm_grads, scratch, normed_q,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        B * H, H, N, programs, rows, scale, scale * LOG2E, q_eps, k_eps, dropout_p, **consts)
    return norm_grads[:, 0].sum(dim=0), norm_grads[:, 1].sum(dim=0)


def _heads(packed: Tensor, num_heads: int) -> Tensor:
    """(B, N, H * D) -> the (B, H, N, D) view."""
    return packed.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _split(qkv: Tensor, num_heads: int):
    """(B, N, 3 * H * D) -> q, k, v as (B, H, N, D) views (splitting a dim is always a view)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


_NO_NORMS = ((None, None, 0.0), (None, None, 0.0))


# ---------------------------------------------------------------------------------------------
# torch.library ops: (q, k, v) strided and packed qkv, forward and backward.

def _fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float, seed: Optional[Tensor],
         packed_out: bool) -> tuple[Tensor, Tensor]:
    B, H, N, D = q.shape
    if packed_out:
        out = q.new_empty(B, N, H * D)
        o = _heads(out, H)
    else:
        out = o = q.new_empty(B, H, N, D)
    lse = q.new_empty(B * H, N, dtype=torch.float32)
    _launch_fwd(q, k, v, o, lse, seed, scale, dropout_p, _NO_NORMS)
    return out, lse


def _bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
         dropout_p: float, seed: Optional[Tensor], packed_out: bool) -> tuple[Tensor, Tensor, Tensor]:
    H = q.shape[1]
    do, o = (_heads(dout, H), _heads(out, H)) if packed_out else (dout, out)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    _launch_bwd(do, q, k, v, o, lse, dq, dk, dv, seed, scale, dropout_p, _NO_NORMS)
    return dq, dk, dv


def _qkv_fwd(qkv: Tensor, num_heads: int, scale: float, dropout_p: float, seed: Optional[Tensor],
             q_weight: Optional[Tensor], q_bias: Optional[Tensor], q_eps: float,
             k_weight: Optional[Tensor], k_bias: Optional[Tensor], k_eps: float) -> tuple[Tensor, Tensor]:
    B, N, _ = qkv.shape
    q, k, v = _split(qkv, num_heads)
    out = qkv.new_empty(B, N, qkv.shape[-1] // 3)
    lse = qkv.new_empty(B * num_heads, N, dtype=torch.float32)
    _launch_fwd(q, k, v, _heads(out, num_heads), lse, seed, scale, dropout_p,
                ((q_weight, q_bias, q_eps), (k_weight, k_bias, k_eps)))
    return out, lse


def _qkv_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: float,
             dropout_p: float, seed: Optional[Tensor],
             q_weight: Optional[Tensor], q_bias: Optional[Tensor], q_eps: float,
             k_weight: Optional[Tensor], k_bias: Optional[Tensor],
             k_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dqkv (B, N, 3 * C), q-norm (dw, db) as (2, D) float32, k-norm (dw, db) as (2, D) float32)."""
    dqkv = qkv.new_empty(qkv.shape)
    q, k, v = _split(qkv, num_heads)
    dq, dk, dv = _split(dqkv, num_heads)
    q_grads, k_grads = _launch_bwd(_heads(dout, num_heads), q, k, v, _heads(out, num_heads), lse, dq, dk, dv,
                                   seed, scale, dropout_p, ((q_weight, q_bias, q_eps), (k_weight, k_bias, k_eps)))
    return dqkv, q_grads, k_grads


attention_bwd_op = backend.kernel_op("vit_kernels::attention_bwd", _bwd)
qkv_attention_bwd_op = backend.kernel_op("vit_kernels::qkv_attention_bwd", _qkv_bwd)


def _attention_setup(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.dropout_p, seed, ctx.packed_out = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], seed)


def _attention_backward(ctx, dout, _dlse):
    backend.refuse_double_backward("attention")
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, ctx.scale, ctx.dropout_p, seed, ctx.packed_out)
    return dq, dk, dv, None, None, None, None


def _qkv_attention_setup(ctx, inputs, output):
    qkv, ctx.num_heads, ctx.scale, ctx.dropout_p, seed, qw, qb, ctx.q_eps, kw, kb, ctx.k_eps = inputs
    ctx.save_for_backward(qkv, output[0], output[1], seed, qw, qb, kw, kb)


def _qkv_attention_backward(ctx, dout, _dlse):
    backend.refuse_double_backward("qkv_attention")
    qkv, out, lse, seed, qw, qb, kw, kb = ctx.saved_tensors
    dqkv, q_grads, k_grads = qkv_attention_bwd_op(dout, qkv, out, lse, ctx.num_heads, ctx.scale, ctx.dropout_p,
                                                  seed, qw, qb, ctx.q_eps, kw, kb, ctx.k_eps)
    q_w, q_b = (None, None) if qw is None else (q_grads[0].to(qw.dtype), q_grads[1].to(qb.dtype))
    k_w, k_b = (None, None) if kw is None else (k_grads[0].to(kw.dtype), k_grads[1].to(kb.dtype))
    return dqkv, None, None, None, None, q_w, q_b, None, k_w, k_b, None


attention_fwd_op = backend.kernel_op("vit_kernels::attention_fwd", _fwd, backward=_attention_backward,
                                     setup_context=_attention_setup)
qkv_attention_fwd_op = backend.kernel_op("vit_kernels::qkv_attention_fwd", _qkv_fwd, backward=_qkv_attention_backward,
                                         setup_context=_qkv_attention_setup)


# ---------------------------------------------------------------------------------------------
# Public functions.

def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")


def _check_kernel_dropout(tokens: int, dropout_p: float) -> None:
    if dropout_p > 0 and not kernels.dropout_counters_fit(tokens):
        raise ValueError(f"dropout_p > 0 with {tokens} tokens: the attention kernel's dropout takes at most "
                         f"131,072 tokens (32-bit counters per head); run it without dropout, or under "
                         f"vit_kernels.use_backend('torch')")


def _check_head_dim(head_dim: int) -> None:
    # Both paths: the default scale head_dim ** -0.5 needs a head dim.
    if head_dim < 1:
        raise ValueError(f"the head dim (last dim of q, k, v) must be >= 1; got {head_dim}")


def _seed(t: Tensor, dropout_p: float) -> Optional[Tensor]:
    """The per-call Philox seed, drawn from torch's generator (so torch.manual_seed replays it)."""
    if dropout_p == 0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=t.device)


def _fused_layer_norm(norm, head_dim: int, like: Tensor):
    """(weight, bias, eps) when ``norm`` is a LayerNorm over head_dim the kernel can fuse, else None."""
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (head_dim,):
        return None
    ones = like.new_ones(head_dim, dtype=torch.float32)
    weight = norm.weight if norm.weight is not None else ones
    bias = norm.bias if norm.bias is not None else torch.zeros_like(ones)
    # The kernels index them as contiguous: a strided or expanded view is copied (D elements).
    return weight.contiguous(), bias.contiguous(), float(norm.eps)


@backend.traceable
def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    """softmax(scale * q @ k^T) @ v; q, k, v of shape (B, H, N, D) with any strides."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D); got {tuple(t.shape)}")
    if k.shape != v.shape or k.shape[:2] + k.shape[3:] != q.shape[:2] + q.shape[3:]:
        raise ValueError(f"q, k, v shapes do not match: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"q must be a floating-point tensor; got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; expected q's {q.dtype} on {q.device}")
    _check_head_dim(q.shape[-1])
    _check_dropout(dropout_p)
    if not backend.runs_kernels("attention", q, dots=True):
        return reference.attention(q, k, v, scale, dropout_p)
    kernels.head_dim_tiles(q.shape[-1])
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k has {k.shape[2]} tokens; the attention kernel expects q's {q.shape[2]}")
    _check_kernel_dropout(q.shape[2], dropout_p)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return attention_fwd_op(q, k, v, scale, dropout_p, _seed(q, dropout_p), False)[0]


@backend.traceable
def qkv_attention(qkv: Tensor, num_heads: int, scale: Optional[float] = None,
                  dropout_p: float = 0.0, q_norm=None, k_norm=None) -> Tensor:
    """Attention read from the packed (B, N, 3 * C) qkv projection; returns (B, N, C).

    ``q_norm``/``k_norm``: a norm over the head dim (timm's qk-norm, e.g. ``nn.LayerNorm(D)``) or None.
    """
    if qkv.dim() != 3:
        raise ValueError(f"qkv must have shape (B, N, 3 * C); got {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise ValueError(f"qkv must be a floating-point tensor; got {qkv.dtype}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")
    if qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv has {qkv.shape[-1]} features; expected a multiple of 3 * num_heads = {3 * num_heads}")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    _check_head_dim(head_dim)
    _check_dropout(dropout_p)
    if not backend.runs_kernels("qkv_attention", qkv, dots=True):
        return reference.qkv_attention(qkv, num_heads, scale, dropout_p, q_norm, k_norm)
    kernels.head_dim_tiles(head_dim)
    _check_kernel_dropout(qkv.shape[1], dropout_p)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    seed = _seed(qkv, dropout_p)
    # timm passes nn.Identity() when qk_norm is off.
    q_norm, k_norm = (None if isinstance(n, nn.Identity) else n for n in (q_norm, k_norm))
    fused = [None if n is None else _fused_layer_norm(n, head_dim, qkv) for n in (q_norm, k_norm)]
    if all(f is not None or n is None for f, n in zip(fused, (q_norm, k_norm))):
        (qw, qb, q_eps), (kw, kb, k_eps) = (f or (None, None, 0.0) for f in fused)
        return qkv_attention_fwd_op(qkv, num_heads, scale, dropout_p, seed, qw, qb, q_eps, kw, kb, k_eps)[0]
    # A norm the kernel cannot fuse: apply both norms in PyTorch on the strided views.
    q, k, v = _split(qkv, num_heads)
    q = q if q_norm is None else q_norm(q).to(v.dtype)
    k = k if k_norm is None else k_norm(k).to(v.dtype)
    return attention_fwd_op(q, k, v, scale, dropout_p, seed, True)[0]
