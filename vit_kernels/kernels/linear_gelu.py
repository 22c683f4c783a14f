"""One tiled GEMM for the MLP, forward and backward: C = epilogue(prologue(A) @ B).

Forward (fc1 with an activation, fc2 without), x (M, K), W (N, K), b (N,):

    pre = x @ W^T + b            A = x, B = W^T (strides swapped, no copy)
    h   = act(pre)               epilogue; ``pre`` optionally stored for the backward

Backward, with dY (M, N) the gradient of h and act' the derivative of the activation:

    dY' = dY * act'(pre)         (dY' = dY for fc2)
    dX  = dY' @ W                A = dY, B = W
    dW  = dY'^T @ x              A = dY^T (strides swapped), B = x
    db  = sum_m dY'              the row sums of the A operand of the dW GEMM

``PROLOGUE_GRAD`` forms dY' tile by tile while A is loaded, from the saved ``pre`` laid out
like A, so dY' never goes to memory. Without a saved ``pre`` (recompute mode) the host first
runs this GEMM with ``EPILOGUE_GRAD``, ``dY' = dY * act'(x @ W^T + b)``, stores dY', then
runs the two plain gradient GEMMs: one more GEMM of time for one (M, N) activation less.

Activations (``ACT``): 0 none, 1 exact GELU 0.5 x (1 + erf(x / sqrt 2)), 2 tanh GELU,
3 QuickGELU x sigmoid(1.702 x). The tanh GELU is written as x sigmoid(2u) with
u = sqrt(2/pi) (x + 0.044715 x^3), since 0.5 (1 + tanh u) = sigmoid(2u): no libdevice tanh
(the interpreter cannot run it). Derivatives:

    gelu'(x)       = Phi(x) + x phi(x),       Phi = 0.5 (1 + erf(x / sqrt 2)), phi = exp(-x^2/2) / sqrt(2 pi)
    gelu_tanh'(x)  = s + x s (1 - s) 2u',     s = sigmoid(2u), u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    quick_gelu'(x) = s + 1.702 x s (1 - s),   s = sigmoid(1.702 x)

s (1 - s) is taken as e^-z s^2 (``_sigmoid_slope``), not by subtracting s from 1: for x > 2 the
subtraction cancels, and the derivative (and the bias gradient summed from it) lost several
bits that PyTorch's tanh form keeps.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import backend

ACT_IDS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}

LOG2E = tl.constexpr(1.4426950408889634)
INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _sigmoid(z):
    # exp2 rather than exp: one MUFU op on the GPU, and no libdevice in the interpreter.
    return 1.0 / (1.0 + tl.exp2(-z * LOG2E))


@triton.jit
def _sigmoid_slope(z):
    """(sigmoid(z), sigmoid(z) * (1 - sigmoid(z))), both to a few ulp for every z.

    1 - s = e s with e = e^-z, so the slope is e s^2: no 1 - s to cancel. e is capped at 2^126
    (z < -87), where s and the slope are below 1e-38 anyway, so that e s^2 is never inf * 0.
    """
    e = tl.exp2(tl.minimum(-z * LOG2E, 126.0))
    s = 1.0 / (1.0 + e)
    return s, e * s * s


@triton.jit
def _act_fwd(x, ACT: tl.constexpr):
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * INV_SQRT2))
    elif ACT == 2:
        u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        return x * _sigmoid(2.0 * u)
    elif ACT == 3:
        return x * _sigmoid(1.702 * x)
    else:
        return x


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act / d x at x (float32)."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * INV_SQRT2))
        pdf = INV_SQRT_2PI * tl.exp2(-0.5 * x * x * LOG2E)
        return cdf + x * pdf
    elif ACT == 2:
        u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        s, slope = _sigmoid_slope(2.0 * u)
        return s + x * slope * 2.0 * du
    elif ACT == 3:
        s, slope = _sigmoid_slope(1.702 * x)
        return s + 1.702 * x * slope
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _gemm(
    a_ptr,              # (M, K) A
    b_ptr,              # (K, N) B
    c_ptr,              # (M, N) out: C
    bias_ptr,           # (N,) added to the accumulator (HAS_BIAS)
    pre_ptr,            # (M, K) the saved pre-activation, laid out like A (read with PROLOGUE_GRAD)
    aux_ptr,            # (M, N) out: the pre-activation (STORE_PRE); or in: dY (EPILOGUE_GRAD)
    rowsum_ptr,         # (M,) out: sum_k prologue(A) (ROW_SUM)
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,   # any strides
    stride_pm, stride_pk,                                               # of pre
    stride_xm, stride_xn,                                               # of aux
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,              # activation id (ACT_IDS)
    PROLOGUE_GRAD: tl.constexpr,    # A = A * act'(pre) as it is loaded
    EPILOGUE_GRAD: tl.constexpr,    # C = dY * act'(acc)
    STORE_PRE: tl.constexpr, ROW_SUM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,    # of float32 dots: "ieee" or "tf32"
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,          # row tiles per group of the grouped ordering
):
    """C (M, N) = epilogue(prologue(A (M, K)) @ B (K, N)); each program owns one BLOCK_M x BLOCK_N tile of C.

    ACT is applied where the flags say: as act' in the prologue (PROLOGUE_GRAD) or in the
    epilogue (EPILOGUE_GRAD), else as act in the epilogue. The row sums are written by the
    programs of the first tile column.
    """
    # Grouped ordering: GROUP_M consecutive programs share a column of B tiles and walk down
    # GROUP_M rows of A, so both stay in L2 while the group runs.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    # int64 offsets: M * K (B * 197 * 4C tokens x features) passes 2^31 at realistic batches.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if PROLOGUE_GRAD:
        p_ptrs = pre_ptr + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk

    # fp32 accumulation whatever the operand dtype.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ROW_SUM:
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # Masked lanes load 0, so they add nothing to the dot or to the row sums
        # (act'(0) is finite, and 0 * act'(0) = 0).
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if PROLOGUE_GRAD:
            p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            # Rounded back to the operand dtype, as the unfused dY * act'(pre) would be.
            a = (a.to(tl.float32) * _act_grad(p.to(tl.float32), ACT)).to(b.dtype)
            p_ptrs += BLOCK_K * stride_pk
        if ROW_SUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # One program per row block writes its sums, reduced in a fixed order: db is
    # deterministic with no atomics, and free, since A is already in registers.
    if ROW_SUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + offs_m, row_sum.to(rowsum_ptr.dtype.element_ty), mask=mask_m)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask_c = mask_m[:, None] & mask_n[None, :]
    aux_offs = offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
    if STORE_PRE:
        tl.store(aux_ptr + aux_offs, acc.to(aux_ptr.dtype.element_ty), mask=mask_c)
    if EPILOGUE_GRAD:
        dy = tl.load(aux_ptr + aux_offs, mask=mask_c, other=0.0).to(tl.float32)
        acc = dy * _act_grad(acc, ACT)
    elif not PROLOGUE_GRAD:
        acc = _act_fwd(acc, ACT)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


# Interpreter: one config (it cannot benchmark more), tiles as large as is reasonable since
# its cost is per tile step, not per element.
_INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=2)


def gemm_configs() -> list[triton.Config]:
    """Candidate tiles for ViT MLP shapes (M = B * 197 or B * 257, K in {384, 768, 1024, 1280}, N = 4K and back).

    N and K are multiples of 64 in every ViT, M is not: wide N tiles with 64-deep K steps for
    the large fc1/fc2 GEMMs, 64-row tiles for small batches (M = 197, 257) where 128-row
    tiles would leave most of the GPU idle, and the dW GEMM's long (M-deep) reduction is
    covered by the same set. Every tile has 4 or 8 warps: wgmma needs whole warpgroups (a
    2-warp 64x64x32 tile compiled to mma.sync, HMMA, in the sm_90 compile report).
    ``prune_gemm_configs`` drops the ones that spill for a launch's flags.
    """
    if backend.interpreter_enabled():
        return [triton.Config(dict(_INTERPRETER_CONFIG))]
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 5),
    ]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


def _per_thread(config: triton.Config, rows: int, cols: int) -> int:
    return rows * cols // (32 * config.num_warps)


def prune_gemm_configs(configs, named_args, **flags):
    """The configs that compile without spilling for this launch's flags (the sm_90 compile
    report, bf16, triton 3.6 and 3.8: benchmarks/results/static/).

    The activation epilogues (erf, tanh, sigmoid on the whole accumulator) need the
    accumulator at no more than 64 fp32 values per thread: the 128-value tiles spilled 72 to
    416 bytes (992 with act' in the epilogue). The act' prologue also holds the A tile and
    the saved pre-activation in registers: at most 32 A values per thread (128x64x64 with 4
    warps spilled 800 bytes).
    """
    if len(configs) == 1:
        return configs  # the interpreter's
    kept = []
    for config in configs:
        bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        accumulator = _per_thread(config, bm, bn)
        if (flags["ACT"] or flags["EPILOGUE_GRAD"]) and accumulator > 64:
            continue
        if flags["PROLOGUE_GRAD"] and _per_thread(config, bm, bk) > 32:
            continue
        kept.append(config)
    return kept


# Every constexpr flag is in the key: the best tile for the dW GEMM (long reduction, prologue)
# is not the best for the forward.
gemm = triton.autotune(
    configs=gemm_configs(),
    key=["M", "N", "K", "HAS_BIAS", "ACT", "PROLOGUE_GRAD", "EPILOGUE_GRAD", "ROW_SUM", "DOT_PRECISION"],
    prune_configs_by=dict(early_config_prune=prune_gemm_configs),
)(_gemm)


def grid(M: int, N: int):
    """1-D grid (the grouped ordering maps it to tiles); axis 0 takes up to 2^31 - 1 programs."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
