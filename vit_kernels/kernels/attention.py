"""Flash attention for ViT shapes: forward, backward (dK/dV and dQ), fused qk LayerNorm, dropout.

q, k, v, o, dO, dq, dk, dv are (B, H, N, D) through their four strides, so the packed
(B, N, 3, H, D) projection and a (B, N, H, D) output are plain views; lse and delta are
(B * H, N) float32, contiguous. Every program owns one (batch * head, row block) pair: the large
B * H product is grid axis 0 (axes 1 and 2 stop at 65,535).

Forward, per query row i, in base 2 so that exp2 replaces exp (``qk_scale = scale * log2(e)``):
    s_ij = qk_scale * q_i . k_j
    lse_i = log2 sum_j exp2(s_ij)                  online: running max m_i, running sum l_i
    p_ij = exp2(s_ij - lse_i)                      = softmax_j(scale * q_i . k_j)
    o_i = sum_j p_ij z_ij v_j / (1 - dropout_p)    z_ij the keep mask (1 without dropout)

Backward, with pd_ij = p_ij z_ij / (1 - dropout_p):
    dv_j = sum_i pd_ij dO_i
    dp_ij = z_ij / (1 - dropout_p) * dO_i . v_j
    delta_i = sum_j p_ij dp_ij = dO_i . o_i        (the preprocess kernel)
    ds_ij = p_ij (dp_ij - delta_i)                 softmax backward
    dq_i = scale * sum_j ds_ij k_j ;  dk_j = scale * sum_i ds_ij q_i
p is recomputed from lse, never stored; no atomics, so the gradients are deterministic.

Precision: statistics (m, l, lse, delta) and accumulators are float32 for every input dtype;
dot operands stay in the input dtype (p and ds are cast to it). float32 dots run with
``INPUT_PRECISION`` = "ieee" unless the host passes "tf32" (it follows PyTorch's
``torch.backends.cuda.matmul.allow_tf32``).

qk-norm: q and k rows can be LayerNorm-ed over D as each tile is loaded, y = xhat * w + b with
xhat = (x - mean) * rstd. Its backward, with dy the gradient w.r.t. the normalised row:
    g = dy * w ;  c1 = mean_d(xhat * g) ;  c2 = mean_d(g)
    dx = rstd * (g - xhat * c1 - c2) ;  dw = sum_rows dy * xhat ;  db = sum_rows dy
dw and db are written per (batch * head, row block) into float32 partial buffers of
``partial_slots(N)`` slots of SLOT_ROWS rows, which the host sums (deterministically). A block
of BLOCK rows covers BLOCK / SLOT_ROWS slots: it writes its sums into the first and zeros into
the others, so every config writes every slot and none keeps a sum from an earlier launch (the
autotuner runs every config on the same buffers).

Dropout: the keep mask is a pure function of (seed, batch * head, i, j) through Philox
(``tl.rand`` on the 64-bit element index), so the backward regenerates it whatever the tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backend

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
# Rows per slot of the qk-norm partial buffers: the smallest backward block, which every
# backward block is a multiple of.
SLOT_ROWS = 64
# Rows per program of the delta preprocess: a pure row-wise reduction, no tuning needed.
DELTA_BLOCK_M = 64


def head_dim_block(head_dim: int) -> int:
    """The padded (power-of-two) head-dim tile; raises past the supported range."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim is {head_dim}; the attention kernel supports "
                         f"{MIN_HEAD_DIM} <= head_dim <= {MAX_HEAD_DIM}")
    return triton.next_power_of_2(head_dim)


def partial_slots(n: int) -> int:
    return triton.cdiv(n, SLOT_ROWS)


