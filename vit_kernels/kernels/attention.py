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
K), so 197 keys cost 208, not 256. Only the wgmma N and K dimensions can shrink so: M is 64
rows per warpgroup. So the forward tails its key loop (keys are N of q k^T and K of p v) and
pads its query blocks; the backward does the opposite (see ``_attention_bwd``).

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
(``tl.randint4x``) on the counter of keys 4c .. 4c + 3 of row i gives their four draws, so the
backward regenerates the forward's mask whatever the tiles (blocks start at multiples of 16).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import backend
from .gemm import num_programs

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
# Tokens per tail step: wgmma's N is a multiple of 8 and its K (for 16-bit operands) of 16.
TAIL = tl.constexpr(16)
# Backward programs per SM: each keeps one head's (D, N) float32 dq partial sum in a scratch
# slot that stays in L2 (2 x 132 x 52 KB at N = 197, D = 64).
BWD_PROGRAMS_PER_SM = 2


def head_dim_block(head_dim: int) -> int:
    """The padded (power-of-two) head-dim tile; raises past the supported range."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim is {head_dim}; the attention kernel supports "
                         f"{MIN_HEAD_DIM} <= head_dim <= {MAX_HEAD_DIM}")
    return triton.next_power_of_2(head_dim)


def tailed(n: int, block: int) -> int:
    """Tokens a loop over n tokens computes: full blocks, then TAIL-token steps."""
    return n // block * block + triton.cdiv(n % block, TAIL.value) * TAIL.value


def padded(n: int, block: int) -> int:
    """Tokens a blocked dimension of n tokens computes: whole blocks."""
    return triton.cdiv(n, block) * block


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
        shapes = [(16, 64, 4, s) for s in (1, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(kernel: str):
    """The early_config_prune of ``kernel`` ("fwd" or "bwd"): the configs that compile without
    spilling for a launch's flags."""
    def prune(configs, named_args, **flags):
        if len(configs) == 1:
            return configs  # the interpreter's
        wide = flags["BLOCK_D"] > 64
        plain = not (flags["DROPOUT"] or flags["Q_NORM"] or flags["K_NORM"] or wide)
        kept = []
        for config in configs:
            m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
            if kernel == "fwd":
                # More than 32 scores per thread spilled with dropout or 128 lanes.
                keep = not (flags["DROPOUT"] or wide) or m * n // (32 * config.num_warps) <= 32
            else:
                keep = config.num_stages == 1 or plain   # pipelined, all but the plain one spilled
            if keep:
                kept.append(config)
        return kept
    return prune


