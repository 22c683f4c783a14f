"""Residual add (LayerScale ``gamma``, DropPath ``row_scale``) fused with the LayerNorm after it.

Shapes: every activation is viewed as (rows, C); ``row_scale`` has one entry per sample and row
``m`` belongs to sample ``m // rows_per_sample``. A program owns ``BLOCK_M`` whole rows and walks
their columns in chunks of ``BLOCK_N`` (see ``add_layer_norm_config``).

Forward, per row (fp32):
    h     = residual + gamma * s * x            rounded to new_residual's dtype (it is stored)
    mean  = sum(h) / C                          chunk means (corrected: see _chunk_moments) and
    var   = sum((h - mean)^2) / C               centred sums of squares, combined with Chan's
                                                formula: no E[h^2] - mean^2 cancellation
    rstd  = 1 / sqrt(var + eps)                 NaN if var overflowed (as PyTorch's LayerNorm gives)
    xhat  = (h - mean) * rstd
    y     = xhat * w + b

A constant row normalises to exactly the bias, as in PyTorch.

Backward, per row, with dy the gradient of y and dnr the gradient arriving at new_residual:
    wdy   = dy * w
    c1    = sum(xhat * wdy) / C
    c2    = sum(wdy) / C
    dh    = rstd * (wdy - xhat * c1 - c2) + dnr
    d(residual) = dh
    d(x)        = dh * gamma * s
    d(w)        = sum over rows of dy * xhat
    d(b)        = sum over rows of dy
    d(gamma)    = sum over rows of dh * s * x
    d(s)[b]     = sum over the rows of sample b and the columns of dh * gamma * x
The column sums are written per program (one fp32 row of partials each) and summed on the host
in a fixed order, so the result is deterministic (no atomics).
"""
from __future__ import annotations

import triton
import triton.language as tl

# The widest chunk a program holds per row; wider rows are walked in chunks.
MAX_BLOCK_N = 4096
# A row wider than this is not supported (rows are walked in chunks, so this is a sanity bound).
MAX_WIDTH = 1 << 20
# About this many elements per program tile: enough bytes in flight per program on a GPU without
# spilling. The interpreter's cost is per program and op, not per element, so it gets wide tiles,
# but at most 32 rows: it sums a column of a tile one row after another (numpy along axis 0), and
# the d(w), d(b), d(gamma) partials must stay as accurate as PyTorch's pairwise sums.
TILE_ELEMENTS = 4096
INTERPRETER_TILE_ELEMENTS = 1 << 16
INTERPRETER_MAX_BLOCK_M = 32