def _configs(stage: str) -> list:
    """Tile configs for ``stage`` ("fwd" or "bwd"): one fixed config in the interpreter.

    ViT lengths are 197, 257, 577 and 1025 tokens: one token past a power of two, so 64-key
    blocks waste up to 20% at 197 and 32-key blocks about half that; the autotuner picks per N.
    The backward's blocks are at least 64 rows: its dots with 32-row blocks compiled to
    mma.sync (HMMA), not wgmma, in the sm_90 compile report. ``_prune`` drops, per launch,
    the configs that spill for its flags.
    """
    if backend.interpreter_enabled():
        # The interpreter costs per tile step, not per element: big tiles keep CI fast.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})]
    if stage == "fwd":
        shapes = [(128, 64, 8, s) for s in (2, 3)] + [(128, 32, 4, s) for s in (2, 3)] + \
            [(64, 64, 4, s) for s in (2, 3)] + [(64, 32, 4, s) for s in (2, 3)] + \
            [(128, 128, 8, s) for s in (2, 3)] + [(64, 128, 4, s) for s in (2, 3)]
    else:
        # 128 x 64 unpipelined (one stage) is the only backward tile whose dK/dV kernel does
        # not spill at head dim 80 (padded to 128).
        shapes = [(64, 64, 4, s) for s in (2, 3)] + [(128, 64, 8, s) for s in (1, 2, 3)] + \
            [(64, 128, 8, s) for s in (2, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(kernel: str):
    """The early_config_prune of ``kernel`` ("fwd", "dkdv" or "dq"): the configs that compile
    without spilling for a launch's flags, as the sm_90 compile report found them (bf16,
    triton 3.6 and 3.8: benchmarks/results/static/). "heavy": dropout with a fused qk-norm;
    "wide": head dim above 64 (padded to 128)."""
    def prune(configs, named_args, **flags):
        if len(configs) == 1:
            return configs  # the interpreter's
        heavy = flags["DROPOUT"] and (flags["Q_NORM"] or flags["K_NORM"])
        wide = flags["BLOCK_D"] > 64
        kept = []
        for config in configs:
            m, n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
            tile = (m, n, config.num_warps, stages)
            if kernel == "fwd":
                # More than 32 scores per thread spilled 24 to 616 bytes there (72 to 80 with
                # dropout alone on triton 3.8).
                keep = not (flags["DROPOUT"] or wide) or m * n // (32 * config.num_warps) <= 32
            elif kernel == "dkdv":
                if wide:
                    keep = tile == (128, 64, 8, 1)
                elif heavy:
                    # At the 255-register limit in every tile: only 128 x 64 fits, and which
                    # pipelining depth fits depends on the dtype (bf16 spilled 8 bytes unpipelined
                    # on triton 3.8 and in 2 stages on 3.6; fp16 8 to 104 in 2 or 3 stages).
                    keep = tile == ((128, 64, 8, 3) if named_args["Q"].dtype == torch.bfloat16
                                    else (128, 64, 8, 1))
                elif flags["DROPOUT"]:
                    # 64 x 64 spilled 8 to 16 bytes on triton 3.8.
                    keep = tile[:3] == (128, 64, 8) and stages > 1
                else:
                    keep = n <= 64 and stages > 1     # 128 keys per block spilled 32 to 1,576 bytes
            else:
                if heavy:
                    # 3 stages spilled 32 bytes, 128 keys 304, 128 queries 8 to 24 (the qk-norm
                    # slot zeroing tips it over the 255-register limit, triton 3.6).
                    keep = tile == (64, 64, 4, 2)
                else:
                    keep = stages > 1 and (n <= 64 or not flags["DROPOUT"])   # dropout, 128 keys: 168
            if keep:
                kept.append(config)
        return kept
    return prune


def _autotune(kernel: str):
    # Keyed on the exact N: a ViT runs a handful of fixed lengths, each tuned once.
    return triton.autotune(configs=_configs("fwd" if kernel == "fwd" else "bwd"), key=["N", "HEAD_DIM", "Q_NORM", "K_NORM", "DROPOUT"],
                           prune_configs_by=dict(early_config_prune=_prune(kernel)))


@triton.jit
def _layer_norm_rows(x, W, B, offs_d, d_valid, HEAD_DIM: tl.constexpr, eps):
    """LayerNorm of every row of the fp32 tile x [rows, BLOCK_D] over its first HEAD_DIM lanes.

    Returns (y, xhat, rstd); padded lanes of y and xhat are 0 so they add nothing to dot products.
    """
    mean = tl.sum(x, axis=1) / HEAD_DIM
    xc = tl.where(d_valid[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / HEAD_DIM + eps)
    xhat = xc * rstd[:, None]
    w = tl.load(W + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    b = tl.load(B + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    return xhat * w[None, :] + b[None, :], xhat, rstd


@triton.jit
def _layer_norm_rows_bwd(dy, xhat, rstd, rows_valid, W, PART, block, offs_d, d_valid, HEAD_DIM: tl.constexpr,
                         BLOCK: tl.constexpr, SLOT_ROWS: tl.constexpr):
    """dx of the LayerNorm for the fp32 row gradients dy; writes row block ``block``'s dw, db.

    PART points at the (batch * head)'s first slot (``_zero_trailing_slots`` returns it); the
    block's sums go to its first slot: dw at [0:D], db at [D:2D].
    """
    part = PART + block * (BLOCK // SLOT_ROWS) * 2 * HEAD_DIM
    w = tl.load(W + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    # Padded rows hold xhat = 0 but may hold dy != 0: keep them out of dw and db.
    dy = tl.where(rows_valid[:, None], dy, 0.0)
    tl.store(part + offs_d, tl.sum(dy * xhat, axis=0), mask=d_valid)
    tl.store(part + HEAD_DIM + offs_d, tl.sum(dy, axis=0), mask=d_valid)
    g = dy * w[None, :]
    c1 = tl.sum(xhat * g, axis=1) / HEAD_DIM
    c2 = tl.sum(g, axis=1) / HEAD_DIM
    return rstd[:, None] * (g - xhat * c1[:, None] - c2[:, None])


@triton.jit
def _zero_trailing_slots(PART, pid_bh, block, num_slots, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK: tl.constexpr, SLOT_ROWS: tl.constexpr):
    """Zeros in the slots after the first of row block ``block`` (see the module docstring).

    PART is the whole (B*H, num_slots, 2, HEAD_DIM) buffer; returns it moved to head pid_bh's first
    slot. Called before the main loop, before the accumulators are live."""
    tl.static_assert(BLOCK % SLOT_ROWS == 0)
    PART += pid_bh.to(tl.int64) * num_slots * 2 * HEAD_DIM
    offs = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_D], tl.float32)
    for r in tl.static_range(1, BLOCK // SLOT_ROWS):
        slot = block * (BLOCK // SLOT_ROWS) + r
        ok = (offs < HEAD_DIM) & (slot < num_slots)
        tl.store(PART + slot * 2 * HEAD_DIM + offs, zeros, mask=ok)
        tl.store(PART + slot * 2 * HEAD_DIM + HEAD_DIM + offs, zeros, mask=ok)
    return PART


@triton.jit
def _keep(seed, pid_bh, offs_m, offs_n, N, dropout_p):
    """The dropout keep mask [BLOCK_M, BLOCK_N]: Philox on the element's 64-bit index in (B*H, N, N)."""
    rows = pid_bh.to(tl.int64) * N + offs_m.to(tl.int64)
    return tl.rand(seed, rows[:, None] * N + offs_n[None, :]) >= dropout_p


@triton.jit
def _load_rows(base, offs, rows_valid, stride_n, stride_d, offs_d, d_valid):
    ptrs = base + offs.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=rows_valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _store_rows(base, x, offs, rows_valid, stride_n, stride_d, offs_d, d_valid):
    ptrs = base + offs.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows_valid[:, None] & d_valid[None, :])


@triton.jit
def _load_normed_rows(base, offs, rows_valid, stride_n, stride_d, offs_d, d_valid, NORM: tl.constexpr,
                      W, B, eps, HEAD_DIM: tl.constexpr):
    """(x, xhat, rstd): rows ``offs`` of one head, LayerNorm-ed when NORM; x keeps the input dtype.

    xhat and rstd (fp32) mean something only with NORM; a caller that does not use them loses
    them to dead-code elimination."""
    x = _load_rows(base, offs, rows_valid, stride_n, stride_d, offs_d, d_valid)
    xhat = x
    rstd = x
    if NORM:
        normed, xhat, rstd = _layer_norm_rows(x.to(tl.float32), W, B, offs_d, d_valid, HEAD_DIM, eps)
        x = normed.to(x.dtype)
    return x, xhat, rstd


@triton.jit
def _key_rows(K, V, start, N, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid,
              K_NORM: tl.constexpr, KW, KB, k_eps, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key rows [start, +BLOCK_N) of one head: (offs_n, n_valid, k, k_hat, k_rstd, v), k normed with K_NORM."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    k, k_hat, k_rstd = _load_normed_rows(K, offs_n, n_valid, stride_kn, stride_kd, offs_d, d_valid, K_NORM,
                                         KW, KB, k_eps, HEAD_DIM)
    v = _load_rows(V, offs_n, n_valid, stride_vn, stride_vd, offs_d, d_valid)
    return offs_n, n_valid, k, k_hat, k_rstd, v


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, start, N, stride_qn, stride_qd, stride_don, stride_dod, offs_d, d_valid,
                Q_NORM: tl.constexpr, QW, QB, q_eps, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query rows [start, +BLOCK_M) of one head for the backward:
    (offs_m, m_valid, q, q_hat, q_rstd, dO, lse, delta), q normed with Q_NORM."""
    offs_m = start + tl.arange(0, BLOCK_M)
    m_valid = offs_m < N
    q, q_hat, q_rstd = _load_normed_rows(Q, offs_m, m_valid, stride_qn, stride_qd, offs_d, d_valid, Q_NORM,
                                         QW, QB, q_eps, HEAD_DIM)
    do = _load_rows(DO, offs_m, m_valid, stride_don, stride_dod, offs_d, d_valid)
    lse = tl.load(LSE + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=m_valid, other=0.0)
    return offs_m, m_valid, q, q_hat, q_rstd, do, lse, delta


@triton.jit
def _head_base(ptr, pid_bh, H, stride_b, stride_h):
    # 64-bit: b * stride_b passes 2^31 for large batches of packed projections.
    return ptr + (pid_bh // H).to(tl.int64) * stride_b + (pid_bh % H).to(tl.int64) * stride_h


@triton.jit
def _program_heads(Q, K, V, X, H, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                   stride_xb, stride_xh):
    """(pid_bh, block, Q, K, V, X): this program's head (grid axis 0) and row block (axis 1), and
    the pointers moved to that head (X: O in the forward, dO in the backward)."""
    pid_bh = tl.program_id(0)
    block = tl.program_id(1)
    Q = _head_base(Q, pid_bh, H, stride_qb, stride_qh)
    K = _head_base(K, pid_bh, H, stride_kb, stride_kh)
    V = _head_base(V, pid_bh, H, stride_vb, stride_vh)
    X = _head_base(X, pid_bh, H, stride_xb, stride_xh)
    return pid_bh, block, Q, K, V, X


@triton.jit
def _bwd_program(Q, K, V, DO, LSE, DELTA, H, N, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                 stride_dob, stride_doh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The set-up of both gradient kernels: ``_program_heads``, LSE and DELTA moved to the head's
    row, and the head-dim lanes: (pid_bh, block, Q, K, V, DO, LSE, DELTA, offs_d, d_valid)."""
    pid_bh, block, Q, K, V, DO = _program_heads(Q, K, V, DO, H, stride_qb, stride_qh, stride_kb, stride_kh,
                                                stride_vb, stride_vh, stride_dob, stride_doh)
    LSE += pid_bh.to(tl.int64) * N
    DELTA += pid_bh.to(tl.int64) * N
    offs_d = tl.arange(0, BLOCK_D)
    return pid_bh, block, Q, K, V, DO, LSE, DELTA, offs_d, offs_d < HEAD_DIM


@triton.jit
def _bwd_probs(q, k, v, do, lse, offs_m, offs_n, m_valid, n_valid, seed, pid_bh, N, qk_scale, dropout_p,
               DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(p, pd, dp) of a [BLOCK_M, BLOCK_N] tile: p recomputed from lse, pd = p z / (1 - dropout_p)
    and dp = z / (1 - dropout_p) * dO v^T (see the module docstring)."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    # Padded query rows and padded keys (whose normed k is the bias, not 0) get p = 0, so
    # they reach no gradient and none of the norms' partial sums.
    p = tl.where(m_valid[:, None] & n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if DROPOUT:
        keep = _keep(seed, pid_bh, offs_m, offs_n, N, dropout_p)
        pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        pd = p
    return p, pd, dp


@triton.jit
def _own_rows_grad(acc, scale, NORM: tl.constexpr, xhat, rstd, rows_valid, W, PART, block, offs_d, d_valid,
                   HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SLOT_ROWS: tl.constexpr):
    """The gradient of the program's own rows (dk or dq) from its accumulator: scaled, and taken back
    through the LayerNorm (its dw, db to PART) with NORM."""
    acc *= scale
    if NORM:
        acc = _layer_norm_rows_bwd(acc, xhat, rstd, rows_valid, W, PART, block, offs_d, d_valid, HEAD_DIM,
                                   BLOCK, SLOT_ROWS)
    return acc


@_autotune("fwd")
@triton.jit
def _attention_fwd(
    Q, K, V,                        # (B, H, N, D) inputs
    O,                              # (B, H, N, D) output, q's dtype
    LSE,                            # (B * H, N) fp32 out: log2 sum_j exp2(s_ij) of each query row
    SEED,                           # (1,) int64 Philox seed (None without DROPOUT)
    QW, QB, KW, KB,                 # (D,) weight, bias of the q- and k-norm (None without Q_NORM, K_NORM)
    stride_qb, stride_qh, stride_qn, stride_qd,     # batch, head, token and feature strides of
    stride_kb, stride_kh, stride_kn, stride_kd,     # each (B, H, N, D) tensor, in elements
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N,                           # heads, tokens
    qk_scale,                       # softmax scale * log2(e)
    q_eps, k_eps, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # D and its power-of-two tile
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # of the dots: "ieee" or "tf32" (float32 inputs only)
    BLOCK_M: tl.constexpr,          # query rows per program
    BLOCK_N: tl.constexpr,          # keys per loop step
):
    """o and lse of query rows [pid_m * BLOCK_M, +BLOCK_M) of head pid_bh, looping over all keys."""
    pid_bh, pid_m, Q, K, V, O = _program_heads(Q, K, V, O, H, stride_qb, stride_qh, stride_kb, stride_kh,
                                               stride_vb, stride_vh, stride_ob, stride_oh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM

    q = _load_normed_rows(Q, offs_m, m_valid, stride_qn, stride_qd, offs_d, d_valid, Q_NORM, QW, QB, q_eps,
                          HEAD_DIM)[0]
    seed = tl.load(SEED) if DROPOUT else 0

    # Statistics in fp32 whatever the input dtype; m starts at -inf so the first alpha is 0.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n, n_valid, k, _, _, v = _key_rows(K, V, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd,
                                                offs_d, d_valid, K_NORM, KW, KB, k_eps, HEAD_DIM, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        # Tail keys past N get -inf so exp2 gives them exactly zero weight. Every block has at
        # least one real key, so the row max stays finite (no -inf - -inf).
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            # The normaliser l keeps the dropped weights; 1 / (1 - p) is applied once at the end.
            p = tl.where(_keep(seed, pid_bh, offs_m, offs_n, N, dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    if DROPOUT:
        acc = acc / (l_i * (1.0 - dropout_p))[:, None]
    else:
        acc = acc / l_i[:, None]
    _store_rows(O, acc, offs_m, m_valid, stride_on, stride_od, offs_d, d_valid)
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=m_valid)


@triton.jit
def _attention_bwd_delta(
    O, DO,                          # (B, H, N, D) forward output and its gradient
    DELTA,                          # (B * H, N) fp32 out
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * o) in fp32 for rows [pid_m * BLOCK_M, +BLOCK_M) of head pid_bh."""
    pid_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM
    o = _load_rows(_head_base(O, pid_bh, H, stride_ob, stride_oh), offs_m, m_valid, stride_on, stride_od,
                   offs_d, d_valid)
    do = _load_rows(_head_base(DO, pid_bh, H, stride_dob, stride_doh), offs_m, m_valid, stride_don,
                    stride_dod, offs_d, d_valid)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=m_valid)


@_autotune("dkdv")
@triton.jit
def _attention_bwd_dkdv(
    Q, K, V, DO,                    # (B, H, N, D): the forward's inputs and the gradient of its output
    LSE, DELTA,                     # (B * H, N) fp32: the forward's lse, _attention_bwd_delta's delta
    DK, DV,                         # (B, H, N, D) out
    SEED, QW, QB, KW, KB,           # as in _attention_fwd
    KW_PART,                        # (B * H, num_slots, 2, D) fp32 out: the k-norm's (dw, db) partials
    stride_qb, stride_qh, stride_qn, stride_qd,     # (batch, head, token, feature) strides of q, k, v,
    stride_kb, stride_kh, stride_kn, stride_kd,     # dO, dk, dv
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N, num_slots,                # heads, tokens, partial slots per head
    scale, qk_scale,                # softmax scale; scale * log2(e)
    q_eps, k_eps, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,          # queries per loop step
    BLOCK_N: tl.constexpr,          # key rows per program
    SLOT_ROWS: tl.constexpr,        # rows per partial slot
):
    """dk, dv of key rows [pid_n * BLOCK_N, +BLOCK_N) of head pid_bh, looping over all queries.

    With K_NORM, dk is taken through the LayerNorm and this block's (dw, db) of the k-norm go to
    KW_PART[pid_bh, pid_n * BLOCK_N // SLOT_ROWS].
    """
    pid_bh, pid_n, Q, K, V, DO, LSE, DELTA, offs_d, d_valid = _bwd_program(
        Q, K, V, DO, LSE, DELTA, H, N, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_dob, stride_doh, HEAD_DIM, BLOCK_D)
    offs_n, n_valid, k, k_hat, k_rstd, v = _key_rows(K, V, pid_n * BLOCK_N, N, stride_kn, stride_kd, stride_vn,
                                                     stride_vd, offs_d, d_valid, K_NORM, KW, KB, k_eps, HEAD_DIM,
                                                     BLOCK_N)
    seed = tl.load(SEED) if DROPOUT else 0

    if K_NORM:
        KW_PART = _zero_trailing_slots(KW_PART, pid_bh, pid_n, num_slots, HEAD_DIM, BLOCK_D, BLOCK_N, SLOT_ROWS)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m, m_valid, q, _, _, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, start_m, N, stride_qn, stride_qd,
                                                               stride_don, stride_dod, offs_d, d_valid, Q_NORM,
                                                               QW, QB, q_eps, HEAD_DIM, BLOCK_M)
        p, pd, dp = _bwd_probs(q, k, v, do, lse, offs_m, offs_n, m_valid, n_valid, seed, pid_bh, N, qk_scale,
                               dropout_p, DROPOUT, INPUT_PRECISION)
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)

    dk = _own_rows_grad(dk, scale, K_NORM, k_hat, k_rstd, n_valid, KW, KW_PART, pid_n, offs_d, d_valid, HEAD_DIM,
                        BLOCK_N, SLOT_ROWS)
    _store_rows(_head_base(DK, pid_bh, H, stride_dkb, stride_dkh), dk, offs_n, n_valid, stride_dkn, stride_dkd,
                offs_d, d_valid)
    _store_rows(_head_base(DV, pid_bh, H, stride_dvb, stride_dvh), dv, offs_n, n_valid, stride_dvn, stride_dvd,
                offs_d, d_valid)


@_autotune("dq")
@triton.jit
def _attention_bwd_dq(
    Q, K, V, DO, LSE, DELTA,        # as in _attention_bwd_dkdv
    DQ,                             # (B, H, N, D) out
    SEED, QW, QB, KW, KB,           # as in _attention_fwd
    QW_PART,                        # as KW_PART in _attention_bwd_dkdv, for the q-norm
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N, num_slots, scale, qk_scale, q_eps, k_eps, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,          # query rows per program
    BLOCK_N: tl.constexpr,          # keys per loop step
    SLOT_ROWS: tl.constexpr,
):
    """dq of query rows [pid_m * BLOCK_M, +BLOCK_M) of head pid_bh, looping over all keys.

    With Q_NORM, dq is taken through the LayerNorm and this block's (dw, db) of the q-norm go to
    QW_PART[pid_bh, pid_m * BLOCK_M // SLOT_ROWS].
    """
    pid_bh, pid_m, Q, K, V, DO, LSE, DELTA, offs_d, d_valid = _bwd_program(
        Q, K, V, DO, LSE, DELTA, H, N, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_dob, stride_doh, HEAD_DIM, BLOCK_D)
    offs_m, m_valid, q, q_hat, q_rstd, do, lse, delta = _query_rows(
        Q, DO, LSE, DELTA, pid_m * BLOCK_M, N, stride_qn, stride_qd, stride_don, stride_dod, offs_d, d_valid,
        Q_NORM, QW, QB, q_eps, HEAD_DIM, BLOCK_M)
    seed = tl.load(SEED) if DROPOUT else 0

    if Q_NORM:
        QW_PART = _zero_trailing_slots(QW_PART, pid_bh, pid_m, num_slots, HEAD_DIM, BLOCK_D, BLOCK_M, SLOT_ROWS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n, n_valid, k, _, _, v = _key_rows(K, V, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd,
                                                offs_d, d_valid, K_NORM, KW, KB, k_eps, HEAD_DIM, BLOCK_N)
        p, _, dp = _bwd_probs(q, k, v, do, lse, offs_m, offs_n, m_valid, n_valid, seed, pid_bh, N, qk_scale,
                              dropout_p, DROPOUT, INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)

    dq = _own_rows_grad(dq, scale, Q_NORM, q_hat, q_rstd, m_valid, QW, QW_PART, pid_m, offs_d, d_valid, HEAD_DIM,
                        BLOCK_M, SLOT_ROWS)
    _store_rows(_head_base(DQ, pid_bh, H, stride_dqb, stride_dqh), dq, offs_m, m_valid, stride_dqn, stride_dqd,
                offs_d, d_valid)
