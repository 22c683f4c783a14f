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
def _layer_norm_rows_bwd(dy, xhat, rstd, rows_valid, W, B_PART, offs_d, d_valid, HEAD_DIM: tl.constexpr):
    """dx of the LayerNorm for the fp32 row gradients dy; writes this block's dw, db to B_PART.

    B_PART points at this program's (dw, db) slot pair: dw at [0:D], db at [D:2D].
    """
    w = tl.load(W + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    # Padded rows hold xhat = 0 but may hold dy != 0: keep them out of dw and db.
    dy = tl.where(rows_valid[:, None], dy, 0.0)
    tl.store(B_PART + offs_d, tl.sum(dy * xhat, axis=0), mask=d_valid)
    tl.store(B_PART + HEAD_DIM + offs_d, tl.sum(dy, axis=0), mask=d_valid)
    g = dy * w[None, :]
    c1 = tl.sum(xhat * g, axis=1) / HEAD_DIM
    c2 = tl.sum(g, axis=1) / HEAD_DIM
    return rstd[:, None] * (g - xhat * c1[:, None] - c2[:, None])


@triton.jit
def _zero_trailing_slots(PART, block, num_slots, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK: tl.constexpr, SLOT_ROWS: tl.constexpr):
    """Zeros in the slots after the first of row block ``block`` (see the module docstring).

    PART points at the (batch * head)'s first slot. Called before the main loop, before the
    accumulators are live."""
    tl.static_assert(BLOCK % SLOT_ROWS == 0)
    offs = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_D], tl.float32)
    for r in tl.static_range(1, BLOCK // SLOT_ROWS):
        slot = block * (BLOCK // SLOT_ROWS) + r
        ok = (offs < HEAD_DIM) & (slot < num_slots)
        tl.store(PART + slot * 2 * HEAD_DIM + offs, zeros, mask=ok)
        tl.store(PART + slot * 2 * HEAD_DIM + HEAD_DIM + offs, zeros, mask=ok)


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
def _head_base(ptr, pid_bh, H, stride_b, stride_h):
    # 64-bit: b * stride_b passes 2^31 for large batches of packed projections.
    return ptr + (pid_bh // H).to(tl.int64) * stride_b + (pid_bh % H).to(tl.int64) * stride_h


@_autotune("fwd")
@triton.jit
def _attention_fwd(
    Q, K, V, O, LSE, SEED, QW, QB, KW, KB,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, qk_scale, q_eps, k_eps, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """o and lse of query rows [pid_m * BLOCK_M, +BLOCK_M) of head pid_bh, looping over all keys."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    Q = _head_base(Q, pid_bh, H, stride_qb, stride_qh)
    K = _head_base(K, pid_bh, H, stride_kb, stride_kh)
    V = _head_base(V, pid_bh, H, stride_vb, stride_vh)
    O = _head_base(O, pid_bh, H, stride_ob, stride_oh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM

    q = _load_rows(Q, offs_m, m_valid, stride_qn, stride_qd, offs_d, d_valid)
    if Q_NORM:
        q = _layer_norm_rows(q.to(tl.float32), QW, QB, offs_d, d_valid, HEAD_DIM, q_eps)[0].to(q.dtype)
    if DROPOUT:
        seed = tl.load(SEED)

    # Statistics in fp32 whatever the input dtype; m starts at -inf so the first alpha is 0.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        k = _load_rows(K, offs_n, n_valid, stride_kn, stride_kd, offs_d, d_valid)
        if K_NORM:
            k = _layer_norm_rows(k.to(tl.float32), KW, KB, offs_d, d_valid, HEAD_DIM, k_eps)[0].to(k.dtype)
        v = _load_rows(V, offs_n, n_valid, stride_vn, stride_vd, offs_d, d_valid)
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
    O, DO, DELTA,
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
    Q, K, V, DO, LSE, DELTA, DK, DV, SEED, QW, QB, KW, KB, KW_PART,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N, num_slots, scale, qk_scale, q_eps, k_eps, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SLOT_ROWS: tl.constexpr,
):
    """dk, dv of key rows [pid_n * BLOCK_N, +BLOCK_N) of head pid_bh, looping over all queries.

    With K_NORM, dk is taken through the LayerNorm and this block's (dw, db) of the k-norm go to
    KW_PART[pid_bh, pid_n * BLOCK_N // SLOT_ROWS] (float32, shape (B*H, num_slots, 2, HEAD_DIM)).
    """
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    Q = _head_base(Q, pid_bh, H, stride_qb, stride_qh)
    K = _head_base(K, pid_bh, H, stride_kb, stride_kh)
    V = _head_base(V, pid_bh, H, stride_vb, stride_vh)
    DO = _head_base(DO, pid_bh, H, stride_dob, stride_doh)
    LSE += pid_bh.to(tl.int64) * N
    DELTA += pid_bh.to(tl.int64) * N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < N
    d_valid = offs_d < HEAD_DIM

    k = _load_rows(K, offs_n, n_valid, stride_kn, stride_kd, offs_d, d_valid)
    if K_NORM:
        k_normed, k_hat, k_rstd = _layer_norm_rows(k.to(tl.float32), KW, KB, offs_d, d_valid, HEAD_DIM, k_eps)
        k = k_normed.to(k.dtype)
    v = _load_rows(V, offs_n, n_valid, stride_vn, stride_vd, offs_d, d_valid)
    if DROPOUT:
        seed = tl.load(SEED)

    if K_NORM:
        KW_PART += pid_bh.to(tl.int64) * num_slots * 2 * HEAD_DIM
        _zero_trailing_slots(KW_PART, pid_n, num_slots, HEAD_DIM, BLOCK_D, BLOCK_N, SLOT_ROWS)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < N
        q = _load_rows(Q, offs_m, m_valid, stride_qn, stride_qd, offs_d, d_valid)
        if Q_NORM:
            q = _layer_norm_rows(q.to(tl.float32), QW, QB, offs_d, d_valid, HEAD_DIM, q_eps)[0].to(q.dtype)
        do = _load_rows(DO, offs_m, m_valid, stride_don, stride_dod, offs_d, d_valid)
        lse = tl.load(LSE + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=m_valid, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        # Padded query rows and padded keys (whose normed k is the bias, not 0) get p = 0, so
        # they reach neither dv, dk nor the norm's partial sums.
        p = tl.where(m_valid[:, None] & n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if DROPOUT:
            keep = _keep(seed, pid_bh, offs_m, offs_n, N, dropout_p)
            pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            pd = p
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)

    dk *= scale
    if K_NORM:
        part = KW_PART + pid_n * (BLOCK_N // SLOT_ROWS) * 2 * HEAD_DIM
        dk = _layer_norm_rows_bwd(dk, k_hat, k_rstd, n_valid, KW, part, offs_d, d_valid, HEAD_DIM)
    _store_rows(_head_base(DK, pid_bh, H, stride_dkb, stride_dkh), dk, offs_n, n_valid, stride_dkn, stride_dkd,
                offs_d, d_valid)
    _store_rows(_head_base(DV, pid_bh, H, stride_dvb, stride_dvh), dv, offs_n, n_valid, stride_dvn, stride_dvd,
                offs_d, d_valid)


@_autotune("dq")
@triton.jit
def _attention_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, SEED, QW, QB, KW, KB, QW_PART,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N, num_slots, scale, qk_scale, q_eps, k_eps, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SLOT_ROWS: tl.constexpr,
):
    """dq of query rows [pid_m * BLOCK_M, +BLOCK_M) of head pid_bh, looping over all keys.

    With Q_NORM, dq is taken through the LayerNorm and this block's (dw, db) of the q-norm go to
    QW_PART[pid_bh, pid_m * BLOCK_M // SLOT_ROWS] (float32, shape (B*H, num_slots, 2, HEAD_DIM)).
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    Q = _head_base(Q, pid_bh, H, stride_qb, stride_qh)
    K = _head_base(K, pid_bh, H, stride_kb, stride_kh)
    V = _head_base(V, pid_bh, H, stride_vb, stride_vh)
    DO = _head_base(DO, pid_bh, H, stride_dob, stride_doh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM

    q = _load_rows(Q, offs_m, m_valid, stride_qn, stride_qd, offs_d, d_valid)
    if Q_NORM:
        q_normed, q_hat, q_rstd = _layer_norm_rows(q.to(tl.float32), QW, QB, offs_d, d_valid, HEAD_DIM, q_eps)
        q = q_normed.to(q.dtype)
    do = _load_rows(DO, offs_m, m_valid, stride_don, stride_dod, offs_d, d_valid)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=m_valid, other=0.0)
    if DROPOUT:
        seed = tl.load(SEED)

    if Q_NORM:
        QW_PART += pid_bh.to(tl.int64) * num_slots * 2 * HEAD_DIM
        _zero_trailing_slots(QW_PART, pid_m, num_slots, HEAD_DIM, BLOCK_D, BLOCK_M, SLOT_ROWS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        k = _load_rows(K, offs_n, n_valid, stride_kn, stride_kd, offs_d, d_valid)
        if K_NORM:
            k = _layer_norm_rows(k.to(tl.float32), KW, KB, offs_d, d_valid, HEAD_DIM, k_eps)[0].to(k.dtype)
        v = _load_rows(V, offs_n, n_valid, stride_vn, stride_vd, offs_d, d_valid)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        p = tl.where(m_valid[:, None] & n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if DROPOUT:
            keep = _keep(seed, pid_bh, offs_m, offs_n, N, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)

    dq *= scale
    if Q_NORM:
        part = QW_PART + pid_m * (BLOCK_M // SLOT_ROWS) * 2 * HEAD_DIM
        dq = _layer_norm_rows_bwd(dq, q_hat, q_rstd, m_valid, QW, part, offs_d, d_valid, HEAD_DIM)
    _store_rows(_head_base(DQ, pid_bh, H, stride_dqb, stride_dqh), dq, offs_m, m_valid, stride_dqn, stride_dqd,
                offs_d, d_valid)