def add_layer_norm_config(width: int, rows: int, interpret: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``width`` features (``interpret``: for the CPU interpreter).

    BLOCK_N is the whole row rounded up to a power of two when that pads by at most 1/8
    (1000 -> 1024 in one chunk); otherwise the widest power-of-two chunk that tiles the row
    with at most 1/8 padding (768 = 3 x 256, 1280 = 5 x 256, 384 = 3 x 128, 192 = 3 x 64), so
    no quarter of the lanes idles as it would in a 1024-wide tile of a 768-wide row.
    """
    if not 0 < width <= MAX_WIDTH:
        raise ValueError(f"add_layer_norm supports 1 <= width <= {MAX_WIDTH}; got width {width}")
    full = triton.next_power_of_2(width)
    if full <= MAX_BLOCK_N and (full - width) * 8 <= width:
        block_n = full
    else:
        block_n = 16
        for candidate in (MAX_BLOCK_N, 2048, 1024, 512, 256, 128, 64, 32):
            if candidate <= width and (triton.cdiv(width, candidate) * candidate - width) * 8 <= width:
                block_n = candidate
                break
    tile = INTERPRETER_TILE_ELEMENTS if interpret else TILE_ELEMENTS
    block_m = max(1, min(tile // block_n, triton.next_power_of_2(rows)))
    if interpret:
        block_m = min(block_m, INTERPRETER_MAX_BLOCK_M)
    num_warps = 8 if block_m * block_n >= 4096 else 4
    return block_m, block_n, num_warps


@triton.jit
def _residual_chunk(X, R, G, s, x_rows, r_rows, row_ok, cols, stride_xn, stride_rn, width,
                    HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                    OUT_DTYPE: tl.constexpr):
    """(h, mask) of the (BLOCK_M, BLOCK_N) chunk at columns ``cols``: h = residual + gamma * s * x
    in fp32, 0 in the lanes the mask drops (rows past ``rows``, columns past ``width``)."""
    mask = row_ok[:, None] & (cols < width)[None, :]
    col_off = cols.to(tl.int64)
    h = tl.load(X + x_rows[:, None] + (col_off * stride_xn)[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        h *= tl.load(G + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
    if HAS_ROW_SCALE:
        h *= s[:, None]
    if HAS_RESIDUAL:
        h += tl.load(R + r_rows[:, None] + (col_off * stride_rn)[None, :], mask=mask, other=0.0).to(tl.float32)
    # Normalise exactly the new_residual that is stored (normed = LayerNorm(new_residual)), so the
    # backward, which reads it back, sees the same xhat as the forward.
    return h.to(OUT_DTYPE).to(tl.float32), mask


@triton.jit
def _chunk_moments(h, mask, n):
    """(mean, sum of squared deviations) of each row of the chunk h over its n valid lanes.

    Two-pass with a corrected mean: sum(h) / n rounds (197 copies of 100.3 gave a mean 7.6e-6
    off, 7.6e-3 after normalising at eps 1e-6), and the mean of the deviations from it brings
    it back: exactly, for a constant row, as PyTorch's Welford mean is."""
    mean = tl.sum(h, axis=1) / n
    centred = tl.where(mask, h - mean[:, None], 0.0)
    correction = tl.sum(centred, axis=1) / n
    return mean + correction, tl.sum(centred * centred, axis=1) - n * correction * correction


@triton.jit
def _normalise_chunk(Y, W, B, h, mean, rstd, y_rows, cols, mask, width,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = (h - mean[:, None]) * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + y_rows[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_layer_norm_fwd(
    X,                  # (rows, C) x, any strides
    R,                  # (rows, C) residual, any strides (read with HAS_RESIDUAL)
    G,                  # (C,) LayerScale gamma (HAS_GAMMA)
    S,                  # (rows // rows_per_sample,) DropPath row_scale, one per sample (HAS_ROW_SCALE)
    W, B,               # (C,) LayerNorm weight and bias (HAS_WEIGHT, HAS_BIAS)
    Y,                  # (rows, C) out: normed, x's dtype, contiguous
    NR,                 # (rows, C) out: new_residual, contiguous; without STORE_RESIDUAL it is X
                        # itself (new_residual = x) and only its dtype is used
    Mean, Rstd,         # (rows,) fp32 out: the row statistics the backward reads
    rows, width,        # the (rows, C) shape
    rows_per_sample,    # row m belongs to sample m // rows_per_sample
    eps,
    stride_xm, stride_xn, stride_rm, stride_rn,
    BLOCK_M: tl.constexpr,          # rows per program
    BLOCK_N: tl.constexpr,          # columns per chunk
    HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
    ONE_CHUNK: tl.constexpr,        # width <= BLOCK_N
):
    """Program ``pid`` owns rows [pid * BLOCK_M, (pid + 1) * BLOCK_M) of every (rows, C) tensor.

    ONE_CHUNK compiles without the chunk loops: never run for such rows, they still cost
    registers (ptxas spilled the 1024-wide fp16 forward at 64 with them).
    """
    # The program's first row goes into the base pointers (scalars) and Y and NR share one row
    # offset: each thread holds every row of its tile, so each per-row offset vector costs
    # 2 * BLOCK_M registers. With one vector per tensor of absolute rows, ptxas held this
    # kernel to 64 registers by spilling (sm_90 compile report, triton 3.6 and 3.8).
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * BLOCK_M
    X += first * stride_xm
    R += first * stride_rm
    Y += first * width
    NR += first * width
    local = tl.arange(0, BLOCK_M).to(tl.int64)
    row = first + local
    row_ok = local < rows - first
    cols = tl.arange(0, BLOCK_N)
    x_rows = local * stride_xm
    r_rows = local * stride_rm
    out_rows = local * width
    s = 1.0
    if HAS_ROW_SCALE:
        s = tl.load(S + row // rows_per_sample, mask=row_ok, other=0.0).to(tl.float32)

    # Pass 1: h chunk by chunk; store new_residual; running (count, mean, m2) per row.
    # Chunk 0 stays in registers for pass 2, so a row that fits one chunk is read once.
    h0, mask0 = _residual_chunk(X, R, G, s, x_rows, r_rows, row_ok, cols, stride_xn, stride_rn, width,
                                HAS_RESIDUAL, HAS_GAMMA, HAS_ROW_SCALE, NR.dtype.element_ty)
    if STORE_RESIDUAL:
        tl.store(NR + out_rows[:, None] + cols[None, :], h0.to(NR.dtype.element_ty), mask=mask0)
    count = tl.minimum(width, BLOCK_N).to(tl.float32)
    mean, m2 = _chunk_moments(h0, mask0, count)
    if not ONE_CHUNK:
        for start in range(BLOCK_N, width, BLOCK_N):
            c = start + cols
            h, mask = _residual_chunk(X, R, G, s, x_rows, r_rows, row_ok, c, stride_xn, stride_rn, width,
                                      HAS_RESIDUAL, HAS_GAMMA, HAS_ROW_SCALE, NR.dtype.element_ty)
            if STORE_RESIDUAL:
                tl.store(NR + out_rows[:, None] + c[None, :], h.to(NR.dtype.element_ty), mask=mask)
            n_c = tl.minimum(width - start, BLOCK_N).to(tl.float32)
            mean_c, m2_c = _chunk_moments(h, mask, n_c)
            # Chan et al.: merge (count, mean, m2) with the chunk's (n_c, mean_c, m2_c).
            total = count + n_c
            delta = mean_c - mean
            mean += delta * (n_c / total)
            m2 += m2_c + delta * delta * (count * n_c / total)
            count = total
    var = m2 / width
    rstd = tl.where(var < float("inf"), 1.0 / tl.sqrt(var + eps), float("nan"))
    tl.store(Mean + row, mean, mask=row_ok)
    tl.store(Rstd + row, rstd, mask=row_ok)

    # Pass 2: normalise. Later chunks are recomputed from x and residual (cache-resident).
    _normalise_chunk(Y, W, B, h0, mean, rstd, out_rows, cols, mask0, width, HAS_WEIGHT, HAS_BIAS)
    if not ONE_CHUNK:
        for start in range(BLOCK_N, width, BLOCK_N):
            c = start + cols
            h, mask = _residual_chunk(X, R, G, s, x_rows, r_rows, row_ok, c, stride_xn, stride_rn, width,
                                      HAS_RESIDUAL, HAS_GAMMA, HAS_ROW_SCALE, NR.dtype.element_ty)
            _normalise_chunk(Y, W, B, h, mean, rstd, out_rows, c, mask, width, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def _bwd_load_chunk(DY, H, W, mean, rstd, dy_rows, h_rows, row_ok, cols, stride_dyn, stride_hn, width,
                    HAS_WEIGHT: tl.constexpr):
    """(dy, xhat, wdy, mask) of the chunk at columns ``cols``: fp32, 0 in the lanes the mask drops."""
    mask = row_ok[:, None] & (cols < width)[None, :]
    col_off = cols.to(tl.int64)
    dy = tl.load(DY + dy_rows[:, None] + (col_off * stride_dyn)[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + h_rows[:, None] + (col_off * stride_hn)[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy
    if HAS_WEIGHT:
        wdy = dy * tl.load(W + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
    return dy, xhat, wdy, mask


@triton.jit
def _bwd_store_chunk(DNR, X, G, DX, DR, DGp, xhat, wdy, c1, c2, rstd, s, row_acc,
                     dnr_rows, x_rows, dx_rows, dr_rows, part_row, cols, mask,
                     stride_dnrn, stride_xn, width,
                     HAS_DNR: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                     STORE_DR: tl.constexpr, ROW_SCALE_GRAD: tl.constexpr):
    """Store d(x), d(residual) and the d(gamma) partials of a chunk; return row_acc += d(s) terms."""
    col_off = cols.to(tl.int64)
    dh = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if HAS_DNR:
        dh += tl.load(DNR + dnr_rows[:, None] + (col_off * stride_dnrn)[None, :], mask=mask,
                      other=0.0).to(tl.float32)
    if STORE_DR:
        tl.store(DR + dr_rows[:, None] + cols[None, :], dh.to(DR.dtype.element_ty), mask=mask)
    dx = dh
    if HAS_GAMMA or HAS_ROW_SCALE:
        x = tl.load(X + x_rows[:, None] + (col_off * stride_xn)[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            g = tl.load(G + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
            dx = dx * g
            dhx = dh * x
            if HAS_ROW_SCALE:
                dhx = dhx * s[:, None]
            tl.store(DGp + part_row + cols, tl.sum(dhx, axis=0), mask=cols < width)
        if ROW_SCALE_GRAD:
            row_acc += tl.sum(dx * x, axis=1)
        if HAS_ROW_SCALE:
            dx = dx * s[:, None]
    tl.store(DX + dx_rows[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    return row_acc


@triton.jit
def _add_layer_norm_bwd(
    DY,                 # (rows, C) gradient of normed, any strides
    DNR,                # (rows, C) gradient arriving at new_residual, any strides (read with HAS_DNR)
    H,                  # (rows, C) new_residual as the forward stored it (x when new_residual is x)
    X,                  # (rows, C) x (read with HAS_GAMMA or HAS_ROW_SCALE)
    G, S, W,            # gamma, row_scale and LayerNorm weight, as in the forward
    Mean, Rstd,         # (rows,) fp32 from the forward
    DX,                 # (rows, C) out: d(x), unit column stride
    DR,                 # (rows, C) out: d(residual), unit column stride (written with STORE_DR)
    DWp, DBp, DGp,      # (programs, C) fp32 out: per-program column partials of d(w), d(b), d(gamma)
    DS,                 # (rows,) fp32 out: per-row d(row_scale) terms, summed per sample on the host
    rows, width, rows_per_sample,   # as in the forward
    stride_dym, stride_dyn, stride_dnrm, stride_dnrn, stride_hm, stride_hn,
    stride_xm, stride_xn, stride_dxm, stride_drm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DNR: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_DR: tl.constexpr,
    ROW_SCALE_GRAD: tl.constexpr,   # write DS
):
    """Program ``pid`` owns rows [pid * BLOCK_M, (pid + 1) * BLOCK_M) and row ``pid`` of the partials."""
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = row < rows
    cols = tl.arange(0, BLOCK_N)
    dy_rows = row * stride_dym
    dnr_rows = row * stride_dnrm
    h_rows = row * stride_hm
    x_rows = row * stride_xm
    dx_rows = row * stride_dxm
    dr_rows = row * stride_drm
    part_row = pid.to(tl.int64) * width
    mean = tl.load(Mean + row, mask=row_ok, other=0.0)
    rstd = tl.load(Rstd + row, mask=row_ok, other=0.0)
    s = 1.0
    if HAS_ROW_SCALE:
        s = tl.load(S + row // rows_per_sample, mask=row_ok, other=0.0).to(tl.float32)

    # Pass 1: the row sums c1, c2 and the d(w), d(b) partials. Chunk 0 stays in registers.
    dy0, xhat0, wdy0, mask0 = _bwd_load_chunk(DY, H, W, mean, rstd, dy_rows, h_rows, row_ok, cols,
                                              stride_dyn, stride_hn, width, HAS_WEIGHT)
    c1 = tl.sum(xhat0 * wdy0, axis=1)
    c2 = tl.sum(wdy0, axis=1)
    if HAS_WEIGHT:
        tl.store(DWp + part_row + cols, tl.sum(dy0 * xhat0, axis=0), mask=cols < width)
    if HAS_BIAS:
        tl.store(DBp + part_row + cols, tl.sum(dy0, axis=0), mask=cols < width)
    for start in range(BLOCK_N, width, BLOCK_N):
        c = start + cols
        dy, xhat, wdy, mask = _bwd_load_chunk(DY, H, W, mean, rstd, dy_rows, h_rows, row_ok, c,
                                              stride_dyn, stride_hn, width, HAS_WEIGHT)
        c1 += tl.sum(xhat * wdy, axis=1)
        c2 += tl.sum(wdy, axis=1)
        if HAS_WEIGHT:
            tl.store(DWp + part_row + c, tl.sum(dy * xhat, axis=0), mask=c < width)
        if HAS_BIAS:
            tl.store(DBp + part_row + c, tl.sum(dy, axis=0), mask=c < width)
    c1 /= width
    c2 /= width

    # Pass 2: dh and everything that follows from it.
    row_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_acc = _bwd_store_chunk(DNR, X, G, DX, DR, DGp, xhat0, wdy0, c1, c2, rstd, s, row_acc,
                               dnr_rows, x_rows, dx_rows, dr_rows, part_row, cols, mask0,
                               stride_dnrn, stride_xn, width,
                               HAS_DNR, HAS_GAMMA, HAS_ROW_SCALE, STORE_DR, ROW_SCALE_GRAD)
    for start in range(BLOCK_N, width, BLOCK_N):
        c = start + cols
        dy, xhat, wdy, mask = _bwd_load_chunk(DY, H, W, mean, rstd, dy_rows, h_rows, row_ok, c,
                                              stride_dyn, stride_hn, width, HAS_WEIGHT)
        row_acc = _bwd_store_chunk(DNR, X, G, DX, DR, DGp, xhat, wdy, c1, c2, rstd, s, row_acc,
                                   dnr_rows, x_rows, dx_rows, dr_rows, part_row, c, mask,
                                   stride_dnrn, stride_xn, width,
                                   HAS_DNR, HAS_GAMMA, HAS_ROW_SCALE, STORE_DR, ROW_SCALE_GRAD)
    if ROW_SCALE_GRAD:
        tl.store(DS + row, row_acc, mask=row_ok)
