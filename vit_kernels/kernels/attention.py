"""Flash attention for ViT shapes: forward, one-launch backward, fused qk LayerNorm, dropout.

q, k, v, o, dO, dq, dk, dv are (B, H, N, D) through their four strides, so the packed
(B, N, 3, H, D) projection and a (B, N, H, D) output are plain views; lse is (B * H, N) float32,
contiguous.

Forward, per query row i, in base 2 so that exp2 replaces exp (``qk_scale = scale * log2(e)``):
    s_ij = qk_scale * q_i . k_j
    lse_i = log2 sum_j exp2(s_ij)                  online: running max m_i, running sum l_i
    p_ij = exp2(s_ij - lse_i)                      = softmax_j(scale * q_i . k_j)
    o_i = sum_j p_ij z_ij v_j / (1 - dropout_p)    z_ij the keep mask (1 without dropout)

Backward, with pd_ij = p_ij z_ij / (1 - dropout_p):
    dv_j = sum_i pd_ij dO_i
    dp_ij = z_ij / (1 - dropout_p) * dO_i . v_j
    delta_i = sum_j p_ij dp_ij = dO_i . o_i
    ds_ij = p_ij (dp_ij - delta_i)                 softmax backward
    dq_i = scale * sum_j ds_ij k_j ;  dk_j = scale * sum_i ds_ij q_i
p is recomputed from lse, never stored.

Tiles. ViT lengths are one token past a power of two (197, 257, 577, 1025). A loop over tokens
walks full blocks unmasked and then the rest in TAIL-token steps (16: the smallest wgmma N and
K), so 197 tokens cost 208, not 256. Only the wgmma N and K dimensions can shrink so: M is 64
rows per warpgroup. The forward's query blocks are the M of q k^T: its key loop is tailed, and
the queries past the last full block are TAIL-query tails of their own whose scores are
transposed (s^T = k q^T: the tail is the N; ``_fwd_query_tail``). The backward is the mirror
image: key blocks are the M, its query loop is tailed, and where ``key_tails`` allows it the
keys past the last full block are TAIL-key tails with untransposed scores (``_bwd_key_tail``).
At N = 197 each direction then costs 192 x 208 + 16 x 256 pairs, 1.13x the 197^2.

Head-dim tiles. Triton tiles are powers of two, so a head dim that is not one is held as two
tiles where that pads less (``head_dim_tiles``): lanes [0, BLOCK_D) and [BLOCK_D, +BLOCK_E), e.g.
80 = 64 + 16 (ViT-H/14) rather than 128 lanes, which cost 1.6x the MMA work, registers and shared
memory. Every (rows, D) tile below is such a pair ``x, x_e``; dot products over D are the sum of
two dots, products into D are two dots. With BLOCK_E = 0 the second tile does not exist (its name
holds the first, unread). Products with the lanes as their M cannot shrink so (wgmma wants M in
multiples of 64): the backward's dq^T = k^T ds^T and every product of the tails run their second
tile at 64 lanes (``WGMMA_M``, the ``WIDE_E`` of the tails), zero past the head dim.

Precision: statistics (m, l, lse, delta) and accumulators are float32 for every input dtype;
dot operands stay in the input dtype (p and ds are cast to it). float32 dots run with
``INPUT_PRECISION`` = "ieee" unless the host passes "tf32" (it follows PyTorch's
``torch.backends.cuda.matmul.allow_tf32``).

qk-norm: q and k rows can be LayerNorm-ed over D as each tile is loaded, y = xhat * w + b with
xhat = (x - mean) * rstd. Its backward, with dy the gradient w.r.t. the normalised row:
    g = dy * w ;  c1 = mean_d(xhat * g) ;  c2 = mean_d(g)
    dx = rstd * (g - xhat * c1 - c2) ;  dw = sum_rows dy * xhat ;  db = sum_rows dy
The backward program of a head sums dw and db over the head's rows and writes them once per
head to NORM_GRADS (B * H, 2, 2, D) [head, q or k, dw or db]; the host sums over heads.

Dropout: the keep mask is a pure function of (seed, batch * head, i, j): one Philox call
(``tl.philox``, as ``tl.randint4x`` makes it) gives the four draws of queries {i, i + 8} x keys
{j, j + 8} (``_keep``), with the head as its counter's second word, so the backward regenerates
the forward's mask whatever the tiles (blocks start at multiples of 16).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import backend
from .gemm import num_programs

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
# Tokens per tail step: wgmma's N is a multiple of 8 and its K (for 16-bit operands) of 16.
TAIL = tl.constexpr(16)
# wgmma's M: 64 rows per warpgroup; a dot with fewer leaves wgmma for mma.sync (HMMA).
WGMMA_M = tl.constexpr(64)
# Backward programs per SM: each keeps one head's (D, N) float32 dq partial sum in a scratch
# slot that stays in L2 (2 x 132 x 52 KB at N = 197, D = 64).
BWD_PROGRAMS_PER_SM = 2
# Head-dim lanes up to which the backward accumulates dk and dv in one pass over the queries
# (see ``_bwd_key_block``): the most whose kept configs compile without spills.
ONE_PASS_LANES = tl.constexpr(64)


def head_dim_tiles(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_E): the lanes of the head dim's two tiles (BLOCK_E = 0: one tile), the
    fewest lanes in powers of two; raises past the supported range.

    80 -> (64, 16), 96 -> (64, 32), 48 -> (32, 16), 64 -> (64, 0); 112 -> (128, 0), since
    64 + 64 pads as much as one tile and costs more dots."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim is {head_dim}; the attention kernel supports "
                         f"{MIN_HEAD_DIM} <= head_dim <= {MAX_HEAD_DIM}")
    whole = triton.next_power_of_2(head_dim)
    first = whole if whole == head_dim else whole // 2
    second = max(TAIL.value, triton.next_power_of_2(head_dim - first)) if head_dim > first else 0
    return (first, second) if first + second < whole else (whole, 0)


def tailed(n: int, block: int) -> int:
    """Tokens a loop over n tokens computes: full blocks, then TAIL-token steps."""
    return n // block * block + triton.cdiv(n % block, TAIL.value) * TAIL.value


def padded(n: int, block: int) -> int:
    """Tokens a blocked dimension of n tokens computes: whole blocks."""
    return triton.cdiv(n, block) * block


def forward_mma_work(n: int, block_m: int, block_n: int, block_d: int, block_e: int) -> int:
    """Lanes x queries x keys the forward's two GEMMs execute per head (N^2 D is the unpadded work
    of one): full query blocks over tailed keys, then query tails over WGMMA_M-key blocks."""
    lanes, tail_lanes = block_d + block_e, block_d + (WGMMA_M.value if block_e else 0)
    full = n // block_m * block_m
    return 2 * (lanes * full * tailed(n, block_n) +
                tail_lanes * (tailed(n, block_m) - full) * padded(n, WGMMA_M.value))


def backward_mma_work(n: int, block_m: int, block_n: int, block_d: int, block_e: int, tails: bool) -> int:
    """Lanes x keys x queries the backward's GEMMs execute per head: key blocks over tailed
    queries (s^T, dp^T, dv, dk, dq^T, and s^T again in dv's own pass above ONE_PASS_LANES; dq^T's
    second tile at WGMMA_M lanes); with ``tails`` (``key_tails``) the last keys as tails over
    WGMMA_M-query blocks (5 GEMMs), else one padded key block."""
    lanes, wide = block_d + block_e, block_d + (WGMMA_M.value if block_e else 0)
    per_pair = (4 if lanes <= ONE_PASS_LANES.value else 5) * lanes + wide
    if not tails:
        return per_pair * padded(n, block_n) * tailed(n, block_m)
    full = n // block_n * block_n
    return per_pair * full * tailed(n, block_m) + 5 * wide * (tailed(n, block_n) - full) * padded(n, WGMMA_M.value)


def key_tails(block_d: int, block_e: int, norms: bool) -> bool:
    """Whether the backward runs the keys past its last full block as 16-key tails
    (``_bwd_key_tail``) rather than as one padded block: where that compiles without spilling,
    up to 64 lanes without qk-norm (the sm_90 compile report: with more lanes the tails' [64
    queries, D] tiles took the kernel past 255 registers, 16 to 680 bytes of spills; with qk-norm,
    the tails normalising their k, 48 to 80 bytes at 64 lanes)."""
    return block_d + block_e <= 64 and not norms


def dropout_counters_fit(n: int) -> bool:
    """Whether a head of n tokens numbers its dropout draws' Philox counters in 32 bits (n <= 131,072)."""
    groups = (n + 15) // 16 * 8  # per row of counters: see _keep
    return groups * groups <= 2**32


