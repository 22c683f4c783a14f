"""The persistent GEMM behind linear, linear_gelu and the MLP: C = epilogue(A @ B).

One program per SM (``tl.num_programs(0)`` of them) walks the output tiles in grouped order,
so the grid is never larger than the machine and consecutive tiles of a program share rows of
A and columns of B in L2. Operands are read through TMA tensor descriptors (``TMA``) where
their layout allows it (row-major in either orientation, 16-byte aligned rows: every ViT), or
through pointers with any strides otherwise. A transposed operand (``A_T``, ``B_T``: stored
(K, M) or (N, K)) is loaded as stored and transposed in shared memory, which wgmma reads in
either order: no copy of W^T, dY^T or x^T is ever made.

What the MLP launches, with x (M, C), W1 (4C, C), W2 (C, 4C), pre = x W1^T + b1, h = act(pre):

    forward    pre, h = x @ W1^T (+ b1, act; pre stored when a backward will need it)
               y      = h @ W2^T (+ b2)
    backward   dW2    = dY^T @ h                  split-K, fp32 partials (no epilogue)
               dPre   = (dY @ W2) * act'(pre)     act' in the epilogue (EPILOGUE_GRAD_OF_AUX),
                                                  its column sums per row tile -> db1 (COL_SUM)
               dX     = dPre @ W1                 plain
               dW1    = dPre^T @ x                split-K, plain

so the activation derivative is applied once, in an epilogue, and every K loop is a plain
GEMM's. ``EPILOGUE_GRAD_OF_ACC`` serves ``linear_gelu(recompute=True)``:
dPre = dY * act'(x @ W^T + b), the pre-activation recomputed by the GEMM itself.

Split-K (``SPLIT_K`` > 1): the K steps are dealt out to SPLIT_K slices of near-equal length
and each (slice, tile) is a tile of its own, written in float32 to slice ``s`` of C
(SPLIT_K, M, N); the host sums the slices in a fixed order, so the weight gradients are
deterministic and no atomics are used. It lets the weight-gradient GEMMs (few output tiles,
long K = tokens) fill the last wave of the machine (``split_k``).

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

import functools

import torch
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


# EPILOGUE values: what is done to the accumulator (+ bias) before it is stored.
EPILOGUE_ACT = tl.constexpr(0)           # C = act(acc); the pre-activation acc also stored to aux (STORE_PRE)
EPILOGUE_GRAD_OF_ACC = tl.constexpr(1)   # C = aux * act'(acc): acc is the pre-activation, aux dY
EPILOGUE_GRAD_OF_AUX = tl.constexpr(2)   # C = acc * act'(aux): acc is dH, aux the saved pre-activation


@triton.jit
def _tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(K slice, row tile, column tile) of the ``tile_id``-th tile in grouped order: GROUP_M
    consecutive tiles walk down GROUP_M rows of A against one column of B, so both stay in L2."""
    tiles_per_slice = num_pid_m * num_pid_n
    k_slice = tile_id // tiles_per_slice
    t = tile_id % tiles_per_slice
    group_size = GROUP_M * num_pid_n
    first_m = (t // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    return k_slice, first_m + (t % group_size) % rows_in_group, (t % group_size) // rows_in_group


@triton.jit
def _load_operand(desc, ptr, off_r, off_c, R, C, stride_r, stride_c,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TRANSPOSED: tl.constexpr, TMA: tl.constexpr):
    """The (BLOCK_R, BLOCK_C) tile at (off_r, off_c) of an (R, C) operand; zeros past its edges.

    Through the descriptor, which holds the operand as stored: (C, R) when TRANSPOSED."""
    if TMA:
        if TRANSPOSED:
            tile = desc.load([off_c, off_r]).T
        else:
            tile = desc.load([off_r, off_c])
    else:
        rows = (off_r + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = (off_c + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        tile = tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    return tile


@triton.jit
def _descriptor(ptr, R, C, stride_r, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                TRANSPOSED: tl.constexpr):
    """A TMA descriptor of an (R, C) operand over its storage: row-major, or (C, R) row-major when TRANSPOSED."""
    # if/else, not an early return: the two descriptors are of different types.
    if TRANSPOSED:
        desc = tl.make_tensor_descriptor(ptr, shape=[C, R], strides=[stride_c, 1], block_shape=[BLOCK_C, BLOCK_R])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[R, C], strides=[stride_r, 1], block_shape=[BLOCK_R, BLOCK_C])
    return desc


@triton.jit
def _gemm(
    a_ptr,              # (M, K) A
    b_ptr,              # (K, N) B
    c_ptr,              # (M, N) out: C; (SPLIT_K, M, N) float32 partial products with SPLIT_K > 1
    bias_ptr,           # (N,) added to the accumulator (HAS_BIAS)
    aux_ptr,            # (M, N) out: the pre-activation (STORE_PRE); in: dY or pre (the GRAD epilogues)
    col_sum_ptr,        # (cdiv(M, BLOCK_M), N) float32 out: column sums of C per row tile (COL_SUM)
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,                         # any strides unless TMA
    stride_cs, stride_cm, stride_cn,                                    # of C (stride_cs: per K slice)
    stride_xm, stride_xn,                                               # of aux
    A_T: tl.constexpr,              # TMA: A stored as (K, M) row-major (stride_am == 1)
    B_T: tl.constexpr,              # TMA: B stored as (N, K) row-major (stride_bk == 1)
    TMA: tl.constexpr,              # operands through tensor descriptors, else through pointers
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,              # activation id (ACT_IDS)
    EPILOGUE: tl.constexpr,         # EPILOGUE_ACT, EPILOGUE_GRAD_OF_ACC or EPILOGUE_GRAD_OF_AUX
    STORE_PRE: tl.constexpr, COL_SUM: tl.constexpr,
    SPLIT_K,                        # K slices, each written to its own float32 slice of C (not a
                                    # constexpr: one compiled kernel serves every count)
    DOT_PRECISION: tl.constexpr,    # of float32 dots: "ieee" or "tf32"
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,          # row tiles per group of the grouped ordering
):
    """C (M, N) = epilogue(A (M, K) @ B (K, N)), persistent: program p computes tiles p, p + P, ...
    for P = tl.num_programs(0)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n * SPLIT_K
    a_desc = None  # unused without TMA
    b_desc = None
    if TMA:
        a_desc = _descriptor(a_ptr, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T)
        b_desc = _descriptor(b_ptr, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T)

    for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        k_slice, pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # fp32 accumulation whatever the operand dtype.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_step in range(k_slice * k_steps // SPLIT_K, (k_slice + 1) * k_steps // SPLIT_K):
            k = k_step * BLOCK_K
            a = _load_operand(a_desc, a_ptr, off_m, k, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T, TMA)
            b = _load_operand(b_desc, b_ptr, k, off_n, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T, TMA)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        # int64 offsets: M * N (B * 197 * 4C tokens x features) passes 2^31 at realistic batches.
        offs_m = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (off_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        aux_ptrs = aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
        if EPILOGUE == EPILOGUE_GRAD_OF_ACC:
            acc = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32) * _act_grad(acc, ACT)
        elif EPILOGUE == EPILOGUE_GRAD_OF_AUX:
            acc = acc * _act_grad(tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32), ACT)
        else:
            if STORE_PRE:
                tl.store(aux_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
            acc = _act_fwd(acc, ACT)
        if COL_SUM:
            # Rows past M hold 0 (their loads were zero-filled, act'(0) * 0 = 0). One row of
            # sums per row tile, summed by the host in a fixed order: deterministic, no atomics.
            tl.store(col_sum_ptr + pid_m * N + offs_n, tl.sum(acc, axis=0), mask=mask_n)
        c_ptrs = c_ptr + k_slice * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_grad_product(
    dy_ptr,             # (numel,) contiguous: the gradient of act(pre)
    pre_ptr,            # (numel,) contiguous: the saved pre-activation
    out_ptr,            # (numel,) out: dy * act'(pre)
    numel,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dPre = dY * act'(pre) elementwise: ``linear_gelu``'s backward from a saved pre-activation
    (the MLP op applies act' in a GEMM epilogue instead)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (dy * _act_grad(pre, ACT)).to(out_ptr.dtype.element_ty), mask=mask)


ELEMENTWISE_BLOCK = 1024

# Interpreter: one config (it cannot benchmark more), tiles as large as is reasonable since its
# cost is per tile step, not per element; and 3 programs, so that programs walk several tiles.
_INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=2)
_INTERPRETER_PROGRAMS = 3
# The tile of every split-K launch: the host chooses SPLIT_K (``split_k``) for it before the
# autotuner runs, so those launches tune stages and warps only. 128 x 256: the tile with the
# most FLOPs per byte loaded that does not spill without an activation in its epilogue.
_SPLIT_TILE = (128, 256, 64)
# Persistent programs on a device without SMs to count: the compile report's H100 SXM.
H100_SMS = 132


def gemm_configs() -> list[triton.Config]:
    """Candidate tiles for ViT MLP shapes (M = B * 197 or B * 257, K in {384, 768, 1024, 1280}, N = 4K and back).

    N and K are multiples of 64 in every ViT, M is not: wide N tiles with 64-deep K steps for
    the large fc1/fc2 GEMMs, 64-row tiles for small batches (M = 197, 257) where 128-row
    tiles would leave most of the GPU idle. Every tile has 4 or 8 warps: wgmma needs whole
    warpgroups (a 2-warp 64x64x32 tile compiled to mma.sync, HMMA, in the sm_90 compile
    report). ``prune_gemm_configs`` drops the ones that spill for a launch's flags.
    """
    if backend.interpreter_enabled():
        return [triton.Config(dict(_INTERPRETER_CONFIG))]
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 256, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 5),
    ]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


def _per_thread(config: triton.Config, rows: int, cols: int) -> int:
    return rows * cols // (32 * config.num_warps)


def _tile_shape(config: triton.Config) -> tuple[int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]


def prune_gemm_configs(configs, named_args, **flags):
    """The configs the autotuner may pick for this launch (the sm_90 compile report, bf16,
    triton 3.6 and 3.8: benchmarks/results/static/).

    Split-K launches: the tile ``split_k`` counted with. The activation epilogues (erf, tanh or
    sigmoid on the whole accumulator, or their derivatives) need the accumulator at no more than
    64 fp32 values per thread: at 128 (128 x 256 with 8 warps, 128 x 128 with 4) they spilled 16
    to 1,040 bytes, in every epilogue but the bf16 inference one.
    """
    if len(configs) == 1:
        return configs  # the interpreter's
    if flags["SPLIT_K"] > 1:
        return [c for c in configs if _tile_shape(c) == _SPLIT_TILE]
    if flags["ACT"]:
        return [c for c in configs if _per_thread(c, *_tile_shape(c)[:2]) <= 64]
    return list(configs)


# Every constexpr flag is in the key: the best tile for the dW GEMM (long reduction) is not the
# best for the forward.
gemm = triton.autotune(
    configs=gemm_configs(),
    key=["M", "N", "K", "A_T", "B_T", "TMA", "HAS_BIAS", "ACT", "EPILOGUE", "STORE_PRE", "COL_SUM", "SPLIT_K",
         "DOT_PRECISION"],
    prune_configs_by=dict(early_config_prune=prune_gemm_configs),
)(_gemm)


# col_sum buffers have a row per tile of this height, enough for every config.
MIN_BLOCK_M = min(config.kwargs["BLOCK_M"] for config in gemm.configs)


def split_tile() -> tuple[int, int, int]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K) tile of split-K launches."""
    return _tile_shape(triton.Config(dict(_INTERPRETER_CONFIG))) if backend.interpreter_enabled() else _SPLIT_TILE


def last_wave(tiles: int, programs: int) -> float:
    """The fraction of the programs busy in the last round of a persistent launch of ``tiles`` tiles."""
    return (tiles % programs or programs) / programs


def split_k(M: int, N: int, K: int, programs: int) -> int:
    """K slices for an (M, N) output with a long K (the weight gradients: K = tokens).

    The fewest slices (at most 16, each at least 8 K steps long) whose last round keeps at
    least 90% of the ``programs`` busy; if none does, the count that keeps them busiest overall.
    Each slice costs one float32 (M, N) partial written and read back: 9 slices at ViT-B
    (768 x 3072, 72 tiles of 128 x 256 on 132 SMs: 648 tiles in 5 full rounds instead of one
    round at 55%) add about 85 MB of traffic to a 240-GFLOP GEMM.
    """
    block_m, block_n, block_k = split_tile()
    output_tiles = tiles(M, N, 1, block_m, block_n)
    k_steps = triton.cdiv(K, block_k)
    candidates = [s for s in range(1, 17) if s == 1 or k_steps // s >= 8]
    enough = [s for s in candidates if last_wave(output_tiles * s, programs) >= 0.9]
    if enough:
        return enough[0]
    # Otherwise the best busy fraction over all rounds (the first of equals).
    return max(candidates, key=lambda s: (output_tiles * s / (triton.cdiv(output_tiles * s, programs) * programs), -s))


def num_programs(device) -> int:
    """Persistent programs: one per SM."""
    if backend.interpreter_enabled():
        return _INTERPRETER_PROGRAMS
    if device.type != "cuda":
        return H100_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tiles(M: int, N: int, split: int, block_m: int, block_n: int) -> int:
    """The tiles a launch computes: output tiles times K slices."""
    return triton.cdiv(M, block_m) * triton.cdiv(N, block_n) * split


def grid(M: int, N: int, split: int, programs: int):
    """min(tiles, programs) persistent programs."""
    return lambda meta: (min(programs, tiles(M, N, split, meta["BLOCK_M"], meta["BLOCK_N"])),)