def _autotune(kernel: str):
    # Keyed on the exact N: a ViT runs a handful of fixed lengths, each tuned once.
    return triton.autotune(configs=_configs(kernel), key=["N", "HEAD_DIM", "Q_NORM", "K_NORM", "DROPOUT"],
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
def _layer_norm_rows_bwd(dy, xhat, rstd, rows_valid, W, offs_d, d_valid, dw, db, HEAD_DIM: tl.constexpr):
    """(dx, dw, db): dx of the LayerNorm for the fp32 row gradients dy, and this tile's sums
    added to the running dw, db of the norm's weight and bias."""
    w = tl.load(W + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    # Padded rows hold xhat = 0 but may hold dy != 0: keep them out of dw and db.
    dy = tl.where(rows_valid[:, None], dy, 0.0)
    dw += tl.sum(dy * xhat, axis=0)
    db += tl.sum(dy, axis=0)
    g = dy * w[None, :]
    c1 = tl.sum(xhat * g, axis=1) / HEAD_DIM
    c2 = tl.sum(g, axis=1) / HEAD_DIM
    return rstd[:, None] * (g - xhat * c1[:, None] - c2[:, None]), dw, db


@triton.jit
def _keep(seed, bh, offs_m, start_n, N, dropout_p, BLOCK_N: tl.constexpr):
    """The dropout keep mask [len(offs_m), BLOCK_N] of keys [start_n, +BLOCK_N) (start_n % 4 == 0).

    Counter c of row i (of head bh) covers keys 4c .. 4c + 3: one Philox call, four draws."""
    groups = (N + 3) // 4
    rows = (bh.to(tl.int64) * N + offs_m.to(tl.int64)) * groups
    counters = rows[:, None] + (start_n // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    draws = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [offs_m.shape[0], BLOCK_N])
    # The top 24 bits as a uniform float in [0, 1): exact in float32.
    uniform = (draws.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return uniform >= dropout_p


@triton.jit
def _load_rows(base, offs, rows_valid, stride_n, stride_d, offs_d, d_valid):
    # 32-bit offsets within a head (the host checks that they fit): 64-bit ones would double
    # the registers of every hoisted address tensor.
    ptrs = base + (offs[:, None] * stride_n + offs_d[None, :] * stride_d)
    return tl.load(ptrs, mask=rows_valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _store_rows(base, x, offs, rows_valid, stride_n, stride_d, offs_d, d_valid):
    ptrs = base + (offs[:, None] * stride_n + offs_d[None, :] * stride_d)
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
def _head_base(ptr, bh, H, stride_b, stride_h):
    # 64-bit: b * stride_b passes 2^31 for large batches of packed projections.
    return ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _fwd_step(q, K, V, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid, m_i, l_i, acc,
              seed, bh, offs_m, qk_scale, dropout_p, KW, KB, k_eps,
              HEAD_DIM: tl.constexpr, K_NORM: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over keys [start_n, +BLOCK_N): the new (m_i, l_i, acc).

    MASKED: some of the keys lie past N (the tail steps); full blocks skip the -inf select."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    k = _load_normed_rows(K, offs_n, n_valid, stride_kn, stride_kd, offs_d, d_valid, K_NORM, KW, KB, k_eps,
                          HEAD_DIM)[0]
    v = _load_rows(V, offs_n, n_valid, stride_vn, stride_vd, offs_d, d_valid)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
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
        p = tl.where(_keep(seed, bh, offs_m, start_n, N, dropout_p, BLOCK_N), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


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
    BLOCK_N: tl.constexpr,          # keys per full step
):
    """o and lse of query rows [pid_m * BLOCK_M, +BLOCK_M) of head bh: full key blocks, then tails.

    Grid (B * H, cdiv(N, BLOCK_M)): the large B * H product is axis 0 (axes 1 and 2 stop at 65,535).
    """
    bh = tl.program_id(0)
    Q = _head_base(Q, bh, H, stride_qb, stride_qh)
    K = _head_base(K, bh, H, stride_kb, stride_kh)
    V = _head_base(V, bh, H, stride_vb, stride_vh)
    O = _head_base(O, bh, H, stride_ob, stride_oh)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
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
    full_end = N // BLOCK_N * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _fwd_step(q, K, V, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid,
                                  m_i, l_i, acc, seed, bh, offs_m, qk_scale, dropout_p, KW, KB, k_eps,
                                  HEAD_DIM, K_NORM, DROPOUT, INPUT_PRECISION, BLOCK_N, False)
    for start_n in range(full_end, N, TAIL):
        m_i, l_i, acc = _fwd_step(q, K, V, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, d_valid,
                                  m_i, l_i, acc, seed, bh, offs_m, qk_scale, dropout_p, KW, KB, k_eps,
                                  HEAD_DIM, K_NORM, DROPOUT, INPUT_PRECISION, TAIL, True)

    if DROPOUT:
        acc = acc / (l_i * (1.0 - dropout_p))[:, None]
    else:
        acc = acc / l_i[:, None]
    _store_rows(O, acc, offs_m, m_valid, stride_on, stride_od, offs_d, d_valid)
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=m_valid)


@triton.jit
def _bwd_pair(k, v, dk, dv, Q, DO, LSE, delta_rows, dqt_rows, start_n, start_m, N, rows,
              stride_qn, stride_qd, stride_don, stride_dod, n_valid, offs_d, d_valid, seed, bh, qk_scale, dropout_p,
              DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
              DV: tl.constexpr, DKDQ: tl.constexpr):
    """The (key block, query step [start_m, +BLOCK_Q)) pair: with DV, dv accumulated; with DKDQ,
    dk accumulated and the step's dq^T / scale added to its partial sum in the scratch.
    Returns (dk, dv). q is read as it enters the dots (normalised already with a q-norm).

    Scores are transposed, s^T [BLOCK_N keys, BLOCK_Q queries], so that the query step is the
    N (and K) of every GEMM and may be a TAIL: dv += pd^T dO, dk += ds^T q, dq^T = k^T ds^T.
    """
    offs_m = start_m + tl.arange(0, BLOCK_Q)
    m_valid = offs_m < N
    q = _load_rows(Q, offs_m, m_valid, stride_qn, stride_qd, offs_d, d_valid)
    do = _load_rows(DO, offs_m, m_valid, stride_don, stride_dod, offs_d, d_valid)
    lse = tl.load(LSE + offs_m, mask=m_valid, other=0.0)

    st = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
    # Padded queries and padded keys (whose normed k is the bias, not 0) get p = 0, so they
    # reach no gradient and none of the norms' sums.
    pt = tl.where(n_valid[:, None] & m_valid[None, :], tl.exp2(st - lse[None, :]), 0.0)
    if DROPOUT:
        keep = tl.trans(_keep(seed, bh, offs_m, start_n, N, dropout_p, BLOCK_N))
    if DV:
        pdt = pt
        if DROPOUT:
            pdt = tl.where(keep, pt / (1.0 - dropout_p), 0.0)
        dv += tl.dot(pdt.to(do.dtype), do, input_precision=INPUT_PRECISION)
    if DKDQ:
        delta = tl.load(delta_rows + offs_m, mask=m_valid, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if DROPOUT:
            dpt = tl.where(keep, dpt / (1.0 - dropout_p), 0.0)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=INPUT_PRECISION)
        dqt = tl.dot(tl.trans(k), dst, input_precision=INPUT_PRECISION)
        # The first key block has no partial sum yet (the scratch holds another head's, or nothing).
        dqt_ptrs = dqt_rows + offs_d[:, None] * rows + offs_m[None, :]
        dqt += tl.load(dqt_ptrs, mask=(start_n > 0) & d_valid[:, None] & m_valid[None, :], other=0.0)
        tl.store(dqt_ptrs, dqt, mask=d_valid[:, None] & m_valid[None, :])
    return dk, dv


@triton.jit
def _bwd_queries(k, v, dk, dv, Q, DO, LSE, delta_rows, dqt_rows, start_n, N, rows, stride_qn, stride_qd,
                 stride_don, stride_dod, n_valid, offs_d, d_valid, seed, bh, qk_scale, dropout_p,
                 DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DV: tl.constexpr, DKDQ: tl.constexpr):
    """``_bwd_pair`` over every query: full BLOCK_M steps, then TAIL steps. Returns (dk, dv)."""
    # TAIL-sized full steps run to N (the pair masks anyway): one loop, not two.
    full_end = N
    if BLOCK_M > TAIL:
        full_end = N // BLOCK_M * BLOCK_M
    for start_m in range(0, full_end, BLOCK_M):
        dk, dv = _bwd_pair(k, v, dk, dv, Q, DO, LSE, delta_rows, dqt_rows, start_n, start_m, N, rows, stride_qn,
                           stride_qd, stride_don, stride_dod, n_valid, offs_d, d_valid, seed, bh, qk_scale, dropout_p,
                           DROPOUT, INPUT_PRECISION, BLOCK_N, BLOCK_M, DV, DKDQ)
    if BLOCK_M > TAIL:
        for start_m in range(full_end, N, TAIL):
            dk, dv = _bwd_pair(k, v, dk, dv, Q, DO, LSE, delta_rows, dqt_rows, start_n, start_m, N, rows,
                               stride_qn, stride_qd, stride_don, stride_dod, n_valid, offs_d, d_valid, seed, bh,
                               qk_scale, dropout_p, DROPOUT, INPUT_PRECISION, BLOCK_N, TAIL, DV, DKDQ)
    return dk, dv


@triton.jit
def _bwd_key_block(Q, K, V, DO, LSE, delta_rows, dqt_rows, DK, DV, start_n, N, rows, k_dw, k_db,
                   stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
                   stride_dkn, stride_dkd, stride_dvn, stride_dvd, offs_d, d_valid, seed, bh, scale, qk_scale,
                   dropout_p, KW, KB, k_eps, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, K_NORM: tl.constexpr,
                   DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """dk, dv of keys [start_n, +BLOCK_N) over every query, stored; dq's partial sums updated.
    Returns the k-norm's running (dw, db) with this block's sums added.

    Above 64 lanes of head dim, dv takes its own pass over the queries (scores computed twice,
    6 GEMMs per pair instead of 5): dk and dv together are 2 x 64 x 128 float32 accumulators,
    all of a warpgroup's registers at 128 per thread, and every tile spilled."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    k = _load_normed_rows(K, offs_n, n_valid, stride_kn, stride_kd, offs_d, d_valid, K_NORM, KW, KB, k_eps,
                          HEAD_DIM)[0]
    v = _load_rows(V, offs_n, n_valid, stride_vn, stride_vd, offs_d, d_valid)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # dv (with dk and dq in the same pass at 64 lanes or fewer), then dk and dq on their own above.
    dk, dv = _bwd_queries(k, v, dk, dv, Q, DO, LSE, delta_rows, dqt_rows, start_n, N, rows, stride_qn, stride_qd,
                          stride_don, stride_dod, n_valid, offs_d, d_valid, seed, bh, qk_scale, dropout_p, DROPOUT,
                          INPUT_PRECISION, BLOCK_M, BLOCK_N, True, BLOCK_D <= 64)
    _store_rows(DV, dv, offs_n, n_valid, stride_dvn, stride_dvd, offs_d, d_valid)
    if BLOCK_D > 64:
        dk, dv = _bwd_queries(k, v, dk, dv, Q, DO, LSE, delta_rows, dqt_rows, start_n, N, rows, stride_qn, stride_qd,
                              stride_don, stride_dod, n_valid, offs_d, d_valid, seed, bh, qk_scale, dropout_p,
                              DROPOUT, INPUT_PRECISION, BLOCK_M, BLOCK_N, False, True)
    dk *= scale
    if K_NORM:
        # Normalised again (from L2) rather than kept: k_hat would hold BLOCK_N x BLOCK_D floats
        # of registers through the query loop.
        _, k_hat, k_rstd = _load_normed_rows(K, offs_n, n_valid, stride_kn, stride_kd, offs_d, d_valid, K_NORM,
                                             KW, KB, k_eps, HEAD_DIM)
        dk, k_dw, k_db = _layer_norm_rows_bwd(dk, k_hat, k_rstd, n_valid, KW, offs_d, d_valid, k_dw, k_db, HEAD_DIM)
    _store_rows(DK, dk, offs_n, n_valid, stride_dkn, stride_dkd, offs_d, d_valid)
    return k_dw, k_db


@_autotune("bwd")
@triton.jit
def _attention_bwd(
    Q, K, V, O, DO,                 # (B, H, N, D): the forward's inputs and output, the output's gradient
    LSE,                            # (B * H, N) fp32: the forward's lse
    DQ, DK, DV,                     # (B, H, N, D) out
    SEED, QW, QB, KW, KB,           # as in _attention_fwd
    NORM_GRADS,                     # (B * H, 2, 2, D) fp32 out: per head, [q-norm, k-norm] x [dw, db]
    SCRATCH,                        # (programs, (1 + BLOCK_D) * rows) fp32: per program, delta and dq^T
    NORMED_Q,                       # (programs, rows, BLOCK_D) in q's dtype: the normalised q (Q_NORM only)
    stride_qb, stride_qh, stride_qn, stride_qd,     # (batch, head, token, feature) strides of q, k, v,
    stride_kb, stride_kh, stride_kn, stride_kd,     # o, dO, dq, dk, dv
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    BH, H, N,                       # batch * heads, heads, tokens
    rows,                           # scratch_rows(N): N rounded up to TAIL
    scale, qk_scale,                # softmax scale; scale * log2(e)
    q_eps, k_eps, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
         blocks so far is read from, and written back to, the scratch slot;
      3. dq_i read back from the scratch as rows, scaled, taken through the q-norm into DQ.
    Each pair's scores are computed once (5 GEMMs per pair, not the 7 of a split dk/dv + dq
    backward; 6 above 64 lanes, see ``_bwd_key_block``), delta costs no launch, every sum
    runs in a fixed order (no atomics: bitwise deterministic), and each of q, k, v, o, dO is
    read from DRAM once: the program's re-reads of a head's q and dO (one per key block) and
    its scratch slot (2 x 132 slots, 52 KB each at N = 197, D = 64) stay in L2. Programs are
    persistent (``backward_programs``): the scratch is per program, not per head. The price is
    parallelism: a head is one program, so a long sequence with few heads (N = 4096, B * H = 4)
    leaves most SMs idle. Barriers order the scratch's writes and reads between threads.
    """
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    delta_rows = SCRATCH + pid.to(tl.int64) * (1 + BLOCK_D) * rows
    dqt_rows = delta_rows + rows
    normed_q_rows = NORMED_Q + pid.to(tl.int64) * rows * BLOCK_D
    seed = tl.load(SEED) if DROPOUT else 0
    for head in range(pid, BH, tl.num_programs(0)):
        bh = tl.cast(head, tl.int64)  # a tensor in the interpreter too, and 64-bit for the offsets
        q_ptr = _head_base(Q, bh, H, stride_qb, stride_qh)
        k_ptr = _head_base(K, bh, H, stride_kb, stride_kh)
        v_ptr = _head_base(V, bh, H, stride_vb, stride_vh)
        do_ptr = _head_base(DO, bh, H, stride_dob, stride_doh)
        lse_ptr = LSE + bh.to(tl.int64) * N
        o_ptr = _head_base(O, bh, H, stride_ob, stride_oh)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < N
            o = _load_rows(o_ptr, offs_m, m_valid, stride_on, stride_od, offs_d, d_valid)
            do = _load_rows(do_ptr, offs_m, m_valid, stride_don, stride_dod, offs_d, d_valid)
            tl.store(delta_rows + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=m_valid)
            if Q_NORM:
                q = _load_normed_rows(q_ptr, offs_m, m_valid, stride_qn, stride_qd, offs_d, d_valid, Q_NORM, QW,
                                      QB, q_eps, HEAD_DIM)[0]
                _store_rows(normed_q_rows, q, offs_m, m_valid, BLOCK_D, 1, offs_d, d_valid)
        # The scratch is written and read by different threads of the program.
        tl.debug_barrier()

        dq_ptr = _head_base(DQ, bh, H, stride_dqb, stride_dqh)
        dk_ptr = _head_base(DK, bh, H, stride_dkb, stride_dkh)
        dv_ptr = _head_base(DV, bh, H, stride_dvb, stride_dvh)
        # The dots read q from the scratch when it is normalised (once per head, not per key block).
        q_dots, stride_dots_n, stride_dots_d = q_ptr, stride_qn, stride_qd
        if Q_NORM:
            q_dots, stride_dots_n, stride_dots_d = normed_q_rows, BLOCK_D, 1
        k_dw = tl.zeros([BLOCK_D], tl.float32)
        k_db = tl.zeros([BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            k_dw, k_db = _bwd_key_block(q_dots, k_ptr, v_ptr, do_ptr, lse_ptr, delta_rows, dqt_rows, dk_ptr, dv_ptr,
                                        start_n, N, rows, k_dw, k_db, stride_dots_n, stride_dots_d, stride_kn,
                                        stride_kd, stride_vn, stride_vd, stride_don, stride_dod, stride_dkn,
                                        stride_dkd, stride_dvn, stride_dvd, offs_d, d_valid, seed, bh, scale, qk_scale,
                                        dropout_p, KW, KB, k_eps, HEAD_DIM, BLOCK_D, K_NORM, DROPOUT,
                                        INPUT_PRECISION, BLOCK_M, BLOCK_N)
            tl.debug_barrier()

        # dq: the scratch's dq^T read back as rows, scaled, taken through the q-norm.
        q_dw = tl.zeros([BLOCK_D], tl.float32)
        q_db = tl.zeros([BLOCK_D], tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < N
            dq = tl.load(dqt_rows + offs_m[:, None] + offs_d[None, :] * rows,
                         mask=m_valid[:, None] & d_valid[None, :], other=0.0) * scale
            if Q_NORM:
                _, q_hat, q_rstd = _load_normed_rows(q_ptr, offs_m, m_valid, stride_qn, stride_qd, offs_d, d_valid,
                                                     Q_NORM, QW, QB, q_eps, HEAD_DIM)
                dq, q_dw, q_db = _layer_norm_rows_bwd(dq, q_hat, q_rstd, m_valid, QW, offs_d, d_valid, q_dw, q_db,
                                                      HEAD_DIM)
            _store_rows(dq_ptr, dq, offs_m, m_valid, stride_dqn, stride_dqd, offs_d, d_valid)
        grads = NORM_GRADS + bh.to(tl.int64) * 4 * HEAD_DIM + offs_d
        if Q_NORM:
            tl.store(grads, q_dw, mask=d_valid)
            tl.store(grads + HEAD_DIM, q_db, mask=d_valid)
        if K_NORM:
            tl.store(grads + 2 * HEAD_DIM, k_dw, mask=d_valid)
            tl.store(grads + 3 * HEAD_DIM, k_db, mask=d_valid)
        # The next head's delta overwrites the scratch this head's last block read.
        tl.debug_barrier()