def forward_programs(n: int, block_m: int) -> int:
    """Forward programs per head: one per full query block, one per TAIL queries past them."""
    return n // block_m + triton.cdiv(n % block_m, TAIL.value)


def scratch_rows(n: int) -> int:
    return padded(n, TAIL.value)


def backward_programs(heads: int, device) -> int:
    """Persistent backward programs: at most BWD_PROGRAMS_PER_SM per SM, one per head at most."""
    return min(heads, BWD_PROGRAMS_PER_SM * num_programs(device))


def _configs(stage: str) -> list:
    """Tile configs for ``stage`` ("fwd" or "bwd"): one fixed config in the interpreter.

    Forward: BLOCK_M queries per program, BLOCK_N keys per full step. Backward: BLOCK_N keys per
    block (the M of its dk, dv GEMMs: 64 per warpgroup, or the dots leave wgmma), BLOCK_M
    queries per full inner step. ``_prune`` drops, per launch, the configs that spill for its
    flags (the sm_90 compile report, bf16 and fp16, triton 3.6 and 3.8: benchmarks/results/static/).
    """
    if backend.interpreter_enabled():
        # The interpreter costs per tile step, not per element: big tiles keep CI fast.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})]
    if stage == "fwd":
        shapes = [(128, 64, 8, s) for s in (2, 3)] + [(64, 64, 4, s) for s in (2, 3)] + \
            [(128, 128, 8, s) for s in (2, 3)] + [(64, 128, 4, s) for s in (2, 3)]
    else:
        # 16 queries per step: with 32 every backward spilled (24 to 1,120 bytes), the dk, dv
        # accumulators, the dq^T partial and the transposed scores overflowing 255 registers.
        shapes = [(16, 64, 4, s) for s in (1, 2)] + [(16, 64, 8, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# A forward config is tried only if it executes at most this much more MMA work than the leanest
# that does not spill at the launch's N: at N = 197, 128-query blocks leave 69 queries to tails,
# 7% more than 64-query blocks.
MAX_EXTRA_FORWARD_WORK = 1.03


def _prune(kernel: str):
    """The early_config_prune of ``kernel`` ("fwd" or "bwd"): the configs that compile without
    spilling for a launch's flags, and in the forward pad little more than the leanest."""
    def prune(configs, named_args, **flags):
        if len(configs) == 1:
            return configs  # the interpreter's
        if kernel == "bwd":
            if flags["KEY_TAILS"]:
                # With key tails 2 stages spilled (96 bytes).
                return [c for c in configs if c.num_stages == 1]
            return [c for c in configs if c.num_stages == 1 and c.num_warps == 4]
        wide = flags["BLOCK_D"] + flags["BLOCK_E"] > 64

        def spill_free(c):
            # More than 32 scores per thread spilled with dropout or 128 lanes.
            scores_per_thread = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
            return scores_per_thread <= 32 or not (flags["DROPOUT"] or wide)
        kept = [c for c in configs if spill_free(c)]
        work = [forward_mma_work(named_args["N"], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], flags["BLOCK_D"],
                                 flags["BLOCK_E"]) for c in kept]
        kept = [c for c, w in zip(kept, work) if w <= MAX_EXTRA_FORWARD_WORK * min(work)]
        return kept
    return prune


def _autotune(kernel: str):
    # Keyed on the exact N: a ViT runs a handful of fixed lengths, each tuned once.
    return triton.autotune(configs=_configs(kernel), key=["N", "HEAD_DIM", "Q_NORM", "K_NORM", "DROPOUT"],
                           prune_configs_by=dict(early_config_prune=_prune(kernel)))


# ---------------------------------------------------------------------------------------------
# Head-dim tiles: a (rows, D) tile is the pair (x, x_e) of lanes [0, BLOCK_D) and [BLOCK_D, +BLOCK_E).

@triton.jit
def _lanes(LO: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Head-dim lanes [LO, LO + WIDTH) and which of them are real (< HEAD_DIM)."""
    lanes = LO + tl.arange(0, WIDTH)
    return lanes, lanes < HEAD_DIM


@triton.jit
def _load_rows(base, offs, rows_valid, stride_n, stride_d, LO: tl.constexpr, WIDTH: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Rows ``offs`` of one head at lanes [LO, +WIDTH); 0 past N and past the head dim."""
    lanes, valid = _lanes(LO, WIDTH, HEAD_DIM)
    # 32-bit offsets within a head (the host checks that they fit): 64-bit ones would double
    # the registers of every hoisted address tensor.
    ptrs = base + (offs[:, None] * stride_n + lanes[None, :] * stride_d)
    return tl.load(ptrs, mask=rows_valid[:, None] & valid[None, :], other=0.0)


@triton.jit
def _store_rows(base, x, offs, rows_valid, stride_n, stride_d, LO: tl.constexpr, WIDTH: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    lanes, valid = _lanes(LO, WIDTH, HEAD_DIM)
    ptrs = base + (offs[:, None] * stride_n + lanes[None, :] * stride_d)
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows_valid[:, None] & valid[None, :])


@triton.jit
def _load_tiles(base, offs, rows_valid, stride_n, stride_d, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """Rows ``offs`` of one head as (x, x_e)."""
    x = _load_rows(base, offs, rows_valid, stride_n, stride_d, 0, BLOCK_D, HEAD_DIM)
    x_e = x
    if BLOCK_E > 0:
        x_e = _load_rows(base, offs, rows_valid, stride_n, stride_d, BLOCK_D, BLOCK_E, HEAD_DIM)
    return x, x_e


@triton.jit
def _store_tiles(base, x, x_e, offs, rows_valid, stride_n, stride_d, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    _store_rows(base, x, offs, rows_valid, stride_n, stride_d, 0, BLOCK_D, HEAD_DIM)
    if BLOCK_E > 0:
        _store_rows(base, x_e, offs, rows_valid, stride_n, stride_d, BLOCK_D, BLOCK_E, HEAD_DIM)


@triton.jit
def _lane_vector(ptr, LO: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Lanes [LO, +WIDTH) of a (D,) vector in fp32, 0 past the head dim."""
    lanes, valid = _lanes(LO, WIDTH, HEAD_DIM)
    return tl.load(ptr + lanes, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _store_vectors(ptr, x, x_e, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The (D,) vector (x, x_e) to ``ptr``."""
    lanes, valid = _lanes(0, BLOCK_D, HEAD_DIM)
    tl.store(ptr + lanes, x, mask=valid)
    if BLOCK_E > 0:
        lanes, valid = _lanes(BLOCK_D, BLOCK_E, HEAD_DIM)
        tl.store(ptr + lanes, x_e, mask=valid)


@triton.jit
def _zero_vectors(BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """A (D,) fp32 vector of zeros as (x, x_e)."""
    x = tl.zeros([BLOCK_D], tl.float32)
    x_e = x
    if BLOCK_E > 0:
        x_e = tl.zeros([BLOCK_E], tl.float32)
    return x, x_e


@triton.jit
def _row_sums(x, x_e, BLOCK_E: tl.constexpr):
    """Per row, the sum over the head dim of the fp32 tiles (x, x_e)."""
    total = tl.sum(x, axis=1)
    if BLOCK_E > 0:
        total += tl.sum(x_e, axis=1)
    return total


@triton.jit
def _dot_over_d(a, a_e, b, b_e, BLOCK_E: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a b^T, the dot products of the rows of (a, a_e) with those of (b, b_e): fp32 [rows a, rows b]."""
    s = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
    if BLOCK_E > 0:
        s += tl.dot(a_e, tl.trans(b_e), input_precision=INPUT_PRECISION)
    return s


# ---------------------------------------------------------------------------------------------
# qk-norm, dropout, addressing.

@triton.jit
def _centred(x, mean, LO: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    valid = _lanes(LO, WIDTH, HEAD_DIM)[1]
    return tl.where(valid[None, :], x - mean[:, None], 0.0)


@triton.jit
def _row_stats(x, x_e, eps, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(mean, rstd) over the head dim of every row of the fp32 tiles (x, x_e)."""
    mean = _row_sums(x, x_e, BLOCK_E) / HEAD_DIM
    xc = _centred(x, mean, 0, BLOCK_D, HEAD_DIM)
    xc_e = xc
    if BLOCK_E > 0:
        xc_e = _centred(x_e, mean, BLOCK_D, BLOCK_E, HEAD_DIM)
    return mean, 1.0 / tl.sqrt(_row_sums(xc * xc, xc_e * xc_e, BLOCK_E) / HEAD_DIM + eps)


@triton.jit
def _normed_lanes(x, mean, rstd, W, B, LO: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(xhat, y) of the fp32 tile x of lanes [LO, +WIDTH) of rows with statistics (mean, rstd):
    y = xhat * w + b, both 0 past the head dim, so they add nothing to dot products."""
    xhat = _centred(x, mean, LO, WIDTH, HEAD_DIM) * rstd[:, None]
    return xhat, xhat * _lane_vector(W, LO, WIDTH, HEAD_DIM)[None, :] + _lane_vector(B, LO, WIDTH, HEAD_DIM)[None, :]


@triton.jit
def _layer_norm_rows(x, x_e, W, B, eps, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, HEAD_DIM: tl.constexpr):
    """LayerNorm over the head dim of every row of the fp32 tiles (x, x_e): (y, y_e, xhat, xhat_e, rstd)."""
    mean, rstd = _row_stats(x, x_e, eps, BLOCK_D, BLOCK_E, HEAD_DIM)
    xhat, y = _normed_lanes(x, mean, rstd, W, B, 0, BLOCK_D, HEAD_DIM)
    xhat_e, y_e = xhat, y
    if BLOCK_E > 0:
        xhat_e, y_e = _normed_lanes(x_e, mean, rstd, W, B, BLOCK_D, BLOCK_E, HEAD_DIM)
    return y, y_e, xhat, xhat_e, rstd


@triton.jit
def _layer_norm_rows_bwd(dy, dy_e, X, offs, rows_valid, stride_n, stride_d, W, B, eps, dw, dw_e, db, db_e,
                         BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(dx, dx_e, dw, dw_e, db, db_e): the dx of the LayerNorm of rows ``offs`` of one head of X
    for the fp32 gradients (dy, dy_e) of its output, and this tile's sums added to the running
    (dw, dw_e), (db, db_e) of its weight and bias. The rows are normalised again (from L2)."""
    x, x_e = _load_tiles(X, offs, rows_valid, stride_n, stride_d, BLOCK_D, BLOCK_E, HEAD_DIM)
    _, _, xhat, xhat_e, rstd = _layer_norm_rows(x.to(tl.float32), x_e.to(tl.float32), W, B, eps, BLOCK_D, BLOCK_E,
                                                HEAD_DIM)
    # Padded rows hold xhat = 0 but may hold dy != 0: keep them out of dw and db.
    dy = tl.where(rows_valid[:, None], dy, 0.0)
    dw += tl.sum(dy * xhat, axis=0)
    db += tl.sum(dy, axis=0)
    g = dy * _lane_vector(W, 0, BLOCK_D, HEAD_DIM)[None, :]
    g_e = g
    if BLOCK_E > 0:
        dy_e = tl.where(rows_valid[:, None], dy_e, 0.0)
        dw_e += tl.sum(dy_e * xhat_e, axis=0)
        db_e += tl.sum(dy_e, axis=0)
        g_e = dy_e * _lane_vector(W, BLOCK_D, BLOCK_E, HEAD_DIM)[None, :]
    c1 = _row_sums(xhat * g, xhat_e * g_e, BLOCK_E) / HEAD_DIM
    c2 = _row_sums(g, g_e, BLOCK_E) / HEAD_DIM
    dx = rstd[:, None] * (g - xhat * c1[:, None] - c2[:, None])
    dx_e = dx
    if BLOCK_E > 0:
        dx_e = rstd[:, None] * (g_e - xhat_e * c1[:, None] - c2[:, None])
    return dx, dx_e, dw, dw_e, db, db_e


@triton.jit
def _load_normed_tiles(base, offs, rows_valid, stride_n, stride_d, NORM: tl.constexpr, W, B, eps,
                       BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(x, x_e): rows ``offs`` of one head, LayerNorm-ed when NORM, in the input dtype."""
    x, x_e = _load_tiles(base, offs, rows_valid, stride_n, stride_d, BLOCK_D, BLOCK_E, HEAD_DIM)
    if NORM:
        y, y_e, _, _, _ = _layer_norm_rows(x.to(tl.float32), x_e.to(tl.float32), W, B, eps, BLOCK_D, BLOCK_E,
                                           HEAD_DIM)
        x, x_e = y.to(x.dtype), y_e.to(x.dtype)
    return x, x_e


@triton.jit
def _load_key_tiles(K, offs_n, n_valid, stride_kn, stride_kd, K_NORM: tl.constexpr, KW, KB, k_eps,
                    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(k, k_e, k_dq): a backward key block's tiles, LayerNorm-ed when K_NORM, and its second tile
    again at WGMMA_M lanes, the M of dq^T's second tile (k_e itself without one).

    The norm's statistics are taken over (k, k_dq), two tiles of one shape and so of one register
    layout: over (k, k_e), whose row sums lie in different layouts, they were added through shared
    memory, and at head dim 80 the kernel spilled (sm_90, triton 3.8, fp16)."""
    k, k_e = _load_tiles(K, offs_n, n_valid, stride_kn, stride_kd, BLOCK_D, BLOCK_E, HEAD_DIM)
    k_dq = k_e
    WIDE_E: tl.constexpr = WGMMA_M if BLOCK_E > 0 else 0
    if BLOCK_E > 0:
        _, k_dq = _load_tiles(K, offs_n, n_valid, stride_kn, stride_kd, BLOCK_D, WGMMA_M, HEAD_DIM)
    if K_NORM:
        dtype = k.dtype
        x, x_dq = k.to(tl.float32), k_dq.to(tl.float32)
        mean, rstd = _row_stats(x, x_dq, k_eps, BLOCK_D, WIDE_E, HEAD_DIM)
        k = _normed_lanes(x, mean, rstd, KW, KB, 0, BLOCK_D, HEAD_DIM)[1].to(dtype)
        if BLOCK_E > 0:
            k_e = _normed_lanes(k_e.to(tl.float32), mean, rstd, KW, KB, BLOCK_D, BLOCK_E, HEAD_DIM)[1].to(dtype)
            k_dq = _normed_lanes(x_dq, mean, rstd, KW, KB, BLOCK_D, WGMMA_M, HEAD_DIM)[1].to(dtype)
    return k, k_e, k_dq


@triton.jit
def _keep(seed, bh, start_m, start_n, N, dropout_p, ROWS: tl.constexpr, COLS: tl.constexpr,
          KEYS_FIRST: tl.constexpr):
    """The dropout keep mask of queries [start_m, +ROWS) and keys [start_n, +COLS): [ROWS, COLS],
    or with KEYS_FIRST [COLS keys, ROWS queries] (starts and sizes multiples of 16).

    One Philox call gives the four draws of queries {i, i + 8} x keys {j, j + 8} (bit 3 of i and
    j clear): the four scores one thread holds in a wgmma accumulator either way round, so the
    mask is assembled in registers, with no exchange between threads. The call's 32-bit counter
    numbers (i, j) with bit 3 dropped (``dropout_counters_fit``); the head is its second word.
    Four draws of keys 4c .. 4c + 3 instead lay in four threads, and the backward transposed the
    mask through shared memory: at head dim 80 its dropout backward needed 255 registers and 24
    bytes of spills (sm_90, triton 3.6), now 248 and none."""
    groups = (N + 15) // 16 * 8
    rows = start_m // 2 + tl.arange(0, ROWS // 2)
    cols = start_n // 2 + tl.arange(0, COLS // 2)
    if KEYS_FIRST:
        counters = cols[:, None] + (rows * groups)[None, :]
    else:
        counters = (rows * groups)[:, None] + cols[None, :]
    c0 = counters.to(tl.uint32, bitcast=True)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, zero + bh.to(tl.uint32), zero, zero)
    # Draw r_{2x + y} is query i + 8x, key j + 8y. join(a, b)[..., t] is (a, b)[t], so each pair
    # of joins leaves the query bit x and key bit y last, in an order the permute puts back.
    if KEYS_FIRST:
        draws = tl.join(tl.join(r0, r2), tl.join(r1, r3))     # [.., x, y]
    else:
        draws = tl.join(tl.join(r0, r1), tl.join(r2, r3))     # [.., y, x]
    outer: tl.constexpr = 2 * c0.shape[0]
    inner: tl.constexpr = 2 * c0.shape[1]
    draws = tl.reshape(draws, [outer // 16, 8, inner // 16, 8, 2, 2])
    # (outer block, outer low bits, inner block, inner low bits, inner bit 3, outer bit 3)
    draws = tl.reshape(tl.permute(draws, (0, 5, 1, 2, 4, 3)), [outer, inner])
    # The top 24 bits as a uniform float in [0, 1): exact in float32.
    uniform = (draws.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return uniform >= dropout_p


@triton.jit
def _head_base(ptr, bh, H, stride_b, stride_h):
    # 64-bit: b * stride_b passes 2^31 for large batches of packed projections. The kernels take
    # their batch and head strides as 64-bit parameters, used straight from the constant bank: as
    # 32-bit ones, widened in registers, they were held through the backward's loops and at head
    # dim 128 with dropout spilled (sm_90). bh itself stays 32-bit: 64-bit // and % are long.
    return ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


# ---------------------------------------------------------------------------------------------
# Forward.

@triton.jit
def _fwd_step(q, q_e, K, V, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd, m_i, l_i, acc, acc_e,
              seed, bh, start_m, qk_scale, dropout_p, KW, KB, k_eps,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, K_NORM: tl.constexpr,
              DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step of the queries [start_m, +len(q)) over keys [start_n, +BLOCK_N): the
    new (m_i, l_i, acc, acc_e).

    MASKED: some of the keys lie past N (the tail steps); full blocks skip the -inf select."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    k, k_e = _load_normed_tiles(K, offs_n, n_valid, stride_kn, stride_kd, K_NORM, KW, KB, k_eps,
                                BLOCK_D, BLOCK_E, HEAD_DIM)
    v, v_e = _load_tiles(V, offs_n, n_valid, stride_vn, stride_vd, BLOCK_D, BLOCK_E, HEAD_DIM)
    s = _dot_over_d(q, q_e, k, k_e, BLOCK_E, INPUT_PRECISION) * qk_scale
    if MASKED:
        # Keys past N get -inf so exp2 gives them exactly zero weight. Every step has at least
        # one real key, so the row max stays finite (no -inf - -inf).
        s = tl.where(n_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DROPOUT:
        # The normaliser l keeps the dropped weights; 1 / (1 - p) is applied once at the end.
        p = tl.where(_keep(seed, bh, start_m, start_n, N, dropout_p, q.shape[0], BLOCK_N, False), p, 0.0)
    p = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=INPUT_PRECISION)
    if BLOCK_E > 0:
        acc_e = acc_e * alpha[:, None] + tl.dot(p, v_e, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc, acc_e


@triton.jit
def _fwd_query_block(Q, K, V, O, LSE, start_m, N, stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                     stride_on, stride_od, seed, bh, qk_scale, dropout_p, QW, QB, q_eps, KW, KB, k_eps,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, Q_NORM: tl.constexpr,
                     K_NORM: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """o and lse of the full query block [start_m, +BLOCK_M): full key blocks, then key tails."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < N
    q, q_e = _load_normed_tiles(Q, offs_m, m_valid, stride_qn, stride_qd, Q_NORM, QW, QB, q_eps,
                                BLOCK_D, BLOCK_E, HEAD_DIM)
    # Statistics in fp32 whatever the input dtype; m starts at -inf so the first alpha is 0.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_e = acc
    if BLOCK_E > 0:
        acc_e = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    full_end = N // BLOCK_N * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        m_i, l_i, acc, acc_e = _fwd_step(q, q_e, K, V, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd,
                                         m_i, l_i, acc, acc_e, seed, bh, start_m, qk_scale, dropout_p, KW, KB, k_eps,
                                         HEAD_DIM, BLOCK_D, BLOCK_E, K_NORM, DROPOUT, INPUT_PRECISION, BLOCK_N,
                                         False)
    for start_n in range(full_end, N, TAIL):
        m_i, l_i, acc, acc_e = _fwd_step(q, q_e, K, V, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd,
                                         m_i, l_i, acc, acc_e, seed, bh, start_m, qk_scale, dropout_p, KW, KB, k_eps,
                                         HEAD_DIM, BLOCK_D, BLOCK_E, K_NORM, DROPOUT, INPUT_PRECISION, TAIL, True)
    if DROPOUT:
        inverse = 1.0 / (l_i * (1.0 - dropout_p))
    else:
        inverse = 1.0 / l_i
    _store_tiles(O, acc * inverse[:, None], acc_e * inverse[:, None], offs_m, m_valid, stride_on, stride_od,
                 BLOCK_D, BLOCK_E, HEAD_DIM)
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=m_valid)


@triton.jit
def _fwd_query_tail(Q, K, V, O, LSE, start_m, N, stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                    stride_on, stride_od, seed, bh, qk_scale, dropout_p, QW, QB, q_eps, KW, KB, k_eps,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WIDE_E: tl.constexpr, Q_NORM: tl.constexpr,
                    K_NORM: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """o and lse of the TAIL queries [start_m, +TAIL) past the last full query block.

    Scores are transposed, s^T [WGMMA_M keys, TAIL queries], so that the queries are the N of
    both GEMMs (s^T = k q^T, o^T = v^T p^T): 16 rows, not a 64-row block of which few are real.
    Keys become the M, in WGMMA_M steps, the last one masked; the lanes are the M of o^T, so a
    second head-dim tile runs at WIDE_E = WGMMA_M lanes."""
    offs_m = start_m + tl.arange(0, TAIL)
    m_valid = offs_m < N
    q, q_e = _load_normed_tiles(Q, offs_m, m_valid, stride_qn, stride_qd, Q_NORM, QW, QB, q_eps,
                                BLOCK_D, WIDE_E, HEAD_DIM)
    m_i = tl.full([TAIL], float("-inf"), tl.float32)
    l_i = tl.zeros([TAIL], tl.float32)
    acc = tl.zeros([BLOCK_D, TAIL], tl.float32)
    acc_e = acc
    if WIDE_E > 0:
        acc_e = tl.zeros([WIDE_E, TAIL], tl.float32)
    for start_n in range(0, N, WGMMA_M):
        offs_n = start_n + tl.arange(0, WGMMA_M)
        n_valid = offs_n < N
        k, k_e = _load_normed_tiles(K, offs_n, n_valid, stride_kn, stride_kd, K_NORM, KW, KB, k_eps,
                                    BLOCK_D, WIDE_E, HEAD_DIM)
        v, v_e = _load_tiles(V, offs_n, n_valid, stride_vn, stride_vd, BLOCK_D, WIDE_E, HEAD_DIM)
        st = _dot_over_d(k, k_e, q, q_e, WIDE_E, INPUT_PRECISION) * qk_scale
        st = tl.where(n_valid[:, None], st, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(st, axis=0))
        alpha = tl.exp2(m_i - m_new)
        pt = tl.exp2(st - m_new[None, :])
        l_i = l_i * alpha + tl.sum(pt, axis=0)
        if DROPOUT:
            pt = tl.where(_keep(seed, bh, start_m, start_n, N, dropout_p, TAIL, WGMMA_M, True), pt, 0.0)
        pt = pt.to(v.dtype)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), pt, input_precision=INPUT_PRECISION)
        if WIDE_E > 0:
            acc_e = acc_e * alpha[None, :] + tl.dot(tl.trans(v_e), pt, input_precision=INPUT_PRECISION)
        m_i = m_new
    if DROPOUT:
        inverse = 1.0 / (l_i * (1.0 - dropout_p))
    else:
        inverse = 1.0 / l_i
    _store_tiles(O, tl.trans(acc * inverse[None, :]), tl.trans(acc_e * inverse[None, :]), offs_m, m_valid,
                 stride_on, stride_od, BLOCK_D, WIDE_E, HEAD_DIM)
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=m_valid)


@_autotune("fwd")
@triton.jit
def _attention_fwd(
    Q, K, V,                        # (B, H, N, D) inputs
    O,                              # (B, H, N, D) output, q's dtype
    LSE,                            # (B * H, N) fp32 out: log2 sum_j exp2(s_ij) of each query row
    SEED,                           # (1,) int64 Philox seed (None without DROPOUT)
    QW, QB, KW, KB,                 # (D,) weight, bias of the q- and k-norm (None without Q_NORM, K_NORM)
    # Batch, head, token and feature strides of each (B, H, N, D) tensor, in elements; the batch
    # and head strides 64-bit (see _head_base).
    stride_qb: tl.int64, stride_qh: tl.int64, stride_qn, stride_qd,
    stride_kb: tl.int64, stride_kh: tl.int64, stride_kn, stride_kd,
    stride_vb: tl.int64, stride_vh: tl.int64, stride_vn, stride_vd,
    stride_ob: tl.int64, stride_oh: tl.int64, stride_on, stride_od,
    H, N,                           # heads, tokens
    qk_scale,                       # softmax scale * log2(e)
    q_eps, k_eps, dropout_p,
    HEAD_DIM: tl.constexpr,         # D
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,   # head_dim_tiles(D)
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # of the dots: "ieee" or "tf32" (float32 inputs only)
    BLOCK_M: tl.constexpr,          # query rows per program
    BLOCK_N: tl.constexpr,          # keys per full step
):
    """o and lse of head bh: program pid_m < N // BLOCK_M takes query block pid_m, each later one
    the next TAIL queries past the full blocks (``_fwd_query_tail``).

    Grid (B * H, forward_programs(N, BLOCK_M)): the large B * H product is axis 0 (axes 1 and 2
    stop at 65,535).
    """
    bh = tl.program_id(0)
    Q = _head_base(Q, bh, H, stride_qb, stride_qh)
    K = _head_base(K, bh, H, stride_kb, stride_kh)
    V = _head_base(V, bh, H, stride_vb, stride_vh)
    O = _head_base(O, bh, H, stride_ob, stride_oh)
    LSE += bh.to(tl.int64) * N
    seed = tl.load(SEED) if DROPOUT else 0
    full_blocks = N // BLOCK_M
    pid_m = tl.program_id(1)
    if pid_m < full_blocks:
        _fwd_query_block(Q, K, V, O, LSE, pid_m * BLOCK_M, N, stride_qn, stride_qd, stride_kn, stride_kd, stride_vn,
                         stride_vd, stride_on, stride_od, seed, bh, qk_scale, dropout_p, QW, QB, q_eps, KW, KB, k_eps,
                         HEAD_DIM, BLOCK_D, BLOCK_E, Q_NORM, K_NORM, DROPOUT, INPUT_PRECISION, BLOCK_M, BLOCK_N)
    else:
        _fwd_query_tail(Q, K, V, O, LSE, full_blocks * BLOCK_M + (pid_m - full_blocks) * TAIL, N, stride_qn,
                        stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od, seed, bh,
                        qk_scale, dropout_p, QW, QB, q_eps, KW, KB, k_eps, HEAD_DIM, BLOCK_D,
                        WGMMA_M if BLOCK_E > 0 else 0, Q_NORM, K_NORM, DROPOUT, INPUT_PRECISION)


# ---------------------------------------------------------------------------------------------
# Backward.

@triton.jit
def _add_to_dq(dqt_rows, a, b, offs_m, m_valid, start_n, rows, LO: tl.constexpr, WIDTH: tl.constexpr,
               HEAD_DIM: tl.constexpr, TRANSPOSED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a b, the dq of queries offs_m at lanes [LO, +WIDTH) ([queries, lanes], or with TRANSPOSED
    [lanes, queries]), added to its partial sum in the scratch (which holds dq^T: lane stride rows,
    token stride 1). The dot accumulates into the loaded sum: no second tile of registers."""
    lanes, valid = _lanes(LO, WIDTH, HEAD_DIM)
    if TRANSPOSED:
        ptrs = dqt_rows + lanes[:, None] * rows + offs_m[None, :]
        mask = valid[:, None] & m_valid[None, :]
    else:
        ptrs = dqt_rows + offs_m[:, None] + lanes[None, :] * rows
        mask = m_valid[:, None] & valid[None, :]
    # The first key block has no partial sum yet (the scratch holds another head's, or nothing).
    partial = tl.load(ptrs, mask=mask & (start_n > 0), other=0.0)
    tl.store(ptrs, tl.dot(a, b, partial, input_precision=INPUT_PRECISION), mask=mask)


@triton.jit
def _bwd_pair(k, k_e, k_dq, v, v_e, dk, dk_e, dv, dv_e, Q, DO, LSE, delta_rows, dqt_rows, start_n, start_m, N,
              rows, stride_qn, stride_qd, stride_don, stride_dod, n_valid, SEED, bh, qk_scale, dropout_p,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DROPOUT: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
              DV: tl.constexpr, DKDQ: tl.constexpr):
    """The (key block, query step [start_m, +BLOCK_Q)) pair: with DV, dv accumulated; with DKDQ,
    dk accumulated and the step's dq^T / scale added to its partial sum in the scratch.
    Returns (dk, dk_e, dv, dv_e). q is read as it enters the dots (normalised already with a
    q-norm); k_dq is k_e widened to WGMMA_M lanes, the M of dq^T's second tile.

    Scores are transposed, s^T [BLOCK_N keys, BLOCK_Q queries], so that the query step is the
    N (and K) of every GEMM and may be a TAIL: dv += pd^T dO, dk += ds^T q, dq^T = k^T ds^T.
    """
    offs_m = start_m + tl.arange(0, BLOCK_Q)
    m_valid = offs_m < N
    q, q_e = _load_tiles(Q, offs_m, m_valid, stride_qn, stride_qd, BLOCK_D, BLOCK_E, HEAD_DIM)
    do, do_e = _load_tiles(DO, offs_m, m_valid, stride_don, stride_dod, BLOCK_D, BLOCK_E, HEAD_DIM)
    lse = tl.load(LSE + offs_m, mask=m_valid, other=0.0)

    st = _dot_over_d(k, k_e, q, q_e, BLOCK_E, INPUT_PRECISION) * qk_scale
    # Padded queries and padded keys (whose normed k is the bias, not 0) get p = 0, so they
    # reach no gradient and none of the norms' sums.
    pt = tl.where(n_valid[:, None] & m_valid[None, :], tl.exp2(st - lse[None, :]), 0.0)
    if DROPOUT:
        # The seed is loaded per pair, volatile so that it stays there: loaded once per program,
        # it let the compiler hoist Philox's key schedule out of the loops, 20 registers held
        # through them (sm_90: at head dim 128 with dropout, 56 bytes of spills; now none).
        keep = _keep(tl.load(SEED, volatile=True), bh, start_m, start_n, N, dropout_p, BLOCK_Q, BLOCK_N, True)
    if DV:
        pdt = pt
        if DROPOUT:
            pdt = tl.where(keep, pt / (1.0 - dropout_p), 0.0)
        pdt = pdt.to(do.dtype)
        dv += tl.dot(pdt, do, input_precision=INPUT_PRECISION)
        if BLOCK_E > 0:
            dv_e += tl.dot(pdt, do_e, input_precision=INPUT_PRECISION)
    if DKDQ:
        delta = tl.load(delta_rows + offs_m, mask=m_valid, other=0.0)
        dpt = _dot_over_d(v, v_e, do, do_e, BLOCK_E, INPUT_PRECISION)
        if DROPOUT:
            dpt = tl.where(keep, dpt / (1.0 - dropout_p), 0.0)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=INPUT_PRECISION)
        _add_to_dq(dqt_rows, tl.trans(k), dst, offs_m, m_valid, start_n, rows, 0, BLOCK_D, HEAD_DIM, True,
                   INPUT_PRECISION)
        if BLOCK_E > 0:
            dk_e += tl.dot(dst, q_e, input_precision=INPUT_PRECISION)
            _add_to_dq(dqt_rows, tl.trans(k_dq), dst, offs_m, m_valid, start_n, rows, BLOCK_D, WGMMA_M, HEAD_DIM,
                       True, INPUT_PRECISION)
    return dk, dk_e, dv, dv_e


@triton.jit
def _bwd_queries(k, k_e, k_dq, v, v_e, dk, dk_e, dv, dv_e, Q, DO, LSE, delta_rows, dqt_rows, start_n, N, rows,
                 stride_qn, stride_qd, stride_don, stride_dod, n_valid, SEED, bh, qk_scale, dropout_p,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DROPOUT: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DV: tl.constexpr, DKDQ: tl.constexpr):
    """``_bwd_pair`` over every query: full BLOCK_M steps, then TAIL steps. Returns (dk, dk_e, dv, dv_e)."""
    # TAIL-sized full steps run to N (the pair masks anyway): one loop, not two.
    full_end = N
    if BLOCK_M > TAIL:
        full_end = N // BLOCK_M * BLOCK_M
    for start_m in range(0, full_end, BLOCK_M):
        dk, dk_e, dv, dv_e = _bwd_pair(k, k_e, k_dq, v, v_e, dk, dk_e, dv, dv_e, Q, DO, LSE, delta_rows, dqt_rows,
                                       start_n, start_m, N, rows, stride_qn, stride_qd, stride_don, stride_dod,
                                       n_valid, SEED, bh, qk_scale, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_E, DROPOUT,
                                       INPUT_PRECISION, BLOCK_N, BLOCK_M, DV, DKDQ)
    if BLOCK_M > TAIL:
        for start_m in range(full_end, N, TAIL):
            dk, dk_e, dv, dv_e = _bwd_pair(k, k_e, k_dq, v, v_e, dk, dk_e, dv, dv_e, Q, DO, LSE, delta_rows,
                                           dqt_rows, start_n, start_m, N, rows, stride_qn, stride_qd, stride_don,
                                           stride_dod, n_valid, SEED, bh, qk_scale, dropout_p, HEAD_DIM, BLOCK_D,
                                           BLOCK_E, DROPOUT, INPUT_PRECISION, BLOCK_N, TAIL, DV, DKDQ)
    return dk, dk_e, dv, dv_e


@triton.jit
def _bwd_key_block(Q, K, V, DO, LSE, delta_rows, dqt_rows, DK, DV, start_n, N, rows,
                   stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
                   stride_dkn, stride_dkd, stride_dvn, stride_dvd, SEED, bh, scale, qk_scale, dropout_p, KW, KB, k_eps,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, K_NORM: tl.constexpr,
                   DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of keys [start_n, +BLOCK_N) over every query, stored; dq's partial sums updated. With a
    k-norm, dk is stored as the gradient of the normalised k (the row phase of _attention_bwd takes
    it through the norm): the block's registers hold no norm state through its query loop.

    Above ONE_PASS_LANES lanes of head dim, dv takes its own pass over the queries (scores
    computed twice, 6 GEMMs per pair instead of 5): dk and dv together are 2 x 64 x 128 float32
    accumulators at 128 lanes, all of a warpgroup's registers, and every tile spilled."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    k, k_e, k_dq = _load_key_tiles(K, offs_n, n_valid, stride_kn, stride_kd, K_NORM, KW, KB, k_eps,
                                   BLOCK_D, BLOCK_E, HEAD_DIM)
    v, v_e = _load_tiles(V, offs_n, n_valid, stride_vn, stride_vd, BLOCK_D, BLOCK_E, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk_e, dv_e = dk, dv
    if BLOCK_E > 0:
        dk_e = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
        dv_e = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    # dv (with dk and dq in the same pass up to ONE_PASS_LANES lanes), then dk and dq on their own above.
    dk, dk_e, dv, dv_e = _bwd_queries(k, k_e, k_dq, v, v_e, dk, dk_e, dv, dv_e, Q, DO, LSE, delta_rows, dqt_rows,
                                      start_n, N, rows, stride_qn, stride_qd, stride_don, stride_dod, n_valid, SEED,
                                      bh, qk_scale, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_E, DROPOUT, INPUT_PRECISION,
                                      BLOCK_M, BLOCK_N, True, BLOCK_D + BLOCK_E <= ONE_PASS_LANES)
    _store_tiles(DV, dv, dv_e, offs_n, n_valid, stride_dvn, stride_dvd, BLOCK_D, BLOCK_E, HEAD_DIM)
    if BLOCK_D + BLOCK_E > ONE_PASS_LANES:
        dk, dk_e, dv, dv_e = _bwd_queries(k, k_e, k_dq, v, v_e, dk, dk_e, dv, dv_e, Q, DO, LSE, delta_rows,
                                          dqt_rows, start_n, N, rows, stride_qn, stride_qd, stride_don, stride_dod,
                                          n_valid, SEED, bh, qk_scale, dropout_p, HEAD_DIM, BLOCK_D, BLOCK_E,
                                          DROPOUT, INPUT_PRECISION, BLOCK_M, BLOCK_N, False, True)
    _store_tiles(DK, dk * scale, dk_e * scale, offs_n, n_valid, stride_dkn, stride_dkd, BLOCK_D, BLOCK_E, HEAD_DIM)


@triton.jit
def _bwd_key_tail(Q, K, V, DO, LSE, delta_rows, dqt_rows, DK, DV, start_n, N, rows,
                  stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
                  stride_dkn, stride_dkd, stride_dvn, stride_dvd, SEED, bh, scale, qk_scale, dropout_p,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, WIDE_E: tl.constexpr, DROPOUT: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """dk, dv of the TAIL keys [start_n, +TAIL) past the last full key block, stored; dq's partial
    sums updated. Without qk-norm (``key_tails``): with it the tails spilled.

    Scores are not transposed here, s [WGMMA_M queries, TAIL keys], so that the keys are the N of
    every GEMM (dv^T += dO^T pd, dk^T += q^T ds, dq += ds k): 16 keys, not a 64-key block of which
    few are real. Queries become the M, in WGMMA_M steps; the lanes are the M of dv^T and dk^T,
    so a second head-dim tile runs at WIDE_E = WGMMA_M lanes."""
    offs_n = start_n + tl.arange(0, TAIL)
    n_valid = offs_n < N
    k, k_e = _load_tiles(K, offs_n, n_valid, stride_kn, stride_kd, BLOCK_D, WIDE_E, HEAD_DIM)
    v, v_e = _load_tiles(V, offs_n, n_valid, stride_vn, stride_vd, BLOCK_D, WIDE_E, HEAD_DIM)
    dkt = tl.zeros([BLOCK_D, TAIL], tl.float32)
    dvt = tl.zeros([BLOCK_D, TAIL], tl.float32)
    dkt_e, dvt_e = dkt, dvt
    if WIDE_E > 0:
        dkt_e = tl.zeros([WIDE_E, TAIL], tl.float32)
        dvt_e = tl.zeros([WIDE_E, TAIL], tl.float32)
    for start_m in range(0, N, WGMMA_M):
        offs_m = start_m + tl.arange(0, WGMMA_M)
        m_valid = offs_m < N
        q, q_e = _load_tiles(Q, offs_m, m_valid, stride_qn, stride_qd, BLOCK_D, WIDE_E, HEAD_DIM)
        do, do_e = _load_tiles(DO, offs_m, m_valid, stride_don, stride_dod, BLOCK_D, WIDE_E, HEAD_DIM)
        lse = tl.load(LSE + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(delta_rows + offs_m, mask=m_valid, other=0.0)
        s = _dot_over_d(q, q_e, k, k_e, WIDE_E, INPUT_PRECISION) * qk_scale
        p = tl.where(m_valid[:, None] & n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot_over_d(do, do_e, v, v_e, WIDE_E, INPUT_PRECISION)
        pd = p
        if DROPOUT:
            # The seed loaded per step, as in _bwd_pair.
            keep = _keep(tl.load(SEED, volatile=True), bh, start_m, start_n, N, dropout_p, WGMMA_M, TAIL, False)
            pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        pd = pd.to(do.dtype)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dvt += tl.dot(tl.trans(do), pd, input_precision=INPUT_PRECISION)
        dkt += tl.dot(tl.trans(q), ds, input_precision=INPUT_PRECISION)
        _add_to_dq(dqt_rows, ds, k, offs_m, m_valid, start_n, rows, 0, BLOCK_D, HEAD_DIM, False, INPUT_PRECISION)
        if WIDE_E > 0:
            dvt_e += tl.dot(tl.trans(do_e), pd, input_precision=INPUT_PRECISION)
            dkt_e += tl.dot(tl.trans(q_e), ds, input_precision=INPUT_PRECISION)
            _add_to_dq(dqt_rows, ds, k_e, offs_m, m_valid, start_n, rows, BLOCK_D, WIDE_E, HEAD_DIM, False,
                       INPUT_PRECISION)
    _store_tiles(DV, tl.trans(dvt), tl.trans(dvt_e), offs_n, n_valid, stride_dvn, stride_dvd, BLOCK_D, WIDE_E,
                 HEAD_DIM)
    dk = tl.trans(dkt) * scale
    dk_e = dk
    if WIDE_E > 0:
        dk_e = tl.trans(dkt_e) * scale
    _store_tiles(DK, dk, dk_e, offs_n, n_valid, stride_dkn, stride_dkd, BLOCK_D, WIDE_E, HEAD_DIM)


@_autotune("bwd")
@triton.jit
def _attention_bwd(
    Q, K, V, O, DO,                 # (B, H, N, D): the forward's inputs and output, the output's gradient
    LSE,                            # (B * H, N) fp32: the forward's lse
    DQ, DK, DV,                     # (B, H, N, D) out
    SEED, QW, QB, KW, KB,           # as in _attention_fwd
    NORM_GRADS,                     # (B * H, 2, 2, D) fp32 out: per head, [q-norm, k-norm] x [dw, db]
    SCRATCH,                        # (programs, (1 + BLOCK_D + BLOCK_E) * rows) fp32: per program, delta and dq^T
    NORMED_Q,                       # (programs, rows, BLOCK_D + BLOCK_E) in q's dtype: the normalised q (Q_NORM only)
    # (batch, head, token, feature) strides of q, k, v, o, dO, dq, dk, dv, as in _attention_fwd
    stride_qb: tl.int64, stride_qh: tl.int64, stride_qn, stride_qd,
    stride_kb: tl.int64, stride_kh: tl.int64, stride_kn, stride_kd,
    stride_vb: tl.int64, stride_vh: tl.int64, stride_vn, stride_vd,
    stride_ob: tl.int64, stride_oh: tl.int64, stride_on, stride_od,
    stride_dob: tl.int64, stride_doh: tl.int64, stride_don, stride_dod,
    stride_dqb: tl.int64, stride_dqh: tl.int64, stride_dqn, stride_dqd,
    stride_dkb: tl.int64, stride_dkh: tl.int64, stride_dkn, stride_dkd,
    stride_dvb: tl.int64, stride_dvh: tl.int64, stride_dvn, stride_dvd,
    BH, H, N,                       # batch * heads, heads, tokens
    programs,                       # the launch's programs, the head loop's step: a parameter (constant
                                    # bank), as tl.num_programs(0) was held in a register and spilled
    rows,                           # scratch_rows(N): N rounded up to TAIL
    scale, qk_scale,                # softmax scale; scale * log2(e)
    q_eps, k_eps, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    KEY_TAILS: tl.constexpr,        # key_tails(...): the last keys in 16-key tails, not a padded block
    BLOCK_M: tl.constexpr,          # queries per full inner step
    BLOCK_N: tl.constexpr,          # keys per block
):
    """dq, dk, dv (and the norms' dw, db) of whole heads: one launch, deterministic.

    Why this design: ViT heads are short (N <= 1025) and many (B * H in the thousands), so one
    program owns a whole head and walks it alone, and nothing is ever reduced across programs:
      1. delta_i = dO_i . o_i for every query (and, with a q-norm, the normalised q) into the
         program's scratch slot;
      2. for each key block j (in order), for each query step i: s^T, p^T, dp^T and ds^T once
         for the pair; dk_j, dv_j accumulate in registers; dq_i^T's partial sum over the key
         blocks so far is read from, and written back to, the scratch slot; then, with
         KEY_TAILS, the same for each 16-key tail over 64-query blocks (``_bwd_key_tail``);
      3. dq_i read back from the scratch as rows, scaled, taken through the q-norm into DQ; with a
         k-norm, dk_j (stored by step 2 as the gradient of the normalised k) read back and taken
         through the k-norm, so that no norm state is held in registers through step 2.
    Each pair's scores are computed once (5 GEMMs per pair, not the 7 of a split dk/dv + dq
    backward; 6 above ONE_PASS_LANES, see ``_bwd_key_block``), delta costs no launch, every sum
    runs in a fixed order (no atomics: bitwise deterministic), and each of q, k, v, o, dO is
    read from DRAM once: the program's re-reads of a head's q and dO (one per key block) and
    its scratch slot (2 x 132 slots, 52 KB each at N = 197, D = 64) stay in L2. Programs are
    persistent (``backward_programs``): the scratch is per program, not per head. The price is
    parallelism: a head is one program, so a long sequence with few heads (N = 4096, B * H = 4)
    leaves most SMs idle. Barriers order the scratch's writes and reads between threads.
    """
    pid = tl.program_id(0)
    delta_rows = SCRATCH + pid.to(tl.int64) * (1 + BLOCK_D + BLOCK_E) * rows
    dqt_rows = delta_rows + rows
    normed_q_rows = NORMED_Q + pid.to(tl.int64) * rows * (BLOCK_D + BLOCK_E)
    for head in range(pid, BH, programs):
        bh = tl.cast(head, tl.int32)  # a tensor in the interpreter too
        q_ptr = _head_base(Q, bh, H, stride_qb, stride_qh)
        k_ptr = _head_base(K, bh, H, stride_kb, stride_kh)
        v_ptr = _head_base(V, bh, H, stride_vb, stride_vh)
        do_ptr = _head_base(DO, bh, H, stride_dob, stride_doh)
        lse_ptr = LSE + bh.to(tl.int64) * N
        o_ptr = _head_base(O, bh, H, stride_ob, stride_oh)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < N
            o, o_e = _load_tiles(o_ptr, offs_m, m_valid, stride_on, stride_od, BLOCK_D, BLOCK_E, HEAD_DIM)
            do, do_e = _load_tiles(do_ptr, offs_m, m_valid, stride_don, stride_dod, BLOCK_D, BLOCK_E, HEAD_DIM)
            delta = _row_sums(o.to(tl.float32) * do.to(tl.float32), o_e.to(tl.float32) * do_e.to(tl.float32),
                              BLOCK_E)
            tl.store(delta_rows + offs_m, delta, mask=m_valid)
            if Q_NORM:
                q, q_e = _load_normed_tiles(q_ptr, offs_m, m_valid, stride_qn, stride_qd, Q_NORM, QW, QB,
                                            q_eps, BLOCK_D, BLOCK_E, HEAD_DIM)
                _store_tiles(normed_q_rows, q, q_e, offs_m, m_valid, BLOCK_D + BLOCK_E, 1, BLOCK_D, BLOCK_E,
                             HEAD_DIM)
        # The scratch is written and read by different threads of the program.
        tl.debug_barrier()

        dq_ptr = _head_base(DQ, bh, H, stride_dqb, stride_dqh)
        dk_ptr = _head_base(DK, bh, H, stride_dkb, stride_dkh)
        dv_ptr = _head_base(DV, bh, H, stride_dvb, stride_dvh)
        # The dots read q from the scratch when it is normalised (once per head, not per key block).
        q_dots, stride_qdots_n, stride_qdots_d = q_ptr, stride_qn, stride_qd
        if Q_NORM:
            q_dots, stride_qdots_n, stride_qdots_d = normed_q_rows, BLOCK_D + BLOCK_E, 1
        # With KEY_TAILS the keys past the last full block take 16-key tails; without, a masked block.
        full_end = N
        if KEY_TAILS:
            full_end = N // BLOCK_N * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            _bwd_key_block(q_dots, k_ptr, v_ptr, do_ptr, lse_ptr, delta_rows, dqt_rows, dk_ptr, dv_ptr, start_n, N,
                           rows, stride_qdots_n, stride_qdots_d, stride_kn, stride_kd, stride_vn, stride_vd,
                           stride_don, stride_dod, stride_dkn, stride_dkd, stride_dvn, stride_dvd, SEED, bh, scale,
                           qk_scale, dropout_p, KW, KB, k_eps, HEAD_DIM, BLOCK_D, BLOCK_E, K_NORM, DROPOUT,
                           INPUT_PRECISION, BLOCK_M, BLOCK_N)
            tl.debug_barrier()
        for start_n in range(full_end, N, TAIL):
            _bwd_key_tail(q_dots, k_ptr, v_ptr, do_ptr, lse_ptr, delta_rows, dqt_rows, dk_ptr, dv_ptr, start_n, N,
                          rows, stride_qdots_n, stride_qdots_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_don,
                          stride_dod, stride_dkn, stride_dkd, stride_dvn, stride_dvd, SEED, bh, scale, qk_scale,
                          dropout_p, HEAD_DIM, BLOCK_D, WGMMA_M if BLOCK_E > 0 else 0, DROPOUT, INPUT_PRECISION)
            tl.debug_barrier()

        # Rows: dq (the scratch's dq^T read back, scaled) and dk (as the key blocks stored it)
        # taken through their norms.
        q_dw, q_dw_e = _zero_vectors(BLOCK_D, BLOCK_E)
        q_db, q_db_e = _zero_vectors(BLOCK_D, BLOCK_E)
        k_dw, k_dw_e = _zero_vectors(BLOCK_D, BLOCK_E)
        k_db, k_db_e = _zero_vectors(BLOCK_D, BLOCK_E)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < N
            # dq^T is (lanes, rows): read as rows, its token stride is 1 and its lane stride rows.
            dq, dq_e = _load_tiles(dqt_rows, offs_m, m_valid, 1, rows, BLOCK_D, BLOCK_E, HEAD_DIM)
            dq *= scale
            if BLOCK_E > 0:
                dq_e *= scale
            if Q_NORM:
                dq, dq_e, q_dw, q_dw_e, q_db, q_db_e = _layer_norm_rows_bwd(
                    dq, dq_e, q_ptr, offs_m, m_valid, stride_qn, stride_qd, QW, QB, q_eps, q_dw, q_dw_e, q_db, q_db_e,
                    BLOCK_D, BLOCK_E, HEAD_DIM)
            _store_tiles(dq_ptr, dq, dq_e, offs_m, m_valid, stride_dqn, stride_dqd, BLOCK_D, BLOCK_E, HEAD_DIM)
            if K_NORM:
                # Rounded to dk's dtype once on the way (as PyTorch's own backward rounds it between
                # attention and norm): the key blocks' registers hold no norm state.
                dk, dk_e = _load_tiles(dk_ptr, offs_m, m_valid, stride_dkn, stride_dkd, BLOCK_D, BLOCK_E, HEAD_DIM)
                # Every thread has read its rows before any overwrites them.
                tl.debug_barrier()
                dk, dk_e, k_dw, k_dw_e, k_db, k_db_e = _layer_norm_rows_bwd(
                    dk.to(tl.float32), dk_e.to(tl.float32), k_ptr, offs_m, m_valid, stride_kn, stride_kd, KW, KB,
                    k_eps, k_dw, k_dw_e, k_db, k_db_e, BLOCK_D, BLOCK_E, HEAD_DIM)
                _store_tiles(dk_ptr, dk, dk_e, offs_m, m_valid, stride_dkn, stride_dkd, BLOCK_D, BLOCK_E, HEAD_DIM)
        grads = NORM_GRADS + bh.to(tl.int64) * 4 * HEAD_DIM
        if Q_NORM:
            _store_vectors(grads, q_dw, q_dw_e, BLOCK_D, BLOCK_E, HEAD_DIM)
            _store_vectors(grads + HEAD_DIM, q_db, q_db_e, BLOCK_D, BLOCK_E, HEAD_DIM)
        if K_NORM:
            _store_vectors(grads + 2 * HEAD_DIM, k_dw, k_dw_e, BLOCK_D, BLOCK_E, HEAD_DIM)
            _store_vectors(grads + 3 * HEAD_DIM, k_db, k_db_e, BLOCK_D, BLOCK_E, HEAD_DIM)
        # The next head's delta overwrites the scratch this head's last block read.
        tl.debug_barrier()
